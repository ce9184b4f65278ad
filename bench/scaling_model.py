"""Wall time of one archive run of a large cluster on N storage nodes, from measured costs.

A model, not a measurement: per-host load cost and finalize's rows per CPU-second come
from `bench.finalize_rate` (measured); the cluster's size, the cores per node, the network
and the stitch's copy rate are assumptions, named in `Cluster` and `Costs`.

    python -m bench.scaling_model --load-us-per-row 0.025 --finalize-m-rows 27
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    """The run being modelled (issue 13: a 3,000-node cluster, ~2 billion rows per run)."""

    hosts: int = 3_000
    rows: float = 2e9
    cores_per_node: int = 2
    #: Network of the finalize node (10 GbE, an assumption): it pulls every staged chunk.
    network_bytes_per_s: float = 1.25e9


@dataclass(frozen=True)
class Costs:
    """Per-row costs of today's steps (measured) and of the stitched design (bench/stitch.py)."""

    load_s_per_row: float  # steps.load_host, CPU-s per row (measured)
    finalize_rows_per_s: float  # steps.finalize_cluster, rows per CPU-s (measured)
    chunk_bytes_per_row: float  # staged Arrow IPC (lz4) chunk (measured)
    archive_bytes_per_row: float  # the Parquet archive (measured)
    #: Encoding a host's row group inside its load task, CPU-s per row: measured by
    #: bench/stitch.py; None: finalize's own rate (which also reads the chunk back), an upper bound.
    encode_s_per_row: float | None = None
    #: Stitching one host's row group into the archive (byte copy, offsets, page index and
    #: footer entries), CPU-s: measured by bench/stitch.py (pure Python); None: estimated
    #: from the archive's bytes at `stitch_bytes_per_s`.
    stitch_s_per_host: float | None = None
    #: The load task reading its part back to check the rows' digest, CPU-s per row:
    #: measured by bench/stitch.py; 0 leaves the check out.
    check_s_per_row: float = 0.0
    stitch_bytes_per_s: float = 1e9  # an assumption: one sequential copy


@dataclass(frozen=True)
class Wall:
    """Modelled wall seconds of one run on `nodes` storage nodes."""

    nodes: int
    load: float  # all loads, parallel over every core (no finalize)
    finalize: float  # the serial finalize, one core
    chord: float  # finalize after the last load (the Celery chord)
    streamed: float  # finalize follows the loads host by host on one core of one node
    stitched: float  # loads encode their row groups; finalize copies bytes (a prototype)

    @property
    def serial_share(self) -> float:
        """Share of the chord run's wall time spent in the serial finalize."""
        return self.finalize / self.chord


def wall(costs: Costs, nodes: int, cluster: Cluster = Cluster()) -> Wall:
    """The modelled run: equal hosts, loads spread evenly, no scheduling overhead."""
    per_host_rows = cluster.rows / cluster.hosts
    t_load = costs.load_s_per_row * per_host_rows  # one host's load, one core
    t_write = per_host_rows / costs.finalize_rows_per_s  # one host through finalize
    cores = nodes * cluster.cores_per_node
    finalize = cluster.rows / costs.finalize_rows_per_s
    pull = cluster.rows * costs.chunk_bytes_per_row / cluster.network_bytes_per_s
    # The serial step reads the chunks from shared staging while it writes: it takes the
    # longer of its CPU time and the transfer (single node: local, no transfer).
    serial = max(finalize, pull if nodes > 1 else 0.0)
    load = math.ceil(cluster.hosts / cores) * t_load
    chord = load + serial
    # Streamed: one core writes, the others load; the writer is done one host after the
    # last load at the earliest, and never before its own serial work is done.
    load_minus_writer = math.ceil(cluster.hosts / max(cores - 1, 1)) * t_load
    streamed = max(load_minus_writer + t_write, t_load + serial)
    encode = (
        costs.encode_s_per_row
        if costs.encode_s_per_row is not None
        else 1 / costs.finalize_rows_per_s
    )
    out_bytes = cluster.rows * costs.archive_bytes_per_row
    if costs.stitch_s_per_host is not None:
        copy = cluster.hosts * costs.stitch_s_per_host
    else:
        copy = out_bytes / costs.stitch_bytes_per_s
    # The finalize node pulls the encoded row groups (not the larger chunks) from staging.
    copy = max(copy, out_bytes / cluster.network_bytes_per_s if nodes > 1 else 0.0)
    t_task = t_load + (encode + costs.check_s_per_row) * per_host_rows
    stitched = math.ceil(cluster.hosts / cores) * t_task + copy
    return Wall(nodes, load, serial, chord, streamed, stitched)


def render_model(costs_by_shape: dict[str, Costs], nodes: tuple[int, ...] = (1, 4, 16, 64)) -> str:
    """One Markdown table per input shape: modelled wall seconds per node count."""
    c = Cluster()
    lines = [
        f"Model: {c.hosts:,} hosts, {c.rows / 1e9:.0f} billion rows per run "
        f"({c.rows / c.hosts:,.0f} rows = one row group per host), {c.cores_per_node} cores "
        f"per storage node, finalize node on {c.network_bytes_per_s * 8 / 1e9:.0f} Gbit/s. "
        "Wall seconds; loads parallel over all cores, finalize serial on one core. Stitched: "
        "each load task also encodes its host's row group and reads it back to check the "
        "digest; finalize copies the bytes.",
    ]
    for shape, costs in costs_by_shape.items():
        per_host = costs.load_s_per_row * c.rows / c.hosts
        lines += [
            "",
            f"**{shape}**: load {per_host:.2f} CPU-s per host "
            f"({1 / costs.load_s_per_row / 1e6:.1f} M rows/CPU-s), finalize "
            f"{costs.finalize_rows_per_s / 1e6:.1f} M rows/CPU-s.",
            "",
            "| storage nodes | cores | all loads | serial finalize | chord (Celery today) "
            "| serial share | streamed (embedded today) | stitched (prototype costs) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in nodes:
            w = wall(costs, n, c)
            lines.append(
                f"| {n} | {n * c.cores_per_node} | {w.load:.0f} | {w.finalize:.0f} | {w.chord:.0f} "
                f"| {w.serial_share:.0%} | {w.streamed:.0f} | {w.stitched:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the model's table for costs given on the command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.scaling_model", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--load-us-per-row", type=float, required=True, help="measured load CPU µs per row"
    )
    p.add_argument(
        "--finalize-m-rows", type=float, required=True, help="measured finalize M rows/CPU-s"
    )
    p.add_argument("--chunk-bytes-per-row", type=float, default=4.0)
    p.add_argument("--archive-bytes-per-row", type=float, default=0.83)
    p.add_argument("--stitch-mb-per-s", type=float, default=1000.0)
    p.add_argument(
        "--encode-m-rows", type=float, help="a load task's row-group encoding, M rows/CPU-s"
    )
    p.add_argument("--stitch-ms-per-host", type=float, help="stitching CPU ms per host")
    p.add_argument("--check-m-rows", type=float, help="a load task's read-back check, M rows/CPU-s")
    opts = p.parse_args(argv)
    costs = Costs(
        load_s_per_row=opts.load_us_per_row * 1e-6,
        finalize_rows_per_s=opts.finalize_m_rows * 1e6,
        chunk_bytes_per_row=opts.chunk_bytes_per_row,
        archive_bytes_per_row=opts.archive_bytes_per_row,
        stitch_bytes_per_s=opts.stitch_mb_per_s * 1e6,
        encode_s_per_row=1 / (opts.encode_m_rows * 1e6) if opts.encode_m_rows else None,
        stitch_s_per_host=opts.stitch_ms_per_host / 1e3 if opts.stitch_ms_per_host else None,
        check_s_per_row=1 / (opts.check_m_rows * 1e6) if opts.check_m_rows else 0.0,
    )
    print(render_model({"given costs": costs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

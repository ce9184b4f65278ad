"""One measured step per process: `python -m bench.probes STEP ARGS_JSON` prints one JSON line.

Each step imports what it needs, then times only its work with CPU time (all threads of
the process, plus waited-for children for the runner) and wall time, and reports the
process's peak RSS (ru_maxrss). Running every step in a fresh interpreter keeps the peak
of one step from hiding in another's, and gives every step the same cold start.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _files(tree: str, suffix: str) -> Iterator[Path]:
    for cluster in sorted(os.listdir(tree)):
        for host in sorted(os.listdir(os.path.join(tree, cluster))):
            host_dir = Path(tree, cluster, host)
            for name in sorted(os.listdir(host_dir)):
                if name.endswith(suffix):
                    yield host_dir / name


def _hosts(tree: str) -> Iterator[tuple[str, str]]:
    for cluster in sorted(os.listdir(tree)):
        for host in sorted(os.listdir(os.path.join(tree, cluster))):
            yield cluster, host


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _measure(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `work` once; add cpu (s), wall (s), peak RSS (MB) of this process and children."""
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, child0, wall0 = time.process_time(), _children_cpu(), time.perf_counter()
    out = work()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0 + _children_cpu() - child0
    out.update(
        cpu=cpu,
        wall=wall,
        rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_before_mb=base_rss / 1024,
        children_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    )
    return out


# --- probes -----------------------------------------------------------------------------


def noop(args: dict[str, Any]) -> dict[str, Any]:
    """Interpreter plus the project's imports: the floor under every RSS figure."""
    import numpy  # noqa: F401
    import orjson  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import workers.steps  # noqa: F401

    return _measure(lambda: {})


def read(args: dict[str, Any]) -> dict[str, Any]:
    """Read every checkpoint file's bytes, nothing else: the I/O floor (page cache)."""
    paths = list(_files(args["tree"], args["suffix"]))

    def work() -> dict[str, Any]:
        total = 0
        for p in paths:
            total += len(p.read_bytes())
        return {"bytes_in": total}

    return _measure(work)


def parse_only(args: dict[str, Any]) -> dict[str, Any]:
    """Read and parse every JSON file with orjson, doing nothing with the result."""
    import orjson

    paths = list(_files(args["tree"], ".json"))

    def work() -> dict[str, Any]:
        total = 0
        for p in paths:
            data = p.read_bytes()
            total += len(data)
            orjson.loads(data)
        return {"bytes_in": total}

    return _measure(work)


def decode(args: dict[str, Any]) -> dict[str, Any]:
    """Read and decode every file with our readers (checkpoint.parse_json/parse_binary)."""
    from workers.checkpoint import parse_binary, parse_json

    parse = parse_binary if args["suffix"] == ".bin" else parse_json
    paths = list(_files(args["tree"], args["suffix"]))

    def work() -> dict[str, Any]:
        total = 0
        for p in paths:
            data = p.read_bytes()
            total += len(data)
            parse(data)
        return {"bytes_in": total}

    return _measure(work)


def load(args: dict[str, Any]) -> dict[str, Any]:
    """Our load step (steps.load_host) for every host; manifests saved for finalize."""
    from workers import steps

    hosts = list(_hosts(args["tree"]))
    manifests: list[dict[str, Any]] = []

    def work() -> dict[str, Any]:
        rows = 0
        for cluster, host in hosts:
            m = steps.load_host(
                args["tree"], cluster, host, args["cutoff"], args["staging"], args["run_id"]
            )
            if m.bad:
                raise RuntimeError(f"unexpected bad files: {m.bad}")
            rows += m.rows
            manifests.append(m.to_dict())
        return {"rows_out": rows}

    out = _measure(work)
    Path(args["manifests"]).write_text(json.dumps(manifests))
    out["chunk_bytes"] = sum(os.path.getsize(m["chunk"]) for m in manifests if m["chunk"])
    return out


def finalize(args: dict[str, Any]) -> dict[str, Any]:
    """Our finalize step: the staged chunks of one cluster into its verified archive."""
    from workers import steps
    from workers.manifest import HostManifest

    manifests = [HostManifest.from_dict(m) for m in json.loads(Path(args["manifests"]).read_text())]
    clusters = sorted({m.cluster for m in manifests})

    def work() -> dict[str, Any]:
        rows = size = 0
        for cluster in clusters:
            info = steps.finalize_cluster(
                cluster,
                args["cutoff"],
                args["run_id"],
                [m for m in manifests if m.cluster == cluster],
                args["archive"],
            )
            if info is not None:
                rows += info.rows
                size += info.bytes
        return {"rows_out": rows, "bytes_out": size}

    return _measure(work)


def naive(args: dict[str, Any]) -> dict[str, Any]:
    """The naive baseline script (bench/naive.py) over the whole tree."""
    from bench import naive as baseline

    def work() -> dict[str, Any]:
        rows = size = 0
        for cluster in sorted(os.listdir(args["tree"])):
            n, path = baseline.archive_cluster(args["tree"], cluster, args["out"])
            rows += n
            size += os.path.getsize(path) if path else 0
        return {"rows_out": rows, "bytes_out": size}

    return _measure(work)


def pyarrow_write(args: dict[str, Any]) -> dict[str, Any]:
    """pyarrow writing the archive's rows, already in memory, to Parquet.

    Timed: plain zstd, as the naive script writes. Also reported (not timed): the size
    with pyarrow's default settings (dictionary encoding) and zstd.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers import chunks, sink
    from workers.rows import ARCHIVE_SCHEMA

    manifests = json.loads(Path(args["manifests"]).read_text())
    parts = [
        sink._with_names(m["cluster"], m["host"], pa.Table.from_batches(chunks.read_chunk(c)))
        for m in manifests
        if (c := m["chunk"])
    ]
    # Plain string columns, as a user's table would have them.
    table = pa.concat_tables(parts).cast(ARCHIVE_SCHEMA).combine_chunks()
    del parts
    out = os.path.join(args["out"], "probe.parquet")
    os.makedirs(args["out"], exist_ok=True)

    def work() -> dict[str, Any]:
        pq.write_table(table, out, compression="zstd", use_dictionary=False)
        return {"rows_out": table.num_rows, "bytes_out": os.path.getsize(out)}

    result = _measure(work)
    pq.write_table(table, out, compression="zstd")
    result["bytes_out_default"] = os.path.getsize(out)
    return result


def parquet_sweep(args: dict[str, Any]) -> dict[str, Any]:
    """The archive's rows written with our writer settings, then with one setting changed.

    Same rows (from the staged chunks), same row groups; bytes per row and M rows per
    CPU-second of the writer alone. The evidence behind sink._writer_options.
    """
    import io

    import pyarrow.parquet as pq

    from workers import chunks, sink

    manifests = json.loads(Path(args["manifests"]).read_text())
    tables = [
        t
        for m in manifests
        if m["chunk"]
        for t in sink._row_groups(m["cluster"], m["host"], chunks.read_chunk(m["chunk"]), 1_048_576)
    ]
    rows = sum(t.num_rows for t in tables)
    strings = [*sink._STRING_COLUMNS, "frequency"]
    variants: dict[str, dict[str, Any]] = {
        "chosen (sink._writer_options)": {},
        "value: BYTE_STREAM_SPLIT": {
            "column_encoding": {"timestamp": "DELTA_BINARY_PACKED", "value": "BYTE_STREAM_SPLIT"}
        },
        "value: dictionary": {
            "column_encoding": {"timestamp": "DELTA_BINARY_PACKED"},
            "use_dictionary": [*strings, "value"],
        },
        "timestamp: PLAIN": {"column_encoding": {"timestamp": "PLAIN", "value": "PLAIN"}},
        "zstd level 1": {"compression_level": 1},
        "zstd level 6": {"compression_level": 6},
        "zstd level 9": {"compression_level": 9},
        "pages of 20,000 rows (pyarrow's default)": {
            "max_rows_per_page": 20_000,
            "write_batch_size": 20_000,
        },
        "pages of 1 Mi rows": {"max_rows_per_page": 1 << 20, "write_batch_size": 1 << 20},
        "write batches of 1,024 rows (pyarrow's default)": {"write_batch_size": 1024},
        "statistics on every column": {"write_statistics": True},
        "no statistics, no page index": {"write_statistics": False, "write_page_index": False},
        "pyarrow defaults + zstd (dictionary everywhere)": {
            "use_dictionary": True,
            "column_encoding": None,
            "compression_level": None,
            "max_rows_per_page": None,
            "write_batch_size": None,
            "write_page_index": False,
        },
    }
    out: dict[str, Any] = {}
    for t in tables[:2]:  # warm up: first-use costs would land on the first variant
        pq.ParquetWriter(
            io.BytesIO(), t.schema, **sink._writer_options(sink.ParquetOptions())
        ).write_table(t)
    for label, change in variants.items():
        kwargs = {**sink._writer_options(sink.ParquetOptions()), **change}
        buf = io.BytesIO()
        cpu = time.process_time()
        writer = pq.ParquetWriter(buf, tables[0].schema, **kwargs)
        for t in tables:
            writer.write_table(t, row_group_size=1_048_576)
        writer.close()
        cpu = time.process_time() - cpu
        out[label] = {"bytes_per_row": len(buf.getvalue()) / rows, "rows_per_cpu_s": rows / cpu}
    return {"variants": out, "rows_out": rows, "cpu": 1.0, "wall": 1.0, "rss_mb": 0.0}


def run(args: dict[str, Any]) -> dict[str, Any]:
    """The whole embedded run (load, finalize, delete) with N worker processes."""
    from workers.runner import RunOptions
    from workers.runner import run as run_all

    tree = args["scratch"]
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(args["tree"], tree)  # the run deletes what it archives
    shutil.rmtree(args["archive"], ignore_errors=True)

    def work() -> dict[str, Any]:
        reports = run_all(
            RunOptions(
                checkpoints=tree,
                cutoff=args["cutoff"],
                archive=args["archive"],
                workers=args["workers"],
            )
        )
        bad = [r for r in reports if not r.ok]
        if bad:
            raise RuntimeError(f"run reported problems: {bad}")
        return {
            "rows_out": sum(r.rows for r in reports),
            "bytes_out": sum(r.bytes_written for r in reports),
        }

    try:
        return _measure(work)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


PROBES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "noop": noop,
    "read": read,
    "parse_only": parse_only,
    "decode": decode,
    "load": load,
    "finalize": finalize,
    "naive": naive,
    "pyarrow_write": pyarrow_write,
    "parquet_sweep": parquet_sweep,
    "run": run,
}


def main(argv: list[str]) -> int:
    """`python -m bench.probes STEP '{json args}'`: run one probe, print its JSON result."""
    name, raw = argv
    result = PROBES[name](json.loads(raw))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

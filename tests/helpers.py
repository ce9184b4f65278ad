"""Test helpers: checkpoint trees, an independent encoder, a slow oracle, a clean environment.

The oracle re-implements SPEC §2–3 one value at a time with the standard library, so the
vectorised readers are checked against something that shares none of their code. The tree
builders write through `workers.generate` (input only: what the oracle reads back).
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.generate import Level, Metric, write_checkpoint
from workers.paths import checkpoint_timestamp

MAGIC = 0xCC5B0001
ROOT = Path(__file__).resolve().parents[1]  # the checkout under test (its `workers`)
SETTINGS_PREFIXES = ("CCARCHIVE_", "FLOWER_")  # settings a test must not inherit
NEVER = 4_000_000_000  # in 2096: no run of any test (not even a beat run) selects it

Row = tuple[str, str, str, str, str, int, int, int]  # value as float32 bit pattern


def f32_bits(value: float) -> int:
    """Bit pattern of a float rounded to float32 the way Go's float32(x) does."""
    with np.errstate(over="ignore"):
        return int(np.array([value], dtype=np.float64).astype(np.float32).view(np.uint32)[0])


def bits_of(value: float) -> int:
    """Bit pattern of a value already in float32."""
    return int(np.array([value], dtype=np.float32).view(np.uint32)[0])


def metric(data: list[Any], frequency: int = 60, start: int = 1_000_000) -> dict[str, Any]:
    """A JSON metric object."""
    return {"frequency": frequency, "start": start, "data": data}


def level(
    metrics: dict[str, Any] | None = None, children: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A JSON level."""
    return {"metrics": metrics or {}, "children": children or {}}


def write_json(path: Path, doc: dict[str, Any] | str) -> Path:
    """Write a JSON checkpoint (a dict gets from/to added) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(doc, dict):
        doc = json.dumps({"from": 0, "to": 1, **doc})
    path.write_text(doc, encoding="utf-8")
    return path


def bin_level(
    metrics: dict[str, tuple[int, int, list[float]]], children: dict[str, bytes] | None = None
) -> bytes:
    """Encode a binary level: metrics as name -> (frequency, start, float32 values)."""
    out = [struct.pack("<I", len(metrics))]
    for name, (frequency, start, values) in metrics.items():
        raw = name.encode()
        out.append(struct.pack("<H", len(raw)) + raw)
        out.append(struct.pack("<qqI", frequency, start, len(values)))
        out.append(np.array(values, dtype="<f4").tobytes())
    children = children or {}
    out.append(struct.pack("<I", len(children)))
    for name, body in children.items():
        raw = name.encode()
        out.append(struct.pack("<H", len(raw)) + raw + body)
    return b"".join(out)


def bin_file(body: bytes, magic: int = MAGIC) -> bytes:
    """A whole binary checkpoint around an encoded top level."""
    return struct.pack("<Iqq", magic, 0, 1) + body


# --- the oracle ---------------------------------------------------------------------------


def oracle_scope(name: str) -> tuple[str, str]:
    """SPEC §3 scope rule, spelled out."""
    for prefix, scope in (
        ("socket", "socket"),
        ("memoryDomain", "memoryDomain"),
        ("core", "core"),
        ("hwthread", "hwthread"),
        ("cpu", "hwthread"),
        ("accelerator", "accelerator"),
    ):
        if (
            name.startswith(prefix)
            and len(name) > len(prefix)
            and name[len(prefix)] in "0123456789"
        ):
            return scope, name[len(prefix) :]
    return name, ""


def _neg_zero_int(text: str) -> float | int:
    return -0.0 if text == "-0" else int(text)


def oracle_rows(cluster: str, host: str, path: Path) -> list[Row]:
    """Rows of one checkpoint file computed value by value."""
    rows: list[Row] = []
    if path.suffix == ".json":
        doc = json.loads(path.read_text(encoding="utf-8"), parse_int=_neg_zero_int)

        def walk(lv: dict[str, Any], scope: str, sid: str) -> None:
            for name, m in lv.get("metrics", {}).items():
                for i, v in enumerate(m["data"]):
                    if v is None:
                        continue
                    ts = int(m["start"]) + i * int(m["frequency"])
                    rows.append(
                        (
                            cluster,
                            host,
                            name,
                            scope,
                            sid,
                            ts,
                            int(m["frequency"]),
                            f32_bits(float(v)),
                        )
                    )
            for child, sub in (lv.get("children") or {}).items():
                walk(sub, *oracle_scope(child))

        walk(doc, "node", "")
        return rows
    data = path.read_bytes()
    pos = 20

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals

    def name() -> str:
        nonlocal pos
        (n,) = take("<H")
        s = data[pos : pos + n].decode()
        pos += n
        return s

    def walk_bin(scope: str, sid: str) -> None:
        nonlocal pos
        (n_metrics,) = take("<I")
        for _ in range(n_metrics):
            mname = name()
            freq, start, n = take("<qqI")
            for i in range(n):
                (bits,) = take("<I")
                if math.isnan(struct.unpack("<f", struct.pack("<I", bits))[0]):
                    continue
                rows.append((cluster, host, mname, scope, sid, start + i * freq, freq, bits))
        (n_children,) = take("<I")
        for _ in range(n_children):
            walk_bin(*oracle_scope(name()))

    walk_bin("node", "")
    return rows


def table_rows(table: pa.Table) -> list[Row]:
    """Rows of an Arrow table with the archive schema, values as float32 bit patterns."""
    bits = table.column("value").to_numpy().view(np.uint32).tolist()
    names = ("cluster", "hostname", "metric", "scope", "scope_id", "timestamp", "frequency")
    cols = [table.column(c).to_pylist() for c in names]
    return [(*vals, b) for *vals, b in zip(*cols, bits, strict=True)]  # type: ignore[misc]


def archive_rows(path: Path | str) -> list[Row]:
    """Rows of an archive file, values as float32 bit patterns, in file order."""
    return table_rows(pq.read_table(path))


def sort_key(row: Row) -> tuple[bytes, bytes, bytes, bytes, int]:
    """SPEC §4 order: strings by UTF-8 bytes, then signed timestamp."""
    return (row[1].encode(), row[2].encode(), row[3].encode(), row[4].encode(), row[5])


def full_key(row: Row) -> tuple[Any, ...]:
    """SPEC order, then every other column: rows with equal SPEC keys (`cpu7` and
    `hwthread7`) may come in either order, this makes a comparison exact anyway."""
    return (*sort_key(row), row[6], row[7])


def expected_rows(paths: Iterable[Path], key: Callable[[Row], Any] = sort_key) -> list[Row]:
    """The oracle's rows of these checkpoint files (cluster and host from their two parent
    directories), sorted by `key`: by default the order of an archive (SPEC §4)."""
    rows = [r for p in paths for r in oracle_rows(p.parent.parent.name, p.parent.name, p)]
    return sorted(rows, key=key)


def rows_per_file(root: Path) -> dict[str, list[Row] | None]:
    """Every checkpoint file below root (path relative to root) with its oracle rows; None
    for a file the oracle cannot read (bad input: it must stay where it is)."""
    out: dict[str, list[Row] | None] = {}
    for p in sorted(root.rglob("*")):
        ts = checkpoint_timestamp(p.name)
        if p.is_file() and isinstance(ts, int) and ts:
            try:
                rows = oracle_rows(p.parent.parent.name, p.parent.name, p)
            except (ValueError, struct.error, KeyError, TypeError):
                rows = None
            out[str(p.relative_to(root))] = rows
    return out


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file under root with its bytes (directories as None): to prove nothing else changed."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = None if p.is_dir() and not p.is_symlink() else p.read_bytes()
    return out


def archive_argv(
    checkpoints: Path | str,
    archive: Path | str | None = None,
    cutoff: int | str | None = None,
    workers: int | str | None = None,
) -> list[str]:
    """`ccarchive archive` arguments (after the program name): the options given, in this
    order; a caller appends any other option."""
    argv = ["archive", "--checkpoints", str(checkpoints)]
    for flag, value in (("--archive", archive), ("--cutoff", cutoff), ("--workers", workers)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


# --- environment --------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """A child process's environment: this checkout first on PYTHONPATH, no CCARCHIVE_* or
    FLOWER_* setting of whoever runs the tests, then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIXES)}
    inherited = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), inherited]).rstrip(os.pathsep)
    env.update(extra)
    return env


def drop_settings_env(mp: Any) -> None:
    """Remove CCARCHIVE_*/FLOWER_* from this process through a MonkeyPatch `mp` (undone at
    its end), and let it undo the log level the CLI exports for its pool processes."""
    for name in list(os.environ):
        if name.startswith(SETTINGS_PREFIXES):
            mp.delenv(name)
    mp.setenv("CCARCHIVE_LOG_LEVEL_INHERITED", "WARNING")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the CLI in a child process ----------------------------------------------------------

CLI = [sys.executable, "-m", "workers.cli"]  # `ccarchive` of this checkout


def run_cli(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`ccarchive <args>` in a child process (a crash kills only it) with `env` (default:
    `clean_env()`), run to the end; its output as text."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else clean_env(),
        cwd=cwd,
        timeout=timeout,
    )


@contextmanager
def stalled_run(
    argv: Sequence[str], env: Mapping[str, str], fault: Path, point: str = "load:staged"
) -> Iterator[subprocess.Popen[str]]:
    """`ccarchive <argv>` armed to stall at crash point `point` (by default after its first
    staged chunk; `fault` is the fault file), given once it is held there; at the end let
    go and killed if still running."""
    fault.write_text(f"stall {point}")
    proc = subprocess.Popen(
        [*CLI, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "CCARCHIVE_FAULT_FILE": str(fault)},
    )
    stalled = Path(f"{fault}.stalled")
    deadline = time.monotonic() + 90
    while not stalled.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not stall: {proc.communicate()}")
        time.sleep(0.05)
    try:
        yield proc
    finally:
        stalled.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --- checkpoint trees ---------------------------------------------------------------------


def host_level(data: np.ndarray, start: int, step: int = 60, sockets: int = 2) -> Level:
    """A host's level: `load` on the node, `power` per socket, `ipc` on one hardware thread
    per socket, each series derived from `data`."""
    return Level(
        {"load": Metric(step, start, data)},
        {
            f"socket{s}": Level(
                {"power": Metric(step, start, data[::-1] + s)},
                {f"cpu{s}": Level({"ipc": Metric(step, start, data + s)})},
            )
            for s in range(sockets)
        },
    )


def write_untouchable(directory: Path, future: int = NEVER, tmp_ts: int = 1_000_000) -> None:
    """Files no run may touch beside a host's checkpoints: one after any cutoff, a WAL, an
    interrupted temporary file and a checkpoint with timestamp 0."""
    lv = Level({"m": Metric(60, future, np.arange(5.0))})
    write_checkpoint(directory / f"{future}.json", lv, future, future + 300)
    (directory / "current.wal").write_bytes(b"\x00wal")
    (directory / f"{tmp_ts}.bin.tmp").write_bytes(b"interrupted")
    (directory / "0.json").write_text("{}")


def write_host(
    root: Path,
    cluster: str,
    host: str,
    seed: int = 0,
    *,
    formats: tuple[str, ...] = ("json", "bin"),
    start: int = 1_000_000,
    values: int = 100,
    step: int = 60,
    nan: float = 0.0,
    sockets: int = 2,
    untouchable: bool = False,
) -> list[Path]:
    """One host's checkpoint files, one per entry of `formats`, back to back from `start`
    (`values` values `step` seconds apart each, a `nan` share missing); with `untouchable`,
    the files of `write_untouchable` beside them. Same seed and arguments, same bytes."""
    rng = np.random.default_rng(seed)
    d = root / cluster / host
    paths = []
    for k, fmt in enumerate(formats):
        begin = start + k * values * step
        data = np.round(rng.random(values) * 100, 1)
        data[rng.random(values) < nan] = np.nan
        path = d / f"{begin}.{fmt}"
        write_checkpoint(
            path, host_level(data, begin, step, sockets), begin, begin + values * step, fmt=fmt
        )
        paths.append(path)
    if untouchable:
        write_untouchable(d, tmp_ts=start)
    return paths


def write_tree(
    root: Path,
    clusters: Iterable[str] = ("alpha", "beta"),
    hosts: int = 2,
    seed: int = 0,
    **host: Any,
) -> dict[tuple[str, str], list[Path]]:
    """`hosts` hosts h0, h1, ... in each cluster, each written by `write_host` (other values
    per host; `host` are its keyword arguments); the files per (cluster, host)."""
    out: dict[tuple[str, str], list[Path]] = {}
    for i, cluster in enumerate(clusters):
        for h in range(hosts):
            name = f"h{h}"
            out[cluster, name] = write_host(root, cluster, name, seed * 1000 + i * 100 + h, **host)
    return out


def random_tree(
    root: Path,
    rng: random.Random,
    clusters: int = 3,
    max_values: int = 60,
    untouchable: bool = True,
) -> None:
    """A random tree: 1..clusters clusters, 1-4 hosts, 1-3 selected files (JSON or binary,
    up to `max_values` values a series, some without any value), plus, if `untouchable`,
    the files of `write_untouchable` in each host."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    for c in range(rng.randint(1, clusters)):
        for h in range(rng.randint(1, 4)):
            d = root / f"c{c}" / f"h{h}"
            for k in range(rng.randint(1, 3)):
                start = 1_000_000 + k * 3000 + rng.choice([0, 0, 1500])  # sometimes overlapping
                n = rng.randint(0, max_values)
                values = np.round(nrng.random(n) * 100, 1)
                values[nrng.random(n) < 0.2] = np.nan
                lv = Level(
                    {"m": Metric(60, start, values)},
                    {"cpu3": Level({"x": Metric(10, start, values[::-1])})},
                )
                fmt = rng.choice(["json", "bin"])
                write_checkpoint(d / f"{start}.{fmt}", lv, start, start + 3000, fmt=fmt)
            if untouchable:
                write_untouchable(d)

"""Test helpers: an independent encoder for binary checkpoints and a slow, obvious oracle.

The oracle re-implements SPEC §2–3 one value at a time with the standard library, so the
vectorised readers are checked against something that shares none of their code.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

MAGIC = 0xCC5B0001

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


def archive_rows(path: Path | str) -> list[Row]:
    """Rows of an archive file, values as float32 bit patterns, in file order."""
    table = pq.read_table(path)
    bits = table.column("value").to_numpy().view(np.uint32).tolist()
    cols = [
        table.column(c).to_pylist()
        for c in ("cluster", "hostname", "metric", "scope", "scope_id", "timestamp", "frequency")
    ]
    return [(*vals, b) for *vals, b in zip(*cols, bits, strict=True)]  # type: ignore[misc]


def sort_key(row: Row) -> tuple[bytes, bytes, bytes, bytes, int]:
    """SPEC §4 order: strings by UTF-8 bytes, then signed timestamp."""
    return (row[1].encode(), row[2].encode(), row[3].encode(), row[4].encode(), row[5])


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file under root with its bytes (directories as None): to prove nothing else changed."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = None if p.is_dir() and not p.is_symlink() else p.read_bytes()
    return out


def archive_argv(checkpoints: Path, archive: Path | str, cutoff: int, workers: int) -> list[str]:
    """`ccarchive archive` arguments (after the program name) for an embedded run."""
    return [
        "archive",
        "--checkpoints",
        str(checkpoints),
        "--archive",
        str(archive),
        "--cutoff",
        str(cutoff),
        "--workers",
        str(workers),
    ]

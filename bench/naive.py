"""The naive baseline: the archiver a user would write in an afternoon.

One process, stdlib `json`, a Python loop per series and per value, every row of a cluster
collected in Python lists, then pyarrow writes one plain (PLAIN-encoded, no dictionary)
zstd Parquet file. Same rows and column types as ours (SPEC §3), no sorting beyond the
natural walk order (hosts and files sorted by name, levels in file order). This is what
the project has to beat; it is deliberately not tuned. (pyarrow's default settings add
dictionary encoding; the harness reports that variant's size too, see bench/README.md.)

    python -m bench.naive CHECKPOINTS OUT_DIR
"""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        pa.field("cluster", pa.string(), nullable=False),
        pa.field("hostname", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("scope", pa.string(), nullable=False),
        pa.field("scope_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("frequency", pa.int64(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ]
)

PREFIXES = [
    ("socket", "socket"),
    ("memoryDomain", "memoryDomain"),
    ("core", "core"),
    ("hwthread", "hwthread"),
    ("cpu", "hwthread"),
    ("accelerator", "accelerator"),
]


def scope_of(name: str) -> tuple[str, str]:
    """Scope rule of SPEC §3, written the obvious way."""
    for prefix, scope in PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix) and name[len(prefix)].isdigit():
            return scope, name[len(prefix) :]
    return name, ""


def archive_cluster(root: str, cluster: str, out_dir: str) -> tuple[int, str | None]:
    """Archive one cluster into OUT_DIR/<cluster>.parquet; return (rows, path)."""
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}

    def add(host: str, level: dict, scope: str, scope_id: str) -> None:
        for name, m in level.get("metrics", {}).items():
            freq, start = m["frequency"], m["start"]
            for i, v in enumerate(m["data"]):
                if v is None:
                    continue
                cols["cluster"].append(cluster)
                cols["hostname"].append(host)
                cols["metric"].append(name)
                cols["scope"].append(scope)
                cols["scope_id"].append(scope_id)
                cols["timestamp"].append(start + i * freq)
                cols["frequency"].append(freq)
                cols["value"].append(v)
        for child_name, child in level.get("children", {}).items():
            add(host, child, *scope_of(child_name))

    for host in sorted(os.listdir(os.path.join(root, cluster))):
        host_dir = os.path.join(root, cluster, host)
        for fname in sorted(os.listdir(host_dir)):
            path = os.path.join(host_dir, fname)
            if fname.endswith(".json"):
                with open(path) as f:
                    add(host, json.load(f), "node", "")
            elif fname.endswith(".bin"):
                with open(path, "rb") as fb:
                    add(host, read_binary(fb.read()), "node", "")
    rows = len(cols["value"])
    if not rows:
        return 0, None
    table = pa.table(cols, schema=SCHEMA)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{cluster}.parquet")
    pq.write_table(table, out, compression="zstd", use_dictionary=False)
    return rows, out


def read_binary(data: bytes) -> dict:
    """The binary format as the same nested dicts json.load gives (NaN -> None)."""
    pos = 20  # magic, from, to

    def level() -> dict:
        nonlocal pos
        metrics = {}
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        for _ in range(n):
            (ln,) = struct.unpack_from("<H", data, pos)
            name = data[pos + 2 : pos + 2 + ln].decode()
            pos += 2 + ln
            freq, start, count = struct.unpack_from("<qqI", data, pos)
            pos += 20
            vals = np.frombuffer(data, "<f4", count, pos).tolist()
            pos += 4 * count
            metrics[name] = {
                "frequency": freq,
                "start": start,
                "data": [None if v != v else v for v in vals],
            }
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        children = {}
        for _ in range(n):
            (ln,) = struct.unpack_from("<H", data, pos)
            name = data[pos + 2 : pos + 2 + ln].decode()
            pos += 2 + ln
            children[name] = level()
        return {"metrics": metrics, "children": children}

    return level()


def main(argv: list[str]) -> int:
    """Archive every cluster under CHECKPOINTS; print rows written."""
    root, out_dir = argv
    total = 0
    for cluster in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, cluster)):
            rows, _ = archive_cluster(root, cluster, out_dir)
            total += rows
    print(total)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Prototype: hosts' row groups encoded separately, stitched into one archive byte for byte.

    python -m bench.stitch                       # 8 big hosts and 96 small ones, ~1 min
    python -m bench.stitch --trees big-bin --workers 2

For each tree (bench/finalize_rate.py's shapes), the hosts are loaded with
`steps.load_host` (untimed), then, each timed with the process's CPU time and wall time:

1. **serial**: `sink.write_parquet` of every host from its staged chunk into one file, as
   finalize writes it (without finalize's readback verification);
2. **parts**: the same function for one host at a time, each into its own file (what a
   load task would do), in one process and in `--workers` processes;
3. **stitch**: the parts' column chunks copied byte for byte into one file, offsets shifted,
   page index and footer rebuilt (bench/thrift_compact.py); the result is compared with (1)
   byte for byte (same footer metadata handed to both);
4. **naive re-stitch**: the parts read back with pyarrow and written again with the
   archive's writer: decode + encode, what stitching costs without byte copying;
5. **read-back check**: what a load task would do to prove its part holds its rows:
   decode the part and compare the rows' digest with the digest of the rows it loaded.

Not part of the archiver: workers/ is untouched. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from bench.shapes import TREES, generate
from bench.thrift_compact import (
    BINARY,
    I64,
    LIST,
    STRUCT,
    Container,
    Field,
    decode_struct,
    encode_struct,
    get,
)
from workers import chunks, sink, steps
from workers.rows import CHUNK_SCHEMA, table_digest

MAGIC = b"PAR1"
_CHUNK_STRINGS = ("metric", "scope", "scope_id")

# Field ids of parquet.thrift.
FMD_NUM_ROWS, FMD_ROW_GROUPS, FMD_KV = 3, 4, 5
RG_COLUMNS, RG_FILE_OFFSET, RG_ORDINAL = 1, 5, 7
CC_FILE_OFFSET, CC_META, CC_OI_OFFSET, CC_OI_LEN, CC_CI_OFFSET, CC_CI_LEN = 2, 3, 4, 5, 6, 7
CMD_DATA_PAGE, CMD_INDEX_PAGE, CMD_DICT_PAGE = 9, 10, 11


def _footer(buf: memoryview) -> tuple[list[Field], int]:
    if bytes(buf[:4]) != MAGIC or bytes(buf[-4:]) != MAGIC:
        raise ValueError("not a Parquet file")
    (n,) = struct.unpack_from("<I", buf, len(buf) - 8)
    start = len(buf) - 8 - n
    fmd, end = decode_struct(buf, start)
    if end != len(buf) - 8:
        raise ValueError("footer length does not match")
    return fmd, start


def _shift(fields: list[Field], ids: tuple[int, ...], delta: int) -> None:
    for f in fields:
        if f.id in ids and f.value:  # 0 means "not set" for the deprecated file_offset
            f.value += delta


def _value(fields: list[Field], fid: int) -> Any:
    """The value of a field that must be there."""
    f = get(fields, fid)
    if f is None:
        raise ValueError(f"footer: field {fid} missing")
    return f.value


def _columns(rg: list[Field]) -> list[list[Field]]:
    return list(_value(rg, RG_COLUMNS).items)


def _blob(buf: memoryview, cc: list[Field], off_id: int, len_id: int) -> memoryview | None:
    off, length = get(cc, off_id), get(cc, len_id)
    return buf[off.value : off.value + length.value] if off and length else None


def _identity(fmd: list[Field]) -> bytes:
    """Version, schema, created_by and column orders: what every part must share."""
    return encode_struct([f for f in fmd if f.id in (1, 2, 6, 7)])


def stitch(parts: list[memoryview], metadata: Mapping[str, str], out: BinaryIO) -> int:
    """Write `parts` (Parquet files, same schema and writer options) as one file; rows out.

    Column chunks are copied unchanged; what holds absolute offsets (column chunk and row
    group metadata, the offset index's page locations) is shifted; the page index is laid
    out as Arrow's writer lays it out (all column indexes, then all offset indexes).
    """
    out.write(MAGIC)
    pos = 4
    row_groups: list[list[Field]] = []
    column_index: list[bytes | None] = []
    offset_index: list[bytes | None] = []
    first: list[Field] | None = None
    rows = 0
    for buf in parts:
        fmd, footer_start = _footer(buf)
        first = first or fmd
        if _identity(fmd) != _identity(first):
            raise ValueError("parts differ in schema, writer version or column orders")
        groups: list[list[Field]] = _value(fmd, FMD_ROW_GROUPS).items
        # The row groups' data ends where the page index (or else the footer) begins.
        data_end = min(
            [
                f.value
                for rg in groups
                for cc in _columns(rg)
                for f in (get(cc, CC_CI_OFFSET), get(cc, CC_OI_OFFSET))
                if f is not None
            ]
            or [footer_start]
        )
        delta = pos - 4
        out.write(buf[4:data_end])
        pos += data_end - 4
        for rg in groups:
            _shift(rg, (RG_FILE_OFFSET,), delta)
            for f in rg:
                if f.id == RG_ORDINAL:
                    f.value = len(row_groups)
            for cc in _columns(rg):
                _shift(cc, (CC_FILE_OFFSET,), delta)
                meta = _value(cc, CC_META)
                _shift(meta, (CMD_DATA_PAGE, CMD_INDEX_PAGE, CMD_DICT_PAGE), delta)
                ci = _blob(buf, cc, CC_CI_OFFSET, CC_CI_LEN)
                column_index.append(None if ci is None else bytes(ci))  # no offsets inside
                oi = _blob(buf, cc, CC_OI_OFFSET, CC_OI_LEN)
                if oi is None:
                    offset_index.append(None)
                    continue
                locations, _ = decode_struct(oi)
                for loc in _value(locations, 1).items:  # PageLocation.offset is absolute
                    _shift(loc, (1,), delta)
                offset_index.append(encode_struct(locations))
            row_groups.append(rg)
            rows += _value(rg, 3)
    if first is None:
        raise ValueError("nothing to stitch")
    chunks = [cc for rg in row_groups for cc in _columns(rg)]
    for blobs, off_id, len_id in (
        (column_index, CC_CI_OFFSET, CC_CI_LEN),
        (offset_index, CC_OI_OFFSET, CC_OI_LEN),
    ):
        for cc, blob in zip(chunks, blobs, strict=True):
            if blob is not None:
                for f in cc:
                    f.value = pos if f.id == off_id else len(blob) if f.id == len_id else f.value
                out.write(blob)
                pos += len(blob)
    kv = Container(
        STRUCT,
        [[Field(1, BINARY, k.encode()), Field(2, BINARY, v.encode())] for k, v in metadata.items()],
    )
    fmd = [f for f in first if f.id not in (FMD_NUM_ROWS, FMD_ROW_GROUPS, FMD_KV)]
    fmd += [
        Field(FMD_NUM_ROWS, I64, rows),
        Field(FMD_ROW_GROUPS, LIST, Container(STRUCT, row_groups)),
        *([Field(FMD_KV, LIST, kv)] if metadata else []),
    ]
    fmd.sort(key=lambda f: f.id)
    footer = encode_struct(fmd)
    out.write(footer)
    out.write(struct.pack("<I", len(footer)) + MAGIC)
    return rows


# --- the measurement ---------------------------------------------------------------------


def _timed(work: Callable[[], Any]) -> tuple[Any, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = work()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def _write(path: str, cluster: str, hosts: list[tuple[str, str]], meta: Mapping[str, str]) -> float:
    """sink.write_parquet of these (host, chunk) into `path`; the CPU seconds it took."""
    cpu = time.process_time()
    with open(path, "wb") as f:
        items: Iterator[tuple[str, Iterator[pa.RecordBatch]]] = (
            (h, chunks.read_chunk(c)) for h, c in hosts
        )
        sink.write_parquet(f, cluster, items, lambda: dict(meta), sink.ParquetOptions())
    return time.process_time() - cpu


def _write_part(args: tuple[str, str, str, str]) -> float:
    path, cluster, host, chunk = args
    return _write(path, cluster, [(host, chunk)], {})


def measure(tree_name: str, work: Path, workers: int) -> dict[str, Any]:
    """Load one tree, then time serial write, parts, stitch and naive re-stitch."""

    desc, kwargs = TREES[tree_name]
    tree, staging_dir, parts_dir = work / "tree", work / "staging", work / "parts"
    for d in (tree, staging_dir, parts_dir):
        shutil.rmtree(d, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    generate(tree, **kwargs)
    cutoff = int(time.time())
    cluster = "fritz"
    hosts = sorted(os.listdir(tree / cluster))
    manifests = [
        steps.load_host(str(tree), cluster, h, cutoff, str(staging_dir), "bench") for h in hosts
    ]
    shutil.rmtree(tree)
    chunks = [(m.host, str(m.chunk)) for m in manifests if m.rows]
    meta = sink.footer_metadata(cluster, cutoff, "bench", manifests)
    rows = sum(m.rows for m in manifests)
    res: dict[str, Any] = {
        "tree": tree_name,
        "description": desc,
        "rows": rows,
        "hosts": len(chunks),
    }

    serial_path = str(work / "serial.parquet")
    _, res["serial_cpu"], res["serial_wall"] = _timed(
        lambda: _write(serial_path, cluster, chunks, meta)
    )
    jobs = [(str(parts_dir / f"{h}.parquet"), cluster, h, c) for h, c in chunks]
    per_part, _, res["parts_wall_1"] = _timed(lambda: [_write_part(j) for j in jobs])
    res["parts_cpu"] = sum(per_part)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_part, jobs[:workers]))  # start-up and imports outside the timing
        _, _, res[f"parts_wall_{workers}"] = _timed(lambda: list(pool.map(_write_part, jobs)))
    res["workers"] = workers

    stitched_path = str(work / "stitched.parquet")

    def do_stitch() -> int:
        with open(stitched_path, "wb") as out:
            return stitch([memoryview(Path(p).read_bytes()) for p, *_ in jobs], meta, out)

    stitched_rows, res["stitch_cpu"], res["stitch_wall"] = _timed(do_stitch)
    serial_bytes, stitched_bytes = Path(serial_path).read_bytes(), Path(stitched_path).read_bytes()
    res["bytes"] = len(serial_bytes)
    res["identical"] = (
        hashlib.sha256(serial_bytes).digest() == hashlib.sha256(stitched_bytes).digest()
    )
    res["stitched_rows"] = stitched_rows
    res["stitched_reads_back"] = pq.read_table(io.BytesIO(stitched_bytes)).num_rows == rows

    def naive() -> None:
        strings = ["cluster", "hostname", "metric", "scope", "scope_id"]
        with open(work / "naive.parquet", "wb") as f:
            writer = sink._writer(f, sink.ParquetOptions())
            for p, *_ in jobs:
                table = pq.read_table(p, read_dictionary=strings).cast(sink._WRITE_SCHEMA)
                writer.write_table(table, row_group_size=sink.ParquetOptions().row_group_rows)
            writer.add_key_value_metadata(dict(meta))
            writer.close()

    _, res["naive_cpu"], res["naive_wall"] = _timed(naive)

    def read_back() -> list[bool]:
        # The load task's own check in the stitched design: decode the part it wrote and
        # compare the rows' digest with the digest of the rows it loaded.
        digests = {m.host: m.digest for m in manifests}
        same = []
        for path, _, host, _ in jobs:
            table = pq.read_table(
                path, columns=CHUNK_SCHEMA.names, read_dictionary=list(_CHUNK_STRINGS)
            )
            same.append(table_digest(table) == digests[host])
        return same

    same, res["readback_cpu"], res["readback_wall"] = _timed(read_back)
    res["readback_digest_equal"] = all(same)
    res["loadavg"] = os.getloadavg()[0]
    shutil.rmtree(work, ignore_errors=True)
    return res


def _readback(r: dict[str, Any]) -> str:
    if "readback_cpu" not in r:
        return "not measured"
    return f"{r['readback_cpu']:.2f} ({'yes' if r['readback_digest_equal'] else 'no'})"


def render(results: list[dict[str, Any]]) -> str:
    """The measurement as a Markdown table."""
    lines = [
        "| tree | rows | hosts | serial write CPU-s | parts CPU-s (sum) | parts wall, 1 process "
        "| parts wall, N processes | stitch CPU-s | stitch wall s | stitched = serial, byte for byte "
        "| naive re-stitch CPU-s | read-back check CPU-s (digest equal) | load average |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in results:
        n = r["workers"]
        lines.append(
            f"| {r['tree']} | {r['rows']:,} | {r['hosts']} | {r['serial_cpu']:.2f} | {r['parts_cpu']:.2f} "
            f"| {r['parts_wall_1']:.2f} | {r[f'parts_wall_{n}']:.2f} ({n}) | {r['stitch_cpu']:.3f} "
            f"| {r['stitch_wall']:.3f} | {'yes' if r['identical'] else 'NO'} ({r['bytes']:,} bytes) "
            f"| {r['naive_cpu']:.2f} | {_readback(r)} | {r['loadavg']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure the trees and print the table."""
    p = argparse.ArgumentParser(prog="python -m bench.stitch", description=__doc__.splitlines()[0])
    p.add_argument("--trees", default="big-bin,small-hourly")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/ccarchive-stitch")
    opts = p.parse_args(argv)
    results = []
    for name in opts.trees.split(","):
        print(f"{name} ...", flush=True)
        results.append(measure(name, Path(opts.workdir) / name, opts.workers))
        print(f"  {results[-1]}", flush=True)
    print()
    print(render(results))
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

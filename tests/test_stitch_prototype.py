"""The stitching prototype of docs/scaling.md: hosts' row groups written one file each and
stitched byte for byte give exactly the file the serial writer makes."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.stitch import stitch
from bench.thrift_compact import decode_struct, encode_struct
from workers import chunks, sink, steps
from workers.generate import generate_tree


def _write(path: Path, hosts: list[tuple[str, str]], meta: dict[str, str], rows: int) -> None:
    options = sink.ParquetOptions(row_group_rows=rows)
    with open(path, "wb") as f:
        items = ((h, chunks.read_chunk(c)) for h, c in hosts)
        sink.write_parquet(f, "fritz", items, lambda: meta, options)


@pytest.mark.parametrize("row_group_rows", [1_048_576, 5_000])  # one and several per host
def test_stitched_parts_equal_the_serial_file(tmp_path: Path, row_group_rows: int) -> None:
    generate_tree(tmp_path / "cp", ["fritz"], hosts=3, fmt="mixed", samples=8, seed=3)
    cutoff = int(time.time())
    ms = [
        steps.load_host(str(tmp_path / "cp"), "fritz", h, cutoff, str(tmp_path / "stg"), "run")
        for h in sorted(os.listdir(tmp_path / "cp" / "fritz"))
    ]
    chunks = [(m.host, str(m.chunk)) for m in ms]
    assert len(ms) == 3 and all(m.rows for m in ms)
    meta = sink.footer_metadata("fritz", cutoff, "run", ms)
    _write(tmp_path / "serial.parquet", chunks, meta, row_group_rows)
    parts = []
    for host, chunk in chunks:
        _write(tmp_path / f"{host}.parquet", [(host, chunk)], {}, row_group_rows)
        parts.append(memoryview((tmp_path / f"{host}.parquet").read_bytes()))
    out = io.BytesIO()
    rows = stitch(parts, meta, out)

    serial = (tmp_path / "serial.parquet").read_bytes()
    assert rows == sum(m.rows for m in ms)
    assert out.getvalue() == serial
    md = pq.ParquetFile(io.BytesIO(out.getvalue())).metadata
    assert md.num_row_groups > (3 if row_group_rows == 5_000 else 2)


def test_footer_round_trips_through_the_codec(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pq.read_table(io.BytesIO(_tiny())), path, write_page_index=True)
    data = path.read_bytes()
    n = int.from_bytes(data[-8:-4], "little")
    footer, end = decode_struct(data, len(data) - 8 - n)
    assert end == len(data) - 8
    assert encode_struct(footer) == data[len(data) - 8 - n : -8]


def _tiny() -> bytes:
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"a": [1, 2, None], "b": ["x", "y", "z"], "c": [True, False, True]}), buf
    )
    return buf.getvalue()


def test_parts_of_another_schema_are_refused(tmp_path: Path) -> None:
    a, b = io.BytesIO(), io.BytesIO()
    pq.write_table(pa.table({"x": [1, 2]}), a)
    pq.write_table(pa.table({"y": [1, 2]}), b)
    with pytest.raises(ValueError, match="differ"):
        stitch([memoryview(a.getvalue()), memoryview(b.getvalue())], {}, io.BytesIO())

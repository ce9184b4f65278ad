"""Memory properties of the sink: a written host's rows are not kept while the next loads."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers import sink
from workers.rows import CHUNK_SCHEMA


def _host_rows(n: int, metric: str) -> tuple[pa.Table, np.ndarray]:
    """A host's rows in CHUNK_SCHEMA; the value column shares its buffer with the array."""
    values = np.arange(n, dtype=np.float32)
    codes = pa.array(np.zeros(n, np.int32))
    table = pa.Table.from_arrays(
        [
            pa.DictionaryArray.from_arrays(codes, pa.array([metric])),
            pa.DictionaryArray.from_arrays(codes, pa.array(["node"])),
            pa.DictionaryArray.from_arrays(codes, pa.array([""])),
            pa.array(np.arange(n, dtype=np.int64) * 60),
            pa.array(np.full(n, 60, np.int64)),
            pa.Array.from_buffers(pa.float32(), n, [None, pa.py_buffer(values)]),
        ],
        schema=CHUNK_SCHEMA,
    )
    return table, values


def test_a_written_host_is_released_before_the_next_host_is_asked_for(tmp_path: Path) -> None:
    # The embedded runner reads the next host when the writer asks for it: the host just
    # written must be gone by then, or two hosts' rows share the peak.
    released: list[bool] = []
    first: list[weakref.ref[np.ndarray]] = []

    def hosts() -> Iterator[tuple[str, Iterator[pa.RecordBatch]]]:
        table, values = _host_rows(100_000, "cpu_load")
        first.append(weakref.ref(values))
        batches = iter(table.to_batches(max_chunksize=30_000))
        del table, values
        yield "h1", batches
        del batches
        released.append(first[0]() is None)
        table, _ = _host_rows(50_000, "mem_used")
        yield "h2", iter(table.to_batches())

    with open(tmp_path / "out.parquet", "wb") as f:
        rows = sink.write_parquet(f, "c", hosts(), dict, sink.ParquetOptions())
    assert rows == 150_000
    assert released == [True]
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups == 2


def test_one_byte_constant_indices_write_the_same_bytes(tmp_path: Path) -> None:
    # cluster and hostname go to the writer with int8 indices (a smaller shared array);
    # the file must be byte for byte what int32 indices give.
    table, _ = _host_rows(70_000, "cpu_load")
    options = sink.ParquetOptions()
    ours = tmp_path / "int8.parquet"
    with open(ours, "wb") as f:
        sink.write_parquet(f, "c", [("h1", iter(table.to_batches()))], dict, options)
    wide = pa.dictionary(pa.int32(), pa.string())
    schema = pa.schema(
        [
            pa.field(f.name, wide, nullable=False) if f.name in ("cluster", "hostname") else f
            for f in sink._WRITE_SCHEMA
        ]
    )
    zeros = pa.array(np.zeros(table.num_rows, np.int32))
    columns = [
        pa.DictionaryArray.from_arrays(zeros, pa.array(["c"])),
        pa.DictionaryArray.from_arrays(zeros, pa.array(["h1"])),
        *table.columns,
    ]
    reference = tmp_path / "int32.parquet"
    with open(reference, "wb") as f:
        writer = pq.ParquetWriter(f, schema, **sink._writer_options(options))
        writer.write_table(pa.Table.from_arrays(columns, schema=schema), options.row_group_rows)
        writer.add_key_value_metadata({})
        writer.close()
    assert ours.read_bytes() == reference.read_bytes()

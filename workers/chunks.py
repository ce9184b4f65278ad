"""Staged chunks: one host's sorted rows as an Arrow IPC file, written and read as a stream.

A chunk (`paths.chunk_url`) is written through `output.create` (local: temporary name and
rename; S3: a multipart upload completed only at the end), so a chunk that exists is
complete; re-running a load overwrites it with the same rows. Writing and reading stream
batch by batch: memory is bounded by a batch and the storage's buffer (one S3 part when
writing, the read-ahead when reading), never a host.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

from . import output, storage
from .rows import CHUNK_SCHEMA

#: Rows per IPC record batch: the unit in which finalize streams a host back.
BATCH_ROWS = 131_072


def write_chunk(table: pa.Table, url: str, compression: str | None = "lz4") -> int:
    """Write a host's rows as an Arrow IPC file; return its size in bytes."""
    options = ipc.IpcWriteOptions(compression=compression)
    # Not durable (no fsync): a chunk lost to a power cut fails finalize's row counts, and
    # a re-run rewrites it; the archive is what must survive.
    with output.create(url, exclusive=False, durable=False) as out:
        with ipc.new_file(out, CHUNK_SCHEMA, options=options) as writer:
            writer.write_table(table, max_chunksize=BATCH_ROWS)
        out.commit()
    return out.size


def read_chunk(url: str) -> Iterator[pa.RecordBatch]:
    """Stream a chunk back batch by batch, never holding the whole host in memory."""
    with storage.open_input(url) as source:
        # The IPC file format: the footer gives each batch's offset, so every batch is one
        # ranged read (S3: one GET plus read-ahead), not a download of the file.
        reader = ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)

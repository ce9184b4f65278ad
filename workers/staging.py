"""Staging: one Arrow IPC file per host and run, shared by all workers through fsspec.

Layout: `<staging>/<run_id>/<cluster>/<host>.arrow`. A chunk is written under a temporary
name and renamed, so a chunk that exists is complete; re-running a load overwrites it
with the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

from . import storage
from .rows import CHUNK_SCHEMA

#: Rows per IPC record batch: the unit in which finalize streams a host back.
BATCH_ROWS = 131_072


def run_url(staging: str, run_id: str) -> str:
    """Staging prefix of one run."""
    return storage.join(staging, run_id)


def cluster_url(staging: str, run_id: str, cluster: str) -> str:
    """Staging prefix of one cluster in one run."""
    return storage.join(staging, run_id, cluster)


def chunk_url(staging: str, run_id: str, cluster: str, host: str) -> str:
    """Staging location of one host's chunk."""
    return storage.join(staging, run_id, cluster, f"{host}.arrow")


def write_chunk(table: pa.Table, url: str, compression: str | None = "lz4") -> int:
    """Write a host's rows as an Arrow IPC file; return its size in bytes."""
    fs, path = storage.filesystem(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = f"{path}.tmp"
    options = ipc.IpcWriteOptions(compression=compression)
    with fs.open(tmp, "wb") as sink, ipc.new_file(sink, CHUNK_SCHEMA, options=options) as out:
        out.write_table(table, max_chunksize=BATCH_ROWS)
    fs.mv(tmp, path)
    return int(fs.size(path))


def read_chunk(url: str) -> Iterator[pa.RecordBatch]:
    """Stream a chunk back batch by batch, never holding the whole host in memory."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as source:
        reader = ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)

"""The Parquet sink: streams hosts' rows into one cluster archive, verifies it, publishes it.

The file is written under a temporary name, verified by re-reading its footer (row counts
per host, metadata), and only then published under `<archive>/<cluster>/<T>.parquet`
without ever replacing an existing file. The footer's key-value metadata is the commit
record: it lists every archived source file with its size.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__, storage
from .faults import crash_point
from .manifest import HostManifest
from .rows import ARCHIVE_SCHEMA, SORT_KEY

META_PREFIX = "ccarchive."
_DICT = pa.dictionary(pa.int32(), pa.string())
_STRING_COLUMNS = ("cluster", "hostname", "metric", "scope", "scope_id")

# What is handed to the Parquet writer: strings stay dictionary-encoded end to end. The
# Arrow schema is not stored in the file (store_schema=False), so every reader sees plain
# STRING columns, exactly like the upstream archives.
_WRITE_SCHEMA = pa.schema(
    [
        pa.field(f.name, _DICT if f.name in _STRING_COLUMNS else f.type, nullable=False)
        for f in ARCHIVE_SCHEMA
    ]
)


class ArchiveConflict(Exception):
    """An archive with the same name but other content exists; it is left alone."""


class VerificationError(Exception):
    """The written file does not hold what was written into it."""


@dataclass(frozen=True)
class ParquetOptions:
    """Knobs of the Parquet writer; defaults chosen by measurement (bench/README.md)."""

    row_group_rows: int = 1_048_576
    zstd_level: int = 3
    data_page_bytes: int = 1 << 20


@dataclass(frozen=True)
class ArchiveInfo:
    """A published archive file."""

    url: str
    rows: int
    bytes: int
    row_groups: int
    already_existed: bool = False


def archive_url(archive: str, cluster: str, cutoff: int) -> str:
    """Final location of a cluster's archive for cutoff T."""
    return storage.join(archive, cluster, f"{cutoff}.parquet")


def footer_metadata(
    cluster: str, cutoff: int, run_id: str, manifests: Iterable[HostManifest]
) -> dict[str, str]:
    """The commit record: run identity and, per host, the archived files and row counts."""
    sources = {
        m.host: {
            "rows": m.rows,
            "files": [{"name": f.name, "size": f.size, "rows": f.rows} for f in m.files],
        }
        for m in sorted(manifests, key=lambda m: m.host)
        if m.files
    }
    return {
        META_PREFIX + "version": __version__,
        META_PREFIX + "cluster": cluster,
        META_PREFIX + "cutoff": str(cutoff),
        META_PREFIX + "run_id": run_id,
        META_PREFIX + "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        META_PREFIX + "rows": str(sum(h["rows"] for h in sources.values())),
        META_PREFIX + "sources": json.dumps(sources, separators=(",", ":"), sort_keys=True),
    }


def read_footer(url: str) -> dict[str, str]:
    """The archive's key-value metadata (only this project's keys)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode().startswith(META_PREFIX)}


def footer_sources(footer: Mapping[str, str]) -> dict[str, Any]:
    """Per host {rows, files: [{name, size, rows}]} from a footer."""
    return dict(json.loads(footer.get(META_PREFIX + "sources", "{}")))


def _same_commit(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    keys = ("cluster", "cutoff", "sources")
    return all(a.get(META_PREFIX + k) == b.get(META_PREFIX + k) for k in keys)


def _constant(name: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([name]))


def _row_groups(
    cluster: str, host: str, batches: Iterator[pa.RecordBatch], limit: int
) -> Iterator[pa.Table]:
    """Tables of at most `limit` rows of one host, re-cut from the chunk's batches."""
    buffered: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        buffered.append(batch)
        count += batch.num_rows
        while count >= limit:
            table = pa.Table.from_batches(buffered)
            yield _with_names(cluster, host, table.slice(0, limit))
            rest = table.slice(limit)
            buffered = rest.to_batches()
            count = rest.num_rows
    if count:
        yield _with_names(cluster, host, pa.Table.from_batches(buffered))


def _with_names(cluster: str, host: str, table: pa.Table) -> pa.Table:
    n = table.num_rows
    columns = [_constant(cluster, n), _constant(host, n), *table.columns]
    return pa.Table.from_arrays(columns, schema=_WRITE_SCHEMA)


def _writer(sink: BinaryIO, options: ParquetOptions) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        sink,
        _WRITE_SCHEMA,
        store_schema=False,
        compression="zstd",
        compression_level=options.zstd_level,
        use_dictionary=[*_STRING_COLUMNS, "frequency"],
        column_encoding={"timestamp": "DELTA_BINARY_PACKED", "value": "BYTE_STREAM_SPLIT"},
        write_statistics=True,
        write_page_index=True,
        data_page_size=options.data_page_bytes,
        sorting_columns=[pq.SortingColumn(ARCHIVE_SCHEMA.get_field_index(c)) for c in SORT_KEY],
    )


def write_parquet(
    sink: BinaryIO,
    cluster: str,
    hosts: Iterable[tuple[str, Iterator[pa.RecordBatch]]],
    metadata: Mapping[str, str],
    options: ParquetOptions,
) -> int:
    """Write hosts (already in hostname order) to `sink`; return the rows written."""
    rows = 0
    writer = _writer(sink, options)
    try:
        for host, batches in hosts:
            # One write_table call per row group: a row group never spans two hosts.
            for table in _row_groups(cluster, host, batches, options.row_group_rows):
                writer.write_table(table, row_group_size=options.row_group_rows)
                rows += table.num_rows
                crash_point("finalize:writing")
        writer.add_key_value_metadata(dict(metadata))
    finally:
        writer.close()
    return rows


def verify(url: str, expected_rows: Mapping[str, int], metadata: Mapping[str, str]) -> int:
    """Re-open a written archive and check rows per host and the commit record; return row groups."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        md = pq.ParquetFile(f).metadata
    if md.num_rows != sum(expected_rows.values()):
        raise VerificationError(
            f"{url}: {md.num_rows} rows, expected {sum(expected_rows.values())}"
        )
    host_col = ARCHIVE_SCHEMA.get_field_index("hostname")
    per_host: dict[str, int] = {}
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        stats = rg.column(host_col).statistics
        if stats is None or not stats.has_min_max or stats.min != stats.max:
            raise VerificationError(f"{url}: row group {i} does not hold exactly one host")
        per_host[stats.min] = per_host.get(stats.min, 0) + rg.num_rows
    wanted = {h: n for h, n in expected_rows.items() if n}
    if per_host != wanted:
        raise VerificationError(f"{url}: rows per host differ from the manifests")
    footer = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    if not _same_commit(footer, metadata):
        raise VerificationError(f"{url}: footer metadata differs from the commit record")
    return md.num_row_groups


def write_archive(
    url: str,
    cluster: str,
    hosts: Iterable[tuple[str, Iterator[pa.RecordBatch]]],
    expected_rows: Mapping[str, int],
    metadata: Mapping[str, str],
    options: ParquetOptions,
    before_publish: Callable[[], None] | None = None,
) -> ArchiveInfo:
    """Write, verify and publish one archive; idempotent for an identical commit record.

    `before_publish` runs right before the file becomes visible and may raise to abort
    (the distributed runner checks there that it still owns the cluster's lock).
    """
    fs, path = storage.filesystem(url)
    existing = _existing(url, metadata)
    if existing is not None:
        return existing
    parent = fs._parent(path)
    fs.makedirs(parent, exist_ok=True)
    name = path.rsplit("/", 1)[-1]
    tmp_path = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.partial"
    tmp_url = storage.join(url.rsplit("/", 1)[0], tmp_path.rsplit("/", 1)[-1])
    try:
        if storage.is_local(fs):
            with open(tmp_path, "wb") as f:
                rows = write_parquet(f, cluster, hosts, metadata, options)
                f.flush()
                os.fsync(f.fileno())
        else:
            with fs.open(tmp_path, "wb") as f:
                rows = write_parquet(f, cluster, hosts, metadata, options)
        row_groups = verify(tmp_url, expected_rows, metadata)
        size = int(fs.size(tmp_path))
        if before_publish is not None:
            before_publish()
        if not _publish(fs, tmp_path, path):
            again = _existing(url, metadata)
            if again is None:
                raise ArchiveConflict(f"{url} appeared meanwhile with other content")
            return again
    finally:
        if fs.exists(tmp_path):
            fs.rm(tmp_path)
    return ArchiveInfo(url=url, rows=rows, bytes=size, row_groups=row_groups)


def _existing(url: str, metadata: Mapping[str, str]) -> ArchiveInfo | None:
    """The already published archive when it records the same commit; raise on a conflict."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return None
    footer = read_footer(url)
    if not _same_commit(footer, metadata):
        raise ArchiveConflict(
            f"{url} already exists with other content; it is kept and these files are not archived"
        )
    with fs.open(path, "rb") as f:
        md = pq.ParquetFile(f).metadata
    return ArchiveInfo(url, md.num_rows, int(fs.size(path)), md.num_row_groups, True)


def _publish(fs: Any, tmp_path: str, path: str) -> bool:
    """Make the verified file visible under its final name; False if that name is taken."""
    if storage.is_local(fs):
        try:
            # link() fails if the name exists, unlike rename(): never replace an archive.
            os.link(tmp_path, path)
        except FileExistsError:
            return False
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True
    if fs.exists(path):
        return False
    fs.copy(tmp_path, path)
    return True

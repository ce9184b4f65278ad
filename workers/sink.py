"""The Parquet sink: streams hosts' rows into one cluster archive, verifies it, publishes it.

The file is streamed into an `output.Output` (local: a temporary name; S3: a multipart
upload), verified by re-reading its footer (row counts per host, metadata), and only then
published under `<archive>/<cluster>/<T>.parquet` without ever replacing an existing
file. The footer's key-value metadata is the commit record: it lists every archived
source file with its size.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, TypeVar, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__, output, storage
from .alloc import tune_allocator
from .faults import crash_point
from .manifest import ArchiveInfo, HostManifest, ParquetOptions
from .paths import archive_url as archive_url  # re-exported: `sink.archive_url` stays valid
from .rows import ARCHIVE_SCHEMA, SORT_KEY

META_PREFIX = "ccarchive."
T = TypeVar("T")
_DICT = pa.dictionary(pa.int32(), pa.string())
#: cluster and hostname: one name per row group, so one-byte indices (the writer stores
#: dictionary indices in its own bit width whatever their Arrow type: the same bytes).
_CONSTANT = pa.dictionary(pa.int8(), pa.string())
_CONSTANT_COLUMNS = ("cluster", "hostname")
_STRING_COLUMNS = ("cluster", "hostname", "metric", "scope", "scope_id")

# What is handed to the Parquet writer: strings stay dictionary-encoded end to end. The
# Arrow schema is not stored in the file (store_schema=False), so every reader sees plain
# STRING columns, exactly like the upstream archives.
_WRITE_SCHEMA = pa.schema(
    [
        pa.field(
            f.name,
            _CONSTANT
            if f.name in _CONSTANT_COLUMNS
            else _DICT
            if f.name in _STRING_COLUMNS
            else f.type,
            nullable=False,
        )
        for f in ARCHIVE_SCHEMA
    ]
)


class ArchiveConflict(Exception):
    """An archive with the same name but other content exists; it is left alone."""


class VerificationError(Exception):
    """The written file does not hold what was written into it."""


@dataclass(frozen=True)
class CommitRecord:
    """What an archive must hold: rows per host, and the footer metadata naming its sources."""

    rows: Mapping[str, int]
    metadata: Mapping[str, str]


def commit_record(
    cluster: str, cutoff: int, run_id: str, manifests: Iterable[HostManifest]
) -> CommitRecord:
    """The commit record of an archive made from these hosts' manifests."""
    with_files = [m for m in manifests if m.files]
    return CommitRecord(
        rows={m.host: m.rows for m in with_files},
        metadata=footer_metadata(cluster, cutoff, run_id, with_files),
    )


def footer_metadata(
    cluster: str, cutoff: int, run_id: str, manifests: Iterable[HostManifest]
) -> dict[str, str]:
    """The commit record: run identity and, per host, the archived files and row counts."""
    sources: dict[str, dict[str, Any]] = {
        m.host: {
            "rows": m.rows,
            "digest": m.digest,
            # Each file's identity as read: recovery deletes it only if it is still that file.
            "files": [asdict(f) for f in m.files],
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
        META_PREFIX + "rows": str(sum(int(h["rows"]) for h in sources.values())),
        META_PREFIX + "sources": json.dumps(sources, separators=(",", ":"), sort_keys=True),
    }


def read_metadata(url: str) -> pq.FileMetaData:
    """The Parquet footer of a published archive (S3: a ranged read of the file's end)."""
    with storage.open_input(url) as f:
        return pq.ParquetFile(f).metadata


def _project_keys(md: pq.FileMetaData) -> dict[str, str]:
    meta = md.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode().startswith(META_PREFIX)}


def read_footer(url: str) -> dict[str, str]:
    """The archive's key-value metadata (only this project's keys)."""
    return _project_keys(read_metadata(url))


def footer_sources(footer: Mapping[str, str]) -> dict[str, Any]:
    """Per host {rows, digest, files: [SourceFile fields]} from a footer."""
    return dict(json.loads(footer.get(META_PREFIX + "sources", "{}")))


def _same_commit(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    keys = ("cluster", "cutoff", "sources")
    return all(a.get(META_PREFIX + k) == b.get(META_PREFIX + k) for k in keys)


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


_ZEROS = np.zeros(0, np.int8)


def _with_names(cluster: str, host: str, table: pa.Table) -> pa.Table:
    # cluster and hostname are constant per row group: dictionary indices that are all 0,
    # sliced from one shared array instead of allocating (and page-faulting) per group;
    # int8, so the array a process keeps is 1 MiB for the largest row group, not 4.
    global _ZEROS
    n = table.num_rows
    if len(_ZEROS) < n:
        _ZEROS = np.zeros(n, np.int8)
        _ZEROS.flags.writeable = False
    zeros = pa.array(_ZEROS[:n])

    def constant(name: str) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(zeros, pa.array([name]))

    columns = [constant(cluster), constant(host), *table.columns]
    return pa.Table.from_arrays(columns, schema=_WRITE_SCHEMA)


def _writer(sink: BinaryIO, options: ParquetOptions) -> pq.ParquetWriter:
    return pq.ParquetWriter(sink, _WRITE_SCHEMA, **_writer_options(options))


_STATISTICS = ("hostname", "metric", "timestamp", "frequency", "value")


def _writer_options(options: ParquetOptions) -> dict[str, Any]:
    """ParquetWriter keyword arguments (bench/probes.py varies them one at a time).

    Each setting was chosen for bytes per row and writer CPU on generated data; the reasons
    and figures are in bench/README.md ("What changed", 5, and "Parquet writer settings").
    """
    return {
        "store_schema": False,
        "compression": "zstd",
        "compression_level": options.zstd_level,
        # The chunks arrive dictionary-encoded (no hashing); sorted rows make long runs.
        "use_dictionary": [*_STRING_COLUMNS, "frequency"],
        # Plain values: zstd finds the repeated float32 bit patterns BYTE_STREAM_SPLIT scatters.
        "column_encoding": {"timestamp": "DELTA_BINARY_PACKED", "value": "PLAIN"},
        # Only where they can skip data; verify() reads hostname's to check one host per group.
        "write_statistics": list(_STATISTICS),
        "write_page_index": True,
        "data_page_size": options.data_page_bytes,
        "max_rows_per_page": options.page_rows,
        # Arrow computes dictionary statistics per write batch: small batches cost CPU.
        "write_batch_size": options.page_rows,
        "sorting_columns": [pq.SortingColumn(ARCHIVE_SCHEMA.get_field_index(c)) for c in SORT_KEY],
    }


def write_parquet(
    sink: BinaryIO,
    cluster: str,
    hosts: Iterable[tuple[str, Iterator[pa.RecordBatch]]],
    footer: Callable[[], Mapping[str, str]],
    options: ParquetOptions,
) -> int:
    """Write hosts (already in hostname order) to `sink`; return the rows written.

    `footer()` gives the key-value metadata; it is called once the hosts are exhausted.
    """
    tune_allocator()
    rows = 0
    writer = _writer(sink, options)
    try:
        for host, batches in hosts:
            # One write_table call per row group: a row group never spans two hosts.
            for table in _row_groups(cluster, host, batches, options.row_group_rows):
                writer.write_table(table, row_group_size=options.row_group_rows)
                rows += table.num_rows
                # Written: not kept alive while the next host is read (a whole host's rows).
                del table
                crash_point("finalize:writing")
            del batches
        writer.add_key_value_metadata(dict(footer()))
    finally:
        writer.close()
    return rows


def verify(url: str, expected_rows: Mapping[str, int], metadata: Mapping[str, str]) -> int:
    """Re-open a written archive and check rows per host and the commit record; return row groups."""
    return verify_metadata(read_metadata(url), expected_rows, metadata, url)


def verify_metadata(
    md: pq.FileMetaData, expected_rows: Mapping[str, int], metadata: Mapping[str, str], url: str
) -> int:
    """Check a footer against the manifests' rows per host and the commit record; return row groups."""
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


def _then(items: Iterable[T], after: Callable[[], None]) -> Iterator[T]:
    """Yield the items, then call `after` (when the consumer asks past the last one)."""
    yield from items
    after()


def write_archive(
    url: str,
    cluster: str,
    hosts: Iterable[tuple[str, Iterator[pa.RecordBatch]]],
    record: CommitRecord | Callable[[], CommitRecord],
    options: ParquetOptions,
    before_publish: Callable[[], None] | None = None,
) -> ArchiveInfo:
    """Write, verify and publish one archive; idempotent for an identical commit record.

    `record` may be a function, called once `hosts` is exhausted: the embedded runner
    streams hosts into the file while later ones are still loading, so the sources are
    known only at the end. An existing archive is then looked at only if the name turns
    out to be taken when publishing.

    The file is streamed into an `output.Output` (local: temporary file; S3: multipart
    upload), so it is never whole in memory and nothing is visible under `url` before
    `commit()`. Before the commit its footer is read back from the bytes actually written
    and verified; after the commit the published file is verified once more (for S3 that
    is the first read of the real object) and removed again if it fails.

    `before_publish` runs right before the file becomes visible and may raise to abort
    (the distributed runner checks there that it still owns the cluster's lock).
    """
    if isinstance(record, CommitRecord):
        existing = existing_archive(url, record.metadata)
        if existing is not None:
            return existing
        known = record
        commit_record_now: Callable[[], CommitRecord] = lambda: known  # noqa: E731
    else:
        commit_record_now = functools.cache(record)  # called for the footer, then kept
    with output.create(url, exclusive=True) as out:
        # write_parquet consumes the hosts in order and then writes only the page index and
        # the footer: from that mark on the output keeps the bytes for readback(), because
        # an S3 upload cannot be read before it is completed.
        rows = write_parquet(
            cast(BinaryIO, out),
            cluster,
            _then(hosts, out.mark_tail),
            lambda: commit_record_now().metadata,
            options,
        )
        final = commit_record_now()
        out.close()
        with out.readback() as written:
            md = pq.ParquetFile(written).metadata
        row_groups = verify_metadata(md, final.rows, final.metadata, url)
        if before_publish is not None:
            before_publish()
        if not out.commit():  # the name was taken meanwhile; it was not replaced
            again = existing_archive(url, final.metadata)
            if again is None:
                raise ArchiveConflict(f"{url} appeared meanwhile with other content")
            return again
    try:
        verify(url, final.rows, final.metadata)
    except VerificationError:
        out.retract()  # it is ours (created exclusively) and wrong: no one may rely on it
        raise
    return ArchiveInfo(url=url, rows=rows, bytes=out.size, row_groups=row_groups)


def existing_archive(url: str, metadata: Mapping[str, str]) -> ArchiveInfo | None:
    """The already published archive when it records the same commit (None if there is
    none); raise ArchiveConflict if another one is there.

    The existing file is verified against its own commit record (rows per host) before it
    is trusted: a file that only claims to hold the rows must not let checkpoints go.
    """
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return None
    try:
        md = read_metadata(url)
    except pa.ArrowInvalid as exc:  # not Parquet at all (I/O errors propagate: may be transient)
        raise ArchiveConflict(
            f"{url} already exists and is not a readable archive ({exc}); it is kept and these files are not archived"
        ) from exc
    footer = _project_keys(md)
    if not _same_commit(footer, metadata):
        raise ArchiveConflict(
            f"{url} already exists with other content; it is kept and these files are not archived"
        )
    recorded = {host: int(entry["rows"]) for host, entry in footer_sources(footer).items()}
    try:
        verify_metadata(md, recorded, metadata, url)
    except VerificationError as exc:
        raise ArchiveConflict(
            f"{url} already exists but fails verification ({exc}); it is kept and these files are not archived"
        ) from exc
    return ArchiveInfo(url, md.num_rows, int(fs.size(path)), md.num_row_groups, True)

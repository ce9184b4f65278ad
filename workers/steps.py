"""The archiver's steps as plain functions: discover, load a host, finalize a cluster, delete.

Nothing here knows about Celery or process pools: `runner` (in-process) and `tasks`
(Celery) both call these with JSON-able arguments and get small manifests back.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import storage
from .faults import crash_point
from .logs import step_context
from .manifest import (
    ArchiveInfo,
    BadFile,
    DeleteResult,
    HostManifest,
    ParquetOptions,
    SourceFile,
    shown_name,
)
from .paths import (
    BadCheckpoint,
    UnsafeName,
    archive_url,
    check_cutoff,
    check_name,
    checkpoint_timestamp,
    chunk_url,
    cluster_url,
    host_dir,
)
from .sourcefiles import Listed, delete_if_unchanged, listed_identity, read_listed
from .staging import remove_run_if_empty

if TYPE_CHECKING:
    import pyarrow as pa

    from .checkpoint import FileBatch

log = logging.getLogger(__name__)


@dataclass
class ClusterPlan:
    """A cluster found under the checkpoint root, with its host directories.

    `refused`: the directory's name is not safe (control character, not UTF-8): `cluster`
    is then its printable form (`shown_name`), `bad` says why, and nothing in it is touched.
    """

    cluster: str
    hosts: list[str] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)
    refused: bool = False


def _subdirs(path: Path, what: str) -> tuple[list[str], list[BadFile]]:
    names: list[str] = []
    bad: list[BadFile] = []
    with os.scandir(path) as entries:
        for entry in entries:
            # Only real directories: a symlink could point anywhere.
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                names.append(check_name(entry.name, what))
            except UnsafeName as exc:
                shown = os.path.join(shown_name(str(path)), shown_name(entry.name))
                bad.append(BadFile(shown, f"refused {what} directory: {exc}"))
    # Code point order equals UTF-8 byte order: the archive's host order.
    return sorted(names), bad


def discover(checkpoints: str | Path) -> list[ClusterPlan]:
    """Clusters and their hosts under the checkpoint root; unreadable directories reported.

    A cluster directory whose name is refused comes back as a plan with `refused` set, so
    it is reported (exit 1) like any other kept input, never silently skipped.
    """
    root = Path(checkpoints)
    clusters, bad_clusters = _subdirs(root, "cluster")
    plans: list[ClusterPlan] = []
    for cluster in clusters:
        plan = ClusterPlan(cluster)
        try:
            plan.hosts, plan.bad = _subdirs(root / cluster, "host")
        except OSError as exc:
            plan.bad.append(BadFile(str(root / cluster), f"cannot list: {exc.strerror or exc}"))
        plans.append(plan)
    for bad in bad_clusters:
        log.warning("refused a cluster directory: %s: %s", bad.path, bad.reason)
        plans.append(ClusterPlan(os.path.basename(bad.path), bad=[bad], refused=True))
    return plans


@dataclass(frozen=True)
class Selection:
    """The checkpoint files of one host that a cutoff selects, and the bad names seen."""

    files: list[Listed]  # in (ts, name) order
    bad: list[BadFile]


def select_files(directory: Path, cutoff: int, exclude: Collection[str] = ()) -> Selection:
    """Checkpoint files with 0 < ts <= cutoff, less `exclude`; bad names reported; rest ignored."""
    files: list[Listed] = []
    bad: list[BadFile] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            ts = checkpoint_timestamp(entry.name)
            if isinstance(ts, BadCheckpoint):
                bad.append(BadFile(entry.path, ts.reason))
            elif ts is not None and ts != 0 and ts <= cutoff and entry.name not in exclude:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # gone since the listing: nothing to archive or delete
                files.append(Listed(entry.name, ts, st.st_dev, st.st_ino))
    files.sort(key=lambda f: (f.ts, f.name))
    return Selection(files, bad)


def _read(directory: Path, listed: Listed) -> tuple[FileBatch, SourceFile]:
    """Parse one listed file; return its series and its identity as read."""
    # Deferred here and below: numpy and pyarrow load only once a host has a file to read,
    # so a run with nothing to do stays cheap.
    from .checkpoint import parse_binary_batch, parse_json_batch

    data, source = read_listed(directory, listed)
    batch = parse_binary_batch(data) if listed.name.endswith(".bin") else parse_json_batch(data)
    return batch, source


@step_context  # log lines inside carry run_id, cluster and host
def load_host(
    checkpoints: str,
    cluster: str,
    host: str,
    cutoff: int,
    staging_url: str,
    run_id: str,
    chunk_compression: str | None = "lz4",
    exclude: Collection[str] = (),
) -> HostManifest:
    """Read a host's selected files, sort its rows and stage them as one Arrow IPC chunk.

    `exclude` names files a committed archive already holds (see `recovery`): never again.
    """
    started = time.perf_counter()
    manifest, table = read_host(checkpoints, cluster, host, cutoff, run_id, exclude)
    if table is not None and table.num_rows:
        from . import chunks  # deferred: see _read

        url = chunk_url(staging_url, run_id, cluster, host)
        chunks.write_chunk(table, url, chunk_compression)
        manifest.chunk = url
    crash_point("load:staged")
    manifest.seconds = time.perf_counter() - started
    return manifest


@step_context
def read_host(
    checkpoints: str,
    cluster: str,
    host: str,
    cutoff: int,
    run_id: str,
    exclude: Collection[str] = (),
) -> tuple[HostManifest, pa.Table | None]:
    """Read a host's selected files and sort its rows: its manifest (no chunk) and rows
    (None if no file was read). `load_host` without staging, for a writer in this process.
    """
    started = time.perf_counter()
    check_name(run_id, "run id")  # part of the chunk's path in staging
    check_cutoff(cutoff)
    manifest = HostManifest(cluster=cluster, host=host, cutoff=cutoff, run_id=run_id)
    directory = host_dir(checkpoints, cluster, host)
    try:
        selection = select_files(directory, cutoff, exclude)
    except OSError as exc:
        manifest.bad.append(BadFile(str(directory), f"cannot list: {exc.strerror or exc}"))
        return manifest, None
    manifest.bad.extend(selection.bad)
    batches: list[FileBatch] = []
    for listed in selection.files:
        try:
            batch, source = _read(directory, listed)
        except BadCheckpoint as exc:
            path = directory / listed.name
            manifest.bad.append(BadFile(str(path), exc.reason))
            log.info("bad checkpoint %s: %s", path, exc.reason)
            continue
        manifest.files.append(replace(source, rows=batch.rows))
        batches.append(batch)
    table = None
    if batches:  # else no rows and no digest (nothing goes into an archive)
        from .rows import host_table, table_digest  # deferred: see _read

        table = host_table(batches)
        batches.clear()  # the table holds the rows now: free the parsed files
        manifest.rows = table.num_rows
        manifest.digest = table_digest(table)
    crash_point("load:read")
    manifest.seconds = time.perf_counter() - started
    return manifest, table


@step_context
def finalize_cluster(
    cluster: str,
    cutoff: int,
    run_id: str,
    manifests: list[HostManifest],
    archive: str,
    options: ParquetOptions | None = None,
    before_publish: Callable[[], None] | None = None,
    rows_of: RowsOf | None = None,
) -> ArchiveInfo | None:
    """Stream the cluster's chunks in host order into its verified archive; None if no rows.

    `rows_of(manifest)` gives a host's rows; by default its staged chunk, checked.
    """
    _check_finalize_names(cluster, cutoff, run_id)
    for m in manifests:
        check_name(m.host, "host")
    ordered = sorted((m for m in manifests if m.files), key=lambda m: m.host)
    if not any(m.rows for m in ordered):
        return None
    from . import sink  # deferred: see _read

    info = sink.write_archive(
        archive_url(archive, cluster, cutoff),
        cluster,
        _chunks(ordered, rows_of or staged_rows),
        sink.commit_record(cluster, cutoff, run_id, ordered),
        options or ParquetOptions(),
        before_publish,
    )
    crash_point("finalize:committed")
    return info


@step_context
def finalize_streaming(
    cluster: str,
    cutoff: int,
    run_id: str,
    manifests: Iterable[HostManifest],
    archive: str,
    options: ParquetOptions | None = None,
    rows_of: RowsOf | None = None,
) -> ArchiveInfo | None:
    """Like `finalize_cluster`, but writing each host as soon as the iterable yields it.

    `manifests` yields in hostname order and may block while a host is still loading: the
    file is written while later hosts load. If the archive already exists this waits for
    every host and takes the `finalize_cluster` path (same commit record: nothing to write).
    """
    _check_finalize_names(cluster, cutoff, run_id)
    url = archive_url(archive, cluster, cutoff)
    fs, path = storage.filesystem(url)
    arrived = iter(manifests)
    head: list[HostManifest] = []  # up to the first host with rows: nothing to write before
    for m in arrived:
        head.append(m)
        if m.files and m.rows:
            break
    if not any(m.files and m.rows for m in head) or fs.exists(path):
        everything = [*head, *arrived]
        return finalize_cluster(
            cluster, cutoff, run_id, everything, archive, options, rows_of=rows_of
        )
    from . import sink  # deferred: see _read

    seen: list[HostManifest] = []

    def in_order() -> Iterator[HostManifest]:
        for m in itertools.chain(head, arrived):
            check_name(m.host, "host")
            if seen and m.host <= seen[-1].host:
                raise ValueError(f"{cluster}: hosts out of order ({m.host} after {seen[-1].host})")
            if m.files:
                seen.append(m)
                yield m

    info = sink.write_archive(
        url,
        cluster,
        _chunks(in_order(), rows_of or staged_rows),
        lambda: sink.commit_record(cluster, cutoff, run_id, seen),
        options or ParquetOptions(),
    )
    crash_point("finalize:committed")
    return info


def _check_finalize_names(cluster: str, cutoff: int, run_id: str) -> None:
    check_name(cluster, "cluster")
    check_name(run_id, "run id")
    check_cutoff(cutoff)  # the archive's file name


#: A host's rows for the writer: its staged chunk (`staged_rows`) or rows held in memory.
RowsOf = Callable[[HostManifest], Iterator["pa.RecordBatch"]]


def _chunks(
    manifests: Iterable[HostManifest], rows_of: RowsOf
) -> Iterator[tuple[str, Iterator[pa.RecordBatch]]]:
    """(host, its batches) for each manifest with rows, in the order given."""
    return ((m.host, rows_of(m)) for m in manifests if m.rows)


def staged_rows(m: HostManifest) -> Iterator[pa.RecordBatch]:
    """The host's staged batches; at their end, fail unless they are the rows it loaded.

    Raised inside the write, before the footer: the archive is never published.
    """
    from . import chunks, sink  # deferred: see _read
    from .rows import RowDigest

    if m.chunk is None:
        raise sink.VerificationError(f"{m.cluster}/{m.host}: {m.rows} rows loaded, none staged")
    digest = RowDigest()
    for batch in chunks.read_chunk(m.chunk):
        digest.update(batch)
        yield batch
    if digest.hexdigest() != m.digest:
        raise sink.VerificationError(
            f"{m.cluster}/{m.host}: staged rows {m.chunk} differ from the rows loaded "
            f"(digest {digest.hexdigest()}, loaded {m.digest or 'none'})"
        )


class HeldRows:
    """Rows read in this process (`read_host`), handed to the writer once: a `RowsOf`.

    With one worker the embedded runner writes each host as it reads it, so its rows never
    go through a staging chunk and back (an LZ4 IPC write and read, and a second copy).
    """

    def __init__(self) -> None:
        self._tables: dict[str, pa.Table] = {}

    def hold(self, manifest: HostManifest, table: pa.Table | None) -> HostManifest:
        """Keep the host's rows until the writer asks for them; return the manifest."""
        if table is not None and table.num_rows:
            self._tables[manifest.host] = table
        return manifest

    def __call__(self, m: HostManifest) -> Iterator[pa.RecordBatch]:
        from . import sink  # deferred: see _read

        table = self._tables.pop(m.host, None)  # popped: freed once written
        if table is None or table.num_rows != m.rows:
            raise sink.VerificationError(f"{m.cluster}/{m.host}: rows not held for the writer")
        yield from table.to_batches()


@step_context
def delete_files(
    checkpoints: str, cluster: str, host: str, files: list[SourceFile]
) -> DeleteResult:
    """Delete exactly these files of one host, each only if it is still the file recorded."""
    result = DeleteResult(cluster=cluster, host=host)
    directory = host_dir(checkpoints, cluster, host)
    for f in files:
        try:
            path = directory / check_name(f.name, "file name")
        except UnsafeName as exc:  # only a forged message can carry one: keep the others going
            result.kept.append(BadFile(str(directory), str(exc)))
            continue
        try:
            reason = delete_if_unchanged(path, f)
        except FileNotFoundError:
            result.already_gone.append(f.name)
        except OSError as exc:
            result.kept.append(BadFile(str(path), f"cannot delete: {exc.strerror or exc}"))
        else:
            if reason is None:
                result.deleted.append(f.name)
                crash_point("delete:partial")
            else:
                log.warning("kept %s: %s", path, reason)
                result.kept.append(BadFile(str(path), reason))
    return result


@step_context
def delete_expired(checkpoints: str, cluster: str, host: str, cutoff: int) -> DeleteResult:
    """Delete mode: remove the host's checkpoint files selected by the cutoff, unread."""
    directory = host_dir(checkpoints, cluster, host)
    try:
        selection = select_files(directory, cutoff)
    except OSError as exc:
        result = DeleteResult(cluster=cluster, host=host)
        result.kept.append(BadFile(str(directory), f"cannot list: {exc.strerror or exc}"))
        return result
    listed: list[SourceFile] = []
    for f in selection.files:
        try:
            listed.append(listed_identity(directory / f.name))
        except OSError:
            continue  # gone meanwhile
    result = delete_files(checkpoints, cluster, host, listed)
    result.kept.extend(selection.bad)
    return result


def cleanup_staging(staging_url: str, run_id: str, cluster: str, whole_run: bool = True) -> None:
    """Remove a cluster's staging chunks of one run, and (`whole_run`) the run's directory
    once nothing but its marker is left in it."""
    # Both names come from task messages: "..", say, would make this remove a whole root.
    check_name(run_id, "run id")
    check_name(cluster, "cluster")
    storage.remove_tree(cluster_url(staging_url, run_id, cluster))
    if whole_run:
        with suppress(OSError):  # the prefix is already gone, or swept later (it is marked)
            remove_run_if_empty(staging_url, run_id)


__all__ = [
    "ClusterPlan",
    "Selection",
    "UnsafeName",
    "check_cutoff",
    "check_name",
    "cleanup_staging",
    "delete_expired",
    "delete_files",
    "discover",
    "finalize_cluster",
    "host_dir",
    "load_host",
    "select_files",
]

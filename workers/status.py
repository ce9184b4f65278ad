"""`ccarchive status`: per cluster, its archives, last run and pending recoveries.

Reads listings, footers and run records, never data; the CLI presents the result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from . import sink, storage
from .manifest import SourceFile
from .paths import check_name, cluster_dirs, list_archive_dir, name_of, present_files
from .reporting import ProgressFn, no_progress
from .runlog import RunRecord, read_runs
from .sourcefiles import change


@dataclass(frozen=True)
class ArchiveSummary:
    """One published archive file, from its listing and its footer."""

    url: str
    cutoff: int
    bytes: int
    rows: int
    row_groups: int
    hosts: int | None  # None: no ccarchive commit record (e.g. written by cc-backend)
    source_files: int | None
    run_id: str | None
    created: str | None


@dataclass(frozen=True)
class PendingFile:
    """A checkpoint file still present although a committed archive lists it.

    `delete`: still the very file archived, the next run's recovery deletes it. `keep`: it
    changed since; the next run reports it and leaves it for a person to decide.
    """

    host: str
    name: str
    archive: str
    archived_size: int
    size: int
    action: str


@dataclass
class ClusterStatus:
    """Everything `status` knows about one cluster."""

    cluster: str
    archives: list[ArchiveSummary] = field(default_factory=list)
    runs: int = 0  # run records present
    last_run: RunRecord | None = None
    pending: list[PendingFile] | None = None  # None: checkpoints (or archive) not configured
    partial_files: list[str] = field(default_factory=list)  # temporary files of dead runs
    problems: list[str] = field(default_factory=list)  # unreadable archives, records

    @property
    def rows(self) -> int:
        """Rows in all archives of the cluster."""
        return sum(a.rows for a in self.archives)

    @property
    def bytes(self) -> int:
        """Bytes of all archives of the cluster."""
        return sum(a.bytes for a in self.archives)


@dataclass
class Status:
    """`ccarchive status`: per cluster, archives, last run and pending recoveries."""

    archive: str | None
    checkpoints: str | None
    run_log: str | None
    clusters: list[ClusterStatus] = field(default_factory=list)


def _summarize_archive(url: str, cutoff: int, size: int) -> tuple[ArchiveSummary, dict[str, Any]]:
    """Summary and per-host sources of one archive, from its footer only."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        md = pq.ParquetFile(f).metadata
    footer = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    has_record = sink.META_PREFIX + "sources" in footer
    sources = sink.footer_sources(footer) if has_record else {}
    summary = ArchiveSummary(
        url=url,
        cutoff=cutoff,
        bytes=size,
        rows=md.num_rows,
        row_groups=md.num_row_groups,
        hosts=len(sources) if has_record else None,
        source_files=sum(len(h.get("files", [])) for h in sources.values()) if has_record else None,
        run_id=footer.get(sink.META_PREFIX + "run_id"),
        created=footer.get(sink.META_PREFIX + "created"),
    )
    return summary, sources


def _unchanged(path: Path, source: SourceFile) -> bool:
    """Whether recovery would delete this file: still the very file archived."""
    try:
        return change(path, source) is None
    except OSError:
        return False


def _read_archives(status: ClusterStatus, archive: str, progress: ProgressFn) -> list[Any]:
    """Summarize the cluster's archives into `status`; return (url, sources) of each read."""
    listing = list_archive_dir(archive, status.cluster)
    status.partial_files = [
        storage.join(archive, status.cluster, name_of(str(info["name"])))
        for info in listing.partials
    ]
    sources_of: list[tuple[str, dict[str, Any]]] = []
    for i, (cutoff, url, size, kind) in enumerate(listing.archives):
        try:
            if kind not in ("file", "directory"):  # a FIFO would block the reader forever
                raise OSError(f"not a regular file ({kind})")
            summary, sources = _summarize_archive(url, cutoff, size)
        except Exception as exc:  # a broken file must not hide the others
            status.problems.append(f"cannot read {url}: {type(exc).__name__}: {exc}")
        else:
            status.archives.append(summary)
            sources_of.append((url, sources))
        progress(i + 1, len(listing.archives))
    return sources_of


def _pending(
    checkpoints: str, cluster: str, sources_of: list[tuple[str, dict[str, Any]]]
) -> list[PendingFile]:
    """The files committed archives list that are still present: what recovery will do."""
    present = present_files(checkpoints, cluster)
    pending = []
    for url, sources in sources_of:
        for host, entry in sorted(sources.items()):
            for f in entry.get("files", []):
                if f["name"] not in present.get(host, {}):
                    continue
                source = SourceFile.from_dict(f)
                path = Path(checkpoints) / cluster / host / source.name
                try:
                    size = os.stat(path, follow_symlinks=False).st_size
                except OSError:
                    continue  # gone since the listing: nothing pending
                pending.append(
                    PendingFile(
                        host=host,
                        name=f["name"],
                        archive=url,
                        archived_size=int(f["size"]),
                        size=size,
                        action="delete" if _unchanged(path, source) else "keep",
                    )
                )
    return pending


def cluster_status(
    archive: str | None,
    cluster: str,
    checkpoints: str | None = None,
    run_log: str | None = None,
    progress: ProgressFn = no_progress,
) -> ClusterStatus:
    """One cluster's archives, last run and pending recoveries (reads footers, not data).

    `archive` None (delete mode keeps no archive): only the run records are read.
    """
    status = ClusterStatus(check_name(cluster, "cluster"))
    sources_of = _read_archives(status, archive, progress) if archive else []
    if run_log:
        try:
            urls, status.last_run = read_runs(run_log, cluster)
            status.runs = len(urls)
        except OSError as exc:
            status.problems.append(f"cannot read run records: {exc}")
    if checkpoints and archive:
        status.pending = _pending(checkpoints, cluster, sources_of)
    return status


def status(
    archive: str | None,
    checkpoints: str | None = None,
    run_log: str | None = None,
    clusters: Sequence[str] | None = None,
    progress: ProgressFn = no_progress,
) -> Status:
    """Every cluster found under the archive, the run log or the checkpoints (or `clusters`)."""
    names = set(clusters or ())
    if not clusters:
        if archive:
            names.update(cluster_dirs(archive))
        if run_log:
            names.update(cluster_dirs(run_log))
        if checkpoints and Path(checkpoints).is_dir():
            names.update(cluster_dirs(checkpoints))
    result = Status(archive=archive, checkpoints=checkpoints, run_log=run_log)
    ordered = sorted(names)
    for i, name in enumerate(ordered):
        result.clusters.append(cluster_status(archive, name, checkpoints, run_log))
        progress(i + 1, len(ordered))
    return result


__all__ = [
    "ArchiveSummary",
    "ClusterStatus",
    "PendingFile",
    "Status",
    "cluster_status",
    "status",
]

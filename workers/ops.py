"""What operators ask about archives: status, inspect, query — and the run records.

Everything here reads; the writers are `record_start`/`record_run`, which the runner calls
when a cluster starts and is done, so the format of a run record is defined next to its reader. The
functions return small dataclasses (JSON-able with `to_json`); presentation is the CLI's.

Run records: `<run_log>/<cluster>/<finished UTC>-<run_id>.json`, one per cluster and run
(S3 has no append, so no shared log file). The names sort by the time the run ended. A
run first writes `<started UTC>-<run_id>.started.json` and removes it with its end record,
so a run killed outright still shows (as `unfinished`).
`run_log` is a setting (CCARCHIVE_RUN_LOG); under the archive root a name starting with
`_` (e.g. `<archive>/_runs`) is skipped by pyarrow, Spark and by `query`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__, sink, storage
from .checkpoint import checkpoint_timestamp
from .manifest import ClusterReport, SourceFile
from .sourcefiles import change
from .steps import UnsafeName, check_name

if TYPE_CHECKING:
    import pyarrow.dataset as ds

log = logging.getLogger(__name__)

#: progress(done, total): called as long work advances (the CLI draws a bar on a terminal).
ProgressFn = Callable[[int, int], None]

#: At most this many kept files are listed in a run record (the count is always exact).
MAX_RECORDED_BAD = 1000


def _noop(_done: int, _total: int) -> None:
    return None


def iso(ts: float | None) -> str | None:
    """A Unix time as an ISO 8601 UTC string (None stays None)."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # beyond year 9999: any int64 is valid
        return None


def to_json(obj: Any) -> str:
    """A dataclass result as indented JSON (for `--json`)."""
    data = (
        dataclasses.asdict(obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type)
        else obj
    )
    return json.dumps(data, indent=2, default=str, ensure_ascii=False)


def _name_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def one_line(exc: BaseException) -> str:
    """An exception as one line of a problem report."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _not_an_archive(schema: pa.Schema) -> str | None:
    """Why a Parquet file's columns are not an archive's (SPEC §3), or None if they are."""
    from .rows import ARCHIVE_SCHEMA

    missing, wrong = [], []
    for f in ARCHIVE_SCHEMA:
        i = schema.get_field_index(f.name)  # -1: absent or ambiguous
        if i < 0:
            missing.append(f.name)
        elif not schema.field(i).type.equals(f.type):
            wrong.append(f"{f.name} is {schema.field(i).type}, not {f.type}")
    if not missing and not wrong:
        return None
    parts = ([f"no column {', '.join(missing)}"] if missing else []) + wrong
    return f"not a metric archive: {'; '.join(parts)}"


def file_kind_problem(fs: Any, path: str) -> str | None:
    """None for a regular file; else why it cannot be read as one (never opens it)."""
    kind = fs.info(path).get("type")
    if kind == "directory":
        return "a directory, not a Parquet file"
    if kind != "file":  # a FIFO would block the reader forever
        return f"not a regular file ({kind})"
    return None


def _subdirs(url: str) -> list[str]:
    """Names of the directories (prefixes) directly below url that may be clusters."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return []
    names = []
    for info in fs.ls(path, detail=True):
        name = _name_of(str(info["name"]))
        if info.get("type") != "directory" or name.startswith((".", "_")):
            continue
        try:
            names.append(check_name(name, "cluster"))
        except UnsafeName:
            continue
    return sorted(names)


# --- run records --------------------------------------------------------------------------


#: Keep at most this many run records per cluster, and none older than this (the settings
#: `run_log_keep` and `run_log_max_age` override both).
DEFAULT_KEEP_RECORDS = 500
DEFAULT_MAX_RECORD_AGE = 90 * 86400.0

#: `<end UTC>-<run id>.json` (a finished run) or `<start UTC>-<run id>.started.json` (a
#: run that began and has not ended yet, or never will: it was killed).
_RECORD_NAME = re.compile(r"(\d{8}T\d{6}Z)-(.+?)(\.started)?\.json")
_STAMP = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class RunRecord:
    """The outcome of one run for one cluster, as the runner recorded it."""

    run_id: str
    cluster: str
    cutoff: int
    mode: str
    finished: str  # ISO 8601 UTC; "" while the run has not ended
    seconds: float
    outcome: str  # ok | reported | error | interrupted | unfinished (start record only)
    hosts: int = 0
    files_archived: int = 0
    files_deleted: int = 0
    rows: int = 0
    bytes_written: int = 0
    archive: str | None = None
    bad_count: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    version: str = ""
    started: str = ""  # ISO 8601 UTC
    pid: int = 0  # the process that ran it (of use for an `unfinished` one)
    host: str = ""  # ... on this machine

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Read a record, ignoring keys a newer version may have added."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def run_outcome(report: ClusterReport) -> str:
    """`ok`, `reported` (bad input kept: exit code 1) or `error` (something failed)."""
    if report.errors:
        return "error"
    return "reported" if report.bad else "ok"


def usable_run_log(run_log: str | None) -> str | None:
    """run_log if its directory exists or can be made, else None after one warning.

    A service user whose home is `/` cannot write the default under ~/.local/state: the
    run goes on (its outcome must not depend on its log), but the operator is told how to
    get records.
    """
    if not run_log:
        return None
    try:
        fs, path = storage.filesystem(run_log)
        fs.makedirs(path, exist_ok=True)
    except Exception as exc:
        log.warning(
            "run records off for this run: cannot create %s (%s); set run_log "
            "(CCARCHIVE_RUN_LOG) to a writable directory, or StateDirectory=ccarchive in the "
            "systemd unit",
            run_log,
            one_line(exc),
        )
        return None
    return run_log


def _write_record(run_log: str, record: RunRecord, name: str) -> str | None:
    url = storage.join(run_log, record.cluster, name)
    try:
        fs, path = storage.filesystem(url)
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, json.dumps(dataclasses.asdict(record), indent=1).encode())
    except Exception as exc:
        log.warning("cannot write run record %s: %s", url, exc)
        return None
    return url


def _checked(report: ClusterReport) -> bool:
    try:  # both are part of the record's path; a report from a message may carry anything
        check_name(report.cluster, "cluster")
        check_name(report.run_id, "run id")
    except UnsafeName as exc:
        log.warning("no run record: %r", str(exc))
        return False
    return True


def record_start(
    run_log: str | None, report: ClusterReport, mode: str, started: float | None = None
) -> str | None:
    """Write the start record of a cluster's run (outcome `unfinished`); return its URL.

    `record_run` replaces it when the run ends; a run killed outright (SIGKILL, power
    loss) leaves it, and `status` shows that run as `unfinished`. Never raises.
    """
    if not run_log or not _checked(report):
        return None
    begun = time.time() if started is None else started
    record = RunRecord(
        run_id=report.run_id,
        cluster=report.cluster,
        cutoff=report.cutoff,
        mode=mode,
        finished="",
        seconds=0.0,
        outcome="unfinished",
        hosts=report.hosts,
        version=__version__,
        started=iso(begun) or "",
        pid=os.getpid(),
        host=socket.gethostname(),
    )
    stamp = time.strftime(_STAMP, time.gmtime(begun))
    return _write_record(run_log, record, f"{stamp}-{report.run_id}.started.json")


def record_run(
    run_log: str | None,
    report: ClusterReport,
    mode: str,
    finished: float | None = None,
    outcome: str | None = None,
    keep: int = DEFAULT_KEEP_RECORDS,
    max_age: float = DEFAULT_MAX_RECORD_AGE,
) -> str | None:
    """Write the run record of a finished cluster; return its URL (None if off or failed).

    `outcome` overrides the one the report implies (`interrupted`). Then removes the run's
    start record and prunes the cluster's records to the newest `keep`, none older than
    `max_age` seconds. Never raises: the outcome of a run must not depend on its log.
    """
    if not run_log or not _checked(report):
        return None
    ended = time.time() if finished is None else finished
    record = RunRecord(
        run_id=report.run_id,
        cluster=report.cluster,
        cutoff=report.cutoff,
        mode=mode,
        finished=iso(ended) or "",
        seconds=round(report.seconds, 3),
        outcome=outcome or run_outcome(report),
        hosts=report.hosts,
        files_archived=report.files_archived,
        files_deleted=report.files_deleted,
        rows=report.rows,
        bytes_written=report.bytes_written,
        archive=report.archive,
        bad_count=len(report.bad),
        bad=[{"path": b.path, "reason": b.reason} for b in report.bad[:MAX_RECORDED_BAD]],
        errors=list(report.errors),
        version=__version__,
        started=iso(ended - report.seconds) or "",
        pid=os.getpid(),
        host=socket.gethostname(),
    )
    stamp = time.strftime(_STAMP, time.gmtime(ended))
    url = _write_record(run_log, record, f"{stamp}-{report.run_id}.json")
    if url is not None:
        try:
            _prune(run_log, report.cluster, report.run_id, keep, max_age)
        except Exception as exc:  # pruning is housekeeping: the next run tries again
            log.warning("cannot prune run records of %s: %s", report.cluster, one_line(exc))
    return url


def _record_names(fs: Any, path: str) -> list[tuple[str, re.Match[str]]]:
    """(name, match) of the run records in a cluster's directory, oldest first; nothing
    else in it (a name this module did not write) is ever listed, read or removed."""
    found = []
    for p in fs.ls(path, detail=False):
        name = _name_of(p)
        m = _RECORD_NAME.fullmatch(name)
        if m is not None:
            found.append((name, m))
    return sorted(found, key=lambda nm: nm[0])


def _prune(run_log: str, cluster: str, run_id: str, keep: int, max_age: float) -> None:
    """Remove the run's start record, then records beyond the newest `keep` or too old."""
    fs, path = storage.filesystem(storage.join(run_log, cluster))
    records = _record_names(fs, path)
    doomed = [n for n, m in records if m.group(3) and m.group(2) == run_id]
    # The record just written stays, however old its end time was given as.
    records = [(n, m) for n, m in records if m.group(2) != run_id]
    surplus = max(0, len(records) - (keep - 1))  # the oldest ones, beyond `keep` with it
    oldest = time.strftime(_STAMP, time.gmtime(time.time() - max_age))  # compare as text
    doomed += [n for i, (n, m) in enumerate(records) if i < surplus or m.group(1) < oldest]
    for name in doomed:
        with suppress(FileNotFoundError):  # a concurrent run pruned it first
            fs.rm_file(storage.join(path, name))


def read_runs(run_log: str, cluster: str) -> tuple[list[str], RunRecord | None]:
    """The URLs of a cluster's run records (oldest first) and the newest readable record.

    A start record whose run also has an end record (the run stopped between writing the
    one and removing the other) is left out.
    """
    fs, path = storage.filesystem(storage.join(run_log, cluster))
    if not fs.exists(path):
        return [], None
    records = _record_names(fs, path)
    ended = {m.group(2) for _, m in records if not m.group(3)}
    names = [n for n, m in records if not (m.group(3) and m.group(2) in ended)]
    urls = [storage.join(run_log, cluster, n) for n in names]
    for url in reversed(urls):
        try:
            rfs, rpath = storage.filesystem(url)
            return urls, RunRecord.from_dict(json.loads(rfs.cat_file(rpath)))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("unreadable run record %s: %s", url, exc)
    return urls, None


# --- status -------------------------------------------------------------------------------


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


def _summarize_archive(url: str, size: int) -> tuple[ArchiveSummary, dict[str, Any]]:
    """Summary and per-host sources of one archive, from its footer only."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        md = pq.ParquetFile(f).metadata
    footer = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    has_record = sink.META_PREFIX + "sources" in footer
    sources = sink.footer_sources(footer) if has_record else {}
    summary = ArchiveSummary(
        url=url,
        cutoff=int(_name_of(url).split(".", 1)[0]),
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


def _present(checkpoints: str, cluster: str) -> dict[str, dict[str, int]]:
    """Per host, the timestamped checkpoint files present and their sizes."""
    root = Path(checkpoints) / cluster
    present: dict[str, dict[str, int]] = {}
    try:
        hosts = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return present
    for host in hosts:
        files: dict[str, int] = {}
        try:
            with os.scandir(host.path) as entries:
                for entry in entries:
                    ts = checkpoint_timestamp(entry.name)
                    if isinstance(ts, int) and ts != 0 and entry.is_file(follow_symlinks=False):
                        files[entry.name] = entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
        present[host.name] = files
    return present


def _entry_time(info: dict[str, Any]) -> float | None:
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, datetime):
        return mtime.timestamp()
    return float(mtime) if mtime else None


def cluster_status(
    archive: str | None,
    cluster: str,
    checkpoints: str | None = None,
    run_log: str | None = None,
    progress: ProgressFn = _noop,
) -> ClusterStatus:
    """One cluster's archives, last run and pending recoveries (reads footers, not data).

    `archive` None (delete mode keeps no archive): only the run records are read.
    """
    status = ClusterStatus(check_name(cluster, "cluster"))
    entries: list[dict[str, Any]] = []
    if archive:
        fs, path = storage.filesystem(storage.join(archive, cluster))
        entries = fs.ls(path, detail=True) if fs.exists(path) else []
    finals: list[tuple[int, str, int, str]] = []
    for info in entries:
        name = _name_of(str(info["name"]))
        stem, _, ext = name.rpartition(".")
        if ext == "parquet" and stem.isascii() and stem.isdigit():
            finals.append((int(stem), name, int(info.get("size") or 0), str(info.get("type"))))
        elif name.startswith(".") and name.endswith(".partial") and archive:
            status.partial_files.append(storage.join(archive, cluster, name))
    finals.sort()
    sources_of: list[tuple[str, dict[str, Any]]] = []
    for i, (_cutoff, name, size, kind) in enumerate(finals):
        url = storage.join(archive or "", cluster, name)
        try:
            if kind not in ("file", "directory"):  # a FIFO would block the reader forever
                raise OSError(f"not a regular file ({kind})")
            summary, sources = _summarize_archive(url, size)
        except Exception as exc:  # a broken file must not hide the others
            status.problems.append(f"cannot read {url}: {type(exc).__name__}: {exc}")
        else:
            status.archives.append(summary)
            sources_of.append((url, sources))
        progress(i + 1, len(finals))
    if run_log:
        try:
            urls, status.last_run = read_runs(run_log, cluster)
            status.runs = len(urls)
        except OSError as exc:
            status.problems.append(f"cannot read run records: {exc}")
    if checkpoints and archive:
        present = _present(checkpoints, cluster)
        status.pending = []
        for url, sources in sources_of:
            for host, entry in sorted(sources.items()):
                for f in entry.get("files", []):
                    now = present.get(host, {}).get(f["name"])
                    if now is not None:
                        source = SourceFile.from_dict(f)
                        file_path = Path(checkpoints) / cluster / host / source.name
                        status.pending.append(
                            PendingFile(
                                host=host,
                                name=f["name"],
                                archive=url,
                                archived_size=int(f["size"]),
                                size=now,
                                action="delete" if _unchanged(file_path, source) else "keep",
                            )
                        )
    return status


def status(
    archive: str | None,
    checkpoints: str | None = None,
    run_log: str | None = None,
    clusters: Sequence[str] | None = None,
    progress: ProgressFn = _noop,
) -> Status:
    """Every cluster found under the archive, the run log or the checkpoints (or `clusters`)."""
    names = set(clusters or ())
    if not clusters:
        if archive:
            names.update(_subdirs(archive))
        if run_log:
            names.update(_subdirs(run_log))
        if checkpoints and Path(checkpoints).is_dir():
            names.update(_subdirs(checkpoints))
    result = Status(archive=archive, checkpoints=checkpoints, run_log=run_log)
    ordered = sorted(names)
    for i, name in enumerate(ordered):
        result.clusters.append(cluster_status(archive, name, checkpoints, run_log))
        progress(i + 1, len(ordered))
    return result


# --- inspect ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnInfo:
    """One column as stored."""

    name: str
    arrow_type: str
    physical_type: str
    logical_type: str
    required: bool
    compression: str
    encodings: list[str]


@dataclass(frozen=True)
class RowGroupInfo:
    """One row group: its rows, size and the ranges its statistics declare."""

    index: int
    rows: int
    bytes: int  # compressed
    hosts: list[str]  # min and max hostname (one entry when they are equal)
    metrics: list[str]  # min and max metric
    time_min: int | None
    time_max: int | None


@dataclass
class Inspection:
    """`ccarchive inspect`: a Parquet file's layout, contents and commit record."""

    url: str
    bytes: int
    rows: int
    created_by: str
    metadata: dict[str, str]  # ccarchive.* footer keys, without the source list
    sorting_columns: list[str]
    columns: list[ColumnInfo]
    row_groups: list[RowGroupInfo]
    hosts: dict[str, int]  # rows per host, from row group statistics
    metrics: list[str]
    time_min: int | None
    time_max: int | None
    sources: dict[str, Any]  # per host {rows, files: [{name, size, rows}]}
    problems: list[str] = field(default_factory=list)  # e.g. not an archive's columns


def _stat_range(stats: Any) -> tuple[Any, Any]:
    if stats is None or not stats.has_min_max:
        return None, None
    return stats.min, stats.max


def inspect_file(url: str, progress: ProgressFn = _noop) -> Inspection:
    """Describe one archive file: schema, row groups, hosts, time range, metrics, sources.

    Everything but the metric list comes from the footer; the metric names are read from
    the dictionary-encoded `metric` column one row group at a time (bounded memory).
    """
    fs, path = storage.filesystem(url)
    size = int(fs.size(path))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        foreign = _not_an_archive(pf.schema_arrow)
        if pa.types.is_string(_field_type(pf.schema_arrow, "metric")):
            pf = pq.ParquetFile(f, read_dictionary=["metric"])  # names, not values, per group
        md = pf.metadata
        # Leaf columns by path ("a.b" for nested ones, only in files of another kind).
        names = [pf.schema.column(i).path for i in range(len(pf.schema))]
        index = {n: i for i, n in enumerate(names)}
        arrow = pf.schema.to_arrow_schema()  # not schema_arrow: that shows read_dictionary

        def column(name: str, is_type: Callable[[pa.DataType], bool]) -> int | None:
            """The leaf index of top-level column `name` if its type passes, else None."""
            ok = name in index and is_type(_field_type(arrow, name))
            return index[name] if ok else None

        host_col = column("hostname", pa.types.is_string)
        metric_col = column("metric", pa.types.is_string)
        time_col = column("timestamp", pa.types.is_integer)
        first = md.row_group(0) if md.num_row_groups else None
        columns = []
        for i, name in enumerate(names):
            col = pf.schema.column(i)
            chunk = first.column(i) if first is not None else None
            columns.append(
                ColumnInfo(
                    name=name,
                    arrow_type=str(_field_type(arrow, name)) if "." not in name else "",
                    physical_type=str(col.physical_type),
                    logical_type=str(col.logical_type),
                    required=col.max_definition_level == 0,
                    compression=str(chunk.compression) if chunk is not None else "",
                    encodings=[str(e) for e in chunk.encodings] if chunk is not None else [],
                )
            )
        row_groups: list[RowGroupInfo] = []
        hosts: dict[str, int] = {}
        metrics: set[str] = set()
        tmin: int | None = None
        tmax: int | None = None
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            h = _stat_range(rg.column(host_col).statistics) if host_col is not None else ()
            m = _stat_range(rg.column(metric_col).statistics) if metric_col is not None else ()
            lo, hi = (
                _stat_range(rg.column(time_col).statistics)
                if time_col is not None
                else (None, None)
            )
            row_groups.append(
                RowGroupInfo(
                    index=g,
                    rows=rg.num_rows,
                    bytes=sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)),
                    hosts=sorted({x for x in h if x is not None}),
                    metrics=sorted({x for x in m if x is not None}),
                    time_min=lo,
                    time_max=hi,
                )
            )
            if h and h[0] is not None:
                # Our row groups hold one host each; an upstream file's may span several,
                # then the rows are attributed to the range's first host.
                hosts[h[0]] = hosts.get(h[0], 0) + rg.num_rows
            if lo is not None and hi is not None:
                tmin = lo if tmin is None else min(tmin, lo)
                tmax = hi if tmax is None else max(tmax, hi)
            if metric_col is not None:
                for chunk in pf.read_row_group(g, columns=["metric"]).column(0).chunks:
                    if isinstance(chunk, pa.DictionaryArray):
                        used = chunk.dictionary.take(chunk.indices.unique().drop_null())
                    else:
                        used = chunk.unique()
                    metrics.update(used.to_pylist())
            progress(g + 1, md.num_row_groups)
        footer = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    sorting = []
    if first is not None and first.sorting_columns:
        sorting = [names[c.column_index] for c in first.sorting_columns]
    return Inspection(
        url=url,
        bytes=size,
        rows=md.num_rows,
        created_by=str(md.created_by),
        metadata={
            k: v
            for k, v in footer.items()
            if k.startswith(sink.META_PREFIX) and k != sink.META_PREFIX + "sources"
        },
        sorting_columns=sorting,
        columns=columns,
        row_groups=row_groups,
        hosts=dict(sorted(hosts.items())),
        metrics=sorted(m for m in metrics if m is not None),
        time_min=tmin,
        time_max=tmax,
        sources=sink.footer_sources(footer),
        problems=[f"{url}: {foreign}"] if foreign else [],
    )


def _field_type(schema: pa.Schema, name: str) -> pa.DataType:
    i = schema.get_field_index(name)
    return schema.field(i).type if i >= 0 else pa.null()


# --- query --------------------------------------------------------------------------------


@dataclass
class QueryPlan:
    """What a query reads: the files, and the row groups statistics could not rule out."""

    archive: str
    files: list[str]
    row_groups_total: int
    row_groups_selected: int
    dataset: ds.Dataset | None = field(default=None, repr=False)
    filter: ds.Expression | None = field(default=None, repr=False)
    #: Per readable file, its selected row groups (`query_batches` reads file by file).
    parts: list[tuple[str, list[ds.Fragment]]] = field(default_factory=list, repr=False)
    #: "<file>: <reason>" per file that could not be read; the others are read all the same.
    problems: list[str] = field(default_factory=list)


def parse_time(text: str) -> int:
    """A Unix timestamp from `1742380800`, `2026-03-19`, `2026-03-19T12:00` or `...Z`.

    Times without a zone are UTC, like the timestamps in the archive.
    """
    s = text.strip()
    if s.lstrip("-").isdigit():
        return int(s)
    try:
        moment = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r} (expected a Unix timestamp or ISO 8601, e.g. 2026-03-19T12:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _any_of(name: str, values: Sequence[str]) -> ds.Expression:
    import pyarrow.dataset as ds

    # An OR of equalities rather than is_in: each term is checked against the row group's
    # min/max statistics, so row groups of other hosts and metrics are never read.
    expr = ds.field(name) == values[0]
    for v in values[1:]:
        expr = expr | (ds.field(name) == v)
    return expr


def archive_files(archive: str, clusters: Sequence[str] | None = None) -> list[str]:
    """The published archives `<archive>/<cluster>/<T>.parquet`, in cluster and cutoff order."""
    found: list[str] = []
    for cluster in clusters or _subdirs(archive):
        fs, path = storage.filesystem(storage.join(archive, check_name(cluster, "cluster")))
        if not fs.exists(path):
            continue
        names = []
        for p in fs.ls(path, detail=False):
            stem, _, ext = _name_of(p).rpartition(".")
            if ext == "parquet" and stem.isascii() and stem.isdigit():
                names.append((int(stem), _name_of(p)))
        found.extend(storage.join(archive, cluster, n) for _, n in sorted(names))
    return found


def plan_query(
    archive: str,
    clusters: Sequence[str] | None = None,
    hosts: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    start: int | None = None,
    end: int | None = None,
    progress: ProgressFn = _noop,
) -> QueryPlan:
    """Select files by cluster and row groups by statistics; `start` <= timestamp < `end`.

    Reads only footers. Row groups whose host, metric or time range cannot match are
    dropped here, before any data is read.
    """
    import pyarrow.dataset as ds

    files = archive_files(archive, clusters)
    plan = QueryPlan(archive, files, 0, 0)
    conditions: list[ds.Expression] = []
    if hosts:
        conditions.append(_any_of("hostname", hosts))
    if metrics:
        conditions.append(_any_of("metric", metrics))
    if start is not None:
        conditions.append(ds.field("timestamp") >= start)
    if end is not None:
        conditions.append(ds.field("timestamp") < end)
    expr: ds.Expression | None = None
    for c in conditions:
        expr = c if expr is None else expr & c
    plan.filter = expr
    if not files:
        return plan
    fs, _ = storage.filesystem(files[0])  # one archive root: one filesystem
    parquet = ds.ParquetFileFormat()
    schema: pa.Schema | None = None
    for i, url in enumerate(files):
        path = storage.filesystem(url)[1]
        try:
            # One file at a time: a broken or foreign file is reported, not fatal.
            reason = file_kind_problem(fs, path)
            if reason is None:
                one = ds.dataset([path], format=parquet, filesystem=fs)  # reads the footer
                reason = _not_an_archive(one.schema)
        except Exception as exc:
            reason = f"cannot read: {one_line(exc)}"
        if reason is not None:
            plan.problems.append(f"{url}: {reason}")
            progress(i + 1, len(files))
            continue
        if schema is None:
            schema = one.schema
            filesystem = one.filesystem
        for fragment in one.get_fragments():
            plan.row_groups_total += fragment.metadata.num_row_groups
            parts = fragment.split_by_row_group(expr) if expr is not None else [fragment]
            if expr is None:
                plan.row_groups_selected += fragment.metadata.num_row_groups
            else:
                plan.row_groups_selected += len(parts)
            plan.parts.append((url, parts))
        progress(i + 1, len(files))
    if schema is not None:
        selected = [f for _, fragments in plan.parts for f in fragments]
        plan.dataset = ds.FileSystemDataset(selected, schema, parquet, filesystem)
    return plan


def query_batches(plan: QueryPlan, limit: int | None = None) -> Iterator[pa.RecordBatch]:
    """The matching rows, batch by batch, in file order (each file sorted by host, metric,
    scope, scope_id, timestamp); at most `limit` rows.

    A file that fails while it is read (a corrupt page) is added to `plan.problems`; the
    rows it gave before stay written, and the next file is read.
    """
    import pyarrow.dataset as ds

    if plan.dataset is None:
        return
    left = limit
    for url, fragments in plan.parts:
        one = ds.FileSystemDataset(
            fragments, plan.dataset.schema, plan.dataset.format, plan.dataset.filesystem
        )
        try:
            for batch in one.to_batches(filter=plan.filter):
                if left is not None:
                    if left <= 0:
                        return
                    if batch.num_rows > left:
                        batch = batch.slice(0, left)
                    left -= batch.num_rows
                if batch.num_rows:
                    yield batch
        except Exception as exc:  # a broken file must not hide the others
            plan.problems.append(f"{url}: cannot read: {one_line(exc)}")


__all__ = [
    "ArchiveSummary",
    "ClusterStatus",
    "ColumnInfo",
    "Inspection",
    "PendingFile",
    "QueryPlan",
    "RowGroupInfo",
    "RunRecord",
    "Status",
    "archive_files",
    "cluster_status",
    "file_kind_problem",
    "inspect_file",
    "iso",
    "one_line",
    "parse_time",
    "plan_query",
    "query_batches",
    "read_runs",
    "record_run",
    "record_start",
    "run_outcome",
    "status",
    "to_json",
    "usable_run_log",
]

"""Run records: one JSON file per cluster and run, written by both drivers, read by `status`.

`<run_log>/<cluster>/<finished UTC>-<run_id>.json`, one per cluster and run (S3 has no
append, so no shared log file); the names sort by the time the run ended. A run first
writes `<started UTC>-<run_id>.started.json` and removes it with its end record, so a run
killed outright still shows (as `unfinished`). `run_log` is a setting (CCARCHIVE_RUN_LOG);
under the archive root a name starting with `_` (e.g. `<archive>/_runs`) is skipped by
pyarrow, Spark and by `query`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from . import __version__, storage
from .manifest import ClusterReport
from .paths import (
    RecordName,
    UnsafeName,
    check_name,
    name_of,
    parse_record_name,
    record_name,
    record_stamp,
)
from .reporting import iso, one_line

log = logging.getLogger(__name__)

#: At most this many kept files are listed in a run record (the count is always exact).
MAX_RECORDED_BAD = 1000

#: Keep at most this many run records per cluster, and none older than this (the settings
#: `run_log_keep` and `run_log_max_age` override both).
DEFAULT_KEEP_RECORDS = 500
DEFAULT_MAX_RECORD_AGE = 90 * 86400.0


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
    return _write_record(run_log, record, record_name(begun, report.run_id, started=True))


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
    url = _write_record(run_log, record, record_name(ended, report.run_id))
    if url is not None:
        try:
            _prune(run_log, report.cluster, report.run_id, keep, max_age)
        except Exception as exc:  # pruning is housekeeping: the next run tries again
            log.warning("cannot prune run records of %s: %s", report.cluster, one_line(exc))
    return url


def _record_names(fs: Any, path: str) -> list[RecordName]:
    """The run records in a cluster's directory, oldest first; nothing else in it (a name
    this module did not write) is ever listed, read or removed."""
    found = [parse_record_name(name_of(p)) for p in fs.ls(path, detail=False)]
    return sorted((r for r in found if r is not None), key=lambda r: r.name)


def _prune(run_log: str, cluster: str, run_id: str, keep: int, max_age: float) -> None:
    """Remove the run's start record, then records beyond the newest `keep` or too old."""
    fs, path = storage.filesystem(storage.join(run_log, cluster))
    records = _record_names(fs, path)
    doomed = [r.name for r in records if r.started and r.run_id == run_id]
    # The record just written stays, however old its end time was given as.
    records = [r for r in records if r.run_id != run_id]
    surplus = max(0, len(records) - (keep - 1))  # the oldest ones, beyond `keep` with it
    oldest = record_stamp(time.time() - max_age)  # compare as text
    doomed += [r.name for i, r in enumerate(records) if i < surplus or r.stamp < oldest]
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
    ended = {r.run_id for r in records if not r.started}
    names = [r.name for r in records if not (r.started and r.run_id in ended)]
    urls = [storage.join(run_log, cluster, n) for n in names]
    for url in reversed(urls):
        try:
            rfs, rpath = storage.filesystem(url)
            return urls, RunRecord.from_dict(json.loads(rfs.cat_file(rpath)))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("unreadable run record %s: %s", url, exc)
    return urls, None


__all__ = [
    "DEFAULT_KEEP_RECORDS",
    "DEFAULT_MAX_RECORD_AGE",
    "MAX_RECORDED_BAD",
    "RunRecord",
    "read_runs",
    "record_run",
    "record_start",
    "run_outcome",
    "usable_run_log",
]

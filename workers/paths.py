"""Names and paths: what every file and directory the archiver reads or writes is called.

One place for the rules: safe names (a single path component), checkpoint file names
(`<ts>.json`, `<ts>.bin`), archives (`<archive>/<cluster>/<T>.parquet`), temporary files of
an unfinished write (`.<name>.<id>.partial`), staging (`<staging>/<run_id>/<cluster>/
<host>.arrow`, marked `<run_id>/.ccarchive-staging`) and run records
(`<run_log>/<cluster>/<UTC>-<run_id>[.started].json`). Everything above builds, lists and
recognises these names through this module.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import storage

INT64_MAX = 2**63 - 1
CHECKPOINT_SUFFIXES = (".json", ".bin")


class UnsafeName(ValueError):
    """A cluster, host or file name that could reach outside the configured roots."""


class BadCheckpoint(Exception):
    """A checkpoint file that cannot be archived; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a single safe path component, else raise UnsafeName."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise UnsafeName(f"invalid {what} {name!r}")
    if "/" in name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafeName(f"invalid {what} {name!r}: path separator or control character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:  # undecodable bytes from the directory listing
        raise UnsafeName(f"invalid {what} {name!r}: not UTF-8") from exc
    return name


def check_cutoff(cutoff: object) -> int:
    """Return `cutoff` if it is an integer with 0 < cutoff <= 2**63 - 1, else raise UnsafeName.

    It becomes part of the archive's file name (`<T>.parquet`): a string from a forged
    message such as "../../x" must never reach a path. No checkpoint has a timestamp <= 0.
    """
    if isinstance(cutoff, bool) or not isinstance(cutoff, int):
        raise UnsafeName(f"invalid cutoff {cutoff!r}: not an integer")
    if not 0 < cutoff <= INT64_MAX:
        raise UnsafeName(f"invalid cutoff {cutoff}: must be > 0 and fit in int64")
    return cutoff


def name_of(path: str) -> str:
    """The last component of a path or URL from a listing (`a/b/` -> `b`)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


# --- checkpoints ---------------------------------------------------------------------------


def host_dir(checkpoints: str | Path, cluster: str, host: str) -> Path:
    """The directory of one host, refusing names that would leave the checkpoint root."""
    root = Path(checkpoints)
    path = root / check_name(cluster, "cluster") / check_name(host, "host")
    # Symlinked directories are not followed during discovery; refuse them here as well.
    if os.path.realpath(path) != os.path.join(os.path.realpath(root), cluster, host):
        raise UnsafeName(f"{path} resolves outside {root}")
    return path


def checkpoint_timestamp(name: str) -> int | BadCheckpoint | None:
    """Classify a file name: its timestamp, None when it is no checkpoint, or why it is bad."""
    stem, dot, ext = name.rpartition(".")
    if not dot or "." + ext not in CHECKPOINT_SUFFIXES:
        return None
    # isdigit() alone would accept non-ASCII digits such as "٣".
    if not stem or not stem.isascii() or not stem.isdigit():
        return BadCheckpoint(f"file name stem {stem!r} is not a Unix timestamp")
    ts = int(stem)
    if ts > INT64_MAX:
        return BadCheckpoint(f"file name stem {stem!r} does not fit in int64")
    return ts


def present_files(
    checkpoints: str | Path, cluster: str, hosts: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """Per host, name -> timestamp of every timestamped checkpoint file present (ts != 0).

    `hosts` None: every real host directory of the cluster. Unreadable hosts are left out
    (the load step reports them).
    """
    if hosts is None:
        try:
            with os.scandir(Path(checkpoints) / check_name(cluster, "cluster")) as entries:
                found = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            return {}
        hosts = []
        for name in found:
            try:
                hosts.append(check_name(name, "host"))
            except UnsafeName:
                continue
    present: dict[str, dict[str, int]] = {}
    for host in hosts:
        files: dict[str, int] = {}
        try:
            with os.scandir(host_dir(checkpoints, cluster, host)) as entries:
                for entry in entries:
                    ts = checkpoint_timestamp(entry.name)
                    if isinstance(ts, int) and ts != 0 and entry.is_file(follow_symlinks=False):
                        files[entry.name] = ts
        except (OSError, UnsafeName):
            continue
        present[host] = files
    return present


# --- archives ------------------------------------------------------------------------------


def archive_name(cutoff: int) -> str:
    """The file name of a cluster's archive for cutoff T: `<T>.parquet`."""
    return f"{cutoff}.parquet"


def archive_url(archive: str, cluster: str, cutoff: int) -> str:
    """Final location of a cluster's archive for cutoff T."""
    return storage.join(archive, cluster, archive_name(cutoff))


def archive_cutoff(name: str) -> int | None:
    """The cutoff T of an archive's file name `<T>.parquet`, else None."""
    stem, _, ext = name.rpartition(".")
    return int(stem) if ext == "parquet" and stem.isascii() and stem.isdigit() else None


def partial_name(path: str, sep: str = "/") -> str:
    """A hidden, unique temporary name beside `path` for a write not yet published."""
    parent, _, name = path.rpartition(sep)
    return f"{parent}{sep}.{name}.{uuid.uuid4().hex[:12]}.partial"


def is_partial(name: str) -> bool:
    """True for a temporary file `partial_name` made (a dead run's, if old)."""
    return name.startswith(".") and name.endswith(".partial")


@dataclass
class ArchiveDir:
    """A cluster's directory under the archive root, as listed.

    `archives`: (cutoff, url, size, kind) in cutoff order; `partials`: listing entries of
    temporary files.
    """

    archives: list[tuple[int, str, int, str]] = field(default_factory=list)
    partials: list[dict[str, Any]] = field(default_factory=list)


def list_archive_dir(archive: str, cluster: str) -> ArchiveDir:
    """List `<archive>/<cluster>/`: its published archives and its temporary files."""
    fs, path = storage.filesystem(storage.join(archive, check_name(cluster, "cluster")))
    listing = ArchiveDir()
    if not fs.exists(path):
        return listing
    for info in fs.ls(path, detail=True):
        name = name_of(str(info["name"]))
        cutoff = archive_cutoff(name)
        if cutoff is not None:
            url = storage.join(archive, cluster, name)
            size = int(info.get("size") or 0)
            listing.archives.append((cutoff, url, size, str(info.get("type"))))
        elif is_partial(name):
            listing.partials.append(info)
    listing.archives.sort()
    return listing


def archive_files(archive: str, cluster: str, min_cutoff: int = 0) -> list[str]:
    """URLs of a cluster's published archives with cutoff >= min_cutoff, oldest first."""
    return [u for t, u, _, _ in list_archive_dir(archive, cluster).archives if t >= min_cutoff]


def cluster_dirs(url: str) -> list[str]:
    """Names of the directories (prefixes) directly below url that may be clusters.

    Names starting with `.` or `_` (e.g. `<archive>/_runs`) and unsafe names are skipped.
    """
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return []
    names = []
    for info in fs.ls(path, detail=True):
        name = name_of(str(info["name"]))
        if info.get("type") != "directory" or name.startswith((".", "_")):
            continue
        try:
            names.append(check_name(name, "cluster"))
        except UnsafeName:
            continue
    return sorted(names)


# --- staging -------------------------------------------------------------------------------

#: The marker file of a run directory; it holds the run id.
MARKER = ".ccarchive-staging"
#: The lock file a live run holds (flock) in the private temporary staging.
LOCK = ".ccarchive-lock"
#: `new_run_id`'s names: cutoff, UTC start time, 8 hex digits.
RUN_ID_RE = re.compile(r"-?[0-9]{1,20}-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}")


def new_run_id(cutoff: int) -> str:
    """A unique, sortable id for one run (and the name of its staging directory)."""
    return f"{cutoff}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def is_run_id(name: str) -> bool:
    """True if `name` has the form of a run id."""
    return RUN_ID_RE.fullmatch(name) is not None


def run_url(staging: str, run_id: str) -> str:
    """Staging prefix of one run."""
    return storage.join(staging, run_id)


def cluster_url(staging: str, run_id: str, cluster: str) -> str:
    """Staging prefix of one cluster in one run."""
    return storage.join(staging, run_id, cluster)


def chunk_url(staging: str, run_id: str, cluster: str, host: str) -> str:
    """Staging location of one host's chunk."""
    return storage.join(staging, run_id, cluster, f"{host}.arrow")


# --- run records ---------------------------------------------------------------------------

#: `<end UTC>-<run id>.json` (a finished run) or `<start UTC>-<run id>.started.json` (a
#: run that began and has not ended yet, or never will: it was killed).
_RECORD_NAME = re.compile(r"(\d{8}T\d{6}Z)-(.+?)(\.started)?\.json")
_STAMP = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class RecordName:
    """A run record's file name, parsed: UTC stamp (sorts as text), run id, start record?"""

    name: str
    stamp: str
    run_id: str
    started: bool


def record_stamp(when: float) -> str:
    """A Unix time as a run record name's UTC stamp (`20260319T120000Z`)."""
    return time.strftime(_STAMP, time.gmtime(when))


def record_name(when: float, run_id: str, started: bool = False) -> str:
    """The name of a run's end record, or (`started`) of its start record."""
    return f"{record_stamp(when)}-{run_id}{'.started' if started else ''}.json"


def parse_record_name(name: str) -> RecordName | None:
    """The parts of a run record's name; None for any other name (never touched)."""
    m = _RECORD_NAME.fullmatch(name)
    if m is None:
        return None
    return RecordName(name, m.group(1), m.group(2), bool(m.group(3)))


__all__ = [
    "CHECKPOINT_SUFFIXES",
    "INT64_MAX",
    "LOCK",
    "MARKER",
    "RUN_ID_RE",
    "ArchiveDir",
    "BadCheckpoint",
    "RecordName",
    "UnsafeName",
    "archive_cutoff",
    "archive_files",
    "archive_name",
    "archive_url",
    "check_cutoff",
    "check_name",
    "checkpoint_timestamp",
    "chunk_url",
    "cluster_dirs",
    "cluster_url",
    "host_dir",
    "is_partial",
    "is_run_id",
    "list_archive_dir",
    "name_of",
    "new_run_id",
    "parse_record_name",
    "partial_name",
    "present_files",
    "record_name",
    "record_stamp",
    "run_url",
]

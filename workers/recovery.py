"""Recovery at the start of every run: finish what a crashed run committed, sweep orphans.

The commit record of a run is the footer of its published archive (`ccarchive.sources`:
per host, every archived file with its size). So, before loading anything:

- a checkpoint file listed in a committed archive that is still the very file read (same
  device, inode, size, times and content digest) was archived and its deletion did not
  happen: delete it now (never archive it again);
- one listed that has changed since is reported and excluded from loading: its name says
  it is archived, its content says otherwise, and only a person can tell which is right;
- temporary archive files older than a grace period belong to runs that died: remove them;
- so do staging run directories, but only those the archiver provably made (SPEC §6.9).

See docs/commit-protocol.md for the states of a run and why this is enough.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import staging, storage
from .manifest import BadFile, SourceFile
from .paths import (
    archive_files,
    check_name,
    host_dir,
    is_partial,
    name_of,
    present_files,
    run_url,
)
from .sourcefiles import delete_if_unchanged

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 6 * 3600.0


@dataclass
class Recovery:
    """What recovery did for one cluster, and which files loading must skip."""

    cluster: str
    deleted: list[str] = field(default_factory=list)  # paths of finished deletions
    kept: list[BadFile] = field(default_factory=list)
    exclude: dict[str, list[str]] = field(default_factory=dict)  # host -> file names
    orphans_removed: list[str] = field(default_factory=list)


def _entry_age(info: dict[str, Any], now: float) -> float:
    """Seconds since an fsspec listing entry was modified (0 if unknown: keep it)."""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, datetime):
        mtime = mtime.timestamp()
    return now - float(mtime) if mtime else 0.0


def recover_cluster(
    checkpoints: str,
    archive: str | None,
    cluster: str,
    hosts: list[str],
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> Recovery:
    """Finish deletions of committed archives and sweep stale temporary files of one cluster."""
    check_name(cluster, "cluster")  # even with no host: the archive sweep below uses it
    result = Recovery(cluster)
    if archive is None:
        return result
    present = present_files(checkpoints, cluster, hosts)
    oldest = min((ts for files in present.values() for ts in files.values()), default=None)
    # A file with timestamp ts can only be listed in archives with cutoff >= ts.
    for url in archive_files(archive, cluster, oldest) if oldest is not None else []:
        # Deferred: pyarrow loads only when there is an archive's footer to read, so a run
        # with nothing to do stays cheap.
        from . import sink

        sources = sink.footer_sources(sink.read_footer(url))
        for host, entry in sources.items():
            for f in entry.get("files", []):
                if f["name"] in present.get(host, {}):
                    source = SourceFile.from_dict(f)
                    _finish_deletion(checkpoints, cluster, host, source, url, result)
    _sweep_partials(archive, cluster, grace_seconds, result)
    return result


def _finish_deletion(
    checkpoints: str, cluster: str, host: str, f: SourceFile, url: str, result: Recovery
) -> None:
    path = Path(host_dir(checkpoints, cluster, host)) / f.name
    try:
        reason = delete_if_unchanged(path, f)
    except FileNotFoundError:
        return
    except OSError as exc:
        reason = f"already archived in {url} but cannot delete: {exc.strerror or exc}"
    else:
        if reason is None:
            log.info("recovery: deleted %s (archived in %s)", path, url)
            result.deleted.append(str(path))
            return
        reason = f"listed in committed archive {url} but {reason}; kept, not archived again"
    log.warning("kept %s: %s", path, reason)
    result.kept.append(BadFile(str(path), reason))
    result.exclude.setdefault(host, []).append(f.name)


def _sweep_partials(archive: str, cluster: str, grace_seconds: float, result: Recovery) -> None:
    """Remove temporary archive files (`.<T>.parquet.<id>.partial`) left by dead runs, and
    on S3 their equivalent: multipart uploads a dead run started and could not abort."""
    now = time.time()
    url = storage.join(archive, cluster)
    # The next exclusive create of the same key aborts such an upload anyway; one for a
    # cutoff no run uses again would stay, stored and billed, but invisible, forever.
    for key in storage.abort_uploads(url, older_than=_before(now - grace_seconds)):
        result.orphans_removed.append(key)
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return
    for info in fs.ls(path, detail=True):
        if is_partial(name_of(str(info["name"]))) and _entry_age(info, now) > grace_seconds:
            fs.rm(info["name"])
            result.orphans_removed.append(str(info["name"]))


def _before(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def sweep_staging(
    staging_url: str,
    keep_run_id: str | None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    private: bool = False,
) -> list[str]:
    """Remove run directories of dead runs under the staging root; return what went.

    Only a directory the archiver can prove it made is ever removed (SPEC §6.9): its name
    is a run id and it holds the run's marker (`staging.owned_run`); anything else under
    the staging root is left alone, whatever its age. An owned run is dead once nothing in
    it changed for the grace period; in the embedded runner's private temporary staging
    (`private`) also as soon as its run's lock is free. On S3, chunk uploads that dead
    workers started longer ago than the grace period are aborted inside owned runs only.
    """
    now = time.time()
    fs, path = storage.filesystem(staging_url)
    removed: list[str] = []
    if not fs.exists(path):
        return removed
    local = storage.is_local(fs)
    for entry in fs.ls(path, detail=False):
        name = name_of(entry)
        if name == keep_run_id:
            continue
        if not staging.owned_run(staging_url, name):
            log.debug("staging sweep: %s was not made by the archiver; left alone", entry)
            continue
        if private and local:
            dead = staging.remove_dead_private_run(path, name)
            if dead is True:
                removed.append(entry)
            if dead is not None:
                continue
        run = run_url(staging_url, name)
        entries = list(fs.find(entry, detail=True, withdirs=True).values())
        if local:
            entries.append(fs.info(entry))  # an empty, just-made run directory is young too
        # S3 "directories" are only prefixes, without a time: the objects below decide.
        ages = [_entry_age(info, now) for info in entries if _has_time(info)]
        if ages and min(ages) > grace_seconds:
            staging.remove_run(staging_url, name)
            removed.append(entry)
        else:
            # A live run's worker that died mid-upload left invisible parts: abort those.
            removed.extend(storage.abort_uploads(run, older_than=_before(now - grace_seconds)))
    return removed


def _has_time(info: dict[str, Any]) -> bool:
    return any(info.get(k) for k in ("mtime", "LastModified", "created"))

"""Staging run directories: made and marked by a run, removed only when proven ours.

Layout: `<staging>/<run_id>/<cluster>/<host>.arrow` (the chunks: `chunks`; the names:
`paths`). A run's directory belongs to the archiver only if it can prove it (SPEC §6.9):
its name is a run id (`paths.new_run_id`) and it holds a marker, `<run_id>/.ccarchive-staging`,
written with that run id before any chunk. Sweeps remove nothing else. In the embedded
runner's private temporary staging a run also holds a flock on `<run_id>/.ccarchive-lock`
while it lives, so the next run can tell a dead run's directory (lock free) at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import uuid
from contextlib import suppress

from . import storage
from .paths import LOCK, MARKER, chunk_url, cluster_url, is_run_id, new_run_id, run_url


def mark_run(staging: str, run_id: str) -> None:
    """Create the run's directory (local) and write its marker: call before any chunk."""
    if not is_run_id(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    fs, path = storage.filesystem(run_url(staging, run_id))
    if storage.is_local(fs):
        os.makedirs(path, exist_ok=True)
        marker = os.path.join(path, MARKER)
        tmp = f"{marker}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "xb") as f:  # then renamed: a marker is never seen half written
            f.write(run_id.encode())
        os.replace(tmp, marker)
    else:
        fs.pipe_file(f"{path.rstrip('/')}/{MARKER}", run_id.encode())


def owned_run(staging: str, name: str) -> bool:
    """True if `<staging>/<name>` is a run directory the archiver made: a run-id name, a
    real directory (local: not a symlink) and a marker holding exactly that name."""
    if not is_run_id(name):
        return False
    fs, path = storage.filesystem(run_url(staging, name))
    try:
        if storage.is_local(fs):
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
            fd = os.open(os.path.join(path, MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return False
                content = os.read(fd, 256)
            finally:
                os.close(fd)
        else:
            with fs.open(f"{path.rstrip('/')}/{MARKER}", "rb") as f:
                content = f.read(256)
    except (OSError, ValueError):
        return False
    return content.strip() == name.encode()


def remove_run(staging: str, run_id: str) -> None:
    """Remove a run's whole directory (its own run's, or a proven dead one's)."""
    if not is_run_id(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    fs, path = storage.filesystem(run_url(staging, run_id))
    if storage.is_local(fs):
        _rmtree_local(path)
    else:
        storage.remove_tree(run_url(staging, run_id))


def _rmtree_local(path: str) -> None:
    def gone_is_fine(_fn: object, _path: str, info: tuple[type, BaseException, object]) -> None:
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]  # another sweeper removing the same dead run is fine, not more

    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return  # never follow a link out of staging
    except FileNotFoundError:
        return
    shutil.rmtree(path, onerror=gone_is_fine)


def remove_run_if_empty(staging: str, run_id: str) -> None:
    """Remove the run's directory once only its marker (and lock) is left in it.

    Another cluster of the run may write its first chunk meanwhile: then the directory is
    not empty and the marker is written again, so the run stays provably ours.
    """
    fs, path = storage.filesystem(run_url(staging, run_id))
    own = {MARKER, LOCK}
    if storage.is_local(fs):
        try:
            if set(os.listdir(path)) - own:
                return
            for name in own:
                with suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
            os.rmdir(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if is_run_id(run_id):
                mark_run(staging, run_id)  # a chunk arrived: keep the run marked
        return
    if not fs.exists(path):
        return
    if {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)} - own:
        return
    with suppress(FileNotFoundError):
        fs.rm(f"{path.rstrip('/')}/{MARKER}")
    if is_run_id(run_id) and fs.exists(path) and fs.ls(path, detail=False):
        mark_run(staging, run_id)


class PrivateRun:
    """A live run's directory in the private temporary staging: made with mode 0700,
    locked (flock held until `close`) and marked. `close` removes it."""

    def __init__(self, root: str, run_id: str) -> None:
        self.root, self.run_id = root, run_id
        self.path = os.path.join(root, run_id)
        os.mkdir(self.path, 0o700)
        # Lock before marking: a marked directory whose lock is free is a dead run's.
        self._fd = os.open(
            os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
        )
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        mark_run(root, run_id)

    def close(self) -> None:
        """Remove the run's directory, then let the lock go."""
        if self._fd < 0:
            return
        try:
            _rmtree_local(self.path)
        finally:
            os.close(self._fd)
            self._fd = -1


def remove_dead_private_run(root: str, name: str) -> bool | None:
    """Remove the owned run directory `<root>/<name>` if its run is dead (its lock is
    free): True if removed, False if a live run holds the lock, None if there is no lock
    to tell (the caller falls back to the grace period)."""
    try:
        fd = os.open(os.path.join(root, name, LOCK), os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            return None
        _rmtree_local(os.path.join(root, name))  # holding the lock: no run can own it now
        return True
    finally:
        os.close(fd)


__all__ = [  # chunk_url, cluster_url, new_run_id: the names, re-exported for callers
    "LOCK",
    "MARKER",
    "PrivateRun",
    "chunk_url",
    "cluster_url",
    "is_run_id",
    "mark_run",
    "new_run_id",
    "owned_run",
    "remove_dead_private_run",
    "remove_run",
    "remove_run_if_empty",
]

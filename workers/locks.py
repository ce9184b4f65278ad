"""One run per cluster at a time, on this machine's file systems: flock on the cluster directory.

Embedded runs lock the cluster's checkpoint directory itself with flock(2): nothing is
written into the tree, and the kernel drops the lock when the process dies (on a file
system that cannot lock a directory, a local lock file stands in for it). Distributed
runs hold a Redis key (`workers.distributed.locks`), and their workers hold the same
directories shared (`RunHolds`) so that an embedded run sees them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class LockBusy(Exception):
    """Another run holds the cluster."""


class DirectoryLock:
    """An exclusive, non-blocking flock on a directory, held until `release`.

    Where the file system cannot lock the directory — NFS (flock becomes a byte-range
    lock, which needs a descriptor open for writing), Lustre or GPFS mounted without
    lock support — the lock is taken on a file named after the directory in this
    machine's lock directory instead: runs on this machine still exclude each other, and
    a warning says that runs on other machines are not seen.
    """

    def __init__(self, directory: Path, fallback_dir: Path | None = None) -> None:
        self.directory = directory
        self.fallback_dir = fallback_dir or local_lock_dir()
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock or raise LockBusy at once."""
        fd = _flock(self.directory, fcntl.LOCK_EX, self.directory)
        if fd is None:
            stand_in = _stand_in(self.directory, self.fallback_dir)
            fd = _flock(stand_in, fcntl.LOCK_EX, self.directory)
            assert fd is not None  # a local file can be locked
            log.warning(
                "%s cannot be locked: locked through %s, which only runs on this machine see",
                self.directory,
                stand_in,
            )
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunHolds:
    """Shared flocks on cluster directories that a worker process keeps while a
    distributed run of that cluster goes on.

    An embedded run locks the same directory exclusively (`DirectoryLock`). A distributed
    run holds a Redis key instead, which the embedded runner cannot see; so each worker
    process that loads a host also holds the cluster directory shared — and its stand-in
    lock file, which is what an embedded run locks where the directory cannot be — until
    `still_running(cluster, run_id)` says the run is over. An embedded run then skips the
    cluster, and a load that finds an embedded run there keeps its files: the two kinds of
    run never archive the same files at once.
    """

    def __init__(self, still_running: Callable[[str, str], bool], period: float = 2.0) -> None:
        self._still_running = still_running
        self._period = period
        self._held: dict[str, tuple[list[int], str, str]] = {}  # dir -> (fds, cluster, run)
        self._mutex = threading.Lock()
        self._watcher: threading.Thread | None = None
        # A forked child (Celery's prefork pool) has no watcher thread: it starts afresh,
        # and must not keep its parent's locks alive through inherited descriptors.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        for fds, _, _ in self._held.values():
            for fd in fds:
                os.close(fd)
        self._held = {}
        self._mutex = threading.Lock()
        self._watcher = None

    def hold(self, directory: Path, cluster: str, run_id: str) -> None:
        """Hold `directory` shared for this run; LockBusy if an embedded run has it."""
        key = os.path.realpath(directory)
        with self._mutex:
            if key in self._held:
                kept, _, _ = self._held[key]
                self._held[key] = (kept, cluster, run_id)  # a later run of the same cluster
                return
            fds: list[int] = []
            try:
                for target in (directory, _stand_in(directory, local_lock_dir())):
                    fd = _flock(target, fcntl.LOCK_SH, directory)
                    if fd is not None:
                        fds.append(fd)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            self._held[key] = (fds, cluster, run_id)
            if self._watcher is None:
                self._watcher = threading.Thread(
                    target=self._watch, name="ccarchive-run-holds", daemon=True
                )
                self._watcher.start()

    def held(self) -> list[str]:
        """The directories held now."""
        with self._mutex:
            return sorted(self._held)

    def _watch(self) -> None:
        while True:
            time.sleep(self._period)
            with self._mutex:
                entries = list(self._held.items())
            for key, (fds, cluster, run_id) in entries:
                try:
                    over = not self._still_running(cluster, run_id)
                except Exception:  # Redis away: keep holding, ask again later
                    continue
                with self._mutex:
                    if over and self._held.get(key, (None, None, None))[2] == run_id:
                        del self._held[key]
                        for fd in fds:
                            os.close(fd)


def _flock(path: Path, operation: int, directory: Path) -> int | None:
    """Open and flock `path` (LOCK_EX or LOCK_SH, never blocking): the descriptor, None if
    this file system cannot lock it, LockBusy (naming `directory`) if another run has it."""
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        # A stand-in lock file. Read-only is enough for flock on a local file system and
        # lets one user lock a file another user created (opened without O_CREAT when it
        # exists: the kernel's protected_regular refuses O_CREAT on another user's file in
        # a sticky directory); O_NOFOLLOW: a planted symlink is refused, not followed.
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockBusy(f"another run is archiving {directory}") from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKS_HERE:
            return None
        raise
    return fd


def _stand_in(directory: Path, lock_dir: Path) -> Path:
    """The local lock file that stands for `directory` where it cannot be locked itself."""
    name = hashlib.sha1(os.path.realpath(directory).encode()).hexdigest()[:16]
    return lock_dir / f"ccarchive-{name}.lock"


#: flock errors that mean "this file system does not lock", not "someone holds it".
_NO_LOCKS_HERE = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def local_lock_dir() -> Path:
    """Where stand-in lock files go: /run/lock (shared by every user of the machine), else
    the temporary directory."""
    run_lock = Path("/run/lock")
    if run_lock.is_dir() and os.access(run_lock, os.W_OK | os.X_OK):
        return run_lock
    return Path(tempfile.gettempdir())

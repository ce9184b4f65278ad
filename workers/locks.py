"""One run per cluster at a time.

Embedded runs lock the cluster's checkpoint directory itself with flock(2): nothing is
written into the tree, and the kernel drops the lock when the process dies (on a file
system that cannot lock a directory, a local lock file stands in for it). Distributed
runs hold a Redis key with an expiry that every task of the run renews; the finalize step
checks that it still owns the key right before publishing, so a run whose lock expired
can never commit next to the run that took over.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"another run is archiving {self.directory}") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS_HERE:
                raise
            fd = self._lock_file_instead(exc)
        self._fd = fd
        return self

    def _lock_file_instead(self, why: OSError) -> int:
        """The fallback: flock a local file standing for the directory."""
        name = hashlib.sha1(os.path.realpath(self.directory).encode()).hexdigest()[:16]
        path = self.fallback_dir / f"ccarchive-{name}.lock"
        self.fallback_dir.mkdir(parents=True, exist_ok=True)
        # Read-only is enough for flock on a local file system, and lets one user lock a
        # file another user created (opened without O_CREAT when it exists: the kernel's
        # protected_regular refuses O_CREAT on another user's file in a sticky directory);
        # O_NOFOLLOW: a planted symlink is refused, not followed.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"another run is archiving {self.directory}") from None
        except BaseException:
            os.close(fd)
            raise
        log.warning(
            "%s cannot be locked (%s): locked through %s, which only runs on this machine see",
            self.directory,
            why.strerror or why,
            path,
        )
        return fd

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


#: flock errors that mean "this file system does not lock", not "someone holds it".
_NO_LOCKS_HERE = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def local_lock_dir() -> Path:
    """Where fallback lock files go: /run/lock (shared by every user of the machine), else
    the temporary directory."""
    run_lock = Path("/run/lock")
    if run_lock.is_dir() and os.access(run_lock, os.W_OK | os.X_OK):
        return run_lock
    return Path(tempfile.gettempdir())


# Compare-and-act scripts: only the run that owns the key may renew or delete it.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


@dataclass
class RedisLock:
    """A cluster lock in Redis owned by one run id; expires unless renewed."""

    client: Any  # redis.Redis
    cluster: str
    run_id: str
    ttl_seconds: float = 900.0
    namespace: str = "ccarchive:lock"

    @property
    def key(self) -> str:
        """The Redis key of this cluster's lock."""
        return f"{self.namespace}:{self.cluster}"

    def acquire(self) -> bool:
        """Take the lock for this run if it is free; True on success."""
        return bool(
            self.client.set(self.key, self.run_id, nx=True, px=int(self.ttl_seconds * 1000))
        )

    def renew(self) -> bool:
        """Extend the expiry if this run still owns the lock; False if it was lost."""
        return bool(
            self.client.eval(_RENEW, 1, self.key, self.run_id, int(self.ttl_seconds * 1000))
        )

    def owned(self) -> bool:
        """True if this run holds the lock now (and renews it, so a commit has the full ttl)."""
        return self.renew()

    def release(self) -> None:
        """Give the lock up if this run still owns it."""
        self.client.eval(_RELEASE, 1, self.key, self.run_id)

"""One run per cluster at a time.

Embedded runs lock the cluster's checkpoint directory itself with flock(2): nothing is
written into the tree, and the kernel drops the lock when the process dies. Distributed
runs hold a Redis key with an expiry that every task of the run renews; the finalize step
checks that it still owns the key right before publishing, so a run whose lock expired
can never commit next to the run that took over.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LockBusy(Exception):
    """Another run holds the cluster."""


class DirectoryLock:
    """An exclusive, non-blocking flock on a directory, held until `release`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock or raise LockBusy at once."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"another run is archiving {self.directory}") from None
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

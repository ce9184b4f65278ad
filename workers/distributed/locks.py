"""A distributed run's cluster lock: a Redis key owned by one run id, expiring unless renewed.

Every task of the run renews it; the finalize step checks that it still owns the key right
before publishing, so a run whose lock expired can never commit next to the run that took
over. (Embedded runs lock the checkpoint directory instead: `workers.locks`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from .names import lock_key

# Compare-and-act scripts: only the run that owns the key may renew or delete it.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


@dataclass
class RedisLock:
    """A cluster lock in Redis owned by one run id; expires unless renewed."""

    client: redis.Redis
    cluster: str
    run_id: str
    ttl_seconds: float = 900.0

    @property
    def key(self) -> str:
        """The Redis key of this cluster's lock."""
        return lock_key(self.cluster)

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


__all__ = ["RedisLock"]

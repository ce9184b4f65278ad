"""Beat's scheduler: Celery's persistent one, loud when idle, and only one beat at a time.

The lease that keeps a second beat from firing is a Redis key (`names.BEAT_LEASE_KEY`)
taken and renewed with the scripts below; what beat schedules is `beat.schedule`.
"""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import suppress
from typing import Any

from celery.beat import PersistentScheduler
from celery.beat import logger as beat_log
from redis import RedisError

from beat.schedule import ENTRY, IDLE_WARNING

from ..config import load_settings
from .connection import redis_client
from .names import BEAT_LEASE_KEY

#: What an unreachable Redis raises (redis-py, or the socket underneath).
_REDIS_ERRORS = (RedisError, OSError)

#: The lease lasts this many beat ticks (`--max-interval`), renewed at every tick: a beat
#: that died is replaced by a waiting one after at most that long.
LEASE_TICKS = 3

#: Take the lease if it is free or ours (and renew it); returns the holder afterwards.
LEASE_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return v
"""
#: Give the lease back, only if ours (a clean stop: a waiting beat takes over at once).
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ArchiveScheduler(PersistentScheduler):
    """Celery's default scheduler, loud when it has nothing to schedule, and only one.

    Beat without a retention would otherwise log its banner and never fire: a warning at
    start (`setup_schedule`) and at every tick, naming the setting to give. Two beats
    started by mistake would both fire (every run then finds the other's clusters locked):
    each tick takes or renews a lease in Redis (`names.BEAT_LEASE_KEY`, SET NX PX with this
    beat's id); a beat that finds it held by another schedules nothing, logs an ERROR at
    every tick, and takes over when the lease expires (the other beat stopped or died).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.beat_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease_client: Any = None
        self._holding = False
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        """Celery's set-up, then the warning if no run is scheduled."""
        super().setup_schedule()
        self._warn_if_idle()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One beat tick; warns again while no run is scheduled, and fires nothing
        while another beat holds the lease."""
        self._warn_if_idle()
        if self._is_idle() or self._lease():
            return float(super().tick(*args, **kwargs))
        return float(self.max_interval)

    def close(self) -> None:
        """Celery's shutdown, and the lease given back so a waiting beat takes over."""
        if self._holding and self._lease_client is not None:
            with suppress(*_REDIS_ERRORS):
                self._lease_client.eval(RELEASE_SCRIPT, 1, BEAT_LEASE_KEY, self.beat_id)
        super().close()

    def _lease(self) -> bool:
        """Take or renew the lease; False (and an ERROR line) if another beat holds it."""
        ttl_ms = int(LEASE_TICKS * float(self.max_interval) * 1000)
        try:
            if self._lease_client is None:
                settings = load_settings()
                self._lease_client = redis_client(
                    settings.broker_url, settings, settings.connect_seconds
                )
            holder = self._lease_client.eval(LEASE_SCRIPT, 1, BEAT_LEASE_KEY, self.beat_id, ttl_ms)
        except _REDIS_ERRORS as exc:
            beat_log.error("ccarchive beat: cannot check the beat lease (%s): not scheduling", exc)
            self._holding = False
            return False
        holder = holder.decode() if isinstance(holder, bytes) else str(holder)
        if holder != self.beat_id:
            beat_log.error(
                "ccarchive beat: another beat (%s) holds %s: this one (%s) schedules "
                "nothing; run exactly one beat (it takes over when that lease expires)",
                holder,
                BEAT_LEASE_KEY,
                self.beat_id,
            )
            self._holding = False
            return False
        if not self._holding:
            beat_log.info("ccarchive beat: %s holds %s; scheduling", self.beat_id, BEAT_LEASE_KEY)
        self._holding = True
        return True

    def _is_idle(self) -> bool:
        return ENTRY not in self.app.conf.beat_schedule

    def _warn_if_idle(self) -> None:
        if ENTRY not in self.app.conf.beat_schedule:
            beat_log.warning("ccarchive beat: %s", IDLE_WARNING)


__all__ = ["LEASE_SCRIPT", "LEASE_TICKS", "RELEASE_SCRIPT", "ArchiveScheduler"]

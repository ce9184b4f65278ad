"""The beat schedule: one archive (or delete) run every interval.

`workers.celery.make_app` installs this as `app.conf.beat_schedule`, so plain
`celery -A workers beat` uses it. The interval is `CCARCHIVE_INTERVAL`, or the retention
(`CCARCHIVE_RETENTION`) when no interval is set. The planning task receives the retention,
not a cutoff: it computes `T = now - retention` when it runs, so a message that waited in
the queue still archives exactly what is old enough at that moment.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from workers.config import Settings, parse_duration

#: The name of the schedule entry (shown by beat and Flower).
ENTRY = "ccarchive-run"
#: The planning task (workers.tasks.plan).
PLAN_TASK = "ccarchive.plan"


#: What beat says at start and at every tick while no run is scheduled.
IDLE_WARNING = (
    "no retention configured (set CCARCHIVE_RETENTION, e.g. 48h, or retention in the "
    "TOML file): beat schedules no archive run"
)


#: The Redis key (on the broker's Redis) naming the one beat allowed to schedule.
LEASE_KEY = "ccarchive:beat"
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


def idle_reason(settings: Settings) -> str | None:
    """Why beat would never fire with these settings, or None if it schedules a run."""
    return None if settings.retention else IDLE_WARNING


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The schedule for these settings; empty (beat idles) when no retention is configured."""
    if not settings.retention:
        return {}
    seconds = parse_duration(settings.interval or settings.retention)
    return {
        ENTRY: {
            "task": PLAN_TASK,
            "schedule": timedelta(seconds=seconds),
            "kwargs": {"retention": settings.retention, "mode": settings.mode},
            "options": {
                "queue": settings.default_queue,
                # A run nobody picked up before the next one is due is dropped: after an
                # outage the workers do one run, not one per missed interval.
                "expires": seconds,
            },
        }
    }


__all__ = [
    "ENTRY",
    "IDLE_WARNING",
    "LEASE_KEY",
    "LEASE_SCRIPT",
    "LEASE_TICKS",
    "PLAN_TASK",
    "RELEASE_SCRIPT",
    "beat_schedule",
    "idle_reason",
]

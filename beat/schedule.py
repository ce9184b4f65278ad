"""The beat schedule: one archive (or delete) run every interval.

`workers.distributed.app.make_app` installs this as `app.conf.beat_schedule`, so plain
`celery -A workers beat` uses it. The interval is `CCARCHIVE_INTERVAL`, or the retention
(`CCARCHIVE_RETENTION`) when no interval is set. The planning task receives the retention,
not a cutoff: it computes `T = now - retention` when it runs, so a message that waited in
the queue still archives exactly what is old enough at that moment. The scheduler that
runs it, and keeps a second beat from firing, is `workers.distributed.scheduler`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from workers.config import Settings, parse_duration
from workers.distributed import names

#: The name of the schedule entry (shown by beat and Flower).
ENTRY = "ccarchive-run"
#: What beat says at start and at every tick while no run is scheduled.
IDLE_WARNING = (
    "no retention configured (set CCARCHIVE_RETENTION, e.g. 48h, or retention in the "
    "TOML file): beat schedules no archive run"
)


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
            "task": names.PLAN,
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
    "beat_schedule",
    "idle_reason",
]

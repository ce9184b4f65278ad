"""Every Celery task name and Redis key of the distributed pipeline, in one place.

The tasks register under these names, beat schedules `PLAN`, the `--broker` client sends
`PLAN` and watches `lock_key`, and tests look for them: a rename here reaches them all.
Plain strings only, so beat and the settings can import this without Celery.
"""

from __future__ import annotations

# --- task names ------------------------------------------------------------------------

#: Plans a run (beat and the client send it): discovery on every queue, then launch.
PLAN = "ccarchive.plan"
#: Lists the checkpoint tree one queue's workers see.
DISCOVER = "ccarchive.discover"
#: Takes each cluster's lock and starts its per-host chord.
LAUNCH = "ccarchive.launch"
#: Recovers a cluster's committed archives for the hosts one queue reaches (archive mode).
RECOVER_HOSTS = "ccarchive.recover_hosts"
#: After recovery: starts the cluster's per-host loads and its finalize chord.
LOAD_CLUSTER = "ccarchive.load_cluster"
#: Loads one host's checkpoints into staging (archive mode).
LOAD_HOST = "ccarchive.load_host"
#: Deletes one host's archived checkpoint files (archive mode).
DELETE_FILES = "ccarchive.delete_files"
#: Deletes one host's files older than the cutoff (delete mode).
DELETE_EXPIRED = "ccarchive.delete_expired"
#: Publishes a cluster's archive from its hosts' staged chunks.
FINALIZE_CLUSTER = "ccarchive.finalize_cluster"
#: A broken chord's errback: releases the cluster's lock and reports.
ABANDON_CLUSTER = "ccarchive.abandon_cluster"
#: Ends a cluster: report, run record, metrics, lock released.
FINISH_CLUSTER = "ccarchive.finish_cluster"

#: Every task the workers register.
TASKS = frozenset(
    {
        PLAN,
        DISCOVER,
        LAUNCH,
        RECOVER_HOSTS,
        LOAD_CLUSTER,
        LOAD_HOST,
        DELETE_FILES,
        DELETE_EXPIRED,
        FINALIZE_CLUSTER,
        ABANDON_CLUSTER,
        FINISH_CLUSTER,
    }
)

# --- Redis keys (on the broker's Redis) ---------------------------------------------------

#: A cluster's lock is `LOCK_PREFIX + cluster`, holding the run id (see `lock_key`).
LOCK_PREFIX = "ccarchive:lock:"
#: The list of the latest cluster reports (JSON, newest first): what beat runs leave.
REPORTS_KEY = "ccarchive:reports"
#: A task's delivery counter is `ATTEMPTS_PREFIX + task id`.
ATTEMPTS_PREFIX = "ccarchive:attempts:"
#: The lease naming the one beat allowed to schedule.
BEAT_LEASE_KEY = "ccarchive:beat"


def lock_key(cluster: str) -> str:
    """The Redis key of a cluster's lock."""
    return LOCK_PREFIX + cluster


__all__ = [
    "ABANDON_CLUSTER",
    "ATTEMPTS_PREFIX",
    "BEAT_LEASE_KEY",
    "DELETE_EXPIRED",
    "DELETE_FILES",
    "DISCOVER",
    "FINALIZE_CLUSTER",
    "FINISH_CLUSTER",
    "LAUNCH",
    "LOAD_HOST",
    "LOCK_PREFIX",
    "PLAN",
    "REPORTS_KEY",
    "TASKS",
    "lock_key",
]

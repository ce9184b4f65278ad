"""The Celery app: its configuration (each setting with its reason) and the one instance.

`celery -A workers worker|beat|flower` finds `app` through the thin `workers.celery`.
Broker, result backend, queues and the beat schedule all come from `Settings`
(`CCARCHIVE_*` environment variables), read once when a process imports this module.
The `--broker` client builds its own app with `make_app` instead.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

from celery import Celery

from beat.schedule import beat_schedule

from ..config import ConfigError, Settings, load_settings, mask_url, parse_duration
from . import signals
from .backend import RedisResults

#: The module of the tasks, imported by every worker (`include`).
TASKS_MODULE = "workers.distributed.tasks"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration for the archiver's long, idempotent tasks, and why each setting."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.results_url,
        # SPEC §6.6: messages are JSON only. A pickle payload would let anyone who can write
        # to the broker run code on every worker; JSON is data.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Acknowledge a task only after it finished: a worker killed mid-task (OOM, reboot)
        # leaves the message in the broker and another worker runs it. Every task is safe to
        # run twice (loads rewrite the same chunk, finalize finds its own archive, deletes
        # check sizes), so at-least-once is what we want.
        "task_acks_late": True,
        # Without this a task whose worker *process* died would be acked as failed; with it
        # the message is requeued. Poison messages are bounded by the attempt counter in
        # workers.distributed.tasks, not by Celery.
        "task_reject_on_worker_lost": True,
        # A worker reserves one task per process at a time: tasks last seconds to minutes,
        # so prefetching more would pin hosts to a busy worker while others sit idle, and
        # on a lost worker more messages would wait for redelivery.
        "worker_prefetch_multiplier": 1,
        # Task events (received/started/succeeded/failed, and "sent" from the producer) are
        # what Flower shows; without them it only sees workers, not tasks.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # STARTED state: the CLI and Flower can tell a queued task from a running one.
        "task_track_started": True,
        # Results are read once, by the chord and the submitting CLI; the run's lasting
        # record is the archive's footer and the report log. Let Redis drop them after a day.
        "result_expires": timedelta(days=1),
        # Redis redelivers a message that was taken but not acked after this long. It must
        # exceed the longest task (a big cluster's finalize), or a healthy task would be
        # run a second time next to itself.
        "broker_transport_options": _transport_options(settings),
        "result_backend_transport_options": {
            "visibility_timeout": parse_duration(settings.visibility_timeout)
        },
        # A TCP connect that gets no answer fails after CCARCHIVE_CONNECT_TIMEOUT (and is
        # retried as configured below) instead of hanging on the kernel's own timeout.
        "redis_socket_connect_timeout": settings.connect_seconds,
        # With late acks, a lost broker connection means the running tasks will be delivered
        # again (after the visibility timeout). Celery 6 will cancel them by default; not
        # here. Cancelling records the task as a retry in the result backend, which is the
        # same Redis and just as unreachable: the record fails, the task then counts as
        # REVOKED and its chord breaks, so a Redis restart would leave the run stuck on its
        # cluster lock until the lock expires. Finishing instead lets the chord go on as soon
        # as Redis is back; the second delivery is harmless (every task is idempotent, and
        # the result backend ignores a second result for a chord member).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A finished task whose result cannot be stored fails, and so does its chord: retry
        # while Redis is unreachable (a restart) instead, with exponential back-off capped
        # at 10 s, about five minutes in all. Chords are how a run moves on.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 60,
        # Tasks send the next stage's messages themselves (chords): a finalize that
        # published its archive must not fail because Redis is restarting just then. Keep
        # trying for about a minute (Celery's default gives up after 0.6 s).
        "task_publish_retry_policy": {
            "max_retries": 30,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        },
        # Workers may start before Redis (docker compose): keep retrying instead of exiting.
        "broker_connection_retry_on_startup": True,
        # Queues: unrouted work goes to the default queue; routed per-host tasks name their
        # queue explicitly when they are sent (workers.distributed.routing).
        "task_default_queue": settings.default_queue,
        "task_create_missing_queues": True,
        # Workers log in UTC like the timestamps in the file names.
        "enable_utc": True,
        "timezone": "UTC",
    }
    # rediss:// (TLS): kombu would otherwise connect to a rediss:// broker *without*
    # verifying the server certificate (it only logs a warning), and the result backend
    # refuses a rediss:// URL without `ssl_cert_reqs`. Verify always, against the CA bundle
    # CCARCHIVE_REDIS_CA_CERT (or the system's CAs); `ssl_*` parameters in a URL still win.
    broker_tls = settings.redis_tls(settings.broker_url)
    if broker_tls is not None:
        config["broker_use_ssl"] = broker_tls
    results_tls = settings.redis_tls(settings.results_url)
    if results_tls is not None:
        config["redis_backend_use_ssl"] = results_tls
    return config


def _transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options: the visibility timeout and how soon lost messages return.

    A message whose worker vanished (killed, or cancelled when Redis restarted) stays in
    Redis's `unacked` set and is put back in its queue by a periodic sweep once it is older
    than the visibility timeout. kombu sweeps every `interval * throttle` seconds (100 s by
    default) under a mutex that expires after 300 s; a mutex held when Redis died survives
    a restart with an append-only file and would block every sweep that long. Both scale
    down with the timeout here: a lost task returns after about 1.25 times the timeout,
    whatever it is (the defaults for the default 2 h).
    """
    timeout = parse_duration(settings.visibility_timeout)
    interval = max(1.0, min(10.0, timeout / 40))
    return {
        "socket_connect_timeout": settings.connect_seconds,
        "visibility_timeout": timeout,
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": max(1, min(10, int(timeout / (4 * interval)))),
        "unacked_mutex_expire": int(max(5.0, min(300.0, timeout))),
    }


def _worker_class(celery_app: Celery) -> type:
    """Celery's worker, with the broker URL in its banner masked only if it has a password.

    kombu's `as_uri()` prints `redis://:**@host` for every URL, which reads as "a password
    is set" when none is; `mask_url` shows `**` only in place of a real one.
    """
    base: type = celery_app.Worker

    class Worker(base):  # type: ignore[misc, valid-type]
        def startup_info(self, artlines: bool = True) -> str:
            shown = self.app.connection().as_uri()
            truth = mask_url(self.app.connection().as_uri(include_password=True))
            return str(super().startup_info(artlines)).replace(shown, truth, 1)

    return Worker


def make_app(settings: Settings | None = None) -> Celery:
    """A configured Celery app with the archiver's tasks and beat schedule."""
    settings = settings or load_settings()
    celery_app = Celery("ccarchive", include=[TASKS_MODULE])
    celery_app.conf.update(celery_config(settings))
    if settings.results_url.startswith(("redis://", "rediss://")):
        celery_app.backend_cls = RedisResults  # the URL stays in `result_backend`
    celery_app.conf.beat_schedule = beat_schedule(settings)
    celery_app.conf.beat_scheduler = "workers.distributed.scheduler:ArchiveScheduler"
    celery_app.Worker = _worker_class(celery_app)  # type: ignore[misc]
    return celery_app


def _app_or_exit() -> Celery:
    """The app from the environment; an invalid setting is one line on stderr and exit 2.

    Celery would otherwise print "Unable to load celery application" and a traceback.
    """
    try:
        return make_app()
    except ConfigError as exc:
        print(f"ccarchive: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


#: The app every worker, beat and flower process uses (`celery -A workers ...`).
app = _app_or_exit()

# Start-up checks, storage options, log context and metrics for every task: signals.
signals.install()


__all__ = ["TASKS_MODULE", "app", "celery_config", "make_app"]

"""Every Celery signal hook of the archiver's worker and beat processes, connected by `install`.

At start: the broker and result backend answer (else one error line and exit 2), and the
storage options apply to every process that runs tasks. Per task: its log lines carry its
run, cluster and host. The worker serves the Prometheus metrics when CCARCHIVE_METRICS_PORT
is set (the pipeline counts a cluster when its run ends). The hooks only adapt Celery's
signals to the plain functions of `workers.logs`, `workers.metrics` and `workers.config`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import signals

from .. import logs, metrics
from ..config import configure_storage, load_settings
from .connection import Unreachable, check_reachable

log = logging.getLogger(__name__)


def _check_broker(sender: Any = None, **_: Any) -> None:
    """At start, a Redis that cannot answer (no TLS handshake, wrong password, certificate
    refused) is one `ccarchive: error:` line and exit 2: kombu would wait or retry silently.

    A refused connection (Redis down, or still starting: docker compose) is a warning, and
    Celery keeps retrying as `broker_connection_retry_on_startup` says.
    """
    settings = load_settings()
    for url, what in ((settings.broker_url, "broker"), (settings.results_url, "result backend")):
        try:
            # One attempt: Celery has its own retries for a Redis that is down.
            check_reachable(url, settings, what, retry=False)
        except Unreachable as exc:
            if exc.transient:
                log.warning("ccarchive: %s; retrying", exc)
                return
            # sys.__stderr__: Celery has redirected sys.stderr into its logger by now.
            print(f"ccarchive: error: {exc}", file=sys.__stderr__ or sys.stderr, flush=True)
            raise SystemExit(2) from None
        if settings.results_url == settings.broker_url:
            return


def _configure_storage(**_: Any) -> None:
    """S3 endpoint and credentials (CCARCHIVE_S3_*) for every process that runs tasks."""
    configure_storage(load_settings())


def _annotate(logger: logging.Logger, **_: Any) -> None:
    """Celery set up its logging (`--loglevel`, `--logfile`): keep it, add the context."""
    logs.annotate_handlers(logger)


def _task_prerun(
    task_id: str | None = None, task: Any = None, args: Any = None, kwargs: Any = None, **_: Any
) -> None:
    logs.task_started(task_id or "", getattr(task, "run", None), args, kwargs)


def _task_postrun(task_id: str | None = None, **_: Any) -> None:
    logs.task_ended(task_id or "")


def _serve_metrics(**_: Any) -> None:
    """The worker's main process serves the metrics endpoint (if a port is configured)."""
    try:
        metrics.configure(load_settings())
    except OSError as exc:  # no endpoint is better than no worker
        log.error("cannot serve metrics: %s", exc)


def _process_exited(pid: int | None = None, **_: Any) -> None:
    metrics.process_exited(pid or os.getpid())


#: (signal, handler) pairs; `dispatch_uid` makes a second `install()` harmless.
_HOOKS = (
    (signals.worker_init, _check_broker),
    (signals.beat_init, _check_broker),
    (signals.worker_init, _configure_storage),  # the solo pool runs tasks in the main process
    (signals.worker_process_init, _configure_storage),  # prefork: every child process
    (signals.after_setup_logger, _annotate),
    (signals.after_setup_task_logger, _annotate),
    (signals.task_prerun, _task_prerun),
    (signals.task_postrun, _task_postrun),
    (signals.worker_init, _serve_metrics),
    (signals.worker_process_shutdown, _process_exited),
)


def install() -> None:
    """Connect every hook (process-global: no app object needed); idempotent."""
    for signal, handler in _HOOKS:
        signal.connect(handler, weak=False, dispatch_uid=f"ccarchive:{handler.__name__}")


__all__ = ["install"]

"""Prometheus metrics of the archiver, fed from outside the steps.

The steps know nothing about metrics. What feeds them:

- the embedded runner calls `observe_cluster(report)` when a cluster is done;
- in Celery workers, `install_celery()` connects `task_success`, where the result of the
  task that ends a cluster (its ClusterReport, as JSON) is counted the same way, and
  `worker_init`, which starts the HTTP endpoint in the worker's main process.

Exposed (all labelled `cluster`): `ccarchive_rows_archived_total`,
`ccarchive_files_archived_total`, `ccarchive_files_deleted_total`,
`ccarchive_bytes_written_total`, `ccarchive_bad_files_total`, `ccarchive_runs_total`
(also labelled `outcome`: ok | reported | error), `ccarchive_run_duration_seconds`
(histogram), `ccarchive_last_run_timestamp_seconds` and
`ccarchive_last_success_timestamp_seconds`.

Prefork Celery workers run tasks in child processes: set PROMETHEUS_MULTIPROC_DIR (an
empty directory) in the worker's environment and the endpoint aggregates all children
(prometheus_client's multiprocess mode). See docs/operations.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    write_to_textfile,
)

from .manifest import ClusterReport
from .ops import run_outcome as outcome

log = logging.getLogger(__name__)

ROWS_ARCHIVED = Counter(
    "ccarchive_rows_archived", "Rows written into newly published archives", ["cluster"]
)
FILES_ARCHIVED = Counter(
    "ccarchive_files_archived", "Checkpoint files whose rows were archived", ["cluster"]
)
FILES_DELETED = Counter(
    "ccarchive_files_deleted",
    "Checkpoint files deleted (after archiving, in delete mode, or by recovery)",
    ["cluster"],
)
BYTES_WRITTEN = Counter(
    "ccarchive_bytes_written", "Bytes of newly published archive files", ["cluster"]
)
BAD_FILES = Counter(
    "ccarchive_bad_files",
    "Inputs reported and kept: bad checkpoint files, unreadable hosts, changed files",
    ["cluster"],
)
RUNS = Counter("ccarchive_runs", "Runs of a cluster, by outcome", ["cluster", "outcome"])
RUN_DURATION = Histogram(
    "ccarchive_run_duration_seconds",
    "Wall-clock seconds of a cluster's run",
    ["cluster"],
    # Runs take seconds (small clusters) to hours (thousands of nodes).
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400),
)
# In multiprocess mode several processes report a gauge: the newest timestamp is the answer.
LAST_RUN = Gauge(
    "ccarchive_last_run_timestamp_seconds",
    "Unix time a cluster's last run ended",
    ["cluster"],
    multiprocess_mode="max",
)
LAST_SUCCESS = Gauge(
    "ccarchive_last_success_timestamp_seconds",
    "Unix time a cluster's last run ended without errors (kept bad files do not count)",
    ["cluster"],
    multiprocess_mode="max",
)

_lock = threading.Lock()
_server: tuple[Any, threading.Thread, str, int] | None = None
_textfile: str | None = None


def observe_cluster(report: ClusterReport, now: float | None = None) -> None:
    """Count one finished cluster run (the embedded runner's `_finish`, Celery's last task)."""
    cluster = report.cluster
    if report.bytes_written:
        # Only a newly written archive adds rows: a re-run that finds its own archive
        # already published (bytes_written 0) counted them the first time.
        ROWS_ARCHIVED.labels(cluster).inc(report.rows)
        BYTES_WRITTEN.labels(cluster).inc(report.bytes_written)
    FILES_ARCHIVED.labels(cluster).inc(report.files_archived)  # 0 in delete mode
    FILES_DELETED.labels(cluster).inc(report.files_deleted)
    BAD_FILES.labels(cluster).inc(len(report.bad))
    _observe_run(cluster, outcome(report), report.seconds, now)
    _write_textfile()


def _observe_run(cluster: str, result: str, seconds: float, now: float | None) -> None:
    ended = time.time() if now is None else now
    RUNS.labels(cluster, result).inc()
    RUN_DURATION.labels(cluster).observe(seconds)
    LAST_RUN.labels(cluster).set(ended)
    if result != "error":
        # A permanently bad file is reported on every run; it must not make an alert on
        # "no successful run" fire while everything else is archived.
        LAST_SUCCESS.labels(cluster).set(ended)


def _registry() -> CollectorRegistry:
    """The default registry, or an aggregating one in prometheus multiprocess mode."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


@dataclass(frozen=True)
class Endpoint:
    """Where this process serves its metrics."""

    addr: str
    port: int

    @property
    def url(self) -> str:
        """The scrape URL."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"


def serve(port: int, addr: str = "0.0.0.0") -> Endpoint | None:
    """Serve /metrics on addr:port in a daemon thread (port 0: off). Once per process.

    A second call with the same address is a no-op, so every entry point may call it.
    """
    global _server
    if not port:
        return None
    with _lock:
        if _server is not None:
            if (_server[2], _server[3]) != (addr, port):
                log.warning("metrics already served on %s:%s", _server[2], _server[3])
            return Endpoint(_server[2], _server[3])
        server, thread = start_http_server(port, addr=addr, registry=_registry())
        _server = (server, thread, addr, port)
    log.info("serving Prometheus metrics on %s", Endpoint(addr, port).url)
    return Endpoint(addr, port)


def stop() -> None:
    """Stop the endpoint `serve` started (tests; a process exit stops it anyway)."""
    global _server
    with _lock:
        if _server is None:
            return
        server, thread, _addr, _port = _server
        _server = None
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def set_textfile(path: str | None) -> None:
    """Also write all metrics to `path` after every cluster (node_exporter's textfile
    collector: the right tool for one-shot runs whose endpoint lives only as long as they do).
    """
    global _textfile
    _textfile = path


def _write_textfile() -> None:
    if not _textfile:
        return
    try:
        write_to_textfile(_textfile, _registry())  # writes a temporary file, then renames
    except OSError as exc:
        log.warning("cannot write metrics to %s: %s", _textfile, exc)


def configure(settings: Any) -> Endpoint | None:
    """Apply `Settings` (metrics_port, metrics_addr, metrics_textfile): the CLI's one call."""
    set_textfile(settings.metrics_textfile)
    return serve(settings.metrics_port, settings.metrics_addr)


# --- Celery ------------------------------------------------------------------------------


#: The keys by which a task result is recognised as a cluster's final report.
_REPORT_KEYS = frozenset({"cluster", "cutoff", "run_id", "files_archived", "errors", "bad"})


def observe_task_result(result: Any) -> bool:
    """Count a task's JSON result if it is a cluster's final report; True if it was.

    The Celery pipeline ends every cluster with one task (`ccarchive.finish_cluster`)
    whose result is the whole ClusterReport, deletions and recoveries included: the same
    record `observe_cluster` counts in the embedded runner. Per-host results (manifests,
    deletions) and finalize's preliminary report are nested or partial and are not
    counted, so no number is counted twice.
    """
    if not isinstance(result, Mapping) or not result.keys() >= _REPORT_KEYS:
        return False
    try:
        report = ClusterReport.from_dict(dict(result))
    except TypeError:  # not a ClusterReport after all (unknown keys)
        return False
    observe_cluster(report)
    return True


def install_celery() -> None:
    """Feed the metrics from Celery task results and serve them from the worker.

    Call once where the Celery app is built. Signals are process-global, so this needs no
    app object; `dispatch_uid` makes a second call harmless.
    """
    from celery import signals  # deferred: the embedded runner never imports Celery

    def _on_success(sender: Any = None, result: Any = None, **_kwargs: Any) -> None:
        try:
            observe_task_result(result)
        except Exception:  # metrics must never fail a task
            log.exception("cannot count the result of %s", getattr(sender, "name", sender))

    def _on_worker_init(**_kwargs: Any) -> None:
        from .config import load_settings

        try:
            configure(load_settings())
        except OSError as exc:  # no endpoint is better than no worker
            log.error("cannot serve metrics: %s", exc)

    def _on_process_exit(pid: int | None = None, **_kwargs: Any) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]

    signals.task_success.connect(_on_success, weak=False, dispatch_uid="ccarchive-metrics")
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="ccarchive-metrics")
    signals.worker_process_shutdown.connect(
        _on_process_exit, weak=False, dispatch_uid="ccarchive-metrics"
    )


__all__ = [
    "Endpoint",
    "configure",
    "install_celery",
    "observe_cluster",
    "observe_task_result",
    "outcome",
    "serve",
    "set_textfile",
    "stop",
]

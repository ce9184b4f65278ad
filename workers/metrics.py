"""Prometheus metrics of the archiver, fed from outside the steps.

The steps know nothing about metrics. What feeds them:

- `pipeline.ClusterRun.finish` calls `observe_cluster(report)` when a cluster's run ends,
  in both drivers (skipped clusters included);
- in Celery workers, `workers.distributed.signals` starts the HTTP endpoint in the
  worker's main process and calls `process_exited` for a pool process that ends.

Exposed (all labelled `cluster`): `ccarchive_rows_archived_total`,
`ccarchive_files_archived_total`, `ccarchive_files_deleted_total`,
`ccarchive_bytes_written_total`, `ccarchive_bad_files_total`, `ccarchive_runs_total`
(also labelled `outcome`: ok | reported | error), `ccarchive_run_duration_seconds`
(histogram), `ccarchive_last_run_timestamp_seconds` and
`ccarchive_last_success_timestamp_seconds`.

Per cluster, the last run also as gauges (the same in both places, so one set of alert
rules serves both): `ccarchive_last_run_outcome` (1 for the outcome of the last run, 0 for
the others), `ccarchive_last_run_bad_files`, `_rows`, `_files_deleted`, `_bytes_written`,
`_duration_seconds`.

Prefork Celery workers run tasks in child processes: set PROMETHEUS_MULTIPROC_DIR (an
empty directory) in the worker's environment and the endpoint aggregates all children
(prometheus_client's multiprocess mode). See docs/operations.md.

The textfile (`metrics_textfile`, for node_exporter) is for one-shot runs and is not this
process's registry: each write reads the previous file, adds this process's counts to its
counters (so they grow from run to run, as Prometheus expects of a counter), replaces the
gauges of the clusters this process ran and keeps every other cluster's series. No
process, platform or GC series (node_exporter has its own) and no histogram.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .manifest import ClusterReport
from .runlog import run_outcome as outcome

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

#: Outcomes of a cluster's run (runlog.run_outcome, plus `interrupted` from the runner).
OUTCOMES = ("ok", "reported", "error", "interrupted")
#: Outcomes that count as a success: kept bad input is reported, not a failure.
SUCCESSES = ("ok", "reported")

_LAST = {  # name -> help: per cluster, about its last run
    "ccarchive_last_run_bad_files": "Inputs reported and kept by a cluster's last run",
    "ccarchive_last_run_rows": "Rows archived by a cluster's last run",
    "ccarchive_last_run_files_deleted": "Checkpoint files deleted by a cluster's last run",
    "ccarchive_last_run_bytes_written": "Bytes of archives published by a cluster's last run",
    "ccarchive_last_run_duration_seconds": "Wall-clock seconds of a cluster's last run",
}


@dataclass(frozen=True)
class _Families:
    """This process's metric families, in prometheus_client's default registry."""

    counters: dict[str, Counter]  # sample name (`..._total`) -> counter, labelled cluster
    runs: Counter
    run_duration: Histogram
    last_run: Gauge
    last_success: Gauge
    last: dict[str, Gauge]
    last_outcome: Gauge


@functools.cache
def _families() -> _Families:
    """The metric families, made (and registered) on first use: a run that counts nothing
    and serves nothing never loads prometheus_client."""
    from prometheus_client import Counter, Gauge, Histogram

    counters = {
        "ccarchive_rows_archived_total": Counter(
            "ccarchive_rows_archived", "Rows written into newly published archives", ["cluster"]
        ),
        "ccarchive_bytes_written_total": Counter(
            "ccarchive_bytes_written", "Bytes of newly published archive files", ["cluster"]
        ),
        "ccarchive_files_archived_total": Counter(
            "ccarchive_files_archived", "Checkpoint files whose rows were archived", ["cluster"]
        ),
        "ccarchive_files_deleted_total": Counter(
            "ccarchive_files_deleted",
            "Checkpoint files deleted (after archiving, in delete mode, or by recovery)",
            ["cluster"],
        ),
        "ccarchive_bad_files_total": Counter(
            "ccarchive_bad_files",
            "Inputs reported and kept: bad checkpoint files, unreadable hosts, changed files",
            ["cluster"],
        ),
    }
    return _Families(
        counters=counters,
        runs=Counter("ccarchive_runs", "Runs of a cluster, by outcome", ["cluster", "outcome"]),
        run_duration=Histogram(
            "ccarchive_run_duration_seconds",
            "Wall-clock seconds of a cluster's run",
            ["cluster"],
            # Runs take seconds (small clusters) to hours (thousands of nodes).
            buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400),
        ),
        # In multiprocess mode several processes report a gauge: the newest time is the answer.
        last_run=Gauge(
            "ccarchive_last_run_timestamp_seconds",
            "Unix time a cluster's last run ended",
            ["cluster"],
            multiprocess_mode="max",
        ),
        last_success=Gauge(
            "ccarchive_last_success_timestamp_seconds",
            "Unix time a cluster's last run ended without errors (kept bad files do not count)",
            ["cluster"],
            multiprocess_mode="max",
        ),
        # "mostrecent": in multiprocess mode the value of the process that set it last.
        last={
            name: Gauge(name, text, ["cluster"], multiprocess_mode="mostrecent")
            for name, text in _LAST.items()
        },
        last_outcome=Gauge(
            "ccarchive_last_run_outcome",
            "1 for the outcome of a cluster's last run, 0 for the other outcomes",
            ["cluster", "outcome"],
            multiprocess_mode="mostrecent",
        ),
    )


_lock = threading.Lock()
_server: tuple[Any, threading.Thread, str, int] | None = None
_textfile: str | None = None


def observe_cluster(
    report: ClusterReport, now: float | None = None, result: str | None = None
) -> None:
    """Count one finished cluster run (`pipeline.ClusterRun.finish`, in both drivers).

    `result` overrides the outcome the report implies (`interrupted`).
    """
    cluster = report.cluster
    result = result or outcome(report)
    ended = time.time() if now is None else now
    # Only a newly written archive adds rows: a re-run that finds its own archive already
    # published (bytes_written 0) counted them the first time.
    rows = report.rows if report.bytes_written else 0
    counts = {
        "ccarchive_rows_archived_total": rows,
        "ccarchive_bytes_written_total": report.bytes_written,
        "ccarchive_files_archived_total": report.files_archived,  # 0 in delete mode
        "ccarchive_files_deleted_total": report.files_deleted,
        "ccarchive_bad_files_total": len(report.bad),
    }
    last = {
        "ccarchive_last_run_bad_files": len(report.bad),
        "ccarchive_last_run_rows": rows,
        "ccarchive_last_run_files_deleted": report.files_deleted,
        "ccarchive_last_run_bytes_written": report.bytes_written,
        "ccarchive_last_run_duration_seconds": report.seconds,
        "ccarchive_last_run_timestamp_seconds": ended,
    }
    f = _families()
    for name, counter in f.counters.items():
        counter.labels(cluster).inc(counts[name])
    f.runs.labels(cluster, result).inc()
    f.run_duration.labels(cluster).observe(report.seconds)
    f.last_run.labels(cluster).set(ended)
    for name, gauge in f.last.items():
        gauge.labels(cluster).set(last[name])
    for o in OUTCOMES:
        f.last_outcome.labels(cluster, o).set(1 if o == result else 0)
    if result in SUCCESSES:
        # A permanently bad file is reported on every run; it must not make an alert on
        # "no successful run" fire while everything else is archived.
        f.last_success.labels(cluster).set(ended)
        last["ccarchive_last_success_timestamp_seconds"] = ended
    if _textfile:
        with _lock:
            _pending.add(cluster, result, counts, last)
        _write_textfile()


# --- the textfile ---------------------------------------------------------------------------

#: What the textfile holds: family name -> (type, help, label names). Series of any other
#: name in a previous file (an older version's process_* or histogram) are dropped.
TEXTFILE_FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ccarchive_runs": ("counter", "Runs of a cluster, by outcome", ("cluster", "outcome")),
    "ccarchive_rows_archived": ("counter", "Rows in newly published archives", ("cluster",)),
    "ccarchive_files_archived": (
        "counter",
        "Checkpoint files whose rows were archived",
        ("cluster",),
    ),
    "ccarchive_files_deleted": ("counter", "Checkpoint files deleted", ("cluster",)),
    "ccarchive_bytes_written": ("counter", "Bytes of newly published archives", ("cluster",)),
    "ccarchive_bad_files": ("counter", "Inputs reported and kept", ("cluster",)),
    "ccarchive_last_run_timestamp_seconds": (
        "gauge",
        "Unix time a cluster's last run ended",
        ("cluster",),
    ),
    "ccarchive_last_success_timestamp_seconds": (
        "gauge",
        "Unix time a cluster's last run without errors ended (kept bad files do not count)",
        ("cluster",),
    ),
    "ccarchive_last_run_outcome": (
        "gauge",
        "1 for the outcome of a cluster's last run, 0 for the other outcomes",
        ("cluster", "outcome"),
    ),
    **{name: ("gauge", text, ("cluster",)) for name, text in _LAST.items()},
}

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample, labels) -> value


def _sample_name(family: str) -> str:
    return f"{family}_total" if TEXTFILE_FAMILIES[family][0] == "counter" else family


class _Pending:
    """What this process observed and has not yet written to the textfile."""

    def __init__(self) -> None:
        self.add_to: Series = {}  # counters: increments
        self.set_to: Series = {}  # gauges: values

    def add(
        self,
        cluster: str,
        result: str,
        counts: Mapping[str, float],
        last: Mapping[str, float],
    ) -> None:
        """One cluster's run."""
        key = (("cluster", cluster),)
        runs = ("ccarchive_runs_total", (("cluster", cluster), ("outcome", result)))
        self.add_to[runs] = self.add_to.get(runs, 0.0) + 1
        for counter, n in counts.items():
            self.add_to[counter, key] = self.add_to.get((counter, key), 0.0) + n
        for gauge, v in last.items():
            self.set_to[gauge, key] = float(v)
        for o in OUTCOMES:
            labels = (("cluster", cluster), ("outcome", o))
            self.set_to["ccarchive_last_run_outcome", labels] = 1.0 if o == result else 0.0

    def clear(self) -> None:
        """Everything was written."""
        self.add_to.clear()
        self.set_to.clear()


_pending = _Pending()


def read_textfile(path: str) -> Series:
    """The ccarchive series of a textfile this module wrote ({} if there is none).

    Raises ValueError if the file is not in the Prometheus text format.
    """
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    known = {_sample_name(name) for name in TEXTFILE_FAMILIES}
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in known
    }


class _SeriesCollector:
    """Hands a fixed set of series to `write_to_textfile`, with their types and help."""

    def __init__(self, series: Series) -> None:
        self.series = series

    def collect(self) -> Any:
        """One metric family per name in TEXTFILE_FAMILIES that has a series."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, (kind, text, labels) in TEXTFILE_FAMILIES.items():
            sample = _sample_name(name)
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, text, labels=list(labels)
            )
            found = sorted((k[1], v) for k, v in self.series.items() if k[0] == sample)
            for label_pairs, v in found:
                values = dict(label_pairs)
                family.add_metric([values.get(label, "") for label in labels], v)
            if found:
                yield family


def _write_textfile() -> None:
    """Merge what this process observed into the textfile (see the module's doc)."""
    from prometheus_client import CollectorRegistry, write_to_textfile  # see _families

    if not _textfile:
        return
    with _lock:
        try:
            previous = read_textfile(_textfile)
        except (OSError, ValueError) as exc:
            # Unreadable: start the counters over rather than never write again.
            log.warning("cannot read metrics textfile %s, starting anew: %s", _textfile, exc)
            previous = {}
        merged = dict(previous)
        for key, n in _pending.add_to.items():
            merged[key] = merged.get(key, 0.0) + n
        merged.update(_pending.set_to)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SeriesCollector(merged))  # type: ignore[arg-type]
        try:
            write_to_textfile(_textfile, registry)  # a temporary file, then renamed
        except OSError as exc:
            log.warning("cannot write metrics to %s: %s", _textfile, exc)
            return  # kept: the next write adds it
        _pending.clear()


def _registry() -> CollectorRegistry:
    """The default registry, or an aggregating one in prometheus multiprocess mode."""
    from prometheus_client import REGISTRY, CollectorRegistry  # see _families

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
        from prometheus_client import start_http_server  # see _families

        _families()  # served from the start, before the first run is counted
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
    """Also write the metrics to `path` after every cluster (node_exporter's textfile
    collector: the right tool for one-shot runs whose endpoint lives only as long as they
    do); see the module's doc for what it holds.
    """
    global _textfile
    _textfile = path


def configure(settings: Any) -> Endpoint | None:
    """Apply `Settings` (metrics_port, metrics_addr, metrics_textfile): the CLI's one call."""
    set_textfile(settings.metrics_textfile)
    return serve(settings.metrics_port, settings.metrics_addr)


# --- task results (what Celery workers feed in) ------------------------------------------


def process_exited(pid: int) -> None:
    """A process that counted metrics is gone: in multiprocess mode (prefork workers) its
    live gauges must stop counting towards the endpoint's totals."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


__all__ = [
    "Endpoint",
    "configure",
    "observe_cluster",
    "outcome",
    "process_exited",
    "read_textfile",
    "serve",
    "set_textfile",
    "stop",
]

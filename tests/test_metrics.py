"""Observability: the Prometheus endpoint scraped over HTTP during real runs, the textfile,
the Celery signal path, and log lines that carry run id, cluster and host.

Servers bind 127.0.0.1 on a free port and are stopped by the test. Counters live in the
process-wide registry, so every check compares a value before and after a run.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import archive_argv, free_port, level, metric, write_json
from workers import metrics
from workers.cli import main
from workers.distributed import names
from workers.logs import ContextFilter, current_context, log_context, setup_logging
from workers.manifest import BadFile, ClusterReport


@pytest.fixture(autouse=True)
def no_metrics_left(clean_settings: pytest.MonkeyPatch) -> Iterator[None]:
    """No CCARCHIVE_* of whoever runs the tests; no metrics server or textfile left over."""
    yield
    metrics.stop()
    metrics.set_textfile(None)


def value(name: str, **labels: str) -> float:
    """Current value of a sample in this process's registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def tree(cp: Path, cluster: str, bad: bool = False) -> int:
    """Two hosts with two files each (plus a bad one); return the number of rows."""
    for host in ("n1", "n2"):
        for ts in (100, 200):
            write_json(
                cp / cluster / host / f"{ts}.json",
                level({"load": metric([1.0, 2.0, None, 4.0], 10, ts)}),
            )
    if bad:
        (cp / cluster / "n1" / "150.json").write_text("{not json")  # reported, kept
    return 2 * 2 * 3


@pytest.mark.slow
def test_endpoint_scraped_during_a_cli_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    rows = tree(cp, "m-ok") + tree(cp, "m-bad", bad=True)
    port = free_port()
    monkeypatch.setenv("CCARCHIVE_METRICS_PORT", str(port))
    monkeypatch.setenv("CCARCHIVE_METRICS_ADDR", "127.0.0.1")
    before = {
        c: (
            value("ccarchive_rows_archived_total", cluster=c),
            value("ccarchive_files_deleted_total", cluster=c),
            value("ccarchive_bad_files_total", cluster=c),
            value("ccarchive_bytes_written_total", cluster=c),
        )
        for c in ("m-ok", "m-bad")
    }
    scrapes: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []
    observe = metrics.observe_cluster

    def observe_and_scrape(report: ClusterReport, now: float | None = None) -> None:
        observe(report, now)
        # Still inside the run (the runner has not returned): what Prometheus would see.
        scrapes.append(scrape(f"http://127.0.0.1:{port}/metrics"))

    monkeypatch.setattr(metrics, "observe_cluster", observe_and_scrape)
    code = main(archive_argv(cp, archive, 250))
    assert code == 1  # m-bad's 150.json is reported and kept
    assert len(scrapes) == 2
    last = scrapes[-1]
    for cluster in ("m-ok", "m-bad"):
        lab = (("cluster", cluster),)
        rows0, deleted0, _, bytes0 = before[cluster]
        assert last["ccarchive_rows_archived_total", lab] == rows0 + rows / 2
        assert last["ccarchive_files_deleted_total", lab] == deleted0 + 4
        assert last["ccarchive_files_archived_total", lab] >= 4
        size = (archive / cluster / "250.parquet").stat().st_size
        assert last["ccarchive_bytes_written_total", lab] == bytes0 + size
        assert last["ccarchive_run_duration_seconds_count", lab] >= 1
        assert last["ccarchive_last_success_timestamp_seconds", lab] > 1e9
    assert last["ccarchive_bad_files_total", (("cluster", "m-bad"),)] == before["m-bad"][2] + 1
    runs = ("ccarchive_runs_total", (("cluster", "m-bad"), ("outcome", "reported")))
    assert last[runs] >= 1


def test_failed_run_is_not_a_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    tree(cp, "m-conflict")
    (archive / "m-conflict").mkdir(parents=True)
    # A valid Parquet file with other content under the archive's name: a conflict.
    pq.write_table(pa.table({"x": [1]}), archive / "m-conflict" / "250.parquet")
    textfile = tmp_path / "ccarchive.prom"
    monkeypatch.setenv("CCARCHIVE_METRICS_TEXTFILE", str(textfile))
    errors0 = value("ccarchive_runs_total", cluster="m-conflict", outcome="error")

    code = main(archive_argv(cp, archive, 250))

    assert code == 1
    assert value("ccarchive_runs_total", cluster="m-conflict", outcome="error") == errors0 + 1
    assert value("ccarchive_last_run_timestamp_seconds", cluster="m-conflict") > 1e9
    assert value("ccarchive_last_success_timestamp_seconds", cluster="m-conflict") == 0
    assert value("ccarchive_files_deleted_total", cluster="m-conflict") == 0  # all kept
    # The textfile (node_exporter's collector) holds the same numbers.
    text = textfile.read_text()
    assert 'ccarchive_runs_total{cluster="m-conflict",outcome="error"}' in text
    assert not list(tmp_path.glob("*.prom.*"))  # written atomically, no temporary left


def test_serve_is_once_per_process_and_stops() -> None:
    port = free_port()
    endpoint = metrics.serve(port, "127.0.0.1")
    assert endpoint is not None and endpoint.url == f"http://127.0.0.1:{port}/metrics"
    assert metrics.serve(port, "127.0.0.1") == endpoint  # a second entry point: no-op
    assert metrics.serve(0) is None  # 0: off
    assert ("ccarchive_runs_total", ()) not in scrape(endpoint.url)  # parses, labelled only
    metrics.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint.url, timeout=2)


def test_a_cluster_run_is_counted_once_by_its_finish_not_by_task_results() -> None:
    from celery import signals

    from workers.distributed import signals as hooks
    from workers.pipeline import ClusterRun, RunLog

    hooks.install()
    hooks.install()  # idempotent: one connection per handler
    run = ClusterRun.begin("m-celery", 500, "500-x", ["h1", "h2", "h3"])
    report = run.report
    report.files_archived, report.files_deleted, report.rows = 6, 6, 60
    report.bytes_written = 1234
    report.bad.append(BadFile("/cp/m-celery/h1/x.json", "invalid JSON"))
    rows0 = value("ccarchive_rows_archived_total", cluster="m-celery")
    runs0 = value("ccarchive_runs_total", cluster="m-celery", outcome="reported")

    run.finish(RunLog())  # what both drivers call at a cluster's end

    class FakeTask:
        name = names.FINISH_CLUSTER

    # The finish task's result is that same report: a task result is never counted again.
    signals.task_success.send(sender=FakeTask(), result=report.to_dict())
    signals.task_success.send(sender=FakeTask(), result={"report": report.to_dict()})

    assert value("ccarchive_rows_archived_total", cluster="m-celery") == rows0 + 60
    assert value("ccarchive_runs_total", cluster="m-celery", outcome="reported") == runs0 + 1
    assert value("ccarchive_bytes_written_total", cluster="m-celery") >= 1234
    assert value("ccarchive_files_deleted_total", cluster="m-celery") >= 6


# --- logs -------------------------------------------------------------------------------------

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (?P<level>[A-Z]+) (?P<logger>\S+) "
    r"run=(?P<run>\S+) cluster=(?P<cluster>\S+) host=(?P<host>\S+): (?P<msg>.*)$"
)


def test_log_context_nests_and_resets() -> None:
    with log_context(run_id="r1", cluster="c1"):
        with log_context(host="h1", cluster=None):
            assert current_context() == {"run_id": "r1", "cluster": "c1", "host": "h1"}
        assert current_context() == {"run_id": "r1", "cluster": "c1"}
    assert current_context() == {}
    import logging

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert ContextFilter().filter(record) and (record.run_id, record.host) == ("-", "-")


@pytest.mark.parametrize("workers", ["1", "2"])  # 2: steps run in spawned processes
def test_every_log_line_names_run_cluster_and_host(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    workers: str,
) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    write_json(cp / "logc" / "h7" / "100.json", level({"m": metric([1.0])}))
    (cp / "logc" / "h7" / "150.json").write_text("[1, 2")  # logged by load_host
    monkeypatch.setenv("CCARCHIVE_LOG_LEVEL", "INFO")
    try:
        code = main(archive_argv(cp, archive, 200, workers))
    finally:
        setup_logging("WARNING")  # the test process's logging as it was
    assert code == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if LINE.match(line)]
    bad = [m for m in map(LINE.match, lines) if m and "bad checkpoint" in m["msg"]]
    assert len(bad) == 1, err
    assert (bad[0]["cluster"], bad[0]["host"]) == ("logc", "h7")
    assert re.fullmatch(r"200-\d{8}T\d{6}-[0-9a-f]{8}", bad[0]["run"])
    # Every log line has the three fields (possibly "-" outside a step).
    log_lines = [line for line in err.splitlines() if re.match(r"^\d{4}-\d\d-\d\dT", line)]
    assert log_lines and all(LINE.match(line) for line in log_lines)

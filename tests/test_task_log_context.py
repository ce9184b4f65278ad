"""Log lines from Celery tasks name their run, cluster and host (docs/operations.md, Logs).

The tasks run in this process through Celery's own tracer (`Task.apply`), which sends the
`task_prerun`/`task_postrun` signals a worker sends; the Redis they would use is a port
nothing listens on, so the lock release and the report log fail and warn, the way a
worker whose Redis went away does. Every record is captured with the context filter the
worker's handlers carry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port
from workers import logs
from workers.manifest import ClusterReport

RUN_ID = "200-20260320T101500-3f2a9c1d"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(logs.ContextFilter())  # as workers.distributed.signals adds to Celery's
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured(tmp_path: Path, clean_settings: pytest.MonkeyPatch) -> Iterator[_Capture]:
    """Worker settings (no Redis answering), the tasks module, and every log record."""
    from workers.distributed import tasks

    monkeypatch = clean_settings
    (tmp_path / "cp").mkdir()
    monkeypatch.setenv("CCARCHIVE_CHECKPOINTS", str(tmp_path / "cp"))
    monkeypatch.setenv("CCARCHIVE_ARCHIVE", str(tmp_path / "arc"))
    monkeypatch.setenv("CCARCHIVE_RUN_LOG", str(tmp_path / "runs"))
    monkeypatch.setenv("CCARCHIVE_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    caches = (tasks.settings, tasks.router, tasks._redis)
    for cached in caches:
        cached.cache_clear()
    handler = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for cached in caches:
            cached.cache_clear()


def fields(record: logging.LogRecord) -> tuple[str, str, str]:
    return record.run_id, record.cluster, record.host  # type: ignore[attr-defined]


def test_the_cluster_summary_and_its_warnings_carry_the_run_and_cluster(
    captured: _Capture,
) -> None:
    from workers.distributed import tasks

    report = ClusterReport("fritz", 200, RUN_ID, hosts=3)
    result = tasks.finish_cluster.apply(args=([], report.to_dict(), "archive", time.time()))
    assert result.successful(), result.traceback
    lines = [r for r in captured.records if r.name.startswith("workers")]
    messages = [r.getMessage() for r in lines]
    assert any(m.startswith("lock of fritz not released") for m in messages), messages
    assert any(m.startswith("report of fritz not logged") for m in messages), messages
    assert any(m.startswith(f"run {RUN_ID} cluster fritz: 3 hosts") for m in messages), messages
    assert {fields(r) for r in lines} == {(RUN_ID, "fritz", "-")}
    # After the task, the worker's own lines have no context again.
    after = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    logs.ContextFilter().filter(after)
    assert fields(after) == ("-", "-", "-")


def test_a_host_task_names_its_host_and_a_hostile_name_cannot_forge_a_line(
    captured: _Capture,
) -> None:
    from workers.distributed import tasks

    result = tasks.load_host.apply(args=("fritz", "f01\n2026 forged", 200, RUN_ID))
    assert result.successful(), result.traceback
    refused = [r for r in captured.records if "refused a task message" in r.getMessage()]
    assert refused, [r.getMessage() for r in captured.records]
    assert {fields(r) for r in refused} == {(RUN_ID, "fritz", "'f01\\n2026 forged'")}


def test_context_from_arguments_and_from_a_report() -> None:
    def task(cluster: str, host: str, cutoff: int, run_id: str) -> None: ...

    def finish(deletions: list[object], report: dict[str, object], mode: str) -> None: ...

    assert logs.arguments_context(task, ("c", "h", 1), {"run_id": "r"}) == {
        "run_id": "r",
        "cluster": "c",
        "host": "h",
    }
    assert logs.arguments_context(finish, ([], {"cluster": "c", "run_id": "r"}, "x"), {}) == {
        "run_id": "r",
        "cluster": "c",
    }
    assert logs.arguments_context(task, ("too", "many", 1, "r", "args"), {}) == {}

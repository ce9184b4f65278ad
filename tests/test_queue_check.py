"""A routed queue with no worker refuses the run up front (exit 2, naming the queue),
both in the client and in the workers' plan (issue 14): otherwise discovery on that queue
never completes and every cluster of the run waits silently.

One real redis-server and one real `celery worker` that consumes only the default queue.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed_harness import RedisInstance
from tests.fixtures_redis import (
    CCARCHIVE,
    Processes,
    make_test_app,
    wait_for_workers,
    worker_argv,
)
from tests.helpers import clean_env

pytestmark = [pytest.mark.distributed]

DB = 11
ROUTES = {"fritz": "storage-a"}


@dataclass
class Setup:
    redis: RedisInstance
    checkpoints: Path
    archive: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def default_only(
    redis_server: RedisInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    """A worker on the default queue only, with routes that send fritz to storage-a."""
    root = tmp_path_factory.mktemp("queues")
    checkpoints, archive, staging = root / "cp", root / "ar", root / "st"
    for d in (checkpoints / "fritz" / "f1", checkpoints / "alex" / "a1", archive, staging):
        d.mkdir(parents=True)
    for host in (checkpoints / "fritz" / "f1", checkpoints / "alex" / "a1"):
        (host / "1000.json").write_text('{"from": 1000, "to": 1060, "metrics": {}}')
    redis_server.client(DB).flushdb()
    env = clean_env(
        CCARCHIVE_BROKER_URL=redis_server.url(DB),
        CCARCHIVE_CHECKPOINTS=str(checkpoints),
        CCARCHIVE_ARCHIVE=str(archive),
        CCARCHIVE_STAGING=str(staging),
        CCARCHIVE_ROUTES=json.dumps(ROUTES),
    )
    procs = Processes(root / "logs")
    try:
        worker = procs.start("w-default", worker_argv("w-default", ["celery"]), env)
        app = make_test_app(redis_server.url(DB))
        wait_for_workers(app, ["w-default"], [worker])
        app.close()
        yield Setup(redis_server, checkpoints, archive, env)
    finally:
        procs.stop_all()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def _archive(s: Setup, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [CCARCHIVE, "archive", "--cutoff", "2000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    return done, time.monotonic() - started


@pytest.mark.timeout(120)
def test_client_refuses_a_routed_queue_without_worker(default_only: Setup) -> None:
    before = _tree(default_only.checkpoints)
    done, seconds = _archive(default_only, default_only.env)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("ccarchive: error: no worker consumes the queue(s) storage-a:")
    assert "celery" not in lines[0].split(":")[2]  # the healthy queue is not named
    assert seconds < 30  # a hang check
    assert _tree(default_only.checkpoints) == before
    assert list(default_only.archive.iterdir()) == []


@pytest.mark.timeout(120)
def test_plan_on_the_workers_refuses_it_too(default_only: Setup) -> None:
    """A client without the routes passes its own check; the workers' plan, which has
    them (as beat's runs do), refuses the run before any task is sent to a queue."""
    before = _tree(default_only.checkpoints)
    env = {k: v for k, v in default_only.env.items() if k != "CCARCHIVE_ROUTES"}
    done, seconds = _archive(default_only, env)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and "submitting" not in ln]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, lines
    assert "the workers refused the run: no worker consumes the queue(s) storage-a" in lines[0]
    assert seconds < 30
    assert _tree(default_only.checkpoints) == before
    assert list(default_only.archive.iterdir()) == []
    # No discovery was queued for the orphan queue.
    assert default_only.redis.client(DB).llen("storage-a") == 0

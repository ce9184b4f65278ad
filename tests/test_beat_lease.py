"""Two beats started by mistake: exactly one schedules, the other refuses loudly at every
tick and takes over once the first is gone (issue 14). Real `celery beat` processes
against a loopback redis-server, read through their logs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.distributed_harness import RedisInstance
from tests.fixtures_redis import CELERY, Proc, Processes, wait_until
from tests.helpers import clean_env
from workers.distributed import names

pytestmark = [pytest.mark.distributed]

DB = 12
SENT = "Sending due task ccarchive-run"
REFUSED = "another beat"


def _beat(processes: Processes, name: str, env: dict[str, str], tmp_path: Path) -> Proc:
    argv = [CELERY, "-A", "workers", "beat", "-l", "INFO", "--max-interval", "1"]
    return processes.start(name, [*argv, "-s", str(tmp_path / f"{name}-schedule")], env)


@pytest.mark.timeout(120)
def test_only_one_of_two_beats_schedules_and_the_other_takes_over(
    redis_server: RedisInstance, processes: Processes, tmp_path: Path
) -> None:
    redis_server.client(DB).flushdb()
    env = clean_env(
        CCARCHIVE_BROKER_URL=redis_server.url(DB), CCARCHIVE_RETENTION="1h", CCARCHIVE_INTERVAL="1s"
    )
    first = _beat(processes, "beat-1", env, tmp_path)
    wait_until(lambda: SENT in first.output(), 30, "the first beat to send a run")
    second = _beat(processes, "beat-2", env, tmp_path)
    wait_until(lambda: second.output().count(REFUSED) >= 3, 30, "three refusals of the second")
    time.sleep(2)

    one, two = first.output(), second.output()
    assert one.count(SENT) >= 3, one
    assert SENT not in two, two  # the second beat never fired
    refusals = [ln for ln in two.splitlines() if REFUSED in ln]
    assert all(" ERROR " in ln and names.BEAT_LEASE_KEY in ln for ln in refusals), refusals
    assert REFUSED not in one

    # The first beat stops cleanly (gives the lease back): the second takes over.
    processes.stop(first)
    wait_until(lambda: SENT in second.output(), 30, "the second beat to take over")
    assert f"holds {names.BEAT_LEASE_KEY}; scheduling" in second.output()
    assert redis_server.client(DB).get(names.BEAT_LEASE_KEY).decode().split(":")[1] == str(
        second.pid
    )

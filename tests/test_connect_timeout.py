"""Connecting to Redis is bounded: a closed port or a TLS URL to a plaintext server ends
with one line and exit 2 within the connect timeout, never a silent wait (issue 14).

Real sockets on loopback only; the wall-time bounds are hang checks, not speed checks.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed_harness import RedisInstance
from tests.fixtures_redis import CCARCHIVE, CELERY
from tests.helpers import archive_argv, clean_env, free_port

pytestmark = [pytest.mark.distributed]

#: Generous: interpreter start-up plus the 2 s connect timeout, on a loaded machine.
HANG_BOUND = 30.0


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, list[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    return done.returncode, lines, time.monotonic() - started


def _archive(url: str, tmp_path: Path) -> tuple[int, list[str], float]:
    (tmp_path / "cp").mkdir(exist_ok=True)
    argv = [CCARCHIVE, *archive_argv("cp", "ar", 1000), "--broker", url]
    env = clean_env(CCARCHIVE_CONNECT_TIMEOUT="2s")
    return _run(argv, env, tmp_path)


def test_closed_port_is_one_line_within_the_timeout(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, lines, seconds = _archive(url, tmp_path)
    assert code == 2
    assert lines == [
        f"ccarchive: error: cannot reach the broker at {url} within 2 s: connection refused"
    ]
    assert seconds < HANG_BOUND
    assert not (tmp_path / "ar").exists()  # nothing done


def test_tls_url_to_plaintext_redis_is_one_line_within_the_timeout(
    redis_server: RedisInstance, tmp_path: Path
) -> None:
    url = f"rediss://127.0.0.1:{redis_server.port}/0"
    code, lines, seconds = _archive(url, tmp_path)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ccarchive: error: cannot reach the broker at {url} within 2 s:")
    assert "rediss://" in lines[0] and "plaintext" in lines[0]
    assert seconds < HANG_BOUND


def test_worker_and_beat_stop_on_a_tls_url_to_plaintext_redis(
    redis_server: RedisInstance, tmp_path: Path
) -> None:
    url = f"rediss://127.0.0.1:{redis_server.port}/0"
    env = clean_env(CCARCHIVE_BROKER_URL=url, CCARCHIVE_CONNECT_TIMEOUT="2s")
    for argv in (
        [CELERY, "-A", "workers", "worker", "-P", "solo", "--without-mingle", "-l", "INFO"],
        [CELERY, "-A", "workers", "beat", "-s", str(tmp_path / "schedule"), "-l", "INFO"],
    ):
        code, lines, seconds = _run(argv, env, tmp_path)
        errors = [ln for ln in lines if ln.startswith("ccarchive: error:")]
        assert code == 2, lines
        assert len(errors) == 1 and f"cannot reach the broker at {url} within 2 s" in errors[0]
        assert seconds < HANG_BOUND


def test_connect_timeout_setting_is_a_duration() -> None:
    from workers.config import ConfigError, load_settings

    assert load_settings({"connect_timeout": "1500ms"}).connect_seconds == 1.5
    try:
        load_settings({"connect_timeout": "0s"})
    except ConfigError as exc:
        assert "connect_timeout" in str(exc)
    else:
        raise AssertionError("a zero connect timeout was accepted")

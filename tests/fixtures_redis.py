"""Process primitives for the distributed tests: subprocesses, Celery worker command lines.

Everything listens on 127.0.0.1 only, and every process a fixture starts is stopped by
that fixture, by its pid (SIGTERM, then SIGKILL of its process group after a timeout).
Registered in tests/conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions as redis_errors
from kombu.exceptions import OperationalError

VENV_BIN = Path(sys.executable).parent
CELERY = str(VENV_BIN / "celery")
CCARCHIVE = str(VENV_BIN / "ccarchive")


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    """A started subprocess with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """Its process id (also its process group id: it runs in its own session)."""
        return self.popen.pid

    def output(self) -> str:
        """Everything it wrote so far (stdout and stderr)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        """True while it runs."""
        return self.popen.poll() is None


@dataclass
class Processes:
    """Subprocesses started by one fixture; `stop_all` ends each by pid."""

    logdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path | None = None,
    ) -> Proc:
        """Start `argv` in its own session, output to `<logdir>/<name>.log`."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = self.logdir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd or self.logdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: pool children die with it
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        """SIGTERM the process (warm shutdown); SIGKILL its process group after `timeout`."""
        if proc.popen.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # again, if stop_all sent one: harmless
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                # Not yet reaped, so the group id is still ours: kill it with its children.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every process still in the list: SIGTERM to all first, so they shut down
        in parallel, then each is waited for (and killed) as in `stop`."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout)


def make_test_app(broker_url: str) -> Any:
    """A Celery client app on the test Redis (for ping and inspection; never eager)."""
    from workers.config import Settings
    from workers.distributed.app import make_app

    return make_app(Settings(broker_url=broker_url))


def drop_dac_prefix() -> list[str] | None:
    """argv prefix that makes a process unable to bypass file permissions, or None.

    Tests run as root here, and root reads a chmod 000 directory anyway. Dropping
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set before exec makes
    permission bits apply to that process for real (it stays uid 0, so its own 0700
    directories still work). As another user, chmod works as is: no prefix needed.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def worker_argv(
    name: str, queues: Sequence[str], concurrency: int = 1, pool: str = "prefork"
) -> list[str]:
    """`celery -A workers worker` started for speed: no mingle/gossip, explicit queues."""
    return [
        CELERY,
        "-A",
        "workers",
        "worker",
        "-n",
        f"{name}@%h",
        "-Q",
        ",".join(queues),
        "-P",
        pool,
        "-c",
        str(concurrency),
        "--without-mingle",
        "--without-gossip",
        "-l",
        "INFO",
    ]


def wait_for_workers(
    app: Any, names: Sequence[str], procs: Sequence[Proc], timeout: float = 30
) -> None:
    """Wait until each named worker answers a ping (fail early if a process died)."""
    wanted = set(names)

    def answered() -> bool:
        for p in procs:
            if not p.alive():
                pytest.fail(f"{p.name} exited:\n{p.output()[-4000:]}")
        try:
            replies = app.control.ping(timeout=0.5)
        except (OSError, redis_errors.RedisError, OperationalError):
            return False  # a connection the server dropped: ask again on a fresh one
        got = {n.split("@", 1)[0] for r in replies for n in r}
        return wanted <= got

    wait_until(answered, timeout, f"workers {sorted(wanted)} to answer ping", interval=0.2)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Subprocesses of one test, all stopped by pid when it ends."""
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()

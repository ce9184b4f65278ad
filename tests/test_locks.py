"""The embedded runner's cluster lock on file systems that cannot flock a directory.

NFS (flock becomes a byte-range lock that needs a descriptor open for writing: EBADF on a
directory), Lustre or GPFS without lock support (ENOSYS, ENOLCK, EOPNOTSUPP) cannot be
mounted here, so the flock of a *directory* is made to fail with their errors; every
other flock, and everything else, is real.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import archive_rows, level, metric, write_json
from workers import locks, runner
from workers.locks import DirectoryLock, LockBusy

REAL_FLOCK = fcntl.flock


def no_directory_locks(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Make flock on a directory fail with `code`, as on a file system without locks."""

    def flock(fd: int, operation: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        REAL_FLOCK(fd, operation)

    monkeypatch.setattr(locks.fcntl, "flock", flock)


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_directory_that_cannot_be_locked_is_locked_through_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    no_directory_locks(monkeypatch, code)
    cluster, lock_dir = tmp_path / "cp" / "fritz", tmp_path / "locks"
    cluster.mkdir(parents=True)

    with caplog.at_level(logging.WARNING, logger="workers.locks"):
        first = DirectoryLock(cluster, lock_dir).acquire()
    assert "only runs on this machine see" in caplog.text and str(cluster) in caplog.text
    [lock_file] = lock_dir.iterdir()
    with pytest.raises(LockBusy, match="another run is archiving"):
        DirectoryLock(cluster, lock_dir).acquire()
    # Another directory has its own lock file.
    other = tmp_path / "cp" / "alex"
    other.mkdir()
    DirectoryLock(other, lock_dir).acquire().release()
    first.release()
    DirectoryLock(cluster, lock_dir).acquire().release()  # free again
    assert lock_file.exists() and list(cluster.iterdir()) == []  # nothing written in the tree


def test_other_flock_errors_are_not_taken_for_missing_support(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_directory_locks(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        DirectoryLock(tmp_path, tmp_path / "locks").acquire()
    assert not (tmp_path / "locks").exists()


def test_the_runner_archives_on_such_a_file_system_and_still_excludes_a_second_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fallback every cluster was "skipped: [Errno 9] Bad file descriptor"."""
    no_directory_locks(monkeypatch, errno.EBADF)
    monkeypatch.setattr(locks, "local_lock_dir", lambda: tmp_path / "locks")
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    write_json(cp / "fritz" / "h1" / "100.json", level({"m": metric([1.0, 2.0])}))
    write_json(cp / "alex" / "a1" / "100.json", level({"m": metric([3.0])}))

    def run() -> dict[str, Any]:
        reports = runner.run(runner.RunOptions(str(cp), 200, archive=str(archive), workers=1))
        return {r.cluster: r for r in reports}

    with DirectoryLock(cp / "fritz"):  # another run on this machine holds fritz
        busy = run()
    assert busy["fritz"].errors == [f"skipped: another run is archiving {cp / 'fritz'}"]
    assert busy["alex"].ok and len(archive_rows(archive / "alex" / "200.parquet")) == 1
    assert (cp / "fritz" / "h1" / "100.json").exists()

    free = run()
    assert free["fritz"].ok and len(archive_rows(archive / "fritz" / "200.parquet")) == 2


def test_run_holds_keep_a_directory_shared_until_the_run_is_over(tmp_path: Path) -> None:
    """What a worker process does for a distributed run: hold the cluster directory shared
    (two runs' workers may share it) until the run's own check says it ended."""
    running = {"r1"}
    holds = locks.RunHolds(lambda _cluster, run_id: run_id in running, period=0.05)
    other = locks.RunHolds(lambda _cluster, _run_id: True, period=0.05)
    cluster = tmp_path / "fritz"
    cluster.mkdir()

    holds.hold(cluster, "fritz", "r1")
    other.hold(cluster, "fritz", "r1")  # another worker process of the same run: shared
    with pytest.raises(LockBusy):
        DirectoryLock(cluster, tmp_path / "locks").acquire()

    running.clear()  # the run ended; `other` still holds
    wait_for(lambda: holds.held() == [], "the hold to be let go")
    with pytest.raises(LockBusy):
        DirectoryLock(cluster, tmp_path / "locks").acquire()


def test_a_run_hold_is_refused_while_an_embedded_run_has_the_directory(tmp_path: Path) -> None:
    holds = locks.RunHolds(lambda _cluster, _run_id: True)
    with (
        DirectoryLock(tmp_path, tmp_path / "locks"),
        pytest.raises(LockBusy, match=f"another run is archiving {tmp_path}"),
    ):
        holds.hold(tmp_path, "c", "r1")
    assert holds.held() == []
    holds.hold(tmp_path, "c", "r1")
    assert holds.held() == [os.path.realpath(tmp_path)]


def wait_for(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_forked_child_starts_without_its_parents_holds(tmp_path: Path) -> None:
    """Celery's prefork pool forks: a child must neither inherit holds it cannot release
    (no watcher thread there) nor keep the parent's locks alive."""
    holds = locks.RunHolds(lambda _cluster, _run_id: True)
    holds.hold(tmp_path, "c", "r1")
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code
        os._exit(0 if holds.held() == [] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert holds.held() == [os.path.realpath(tmp_path)]

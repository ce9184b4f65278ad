"""The distributed pipeline with real components: redis-server, Celery workers, beat, Flower.

One module-wide set of workers on three queues, each with its own storage-node role:

- `w-default`  (queue `celery`, 2 processes): planning, finalize, unrouted hosts;
- `w-storage`  (queue `storage-a`): every host of cluster `alex`;
- `w-broken`   (queue `storage-broken`): hosts named `broken*`. Its staging setting points
  below a regular file, so every load it runs fails for real (NotADirectoryError) — a
  storage node that cannot reach the shared staging.

All workers run without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (see `drop_dac_prefix`), so a
host directory with mode 000 is really unreadable to them although the suite runs as root.
No eager mode anywhere: every task goes through Redis to a worker process. The
installation is a `tests.distributed_harness.Deployment` (its own redis-server).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from tests import distributed_harness as harness
from tests import helpers
from tests.distributed_harness import Deployment, RedisInstance
from tests.fixtures_redis import (
    CCARCHIVE,
    drop_dac_prefix,
    wait_until,
)
from tests.helpers import Row, archive_argv, archive_rows, clean_env, snapshot
from workers.cli import main as cli_main
from workers.distributed import names, remote
from workers.generate import Level, Metric, write_checkpoint

ROUTES = {"alex": "storage-a", "*/broken*": "storage-broken"}
NOW = int(time.time())
OLD = NOW - 10 * 86400  # well before any cutoff of these tests
NEW = NOW + 86400  # after any cutoff: never selected

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


# --- the module's deployment -------------------------------------------------------------


@pytest.fixture(scope="module")
def celery_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Three real `celery -A workers worker` processes on three queues; stopped at the end."""
    prefix = drop_dac_prefix()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot make a directory unreadable")
    root = tmp_path_factory.mktemp("celery")
    (root / "not-a-dir").write_text("a regular file where a directory should be\n")
    env = {
        "CCARCHIVE_ROUTES": json.dumps(ROUTES),
        "CCARCHIVE_RETRY_DELAY": "0.1",
        # As shipped, unlike the fault tests' short ones: no redelivery or lock expiry here.
        "CCARCHIVE_VISIBILITY_TIMEOUT": "2h",
        "CCARCHIVE_LOCK_TIMEOUT": "24h",
    }
    d = Deployment(root, env=env)
    try:
        d.archive_dir.mkdir()
        d.staging_dir.mkdir()
        d.start_worker("w-default", concurrency=2, queues=["celery"], prefix=prefix)
        d.start_worker("w-storage", queues=["storage-a"], prefix=prefix)
        broken = {"CCARCHIVE_STAGING": str(root / "not-a-dir" / "staging")}
        d.start_worker("w-broken", queues=["storage-broken"], prefix=prefix, env=broken)
        d.wait_workers(["w-default", "w-storage", "w-broken"])
        yield d
    finally:
        d.close()
        for p in d.checkpoints.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)  # let pytest clean up the unreadable host


# --- input --------------------------------------------------------------------------------


def write_host(checkpoints: Path, cluster: str, host: str, seed: int, files: int = 2) -> list[Path]:
    """Selected checkpoints (JSON and binary) plus files a run must never touch."""
    formats = ("json", "bin") * files
    paths = helpers.write_host(
        checkpoints, cluster, host, seed, formats=formats[:files], start=OLD, values=30, nan=0.15
    )
    helpers.write_untouchable(checkpoints / cluster / host, NEW, OLD)
    return paths


def expected_rows(files: dict[str, list[Path]], cluster: str) -> list[Row]:
    """The SPEC rows of these files (host -> paths), in archive order."""
    assert all(p.parent.parent.name == cluster for ps in files.values() for p in ps)
    return helpers.expected_rows(p for paths in files.values() for p in paths)


def only_parquet(archive: Path, cluster: str) -> Path:
    """The one published archive of a cluster."""
    files = [p for p in (archive / cluster).iterdir() if not p.name.startswith(".")]
    assert len(files) == 1, files
    return files[0]


# --- inotify: a sound order of publication and deletion -----------------------------------

_IN_MOVED_TO, _IN_CREATE, _IN_DELETE, _IN_Q_OVERFLOW = 0x80, 0x100, 0x200, 0x4000


class Inotify:
    """Linux inotify through ctypes. One instance queues the events of all its watches in
    the order they happened, which is what lets the test compare 'archive appeared under
    its final name' with 'checkpoint deleted' across directories without timestamps."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, Path] = {}

    def watch(self, path: Path) -> None:
        """Report names created, moved in or deleted in `path`."""
        wd = self.libc.inotify_add_watch(
            self.fd, os.fsencode(path), _IN_CREATE | _IN_MOVED_TO | _IN_DELETE
        )
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.paths[wd] = path

    def events(self) -> list[tuple[str, Path]]:
        """All queued events as ("create"|"delete", path), oldest first."""
        out: list[tuple[str, Path]] = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, pos)
                name = buf[pos + 16 : pos + 16 + length].rstrip(b"\0").decode()
                pos += 16 + length
                assert not mask & _IN_Q_OVERFLOW, "inotify queue overflowed"
                kind = "delete" if mask & _IN_DELETE else "create"
                out.append((kind, self.paths[wd] / name))

    def close(self) -> None:
        """Release the inotify instance."""
        os.close(self.fd)


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_beat_triggers_a_whole_run_end_to_end(celery_cluster: Deployment) -> None:
    c = celery_cluster
    cp, ar = c.checkpoints, c.archive_dir
    archived: dict[str, dict[str, list[Path]]] = {
        "alex": {h: write_host(cp, "alex", h, i) for i, h in enumerate(["a0001", "a0002"])},
        "fritz": {h: write_host(cp, "fritz", h, 10 + i) for i, h in enumerate(["f0001", "f0004"])},
    }
    # Kept and reported, never touched: bad names and content next to good files, an
    # unreadable host, a host whose storage node cannot stage.
    (cp / "fritz" / "f0004" / "abc.json").write_text("{}")
    (cp / "fritz" / "f0004" / f"{OLD + 5}.json").write_text('{"metrics": {"x": ')
    unreadable = write_host(cp, "fritz", "f0002", 20)
    failing = write_host(cp, "fritz", "broken7", 21)
    # A cluster whose selected file holds no value: no archive, the file is deleted anyway.
    empty = cp / "quiet" / "q0001" / f"{OLD}.json"
    write_checkpoint(
        empty, Level({"cpu_load": Metric(60, OLD, np.full(5, np.nan))}), OLD, OLD + 300
    )
    (cp / "stray-file").write_text("not a cluster")
    expected = {cl: expected_rows(files, cl) for cl, files in archived.items()}
    mine = ("alex", "fritz", "quiet", "stray-file")  # other tests' leftovers may change

    def tree() -> dict[str, bytes | None]:
        return {k: v for k, v in snapshot(cp).items() if k.split("/")[0] in mine}

    before = tree()

    watcher = Inotify()
    for cluster in ("alex", "fritz", "quiet"):
        (ar / cluster).mkdir(exist_ok=True)
        watcher.watch(ar / cluster)
        for host in (cp / cluster).iterdir():
            watcher.watch(host)
    (cp / "fritz" / "f0002").chmod(0o000)  # after its watch: non-root could not add it

    # Every 5 s: soon enough for a test, and rarely a tick whose plan expires (after one
    # interval) on a loaded machine before a busy worker takes it.
    beat = c.start_beat("beat", interval="5s")
    wait_until(lambda: "Sending due task ccarchive-run" in beat.output(), 30, "beat's first run")

    def first_run() -> dict[str, dict[str, Any]] | None:
        # Beat goes on every 5 s: a run that started while the first one held the cluster
        # locks reports "skipped"; later ones find nothing left to do. Take the first run.
        by_run: dict[str, dict[str, dict[str, Any]]] = {}
        for r in c.reports():  # oldest first
            by_run.setdefault(r["run_id"], {})[r["cluster"]] = r
        for reports in by_run.values():
            skipped = any(e.startswith("skipped") for r in reports.values() for e in r["errors"])
            if {"alex", "fritz", "quiet"} <= set(reports) and not skipped:
                return reports
        return None

    reports = wait_until(first_run, 60, "the reports of the beat run", interval=0.2)
    # Only now: stopping beat while it publishes would lose the message it is sending.
    c.procs.stop(beat)
    wait_until(lambda: not c.locks(), 30, "later runs to end")
    events = watcher.events()
    watcher.close()
    (cp / "fritz" / "f0002").chmod(0o755)

    # Rows: exactly the SPEC rows of the archived files, in order, one file per cluster.
    cutoff = reports["alex"]["cutoff"]
    assert NOW - 3600 - 60 <= cutoff <= int(time.time()) - 3600
    for cluster in ("alex", "fritz"):
        path = only_parquet(ar, cluster)
        assert path.name == f"{cutoff}.parquet"
        assert archive_rows(path) == expected[cluster]
    assert list((ar / "quiet").iterdir()) == []

    # Files: every archived checkpoint (and the value-less one) is gone, nothing else changed.
    gone = {
        str(p.relative_to(cp)) for files in archived.values() for ps in files.values() for p in ps
    }
    gone.add(str(empty.relative_to(cp)))
    assert tree() == {k: v for k, v in before.items() if k not in gone}
    assert all(p.exists() for p in unreadable + failing)

    # Reports: the two failing hosts and the two bad files, with file and reason.
    assert reports["alex"]["bad"] == [] and reports["alex"]["errors"] == []
    assert reports["alex"]["files_archived"] == reports["alex"]["files_deleted"] == 4
    fritz = reports["fritz"]
    assert (fritz["hosts"], fritz["files_archived"], fritz["files_deleted"]) == (4, 4, 4)
    assert fritz["rows"] == len(expected["fritz"]) and fritz["errors"] == []
    # A host whose load failed is named `cluster/host` (pipeline.host_label); files by path.
    bad = {
        (
            Path(b["path"]).relative_to(cp) if b["path"].startswith("/") else Path(b["path"])
        ).as_posix(): b["reason"]
        for b in fritz["bad"]
    }
    assert set(bad) == {
        "fritz/broken7",
        "fritz/f0002",
        "fritz/f0004/abc.json",
        f"fritz/f0004/{OLD + 5}.json",
    }
    assert bad["fritz/f0002"] == "cannot list: Permission denied"
    assert bad["fritz/broken7"].startswith("load failed after 3 attempts: NotADirectoryError")
    assert reports["quiet"]["archive"] is None and reports["quiet"]["files_deleted"] == 1

    # Order: no checkpoint of a cluster was deleted before its archive had its final name.
    published: dict[str, int] = {}
    for i, (kind, path) in enumerate(events):
        if kind == "create" and path.parent.parent == ar and path.name == f"{cutoff}.parquet":
            published[path.parent.name] = i
    deletions = [
        (i, p) for i, (kind, p) in enumerate(events) if kind == "delete" and cp in p.parents
    ]
    assert {str(p.relative_to(cp)) for _, p in deletions} == gone
    for i, p in deletions:
        cluster = p.relative_to(cp).parts[0]
        if cluster != "quiet":
            assert cluster in published and published[cluster] < i, f"{p} deleted before archive"

    # Nothing left behind: staging of the run removed, every cluster lock released.
    assert list(c.staging_dir.iterdir()) == []
    assert c.locks() == []


@pytest.mark.timeout(90)
def test_cli_broker_run_shows_in_flower(celery_cluster: Deployment) -> None:
    c = celery_cluster
    auth = ("tester", "secret")
    base = c.start_flower(auth)
    assert c.flower is not None
    try:
        _run_shown_in_flower(c, base, auth)
    finally:
        c.procs.stop(c.flower)  # only this test needs it


def _run_shown_in_flower(c: Deployment, base: str, auth: tuple[str, str]) -> None:
    files = {
        h: write_host(c.checkpoints, "woody", h, 40 + i) for i, h in enumerate(["w1", "w2", "w3"])
    }
    files["w4"] = write_host(c.checkpoints, "woody", "w4", 44)  # one more to go through
    expected = expected_rows(files, "woody")
    cutoff = NOW - 3600

    done = c.cli("--cutoff", str(cutoff), "--cluster", "woody")

    assert done.returncode == 0, done.stderr
    assert "submitting to redis://127.0.0.1" in done.stderr
    line = next(ln for ln in done.stdout.splitlines() if "woody" in ln)
    assert f"{len(expected):,}" in line
    assert archive_rows(c.archive_dir / "woody" / f"{cutoff}.parquet") == expected
    assert not any(p.exists() for ps in files.values() for p in ps)

    wanted = {
        names.LOAD_HOST: 4,
        names.FINALIZE_CLUSTER: 1,
        names.DELETE_FILES: 4,
    }

    def listed() -> dict[str, int] | None:
        tasks = requests.get(f"{base}/api/tasks", auth=auth, timeout=5).json()
        count: dict[str, int] = {}
        for t in tasks.values():
            # Flower shows argument reprs: the cluster is an arg or (finalize) a kwarg.
            called = f"{t.get('args')} {t.get('kwargs')}"
            if t.get("state") == "SUCCESS" and "'woody'" in called:
                count[t["name"]] = count.get(t["name"], 0) + 1
        got = {n: count.get(n, 0) for n in wanted}
        return got if got == wanted else None

    wait_until(listed, 20, "Flower to list the run's tasks as SUCCESS", interval=0.3)


@pytest.mark.timeout(60)
def test_cli_failing_host_is_reported_and_kept_with_exit_1(celery_cluster: Deployment) -> None:
    c = celery_cluster
    good = write_host(c.checkpoints, "jupiter", "j0001", 50)
    bad = write_host(c.checkpoints, "jupiter", "broken1", 51)
    expected = expected_rows({"j0001": good}, "jupiter")

    done = c.cli("--cutoff", str(NOW - 3600), "--cluster", "jupiter")

    assert done.returncode == 1, done.stderr
    assert "load failed after 3 attempts: NotADirectoryError" in done.stderr
    assert "kept: jupiter/broken1:" in done.stderr  # no root: roots are each worker's own
    line = next(ln for ln in done.stdout.splitlines() if "jupiter" in ln)
    # cluster, hosts, files archived, files deleted, kept (bad)
    assert [cell.strip() for cell in line.split("│")][:5] == ["jupiter", "2", "2", "2", "1"]
    assert archive_rows(only_parquet(c.archive_dir, "jupiter")) == expected
    assert not any(p.exists() for p in good) and all(p.exists() for p in bad)


@pytest.mark.timeout(60)
def test_cli_delete_mode_deletes_only_expired_files(celery_cluster: Deployment) -> None:
    c = celery_cluster
    files = write_host(c.checkpoints, "meggie", "m0001", 60) + write_host(
        c.checkpoints, "meggie", "m0002", 61
    )
    before = snapshot(c.checkpoints / "meggie")

    done = c.cli("--cutoff", str(NOW - 3600), "--mode", "delete", "--cluster", "meggie")

    assert done.returncode == 0, done.stderr
    gone = {str(p.relative_to(c.checkpoints / "meggie")) for p in files}
    assert snapshot(c.checkpoints / "meggie") == {k: v for k, v in before.items() if k not in gone}
    assert not (c.archive_dir / "meggie").exists()
    report = next(r for r in c.reports() if r["cluster"] == "meggie")
    assert (report["files_deleted"], report["bad"], report["errors"]) == (4, [], [])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "point",
    ["load:read", "load:staged", "finalize:writing", "finalize:committed", "delete:partial"],
)
def test_a_worker_killed_mid_task_still_archives_every_value_once(
    celery_cluster: Deployment, point: str
) -> None:
    c = celery_cluster
    cluster = "crash-" + point.replace(":", "-")
    files = {h: write_host(c.checkpoints, cluster, h, 70 + i) for i, h in enumerate(["c1", "c2"])}
    expected = expected_rows(files, cluster)
    every_file = helpers.rows_per_file(c.checkpoints)  # the oracle's rows per file
    before = snapshot(c.checkpoints)
    c.fault_file.write_text(point)  # the first worker process reaching `point` is SIGKILLed

    done = c.cli("--cutoff", str(NOW - 3600), "--cluster", cluster)

    assert not c.fault_file.exists(), "the crash point was never reached"
    assert done.returncode == 0, done.stderr
    assert archive_rows(only_parquet(c.archive_dir, cluster)) == expected
    assert not any(p.exists() for ps in files.values() for p in ps)
    # The whole invariant (SPEC §6), then once more after the next run: every value exactly
    # once, every other file untouched, every visible archive complete.
    damage = harness.measure(
        c.checkpoints, c.archive, every_file, before, NOW - 3600, cluster=cluster
    )
    assert damage.ok and damage.files_left == 0, damage
    nxt = c.cli("--cutoff", str(NOW - 3000), "--cluster", cluster)
    assert nxt.returncode == 0, nxt.stderr
    damage = harness.measure(
        c.checkpoints, c.archive, every_file, before, NOW - 3000, cluster=cluster
    )
    assert damage.ok and damage.files_left == 0, damage


@pytest.mark.timeout(60)
def test_cli_refuses_roots_the_workers_do_not_use_with_exit_2(
    celery_cluster: Deployment, tmp_path: Path
) -> None:
    done = celery_cluster.cli("--cutoff", "1", "--checkpoints", str(tmp_path))
    assert done.returncode == 2
    assert f"the workers archive {celery_cluster.checkpoints}, not {tmp_path}" in done.stderr


@pytest.mark.timeout(60)
def test_cli_without_workers_exits_2(redis_server: RedisInstance) -> None:
    env = clean_env(CCARCHIVE_BROKER_URL=redis_server.url(9))  # nobody listens on db 9
    done = subprocess.run(
        [CCARCHIVE, "archive", "--cutoff", "1"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "no Celery worker answers at redis://127.0.0.1" in done.stderr


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (remote.RunLost(remote.LOST_RESTART), 1),  # sent, then lost: part may be done
        (remote.RemoteError("no Celery worker answers at redis://127.0.0.1:1/0"), 2),
    ],
)
def test_a_run_lost_after_it_was_sent_exits_1_one_never_started_exits_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    error: Exception,
    code: int,
) -> None:
    """Narrow: the client's exit code for each kind of failure (the Redis-restart tests
    reach the first one only when the restart falls into the client's wait for launch)."""

    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(remote, "submit", fail)
    monkeypatch.setenv("CCARCHIVE_BROKER_URL", "redis://127.0.0.1:1/0")
    try:
        got = cli_main(archive_argv(tmp_path, cutoff=1))
    except SystemExit as stop:  # how usage errors leave (exit 2, one line)
        got = stop.code
    assert got == code
    assert str(error) in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_host_that_kills_its_worker_every_time_is_given_up(celery_cluster: Deployment) -> None:
    c = celery_cluster
    files = write_host(c.checkpoints, "poison", "p1", 80)
    stop = threading.Event()

    def keep_crashing() -> None:  # re-arm the crash point each time a worker consumed it
        while not stop.is_set():
            if not c.fault_file.exists():
                c.fault_file.write_text("load:read")
            time.sleep(0.02)

    crasher = threading.Thread(target=keep_crashing)
    crasher.start()
    try:
        done = c.cli("--cutoff", str(NOW - 3600), "--cluster", "poison")
    finally:
        stop.set()
        crasher.join()
        c.fault_file.unlink(missing_ok=True)

    assert done.returncode == 1, done.stderr
    assert "gave up after 3 attempts (worker lost)" in done.stderr
    assert all(p.exists() for p in files)
    assert (
        not (c.archive_dir / "poison").exists() or list((c.archive_dir / "poison").iterdir()) == []
    )


@pytest.mark.timeout(60)
def test_an_existing_archive_with_other_content_fails_finalize_and_keeps_files(
    celery_cluster: Deployment,
) -> None:
    c = celery_cluster
    cutoff = NOW - 3600
    files = write_host(c.checkpoints, "taken", "t1", 90)
    existing = c.archive_dir / "taken" / f"{cutoff}.parquet"
    existing.parent.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), existing)
    content = existing.read_bytes()

    done = c.cli("--cutoff", str(cutoff), "--cluster", "taken")

    assert done.returncode == 1, done.stderr
    assert "error: taken: archive not written, all files kept: ArchiveConflict" in done.stderr
    assert existing.read_bytes() == content
    assert all(p.exists() for p in files)
    assert c.locks() == []
    assert list(c.staging_dir.iterdir()) == []


@pytest.mark.timeout(90)
def test_cli_broker_unknown_cluster_is_usage_error(celery_cluster: Deployment) -> None:
    """`--cluster` naming a cluster no worker has: exit 2 and one line naming it, not a
    quiet "no clusters found" (a timer with that typo would never archive)."""
    done = celery_cluster.cli("--cutoff", str(NOW - 3600), "--cluster", "no-such-cluster")

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    # "submitting to ..." (a worker answered), then the one error line
    *_, last = done.stderr.splitlines()
    assert last == "ccarchive: error: no cluster 'no-such-cluster' on the workers", last
    assert "no clusters found" not in done.stdout

"""Faults of the distributed pipeline, with real components, then recovery: SPEC §6.

Every test builds its own installation (`Deployment`: a real redis-server, real
`celery -A workers worker` subprocesses, local or S3 storage through moto) and checks the
invariant of `distributed_harness.measure` against the oracle after the fault and after
the next run:

- Redis restarted mid-run, with an append-only file (the run finishes by itself) and
  without persistence (the run is lost; the next run recovers everything);
- S3 unreachable mid-upload through the Celery path (finalize fails and keeps every file,
  or a retry succeeds; the next run archives the rest and the orphaned upload is aborted);
- two runs for the same cluster at once: a manual run during a running one, two `plan`
  tasks at the same moment, two beat processes by mistake;
- hardening: hostile names in task messages, Redis with a password and with TLS, no
  secret in logs, task arguments or Flower.

Deterministic: faults are placed with stall points (`stall <point>` in the fault file,
see workers/faults.py), not with sleeps. The randomized versions are in
tests/stress_distributed.py (`pytest --stress N` runs them here as assertions).
"""

from __future__ import annotations

import json
import random
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.distributed_harness import (
    CUTOFF,
    Deployment,
    big_tree,
    make_tls_files,
    measure,
)
from tests.fixtures_redis import CCARCHIVE, wait_until
from tests.fixtures_s3 import KEY_ID, S3Bucket, S3Proxy
from tests.helpers import archive_argv, clean_env, random_tree, rows_per_file, snapshot
from workers.distributed import names
from workers.generate import Level, Metric, write_checkpoint
from workers.locks import DirectoryLock

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

Factory = Callable[..., Deployment]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Factory]:
    """Make Deployments under tmp_path; every process they started is stopped at the end."""
    made: list[Deployment] = []

    def make(**kwargs: Any) -> Deployment:
        d = Deployment(tmp_path / f"d{len(made)}", **kwargs)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.close()


def tree(d: Deployment, seed: int) -> tuple[dict[str, Any], dict[str, bytes | None]]:
    """A random tree in the deployment's checkpoints: expected rows and the snapshot."""
    random_tree(d.checkpoints, random.Random(seed))
    return rows_per_file(d.checkpoints), snapshot(d.checkpoints)


def assert_recovered(d: Deployment, expected: dict[str, Any], before: dict[str, Any]) -> None:
    """The next run (later cutoff, same workers) succeeds and leaves SPEC §6 intact with
    every selected file archived; a third run finds nothing to do."""
    nxt = d.cli("--cutoff", str(CUTOFF + 60))
    assert nxt.returncode == 0, nxt.stderr
    damage = measure(d.checkpoints, d.archive, expected, before, CUTOFF + 60)
    assert damage.ok and damage.files_left == 0, damage
    third = d.cli("--cutoff", str(CUTOFF + 120))
    assert third.returncode == 0, third.stderr
    assert measure(d.checkpoints, d.archive, expected, before, CUTOFF + 120).ok


# --- Redis restarted mid-run --------------------------------------------------------------


@pytest.mark.parametrize("point", ["load:staged", "finalize:writing", "delete:partial"])
def test_redis_restart_with_append_only_file_the_run_finishes(
    deployment: Factory, point: str
) -> None:
    """appendonly yes + appendfsync always: queued and unacknowledged messages, chord
    state and the lock survive a SIGKILL of Redis. The workers reconnect, finish what they
    were running, the rest is redelivered, and the run completes on its own.

    Except in one window kombu's Redis transport leaves open: a worker takes a message off
    the queue (BRPOP) and records it as unacknowledged in a second command; if Redis dies
    between the two, that message is gone even with fsync always. The run then cannot
    finish: its cluster lock expires (CCARCHIVE_LOCK_TIMEOUT, 15 s here), the client
    reports the cluster lost (exit 1), and the next run recovers everything."""
    d = deployment(persistent=True, env={"CCARCHIVE_LOCK_TIMEOUT": "15s"})
    expected, before = tree(d, 1)
    d.start_workers()
    d.arm(f"stall {point}")
    run = d.cli_async("--cutoff", str(CUTOFF))
    d.wait_stalled()

    d.redis.restart(down_seconds=0.5)  # tasks in flight: one stalled, others queued
    d.release()

    _, err = run.communicate(timeout=90)
    if run.returncode != 0:  # the BRPOP window above: rare, and only a delay
        assert run.returncode == 1 and "lost: the run no longer holds the lock" in err, err
    d.wait_quiet()
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.rows_lost == damage.files_wrongly_deleted == damage.files_changed == 0, damage
    assert damage.incomplete_visible == [], damage
    if run.returncode == 0:
        assert damage.ok and damage.files_left == 0, damage
    assert_recovered(d, expected, before)


@pytest.mark.parametrize("point", ["load:staged", "finalize:writing", "delete:partial"])
def test_redis_restart_without_persistence_next_run_recovers(
    deployment: Factory, point: str
) -> None:
    """No persistence: the restart loses the run's messages, chords and locks. The client
    says so (exit 1); nothing is lost or visible half-written; the next run archives
    everything, deleting what the lost run had committed."""
    d = deployment(persistent=False)
    expected, before = tree(d, 2)
    d.start_workers()
    d.arm(f"stall {point}")
    run = d.cli_async("--cutoff", str(CUTOFF))
    d.wait_stalled()

    d.redis.restart(down_seconds=0.5)
    d.release()

    _, err = run.communicate(timeout=90)
    assert run.returncode == 1, err
    assert "Redis restarted without persistence" in err or "LockLost" in err, err
    d.wait_quiet()
    damage = measure(d.checkpoints, d.archive, expected, before)
    # Before recovery a committed archive's files may still be in place ("duplicated"
    # until recovery deletes them); nothing may be lost or visible incomplete.
    assert damage.rows_lost == damage.files_wrongly_deleted == damage.files_changed == 0, damage
    assert damage.incomplete_visible == [], damage
    assert_recovered(d, expected, before)


def test_a_broken_chord_releases_the_cluster_lock(deployment: Factory) -> None:
    """A load revoked mid-run (Flower's "terminate", or a result Redis lost while it
    restarted) breaks its cluster's chord: finalize never runs. The chord's errback
    releases the lock at once instead of leaving the cluster to its expiry, and reports."""
    d = deployment()
    expected, before = tree(d, 9)
    d.start_workers()
    d.arm("stall load:staged")
    app = d.app()
    planned = d.result(d.send_plan(CUTOFF))
    launched = d.result(planned["launch"])
    pid = d.wait_stalled()
    stalled = next(
        (e, t)
        for e in launched["clusters"]
        for t in e["loads"].values()
        if (d.meta(t)["result"] or {}).get("pid") == pid  # STARTED: {"pid", "hostname"}
    )
    entry, task_id = stalled
    lock = names.lock_key(entry["cluster"]).encode()
    assert lock in d.locks()

    app.control.revoke(task_id, terminate=True, signal="SIGKILL")

    def broke_off() -> bool:
        return any(
            r["cluster"] == entry["cluster"] and "the run broke off" in " ".join(r["errors"])
            for r in d.reports()
        )

    wait_until(broke_off, 30, "the abandoned cluster's report")
    assert lock not in d.locks()  # released long before CCARCHIVE_LOCK_TIMEOUT (60 s here)
    d.release()
    d.wait_quiet()
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.rows_lost == damage.files_wrongly_deleted == damage.files_changed == 0, damage
    assert_recovered(d, expected, before)


def test_a_finalize_delivered_twice_runs_next_to_itself_and_both_succeed(
    deployment: Factory,
) -> None:
    """A finalize whose acknowledgement was lost (Redis restarted) is delivered again while
    the first copy still runs. The second copy publishes, deletes and removes the staging
    chunks; the first then finds a chunk gone, sees its very commit published and goes on:
    no "archive not written", nothing archived twice."""
    d = deployment()
    for i, host in enumerate(["h0", "h1", "h2"]):
        start = 1_000_000 + 600 * i
        level = Level({"m": Metric(60, start, np.arange(50.0) + i)})
        write_checkpoint(d.checkpoints / "tw" / host / f"{start}.json", level, start, start + 3000)
    expected, before = rows_per_file(d.checkpoints), snapshot(d.checkpoints)
    d.start_workers()
    d.arm("stall finalize:writing")  # the first copy stops after host h0's row group
    launched = d.result(d.result(d.send_plan(CUTOFF))["launch"])
    d.wait_stalled()
    [entry] = launched["clusters"]
    loads = [d.result(entry["loads"][h]) for h in entry["hosts"]]
    kwargs = {
        "cluster": "tw",
        "cutoff": CUTOFF,
        "run_id": launched["run_id"],
        "report": {"cluster": "tw", "cutoff": CUTOFF, "run_id": launched["run_id"], "hosts": 3},
        "queues": {h: "celery" for h in entry["hosts"]},
        "report_id": entry["report_id"],
        "started": time.time(),
    }

    # The second delivery: same task, same id, same arguments, on the other worker.
    d.app().send_task(
        names.FINALIZE_CLUSTER, args=[loads], kwargs=kwargs, task_id=entry["finalize"]
    )
    wait_until(lambda: not any(d.checkpoints.rglob("*.json")), 30, "the twin's deletions")
    # The twin's report is pushed after its staging cleanup and lock release: only then is
    # the first copy sure to find a chunk gone (before, it may finish and publish idempotently).
    wait_until(lambda: bool(d.reports()), 30, "the twin's report")
    d.release()
    d.wait_quiet()

    logs = d.worker_logs()
    assert "this very commit is published (by a second delivery of this task)" in logs
    assert "archive not written" not in logs
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.ok and damage.files_left == 0, damage
    assert all(not r["errors"] for r in d.reports()), d.reports()


# --- S3 failing mid-upload through the Celery path ----------------------------------------


def s3_deployment(
    make: Factory,
    bucket: S3Bucket,
    proxy: S3Proxy,
    grace: str = "1h",
    password: str | None = None,
    secret: str = "testing-secret",
    **env: str,
) -> Deployment:
    """Archive (and staging) on S3 through `proxy`; 5 MiB upload parts, one row group
    per big host, so an upload part is stored before the first crash point."""
    return make(
        password=password,
        archive=f"{bucket.url}/archive",
        staging=f"{bucket.url}/staging",
        env={
            "CCARCHIVE_S3_ENDPOINT_URL": proxy.endpoint_url,
            "CCARCHIVE_S3_ACCESS_KEY_ID": KEY_ID,
            "CCARCHIVE_S3_SECRET_ACCESS_KEY": secret,
            "CCARCHIVE_S3_REGION": "us-east-1",
            "CCARCHIVE_S3_PART_SIZE_MIB": "5",
            "CCARCHIVE_ROW_GROUP_ROWS": "2000000",
            "CCARCHIVE_RECOVERY_GRACE": grace,
            # An outage should fail a request quickly, not after botocore's back-off.
            "AWS_MAX_ATTEMPTS": "1",
            "AWS_RETRY_MODE": "standard",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
            **env,
        },
    )


@pytest.fixture
def s3_proxy(s3_bucket: S3Bucket) -> Iterator[S3Proxy]:
    """A relay to the moto server that a test can take down (an S3 outage)."""
    proxy = S3Proxy(int(s3_bucket.endpoint_url.rsplit(":", 1)[1]))
    try:
        yield proxy
    finally:
        proxy.close()


def stalled_big_run(
    d: Deployment,
) -> tuple[dict[str, Any], dict[str, bytes | None], subprocess.Popen[str]]:
    """Expected rows, snapshot and the CLI of a run on `big_tree`, stalled while writing
    the archive after its first row group (on S3: one 5 MiB upload part stored)."""
    big_tree(d.checkpoints)
    expected, before = rows_per_file(d.checkpoints), snapshot(d.checkpoints)
    d.start_workers()
    d.arm("stall finalize:writing")
    run = d.cli_async("--cutoff", str(CUTOFF))
    d.wait_stalled()
    return expected, before, run


@pytest.mark.s3
@pytest.mark.timeout(180)
def test_s3_outage_mid_upload_fails_finalize_then_next_run_archives(
    deployment: Factory, s3_bucket: S3Bucket, s3_proxy: S3Proxy
) -> None:
    d = s3_deployment(deployment, s3_bucket, s3_proxy, grace="2s")
    expected, before, run = stalled_big_run(d)
    assert s3_bucket.pending_uploads("archive/") == [f"archive/big/{CUTOFF}.parquet"]

    s3_proxy.down()  # for longer than finalize's retries: it gives up
    d.release()
    _, err = run.communicate(timeout=120)

    assert run.returncode == 1, err
    assert "archive not written, all files kept" in err
    assert s3_bucket.keys("archive/") == []  # nothing visible
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.ok and snapshot(d.checkpoints) == before, damage
    # The upload could not even be aborted during the outage: its part is still stored.
    assert s3_bucket.pending_uploads("archive/") == [f"archive/big/{CUTOFF}.parquet"]

    s3_proxy.up()
    time.sleep(2.5)  # the orphaned upload is now older than the grace period
    nxt = d.cli("--cutoff", str(CUTOFF + 60))
    assert nxt.returncode == 0, nxt.stderr
    damage = measure(d.checkpoints, d.archive, expected, before, CUTOFF + 60)
    assert damage.ok and damage.files_left == 0, damage
    assert s3_bucket.keys("archive/") == [f"archive/big/{CUTOFF + 60}.parquet"]
    # Recovery aborted the dead run's upload (a cutoff no run writes again).
    assert s3_bucket.pending_uploads() == []


@pytest.mark.s3
@pytest.mark.timeout(180)
def test_s3_outage_shorter_than_the_retries_the_run_succeeds(
    deployment: Factory, s3_bucket: S3Bucket, s3_proxy: S3Proxy
) -> None:
    d = s3_deployment(deployment, s3_bucket, s3_proxy, CCARCHIVE_RETRY_DELAY="2")
    expected, before, run = stalled_big_run(d)

    s3_proxy.down()
    d.release()
    # The first attempt fails on the next part; bring S3 back before the retry (2 s later).
    time.sleep(1.0)
    s3_proxy.up()
    _, err = run.communicate(timeout=120)

    assert run.returncode == 0, err
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.ok and damage.files_left == 0, damage
    assert s3_bucket.keys("archive/") == [f"archive/big/{CUTOFF}.parquet"]
    assert s3_bucket.pending_uploads() == []  # no upload left behind


# --- two runs for the same cluster at once ------------------------------------------------


def test_a_manual_run_during_a_running_one_is_skipped(deployment: Factory) -> None:
    d = deployment()
    expected, before = tree(d, 3)
    d.start_workers()
    d.arm("stall load:staged")  # hold the first run while it owns the cluster locks
    first = d.cli_async("--cutoff", str(CUTOFF))
    d.wait_stalled()

    second = d.cli("--cutoff", str(CUTOFF + 30))

    assert second.returncode == 1
    assert "skipped: run " in second.stderr and "is still working on this cluster" in second.stderr
    d.release()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.ok and damage.files_left == 0, damage
    assert_recovered(d, expected, before)


def embedded_run(d: Deployment, cutoff: int) -> subprocess.CompletedProcess[str]:
    """`ccarchive archive` without a broker on the deployment's tree: the embedded runner."""
    return subprocess.run(
        [CCARCHIVE, *archive_argv(d.checkpoints, d.archive, cutoff, workers=1)],
        env=clean_env(CCARCHIVE_STAGING=str(d.root / "embedded-staging")),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_manual_embedded_run_during_a_distributed_one_is_skipped(
    deployment: Factory,
) -> None:
    """The embedded runner locks clusters with flock, the distributed one with Redis: the
    workers that loaded a cluster's hosts hold its directory shared until their run ends,
    so an embedded run started meanwhile (here while the archive is being written, all
    loads done) skips the cluster instead of archiving its files a second time."""
    d = deployment()
    expected, before = tree(d, 3)
    d.start_workers()
    d.arm("stall finalize:writing")
    first = d.cli_async("--cutoff", str(CUTOFF))
    d.wait_stalled()

    manual = embedded_run(d, CUTOFF + 30)

    assert manual.returncode == 1, manual.stderr
    assert "skipped: another run is archiving" in manual.stdout + manual.stderr
    d.release()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    d.wait_quiet()
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.ok and damage.files_left == 0, damage
    # Once the run is over the workers let go: an embedded run goes ahead (nothing left).
    wait_until(lambda: embedded_run(d, CUTOFF + 60).returncode == 0, 20, "the holds to go")


def test_a_distributed_run_during_an_embedded_one_keeps_its_hands_off(
    deployment: Factory,
) -> None:
    """The other way round: while an embedded run holds a cluster, the distributed loads
    of its hosts report it and keep the files; a later run archives them."""
    d = deployment()
    expected, before = tree(d, 6)
    d.start_workers()
    clusters = sorted(p.name for p in d.checkpoints.iterdir() if p.is_dir())
    locks = [DirectoryLock(d.checkpoints / c).acquire() for c in clusters]
    try:
        busy = d.cli("--cutoff", str(CUTOFF))
    finally:
        for lock in locks:
            lock.release()

    assert busy.returncode == 1, busy.stderr
    assert "skipped: another run is archiving" in busy.stderr
    assert snapshot(d.checkpoints) == before and not any(Path(d.archive).rglob("*.parquet"))
    assert_recovered(d, expected, before)


@pytest.mark.parametrize("cutoffs", [(CUTOFF, CUTOFF), (CUTOFF, CUTOFF + 30)])
def test_two_plans_at_the_same_moment_archive_each_file_once(
    deployment: Factory, cutoffs: tuple[int, int]
) -> None:
    """Two planning tasks sent together (two beats firing, a retried plan, a manual run):
    whichever launch takes a cluster's lock archives it, the other skips it."""
    d = deployment()
    expected, before = tree(d, 4)
    d.start_workers()
    for cutoff in cutoffs:
        d.send_plan(cutoff)
    d.wait_quiet()
    reports = d.reports()
    assert len({r["run_id"] for r in reports}) == 2
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.ok, damage
    assert_recovered(d, expected, before)


@pytest.mark.timeout(150)
def test_two_beat_processes_by_mistake(deployment: Factory) -> None:
    d = deployment()
    expected, before = tree(d, 5)
    d.start_workers()
    beats = [d.start_beat(f"beat{i}", interval="1s") for i in (1, 2)]

    # Both send a run every second; let them overlap for a while.
    def runs() -> int:
        return len({r["run_id"] for r in d.reports()})

    deadline = time.monotonic() + 30
    while runs() < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    for b in beats:
        d.procs.stop(b)
    d.wait_quiet()

    assert runs() >= 6, d.worker_logs()[-3000:]
    reports = d.reports()
    assert any(e.startswith("skipped: run ") for r in reports for e in r["errors"])
    # beat's cutoff is now - 1h: every file of the tree (ts ~ 1e6) was selected.
    damage = measure(d.checkpoints, d.archive, expected, before, CUTOFF)
    assert damage.ok and damage.files_left == 0, damage


# --- hardening: hostile names in task messages --------------------------------------------


def tree_state(root: Path) -> dict[str, bytes | None]:
    """Everything under root but the processes' own logs, Redis's files and the fault file."""
    return {
        k: v
        for k, v in snapshot(root).items()
        if not {"logs", "redis"} & set(k.split("/")) and not Path(k).name.startswith("fault")
    }


def test_hostile_names_in_task_messages_touch_nothing_outside_the_roots(
    deployment: Factory, tmp_path: Path
) -> None:
    d = deployment()
    random_tree(d.checkpoints, random.Random(6))
    outside = tmp_path / "outside"
    (outside / "h").mkdir(parents=True)
    (outside / "h" / "1000.json").write_text('{"from": 0, "to": 1, "metrics": {}}')
    victim = outside / "1000.json"
    victim.write_text('{"from": 0, "to": 1, "metrics": {}}')
    Path(d.archive).mkdir()
    (Path(d.archive) / "keep.txt").write_text("must survive")
    Path(d.staging).mkdir()
    (Path(d.staging) / "keep.txt").write_text("must survive")
    state = tree_state(tmp_path)
    d.start_workers()
    now = time.time()

    def call(name: str, *args: Any, **kwargs: Any) -> Any:
        return d.result(d.send(name, *args, **kwargs))

    def report(cluster: str, run_id: str) -> dict[str, Any]:
        return {"cluster": cluster, "cutoff": CUTOFF, "run_id": run_id, "hosts": 1}

    loads = [
        ("../outside", "h", CUTOFF, "r1", "invalid cluster"),
        ("..", "outside", CUTOFF, "r1", "invalid cluster"),
        ("c0", "../../outside", CUTOFF, "r1", "invalid host"),
        ("c0", "h0", CUTOFF, "../../../outside", "invalid run id"),
        ("c0", "h0", "../../outside", "r1", "invalid cutoff"),
        ("c\x000", "h0", CUTOFF, "r1", "invalid cluster"),
        ("c0", "h0\nFORGED LOG LINE", CUTOFF, "r1", "invalid host"),
    ]
    for cluster, host, cutoff, run_id, reason in loads:
        result = call(names.LOAD_HOST, cluster, host, cutoff, run_id)
        [bad] = result["manifest"]["bad"]
        assert bad["reason"].startswith(f"refused: {reason}"), result
        assert result["manifest"]["files"] == []

    size = victim.stat().st_size
    for cluster, host, name in [
        ("c0", "h0", "../../../outside/1000.json"),
        ("..", "outside", "1000.json"),
        ("c0", "..", "1000.json"),
    ]:
        files = [{"name": name, "size": size, "rows": 0}]
        result = call(names.DELETE_FILES, cluster, host, files, CUTOFF, "r1", False)
        assert result["deleted"] == [] and result["kept"], result
        assert "invalid" in result["kept"][0]["reason"], result
    for cluster, host in [("..", "outside"), ("c0", ".."), ("../..", "tmp")]:
        result = call(names.DELETE_EXPIRED, cluster, host, 10**12)
        assert result["deleted"] == [] and "invalid" in result["kept"][0]["reason"], result

    forged_calls: list[dict[str, Any]] = [
        {"cluster": "..", "cutoff": CUTOFF, "run_id": "r1"},
        {"cluster": "c0", "cutoff": "../../outside/evil", "run_id": "r1"},
        {"cluster": "c0", "cutoff": CUTOFF, "run_id": "../outside"},
    ]
    for kwargs in forged_calls:
        report_id = str(uuid.uuid4())
        failed = call(
            names.FINALIZE_CLUSTER,
            [],
            report=report(str(kwargs["cluster"]), str(kwargs["run_id"])),
            queues={},
            report_id=report_id,
            started=now,
            **kwargs,
        )
        assert "UnsafeName" in repr(failed), failed
        # The cluster's final step still reports it (refused), and touches nothing.
        final = d.result(report_id)
        assert any("refused: invalid" in e or "invalid" in e for e in final["errors"]), final
    forged = {
        "manifest": {
            "cluster": "c0",
            "host": "../../outside",
            "cutoff": CUTOFF,
            "run_id": "r1",
            "files": [{"name": "1000.json", "size": size, "rows": 1}],
            "rows": 1,
            "chunk": str(victim),
        },
        "recovered": [],
    }
    failed = call(
        names.FINALIZE_CLUSTER,
        [forged],
        cluster="c0",
        cutoff=CUTOFF,
        run_id="r1",
        report=report("c0", "r1"),
        queues={},
        report_id=str(uuid.uuid4()),
        started=now,
    )
    assert "invalid host" in repr(failed), failed

    # finish_cluster removes <staging>/<run_id>/<cluster>: "../archive" would be the archive.
    for cluster, run_id in [("archive", ".."), ("..", "x"), ("c0", "../..")]:
        final = call(names.FINISH_CLUSTER, [], report(cluster, run_id), "archive", now)
        assert any(e.startswith("refused: invalid") for e in final["errors"]), final

    launched = call(
        names.LAUNCH,
        [{"queue": "celery", "clusters": [{"cluster": "../outside", "hosts": ["h"], "bad": []}]}],
        cutoff=CUTOFF,
        mode="archive",
        run_id="r2",
        clusters=None,
        started=now,
    )
    assert launched["clusters"] == [] and "refused: invalid cluster" in launched["errors"][0]
    planned = call(names.PLAN, cutoff=CUTOFF, clusters=["../outside"])
    assert "invalid cluster" in planned["error"]

    d.wait_quiet()
    assert tree_state(tmp_path) == state  # nothing anywhere was created, changed or removed
    assert d.locks() == []
    logs = d.worker_logs()
    assert "refused a task message" in logs
    assert "\nFORGED LOG LINE" not in logs  # names are logged quoted, never raw


# --- hardening: Redis password and TLS; no secret anywhere --------------------------------


def all_redis_values(d: Deployment) -> str:
    """Every key and value in the deployment's Redis, as text."""
    client = d.redis.client()
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1)
        else:
            value = kind
        out.append(f"{key!r} {value!r}")
    return "\n".join(out)


@pytest.mark.s3
@pytest.mark.timeout(180)
def test_password_redis_and_s3_credentials_never_in_logs_messages_or_flower(
    deployment: Factory, s3_bucket: S3Bucket, s3_proxy: S3Proxy
) -> None:
    password = f"redis-pw-{uuid.uuid4().hex}"
    secret = f"s3-secret-{uuid.uuid4().hex}"  # moto accepts any secret key
    d = s3_deployment(
        deployment,
        s3_bucket,
        s3_proxy,
        password=password,
        secret=secret,
        CCARCHIVE_LOG_LEVEL="DEBUG",
    )
    # A file that cannot be read: its error paths are logged too.
    (d.checkpoints / "c0" / "hbad").mkdir(parents=True)
    (d.checkpoints / "c0" / "hbad" / "1000000.json").write_text("{not json")
    expected, before = tree(d, 7)
    d.start_workers()
    base = d.start_flower()
    beat = d.start_beat("beat", interval="1h")  # logs its banner and first tick

    done = d.cli("--cutoff", str(CUTOFF))
    assert done.returncode == 1, done.stderr  # the bad file is reported
    assert "submitting to redis://:**@127.0.0.1" in done.stderr
    d.wait_quiet()
    d.procs.stop(beat)
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.ok and damage.files_left == 0, damage

    auth = ("tester", "flower-pw")
    shown = [
        requests.get(f"{base}/api/tasks", auth=auth, timeout=10).text,
        requests.get(f"{base}/api/workers?refresh=1", auth=auth, timeout=30).text,
    ]
    tasks = json.loads(shown[0])
    assert any(t.get("name") == names.LOAD_HOST for t in tasks.values())
    shown += [
        requests.get(f"{base}/api/task/info/{t}", auth=auth, timeout=10).text for t in list(tasks)
    ]
    for worker in json.loads(shown[1]):
        shown.append(requests.get(f"{base}/worker/{worker}", auth=auth, timeout=10).text)
    everything = {
        "cli": done.stdout + done.stderr,
        "logs": d.worker_logs(),
        "flower": "\n".join(shown),
        "redis": all_redis_values(d),
    }
    assert "Connected to redis://:**@127.0.0.1" in everything["logs"]  # the URL was logged...
    for where, text in everything.items():
        assert password not in text, f"the Redis password appears in {where}"  # ...masked
        assert secret not in text, f"the S3 secret appears in {where}"


@pytest.mark.timeout(120)
def test_rediss_with_a_verified_certificate_and_a_password(
    deployment: Factory, tmp_path: Path
) -> None:
    d = deployment(tls=True, password="tls-pw")
    assert d.redis.url().startswith("rediss://:tls-pw@")
    expected, before = tree(d, 8)
    d.start_workers()

    done = d.cli("--cutoff", str(CUTOFF))

    assert done.returncode == 0, done.stderr
    damage = measure(d.checkpoints, d.archive, expected, before)
    assert damage.ok and damage.files_left == 0, damage
    logs = d.worker_logs()
    assert "Connected to rediss://:**@127.0.0.1" in logs
    assert "insecure SSL" not in logs and "CERT_NONE" not in logs

    # Celery's spelling of the options in the URL works as well (and wins over the env).
    assert d.tls_files is not None
    url = f"{d.redis.url()}?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={d.tls_files.ca}"
    again = subprocess.run(
        [*d.cli_argv(url), "--cutoff", str(CUTOFF + 60)],
        env={**d.env, "CCARCHIVE_REDIS_CA_CERT": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr

    # A server whose certificate does not verify is refused, not used.
    other = make_tls_files(tmp_path / "other-ca")
    refused = subprocess.run(
        [*d.cli_argv(d.redis.url()), "--cutoff", str(CUTOFF + 60)],
        env={**d.env, "CCARCHIVE_REDIS_CA_CERT": str(other.ca)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert "cannot reach the broker at rediss://:**@127.0.0.1" in refused.stderr
    assert "certificate verify failed" in refused.stderr and "Traceback" not in refused.stderr
    assert "tls-pw" not in refused.stderr + refused.stdout


# --- randomized trials (pytest --stress N) ------------------------------------------------


@pytest.mark.timeout(600)
def test_randomized_distributed_trial(
    tmp_path: Path, distributed_trial: tuple[str, int], request: pytest.FixtureRequest
) -> None:
    """One seeded random trial of a distributed fault (tests/stress_distributed.py)."""
    from tests.stress_distributed import run_trial

    fault, seed = distributed_trial
    moto = request.getfixturevalue("moto_server") if fault == "s3-outage" else None
    result = run_trial(fault, seed, tmp_path, moto)
    assert result.ok, f"{result.damage} {result.notes}"

"""Crashes of the embedded runner at every stage, then recovery: every value exactly once.

Each crash is a real SIGKILL of the process doing the work (the runner itself with
--workers 1, a pool process with --workers 2), triggered by a named crash point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import (
    Row,
    archive_argv,
    archive_rows,
    clean_env,
    rows_per_file,
    run_cli,
    snapshot,
    write_tree,
)
from workers.faults import POINTS
from workers.locks import DirectoryLock

pytestmark = [pytest.mark.slow]

CUTOFF = 5_000_000


def make_tree(root: Path, seed: int = 0) -> None:
    """2 clusters x 3 hosts x 2 files (JSON and binary), a few hundred values each."""
    write_tree(root, hosts=3, seed=seed, nan=0.1)


def ccarchive(
    cp: Path, archive: Path, cutoff: int, workers: int, fault: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (so a crash kills only it)."""
    full_env = clean_env(**env)
    if fault is not None:
        full_env["CCARCHIVE_FAULT_FILE"] = str(fault)
    return run_cli(archive_argv(cp, archive, cutoff, workers), full_env)


def assert_exactly_once(
    cp: Path,
    archive: Path,
    expected: dict[str, list[Row]],
    before: dict[str, bytes | None],
    recovered: bool = True,
) -> None:
    """Every file is either in place unchanged, or gone with its rows archived exactly once.

    Right after a crash (`recovered=False`) a committed archive may still have its files in
    place, waiting for recovery to delete them: then only "nothing lost" must hold.
    """
    now = snapshot(cp)
    gone = [name for name in expected if name not in now]
    for name, content in now.items():
        assert content == before[name], f"{name} changed"
    finals = [p for p in archive.rglob("*.parquet") if not p.name.startswith(".")]
    archived = Counter(r for p in finals for r in archive_rows(p))
    wanted = Counter(r for name in gone for r in expected[name])
    lost = wanted - archived
    duplicated = archived - wanted
    assert not lost, f"{sum(lost.values())} rows lost"
    if not recovered:
        return
    assert not duplicated, f"{sum(duplicated.values())} rows duplicated or foreign"


@pytest.mark.parametrize(
    ("point", "workers"),
    # With one worker rows go straight from the reader to the writer: nothing is staged.
    [(p, w) for p in POINTS for w in (1, 2) if (p, w) != ("load:staged", 1)],
)
def test_crash_then_recover(tmp_path: Path, point: str, workers: int) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    make_tree(cp)
    expected = rows_per_file(cp)
    before = snapshot(cp)
    fault = tmp_path / "fault"
    fault.write_text(point)

    crashed = ccarchive(cp, archive, CUTOFF, workers, fault)
    assert not fault.exists(), f"crash point {point} was never reached: {crashed.stderr}"
    assert crashed.returncode != 0
    assert_exactly_once(cp, archive, expected, before, recovered=False)

    # The next scheduled run (a later cutoff) recovers and archives the rest.
    after = ccarchive(cp, archive, CUTOFF + 3600, workers)
    assert after.returncode == 0, after.stderr
    assert_exactly_once(cp, archive, expected, before)
    assert [name for name in expected if (cp / name).exists()] == []
    # A third run finds nothing left to do.
    third = ccarchive(cp, archive, CUTOFF + 7200, workers)
    assert third.returncode == 0, third.stderr
    assert_exactly_once(cp, archive, expected, before)


def test_crash_after_commit_same_cutoff_rerun(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    make_tree(cp)
    expected, before = rows_per_file(cp), snapshot(cp)
    fault = tmp_path / "fault"
    fault.write_text("finalize:committed")
    assert ccarchive(cp, archive, CUTOFF, 1, fault).returncode != 0
    published = sorted(archive.rglob("*.parquet"))
    assert len(published) == 1  # the first cluster committed, then the process died
    snapshot_of_archive = published[0].read_bytes()
    rerun = ccarchive(cp, archive, CUTOFF, 1)
    assert rerun.returncode == 0, rerun.stderr
    assert published[0].read_bytes() == snapshot_of_archive
    assert_exactly_once(cp, archive, expected, before)
    assert not any(cp.rglob("*.json")) and not any(cp.rglob("*.bin"))


def test_orphaned_partial_file_is_swept_after_grace(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    make_tree(cp)
    fault = tmp_path / "fault"
    fault.write_text("finalize:writing")
    assert ccarchive(cp, archive, CUTOFF, 1, fault).returncode != 0
    partials = list(archive.rglob(".*.partial"))
    assert len(partials) == 1
    # Young partial files may belong to a live run: kept.
    assert ccarchive(cp, archive, CUTOFF + 1, 1).returncode == 0
    assert partials[0].exists()
    old = time.time() - 7200
    os.utime(partials[0], (old, old))
    assert ccarchive(cp, archive, CUTOFF + 2, 1, CCARCHIVE_RECOVERY_GRACE="1h").returncode == 0
    assert not partials[0].exists()


def test_changed_file_listed_in_committed_archive_is_kept_not_rearchived(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    make_tree(cp)
    fault = tmp_path / "fault"
    fault.write_text("finalize:committed")
    assert ccarchive(cp, archive, CUTOFF, 1, fault).returncode != 0
    (committed,) = archive.rglob("*.parquet")
    cluster = committed.parent.name
    victim = sorted((cp / cluster / "h0").iterdir())[0]
    victim.write_bytes(victim.read_bytes() + b" ")
    rerun = ccarchive(cp, archive, CUTOFF + 1, 1)
    assert rerun.returncode == 1
    assert "kept, not archived again" in rerun.stderr
    assert victim.exists()
    rows = [r for p in archive.rglob("*.parquet") for r in archive_rows(p) if r[0] == cluster]
    assert rows and len(rows) == len(set(rows))  # nothing archived twice


def test_a_locked_cluster_is_skipped_and_untouched(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    make_tree(cp)
    before = snapshot(cp)
    with DirectoryLock(cp / "alpha"):
        busy = ccarchive(cp, archive, CUTOFF, 1)
    assert busy.returncode == 1
    assert "another run" in busy.stderr
    assert not (archive / "alpha").exists()
    assert all(v == before[k] for k, v in snapshot(cp).items() if k.startswith("alpha"))
    assert (archive / "beta" / f"{CUTOFF}.parquet").exists()
    # The skip is the cluster's last run for `ccarchive status`, like any other outcome.
    status = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status", "--archive", str(archive), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    last = {c["cluster"]: c["last_run"] for c in json.loads(status.stdout)["clusters"]}
    assert last["alpha"]["outcome"] == "error", last
    assert last["alpha"]["errors"][0].startswith("skipped: "), last
    assert last["beta"]["outcome"] == "ok", last


def test_two_runs_at_once_archive_each_file_once(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    make_tree(cp)
    expected, before = rows_per_file(cp), snapshot(cp)
    env = clean_env()
    cmd = [sys.executable, "-m", "workers.cli"]
    procs = [
        subprocess.Popen(
            [*cmd, *archive_argv(cp, archive, CUTOFF + i, 1)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        p.communicate(timeout=120)
    assert_exactly_once(cp, archive, expected, before)
    # Whatever one run skipped, a later run archives.
    assert ccarchive(cp, archive, CUTOFF + 10, 1).returncode == 0
    assert_exactly_once(cp, archive, expected, before)
    assert not any(cp.rglob("*.json"))


def test_randomized_trial(tmp_path: Path, stress_trial: tuple[str, int]) -> None:
    """One seeded random trial per crash point in CI; `pytest --stress N` runs N of them."""
    from tests.stress_faults import run_trial

    point, seed = stress_trial
    result = run_trial(point, seed, tmp_path)
    assert (result.rows_lost, result.rows_duplicated, result.files_wrongly_deleted) == (0, 0, 0)

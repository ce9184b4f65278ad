"""The embedded runner with a pool: each cluster's finalize writes behind its loads.

With `--workers 2` and more, a thread of the runner writes every host into the Parquet file
as soon as it and all hosts before it (hostname order) are loaded. These tests check that
it really overlaps, and that everything the sequential path guarantees still holds when a
host fails in the middle, when writing fails, and when the archive already exists.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.fixtures_redis import CCARCHIVE, drop_dac_prefix
from tests.helpers import (
    archive_argv,
    archive_rows,
    clean_env,
    expected_rows,
    full_key,
    snapshot,
    sort_key,
)
from workers import runner, steps

CUTOFF = 100_000_000


def write_host(root: Path, cluster: str, host: str, values: int, seed: int) -> list[Path]:
    """One JSON and one binary file for `host`, `values` values per series."""
    return helpers.write_host(root, cluster, host, seed, values=values, nan=0.05)


def expected(cluster: str, host: str, paths: list[Path]) -> list[Any]:
    return expected_rows(paths, key=full_key)


@pytest.mark.slow
def test_finalize_writes_the_first_hosts_before_the_last_is_loaded(tmp_path: Path) -> None:
    """The progress callback of the last load to finish holds the runner's main thread
    (which feeds the finalize thread) until the cluster's temporary Parquet file exists.
    A finalize that starts only after the last load would never create it in that time.
    The proof needs a host before the last one in hostname order: h0 is tiny and queued
    first, h3 is large."""
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    sizes = {"h0": 10, "h1": 20, "h2": 20, "h3": 200_000}
    files = {h: write_host(cp, "c", h, n, i) for i, (h, n) in enumerate(sizes.items())}
    want = sorted((r for h, p in files.items() for r in expected("c", h, p)), key=full_key)
    loaded: list[str] = []
    partial_seen = threading.Event()

    def progress(event: str, cluster: str, detail: dict[str, Any]) -> None:
        if event != "loaded":
            return
        loaded.append(detail["host"])
        if len(loaded) == len(sizes) and detail["host"] != "h0":
            for _ in range(1500):  # 30 s
                if any((archive / "c").glob(f".{CUTOFF}.parquet.*.partial")):
                    partial_seen.set()
                    break
                time.sleep(0.02)

    reports = runner.run(
        runner.RunOptions(str(cp), CUTOFF, archive=str(archive), workers=2), progress
    )

    assert loaded[-1] != "h0", loaded  # h0 finishing last would leave nothing to prove
    assert partial_seen.is_set(), f"no archive was being written while {loaded[-1]} loaded"
    [report] = reports
    assert report.ok and report.files_archived == 8 and report.files_deleted == 8
    rows = archive_rows(archive / "c" / f"{CUTOFF}.parquet")
    assert rows == sorted(rows, key=sort_key)
    assert sorted(rows, key=full_key) == want
    assert list(cp.rglob("*.json")) == list(cp.rglob("*.bin")) == []
    assert [p.name for p in (archive / "c").iterdir()] == [f"{CUTOFF}.parquet"]


@pytest.mark.slow
def test_a_host_failing_in_the_middle_is_kept_and_the_rest_archived(tmp_path: Path) -> None:
    """h1's directory is unreadable (mode 000, for a process without the capability to
    bypass it): its load yields nothing but the report while h0 is already written and h2,
    h3 come later."""
    prefix = drop_dac_prefix()
    if prefix is None:
        pytest.fail("setpriv is needed to make a directory unreadable to a root process")
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    files = {h: write_host(cp, "c", h, 50, i) for i, h in enumerate(["h0", "h1", "h2", "h3"])}
    want = sorted(
        (r for h, p in files.items() if h != "h1" for r in expected("c", h, p)), key=full_key
    )
    kept = snapshot(cp / "c" / "h1")
    (cp / "c" / "h1").chmod(0)
    try:
        done = subprocess.run(
            [*prefix, CCARCHIVE, *archive_argv(cp, archive, CUTOFF, workers=2)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        (cp / "c" / "h1").chmod(0o755)

    assert done.returncode == 1, done.stderr
    assert f"kept: {cp / 'c' / 'h1'}: cannot list: Permission denied" in done.stderr
    assert snapshot(cp / "c" / "h1") == kept
    for host in ("h0", "h2", "h3"):
        assert not any((cp / "c" / host).iterdir())
    assert sorted(archive_rows(archive / "c" / f"{CUTOFF}.parquet"), key=full_key) == want


@pytest.mark.slow
def test_writing_failing_midway_keeps_every_file_and_leaves_no_archive(tmp_path: Path) -> None:
    """The archive root is below a regular file: the finalize thread fails on the first host
    while the others still load; the run waits for them, keeps everything, reports it."""
    cp = tmp_path / "cp"
    for i, h in enumerate(["h0", "h1", "h2"]):
        write_host(cp, "c", h, 50, i)
    before = snapshot(cp)
    (tmp_path / "file").write_text("not a directory")

    [report] = runner.run(
        runner.RunOptions(str(cp), CUTOFF, archive=str(tmp_path / "file" / "archive"), workers=2)
    )

    assert not report.ok
    assert any(e.startswith("archive not written, all files kept") for e in report.errors)
    assert report.files_deleted == 0 and report.archive is None
    assert snapshot(cp) == before


def test_streaming_finalize_finds_an_archive_of_the_same_commit(tmp_path: Path) -> None:
    """The archive of these very manifests is already published (a run died before
    deleting, or a finalize runs twice): the streaming finalize writes nothing."""
    cp, archive, staging = tmp_path / "cp", tmp_path / "archive", tmp_path / "staging"
    for i, h in enumerate(["h0", "h1"]):
        write_host(cp, "c", h, 50, i)
    run_id = runner.new_run_id(CUTOFF)
    manifests = [
        steps.load_host(str(cp), "c", h, CUTOFF, str(staging), run_id) for h in ["h0", "h1"]
    ]
    first = steps.finalize_cluster("c", CUTOFF, run_id, manifests, str(archive))
    assert first is not None and not first.already_existed
    out = archive / "c" / f"{CUTOFF}.parquet"
    before = (out.read_bytes(), out.stat().st_mtime_ns)

    again = steps.finalize_streaming("c", CUTOFF, run_id, iter(manifests), str(archive))

    assert again is not None and again.already_existed and again.rows == first.rows
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before


@pytest.mark.parametrize("workers", [1, 2])
def test_a_copy_of_archived_files_is_kept_not_archived_again(tmp_path: Path, workers: int) -> None:
    """Files of the same names and bytes as archived ones, but other inodes (a restored
    backup): not the very files that were read, so they are reported and kept, and the
    published archive is left as it is."""
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    for i, h in enumerate(["h0", "h1"]):
        write_host(cp, "c", h, 50, i)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(cp), str(copy)], check=True)
    before = snapshot(copy)
    runner.run(runner.RunOptions(str(cp), CUTOFF, archive=str(archive), workers=1))
    out = archive / "c" / f"{CUTOFF}.parquet"
    first = (out.read_bytes(), out.stat().st_mtime_ns)

    [report] = runner.run(
        runner.RunOptions(str(copy), CUTOFF, archive=str(archive), workers=workers)
    )

    assert not report.ok
    assert len(report.bad) == len([k for k, v in before.items() if v is not None])
    assert all("changed after it was read" in b.reason for b in report.bad)
    assert (out.read_bytes(), out.stat().st_mtime_ns) == first
    assert snapshot(copy) == before


@pytest.mark.slow
@pytest.mark.parametrize("cutoff", [5, None])
def test_nothing_to_load_starts_no_pool(tmp_path: Path, cutoff: int | None) -> None:
    """16 workers and nothing older than the cutoff (or an empty tree): no process is
    started (counted from /proc through psutil while the run is under way), nothing
    is written; with something to load, the pool is started as before."""
    import psutil

    cp = tmp_path / "cp"
    if cutoff is None:
        cp.mkdir()  # an empty tree
    else:
        write_host(cp, "fritz", "h1", 4, seed=1)
        write_host(cp, "fritz", "h2", 4, seed=2)
    me = psutil.Process()
    # Earlier tests' pools leave multiprocessing's resource tracker behind: count new ones.
    before = {p.pid for p in me.children(recursive=True)}
    children: list[int] = []

    def progress(event: str, cluster: str, detail: dict[str, Any]) -> None:
        children.append(len({p.pid for p in me.children(recursive=True)} - before))

    options = runner.RunOptions(
        checkpoints=str(cp), cutoff=cutoff or 5, archive=str(tmp_path / "arc"), workers=16
    )
    reports = runner.run(options, progress)

    assert runner.last_run.pool is False
    assert all(n == 0 for n in children), children
    assert all(r.ok and r.rows == 0 and r.files_archived == 0 for r in reports)
    assert not list((tmp_path / "arc").rglob("*.parquet"))
    if cutoff is not None:
        assert children and [r.hosts for r in reports] == [2]
        # The same tree with a cutoff after its files does start the pool.
        runner.run(
            runner.RunOptions(
                checkpoints=str(cp), cutoff=2**40, archive=str(tmp_path / "arc"), workers=2
            )
        )
        assert runner.last_run.pool is True

"""`ccarchive plan`: per cluster what the next run would take, and what it would keep and
why, on a real tree with good, badly named and already-archived files; the tree and the
archive are left exactly as they were (bytes and mtimes)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import archive_argv, clean_env, run_cli
from workers.dryrun import rows_estimate
from workers.locks import DirectoryLock


def ccarchive(*argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI from this worktree, with no CCARCHIVE_* setting from outside."""
    return run_cli(argv, clean_env(COLUMNS="200"))


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `root`: size, mtime (ns) and content digest; directories' mtimes."""
    out: dict[str, tuple[int, int, str]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.mark.slow
def test_plan_lists_what_the_run_would_take_and_keep_and_changes_nothing(tmp_path: Path) -> None:
    cp, ar = tmp_path / "cp", tmp_path / "ar"
    gen = ccarchive(
        "generate", "--root", str(cp), "--hosts", "2", "--files-per-host", "2", "--samples", "60"
    )
    assert gen.returncode == 0, gen.stderr
    hosts = sorted((cp / "fritz").iterdir())
    stamps = sorted({int(f.stem) for h in hosts for f in h.iterdir()})
    first, second = stamps[0], stamps[-1]
    # Archive the first files; then put one back as a copy (another inode): a committed
    # archive lists it with another identity, so a run keeps it and never archives it again.
    old = next(f for f in hosts[0].iterdir() if int(f.stem) == first)
    saved = tmp_path / "saved"
    shutil.copy2(old, saved)
    done = ccarchive(*archive_argv(cp, ar, first, 1))
    assert done.returncode == 0, done.stderr
    assert not old.exists()
    shutil.copy2(saved, old)
    (hosts[1] / "abc.json").write_text("{}")  # a bad name: reported and kept
    good = [
        f
        for h in hosts
        for f in h.iterdir()
        if f.suffix in (".json", ".bin") and f.stem == str(second)
    ]
    assert len(good) == 2
    tree, archive = snapshot(cp), snapshot(ar)

    text = ccarchive(
        "plan", "--checkpoints", str(cp), "--archive", str(ar), "--cutoff", str(second)
    )
    js = ccarchive(
        "plan", "--checkpoints", str(cp), "--archive", str(ar), "--cutoff", str(second), "--json"
    )

    assert text.returncode == 1 and js.returncode == 1, text.stderr + js.stderr  # something kept
    doc = json.loads(js.stdout)
    (fritz,) = doc["clusters"]
    size = sum(f.stat().st_size for f in good)
    assert (fritz["cluster"], fritz["hosts"], fritz["files"], fritz["bytes"]) == (
        "fritz",
        2,
        2,
        size,
    )
    assert fritz["rows_estimate"] == sum(rows_estimate(f.name, f.stat().st_size) for f in good)
    assert fritz["skipped"] is None and fritz["recovered"] == []
    kept = {Path(k["path"]).name: k["reason"] for k in fritz["kept"]}
    assert set(kept) == {"abc.json", old.name}
    assert "not a checkpoint" in kept["abc.json"] or "timestamp" in kept["abc.json"]
    assert kept[old.name].startswith(
        f"listed in committed archive {ar}/fritz/{first}.parquet but changed"
    )
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"plan (nothing written or deleted): archive up to cutoff {second}")
    row = next(ln.split() for ln in lines if ln.startswith("fritz "))
    assert row[:4] == ["fritz", "2", "2", f"{size:,}"]
    assert any(ln.startswith(f"fritz: kept: {old}: listed in committed archive") for ln in lines)
    assert any(ln.startswith(f"fritz: kept: {hosts[1] / 'abc.json'}: ") for ln in lines)

    # Nothing was written, deleted or touched; no run record, no temporary file.
    assert snapshot(cp) == tree
    assert snapshot(ar) == archive


@pytest.mark.slow
def test_plan_reports_a_locked_cluster_and_takes_nothing_from_it(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    assert (
        ccarchive("generate", "--root", str(cp), "--hosts", "1", "--samples", "10").returncode == 0
    )
    with DirectoryLock(cp / "fritz"):  # another run holds the cluster
        done = ccarchive(
            "plan", "--checkpoints", str(cp), "--mode", "delete", "--cutoff", "9999999999", "--json"
        )
    assert done.returncode == 1, done.stderr
    (fritz,) = json.loads(done.stdout)["clusters"]
    assert fritz["files"] == 0 and fritz["skipped"].startswith("another run holds it")


def test_plan_with_an_unknown_cluster_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "cp" / "fritz" / "h1").mkdir(parents=True)
    done = ccarchive(
        "plan",
        "--checkpoints",
        str(tmp_path / "cp"),
        "--archive",
        str(tmp_path / "a"),
        "--cutoff",
        "5",
        "--cluster",
        "fritzz",
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no cluster 'fritzz'" in done.stderr
    assert not (tmp_path / "a").exists()

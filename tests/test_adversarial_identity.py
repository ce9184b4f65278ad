"""The tree changes under a run: only the very bytes that were archived are ever deleted.

Each test changes a checkpoint at a known moment (through the runner's progress callback
or right after a listing), with real files: a same-size rewrite, a same-size file renamed
over, a FIFO or a symlink swapped in, a staged chunk swapped for another host's. SPEC §6.7
and §6.8.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.helpers import archive_argv, archive_rows, clean_env, oracle_rows, run_cli, snapshot
from tests.stress_mutations import run_trial
from workers import runner, sink, sourcefiles, steps
from workers.checkpoint import BadCheckpoint

CUTOFF = 100_000_000


def write_host(root: Path, cluster: str, host: str, seed: int, fmt: str = "bin") -> Path:
    """One checkpoint of 40 values per series; every seed gives other values, same size."""
    [path] = helpers.write_host(root, cluster, host, seed, formats=(fmt,), values=40, sockets=1)
    return path


def run_with(
    cp: Path, archive: Path, on_event: Callable[[str, str, dict[str, Any]], None], **kw: Any
) -> Any:
    [report] = runner.run(
        runner.RunOptions(
            str(cp), CUTOFF, archive=str(archive), workers=kw.pop("workers", 1), **kw
        ),
        on_event,
    )
    return report


def rewrite_same_size(path: Path, seed: int) -> bytes:
    """Overwrite `path` in place (same inode) with other values of the same length."""
    scratch = Path(tempfile.mkdtemp())
    data = write_host(scratch, "c", "h", seed).read_bytes()
    shutil.rmtree(scratch)
    assert len(data) == path.stat().st_size and data != path.read_bytes()
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even the mtime is put back
    return data


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_file_rewritten_after_loading_is_kept(tmp_path: Path, how: str) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    target = write_host(cp, "c", "h0", 1)
    other = write_host(cp, "c", "h1", 2)
    original = oracle_rows("c", "h0", target)
    new: bytes = b""

    def on_event(event: str, cluster: str, detail: dict[str, Any]) -> None:
        nonlocal new
        if event == "loaded" and detail.get("host") == "h0":
            if how == "in place":
                new = rewrite_same_size(target, 7)
            else:
                fresh = write_host(tmp_path / "fresh", "c", "h0", 7)
                new = fresh.read_bytes()
                assert len(new) == target.stat().st_size
                os.rename(fresh, target)

    report = run_with(cp, archive, on_event)

    assert not report.ok
    [kept] = report.bad
    assert kept.path == str(target) and "changed after it was read" in kept.reason
    assert target.read_bytes() == new  # the new bytes are in no archive: still here
    assert not other.exists()  # the other host went its way
    rows = archive_rows(archive / "c" / f"{CUTOFF}.parquet")
    assert sorted(r for r in rows if r[1] == "h0") == sorted(original)


@pytest.mark.slow
def test_recovery_keeps_a_file_rewritten_after_its_archive_was_committed(tmp_path: Path) -> None:
    """A run dies right after publishing; the file is then rewritten with the same size and
    mtime: recovery must not delete it as archived (its bytes are not)."""
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    target = write_host(cp, "c", "h0", 1)
    other = write_host(cp, "c", "h1", 2)
    fault = tmp_path / "fault"
    fault.write_text("finalize:committed")
    crashed = run_cli(
        archive_argv(cp, archive, CUTOFF, 1), clean_env(CCARCHIVE_FAULT_FILE=str(fault))
    )
    assert crashed.returncode == -9 and not fault.exists(), crashed.stderr
    published = (archive / "c" / f"{CUTOFF}.parquet").read_bytes()
    new = rewrite_same_size(target, 7)

    report = run_with(cp, archive, lambda *_: None)

    assert any(
        b.path == str(target) and "changed after it was read" in b.reason for b in report.bad
    )
    assert target.read_bytes() == new
    assert not other.exists()  # recovery finished the untouched file's deletion
    assert (archive / "c" / f"{CUTOFF}.parquet").read_bytes() == published


def swap_after_listing(monkeypatch: pytest.MonkeyPatch, swap: Callable[[Path], None]) -> None:
    """Run `swap(host directory)` right after load_host has listed the directory."""
    real = steps.select_files

    def listed_then_swapped(directory: Path, *args: Any, **kw: Any) -> steps.Selection:
        selection = real(directory, *args, **kw)
        swap(directory)
        return selection

    monkeypatch.setattr(steps, "select_files", listed_then_swapped)


@pytest.mark.timeout(60)
def test_a_fifo_swapped_in_after_listing_is_reported_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = tmp_path / "cp"
    target = write_host(cp, "c", "h", 1)

    def swap(directory: Path) -> None:
        os.mkfifo(tmp_path / "fifo")
        os.rename(tmp_path / "fifo", target)

    swap_after_listing(monkeypatch, swap)
    manifest = steps.load_host(str(cp), "c", "h", CUTOFF, str(tmp_path / "st"), "r1")

    assert manifest.files == [] and manifest.rows == 0
    [bad] = manifest.bad
    assert bad.path == str(target) and "not a regular file" in bad.reason


def test_a_symlink_swapped_in_after_listing_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = tmp_path / "cp"
    target = write_host(cp, "c", "h", 1)
    secret = write_host(tmp_path / "outside", "c", "x", 9)  # a valid checkpoint elsewhere
    secret_bytes = secret.read_bytes()

    def swap(directory: Path) -> None:
        os.symlink(secret, tmp_path / "link")
        os.rename(tmp_path / "link", target)

    swap_after_listing(monkeypatch, swap)
    manifest = steps.load_host(str(cp), "c", "h", CUTOFF, str(tmp_path / "st"), "r1")

    assert manifest.files == [] and manifest.rows == 0 and manifest.chunk is None
    [bad] = manifest.bad
    assert "symbolic link" in bad.reason
    assert secret.read_bytes() == secret_bytes and target.is_symlink()


def test_a_file_replaced_by_another_regular_file_after_listing_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = tmp_path / "cp"
    target = write_host(cp, "c", "h", 1)

    def swap(directory: Path) -> None:
        fresh = write_host(tmp_path / "fresh", "c", "h", 3)
        os.rename(fresh, target)

    swap_after_listing(monkeypatch, swap)
    manifest = steps.load_host(str(cp), "c", "h", CUTOFF, str(tmp_path / "st"), "r1")

    assert manifest.files == []
    [bad] = manifest.bad
    assert "replaced by another file after listing" in bad.reason


def test_read_listed_records_identity_and_digest(tmp_path: Path) -> None:
    path = write_host(tmp_path, "c", "h", 1)
    [listed] = steps.select_files(path.parent, CUTOFF).files
    data, source = sourcefiles.read_listed(path.parent, listed)
    st = path.stat()
    assert data == path.read_bytes()
    assert (source.dev, source.ino, source.size) == (st.st_dev, st.st_ino, st.st_size)
    assert (source.mtime_ns, source.ctime_ns) == (st.st_mtime_ns, st.st_ctime_ns)
    assert sourcefiles.change(path, source) is None
    rewrite_same_size(path, 5)
    assert "other content" in (sourcefiles.change(path, source) or "") or "times differ" in (
        sourcefiles.change(path, source) or ""
    )
    with pytest.raises(BadCheckpoint, match="replaced"):
        sourcefiles.read_listed(path.parent, sourcefiles.Listed(path.name, 1, st.st_dev, 1))


def test_same_size_same_times_other_content_is_caught_by_the_digest(tmp_path: Path) -> None:
    """Even when device, inode, size, mtime and ctime all match (a rewrite within one tick
    of a coarse file clock), the digest tells the bytes apart."""
    path = write_host(tmp_path, "c", "h", 1)
    [listed] = steps.select_files(path.parent, CUTOFF).files
    _, source = sourcefiles.read_listed(path.parent, listed)
    rewrite_same_size(path, 5)
    st = path.stat()
    forged = sourcefiles.SourceFile(
        **{**source.__dict__, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    )
    assert sourcefiles.change(path, forged) == (
        "changed after it was read (same size and times, other content)"
    )
    result = steps.delete_files(str(tmp_path), "c", "h", [forged])
    assert result.deleted == [] and path.exists()


def test_two_hosts_cannot_share_a_chunk_even_with_equal_row_counts(tmp_path: Path) -> None:
    """h1's staged chunk is replaced by h0's (same row count, other values) before
    finalize: the per-host digest refuses to publish, nothing is deleted."""
    cp, archive, staging = tmp_path / "cp", tmp_path / "archive", tmp_path / "staging"
    write_host(cp, "c", "h0", 1)
    write_host(cp, "c", "h1", 2)
    before = snapshot(cp)

    def on_event(event: str, cluster: str, detail: dict[str, Any]) -> None:
        if event == "loaded" and detail.get("host") == "h1":
            [c0] = staging.rglob("h0.arrow")
            [c1] = staging.rglob("h1.arrow")
            shutil.copyfile(c0, c1)

    # Two workers: rows are staged (with one they go straight from reader to writer).
    report = run_with(cp, archive, on_event, staging=str(staging), workers=2)

    assert not report.ok and report.archive is None
    assert any("differ from the rows loaded" in e for e in report.errors), report.errors
    assert not list(archive.rglob("*.parquet"))
    assert snapshot(cp) == before


def test_finalize_refuses_a_manifest_whose_digest_does_not_match(tmp_path: Path) -> None:
    cp, staging = tmp_path / "cp", tmp_path / "staging"
    write_host(cp, "c", "h0", 1)
    m = steps.load_host(str(cp), "c", "h0", CUTOFF, str(staging), "r1")
    assert m.digest.startswith(f"{m.rows}:")
    m.digest = f"{m.rows}:0000000000000000"
    with pytest.raises(sink.VerificationError, match="differ from the rows loaded"):
        steps.finalize_cluster("c", CUTOFF, "r1", [m], str(tmp_path / "archive"))
    assert not list((tmp_path / "archive").rglob("*.parquet"))


def test_delete_mode_keeps_a_file_replaced_after_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = tmp_path / "cp"
    target = write_host(cp, "c", "h", 1)
    keep = write_host(cp, "c", "h2", 2)
    real = sourcefiles.listed_identity

    def identity_then_swap(path: Path) -> sourcefiles.SourceFile:
        identity = real(path)
        if path == target:
            fresh = write_host(tmp_path / "fresh", "c", "h", 3)
            os.rename(fresh, target)
        return identity

    monkeypatch.setattr(steps, "listed_identity", identity_then_swap)
    result = steps.delete_expired(str(cp), "c", "h", CUTOFF)

    assert result.deleted == [] and target.exists()
    assert "changed after it was read" in result.kept[0].reason
    assert keep.exists()


@pytest.mark.slow
def test_random_mutations_lose_nothing(mutation_trial: tuple[str, int], tmp_path: Path) -> None:
    """One seeded trial per mutation kind (tests/stress_mutations.py; --stress N for N)."""
    kind, seed = mutation_trial
    result = run_trial(kind, seed, tmp_path)
    assert result.mutations > 0
    assert (result.values_lost, result.files_wrongly_deleted) == (0, 0), result.notes
    assert (result.outside_changed, result.hangs) == (0, 0)

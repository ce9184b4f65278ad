"""Rows written straight from memory (`read_host` + `HeldRows`) make the very archive the
staged path (`load_host` + chunks) makes, byte for byte."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    archive_argv,
    archive_rows,
    clean_env,
    expected_rows,
    run_cli,
    snapshot,
    stalled_run,
)
from workers import sink, steps
from workers.generate import Level, Metric, write_checkpoint

CUTOFF = 5_000_000
RUN = "5000000-20260101T000000-0000abcd"


def make_tree(root: Path) -> None:
    rng = np.random.default_rng(3)
    for h in ("n1", "n2", "n3"):
        for k, fmt in enumerate(("json", "bin")):
            start = 1_000_000 + 6000 * k
            values = np.round(rng.random(80) * 50, 2)
            values[rng.random(80) < 0.05] = np.nan
            level = Level(
                {"load": Metric(60, start, values)},
                {"socket0": Level({"pw": Metric(30, start, values)})},
            )
            write_checkpoint(root / "c" / h / f"{start}.{fmt}", level, start, start + 6000, fmt)
    (root / "c" / "n0").mkdir()  # a host with nothing to archive


def test_direct_and_staged_archives_are_identical(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    make_tree(cp)
    hosts = sorted(p.name for p in (cp / "c").iterdir())
    staged = [steps.load_host(str(cp), "c", h, CUTOFF, str(tmp_path / "st"), RUN) for h in hosts]
    assert all(m.files and not m.bad for m in staged if m.host != "n0")  # every file read
    a = steps.finalize_cluster("c", CUTOFF, RUN, staged, str(tmp_path / "a"))

    held = steps.HeldRows()
    read = (held.hold(*steps.read_host(str(cp), "c", h, CUTOFF, RUN)) for h in hosts)
    b = steps.finalize_streaming("c", CUTOFF, RUN, read, str(tmp_path / "b"), rows_of=held)
    assert a is not None and b is not None and a.rows == b.rows > 0
    assert Path(a.url).read_bytes() == Path(b.url).read_bytes()


def test_rows_not_held_fail_before_anything_is_published(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    make_tree(cp)
    manifest, _table = steps.read_host(str(cp), "c", "n1", CUTOFF, RUN)
    with pytest.raises(sink.VerificationError, match="rows not held"):
        steps.finalize_cluster(
            "c", CUTOFF, RUN, [manifest], str(tmp_path / "a"), rows_of=steps.HeldRows()
        )
    assert not list((tmp_path / "a").rglob("*.parquet"))


def test_a_manifest_with_rows_and_no_chunk_is_refused(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    make_tree(cp)
    manifest, _table = steps.read_host(str(cp), "c", "n1", CUTOFF, RUN)
    with pytest.raises(sink.VerificationError, match="none staged"):
        steps.finalize_cluster("c", CUTOFF, RUN, [manifest], str(tmp_path / "a"))
    assert not list((tmp_path / "a").rglob("*.parquet"))


@pytest.mark.slow
def test_one_worker_stages_nothing_and_a_stop_mid_write_leaves_nothing(tmp_path: Path) -> None:
    """`--workers 1` writes each host as it reads it: while the archive is half written no
    chunk exists anywhere; SIGTERM then leaves no archive, no partial file, every checkpoint
    in place; the next run archives exactly the oracle's rows and deletes the files."""
    cp, archive, tmp = tmp_path / "cp", tmp_path / "arc", tmp_path / "tmp"
    make_tree(cp)
    tmp.mkdir()
    before = snapshot(cp)
    expected = expected_rows(sorted(p for p in cp.rglob("*") if p.is_file()))
    env = clean_env(TMPDIR=str(tmp))
    argv = archive_argv(cp, archive, CUTOFF, 1)

    with stalled_run(argv, env, tmp_path / "fault", "finalize:writing") as proc:
        assert not [p for p in tmp_path.rglob("*.arrow")]
        assert not [p for p in tmp.rglob("*") if p.is_file()]  # no staging at all
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert not [p for p in archive.rglob("*") if p.is_file()]
    assert snapshot(cp) == before

    done = run_cli(argv, env)
    assert done.returncode == 0, done.stderr
    assert archive_rows(archive / "c" / f"{CUTOFF}.parquet") == expected
    assert not [p for p in cp.rglob("*") if p.is_file()]

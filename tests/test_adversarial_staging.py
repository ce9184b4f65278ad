"""Staging belongs to the archiver (SPEC §6.9), tried as a careless operator and a hostile user.

Real trees, real `ccarchive` processes, real signals:

- a staging location (or archive root) equal to, inside or around another root is refused
  with exit 2 and one line, and nothing under the roots changes (bytes and times);
- a sweep of a shared staging root removes only run directories the archiver marked, never
  a foreign file or directory, however old and whatever its name;
- the default temporary staging is a per-user folder, refused when someone else could have
  planted it; SIGTERM and SIGINT leave no run directory in it, and after SIGKILL the next
  run removes the dead run's directory at once (its lock is free) but never a live one's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.fixtures_s3 import S3Bucket
from tests.helpers import archive_argv, clean_env, run_cli, write_tree
from workers import recovery, roots, staging

CUTOFF = 5_000_000
SEVEN_HOURS = 7 * 3600  # older than the default grace period (6 h)

State = dict[str, tuple[bytes | None, int, int, int, int]]


def make_tree(root: Path) -> None:
    """2 clusters x 2 hosts x 2 files (JSON and binary), all older than CUTOFF."""
    write_tree(root, seed=7, values=50, sockets=0)


def age(root: Path, seconds: int = SEVEN_HOURS) -> None:
    """Make everything under root (root included) look `seconds` old, links themselves too."""
    when = time.time() - seconds
    for p in [root, *root.rglob("*")]:
        os.utime(p, (when, when), follow_symlinks=False)


def state(root: Path) -> State:
    """Every entry under root: content (files: bytes, links: target, directories: None),
    inode, mode, mtime_ns, ctime_ns; links are not followed."""
    out: State = {}
    for top, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = Path(top) / name
            st = os.lstat(p)
            if p.is_symlink():
                data: bytes | None = os.readlink(p).encode()
            else:
                data = None if p.is_dir() else p.read_bytes()
            out[str(p.relative_to(root))] = (
                data,
                st.st_ino,
                st.st_mode,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
    return out


def cli_env(tmpdir: Path, **extra: str) -> dict[str, str]:
    """Environment of a `ccarchive` subprocess: this worktree, no CCARCHIVE_* leaking in,
    the system temp dir (so the default staging) in `tmpdir`."""
    return clean_env(TMPDIR=str(tmpdir), **extra)


def ccarchive(args: list[str], tmpdir: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run `ccarchive <args>` to the end."""
    return run_cli(args, cli_env(tmpdir, **extra))


def private_root(tmpdir: Path) -> Path:
    """The default temporary staging of this user with TMPDIR=tmpdir."""
    return tmpdir / f"ccarchive-{os.geteuid()}"


def assert_one_line_usage_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, exactly one line on stderr (no traceback), naming every one of `words`."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ccarchive: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """`<tmp>/w/ck` (a checkpoint tree) and `<tmp>/w/arc` (an archive root with an archive-
    like file), everything seven hours old; `<tmp>/tmp` as the system temp dir."""
    w = tmp_path / "w"
    make_tree(w / "ck")
    (w / "arc" / "alpha").mkdir(parents=True)
    (w / "arc" / "alpha" / "123.parquet").write_bytes(b"PAR1 someone's archive PAR1")
    (tmp_path / "tmp").mkdir()
    age(w)
    return tmp_path


# --- overlapping roots ----------------------------------------------------------------------

# (checkpoints, archive, staging) relative to <tmp>; "file://" is made absolute below.
OVERLAPS = {
    "staging is the checkpoint root": ("w/ck", "w/arc", "w/ck", "--checkpoints"),
    "staging inside the checkpoint root": ("w/ck", "w/arc", "w/ck/alpha", "--checkpoints"),
    "staging contains the checkpoint root": ("w/ck", "arc2", "w", "--checkpoints"),
    "staging is the archive root": ("w/ck", "w/arc", "w/arc", "--archive"),
    "staging inside the archive root": ("w/ck", "w/arc", "w/arc/staging", "--archive"),
    "staging contains the archive root": ("ck2", "w/arc", "w", "--archive"),
    "staging is a symlink to the checkpoint root": ("w/ck", "w/arc", "link", "--checkpoints"),
    "staging inside a symlink to the checkpoint root": (
        "w/ck",
        "w/arc",
        "link/beta/h0",
        "--checkpoints",
    ),
    "staging as a file:// URL of the checkpoint root": (
        "w/ck",
        "w/arc",
        "file://{tmp}/w/ck",
        "--checkpoints",
    ),
    "archive root is the checkpoint root": ("w/ck", "w/ck", None, "--checkpoints"),
    "archive root inside the checkpoint root": ("w/ck", "w/ck/arc", None, "--checkpoints"),
    "archive root contains the checkpoint root": ("w/ck", "w", None, "--checkpoints"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OVERLAPS), ids=list(OVERLAPS))
def test_overlapping_roots_are_refused_and_nothing_changes(world: Path, case: str) -> None:
    checkpoints, archive, staging_dir, other_flag = OVERLAPS[case]
    (world / "link").symlink_to(world / "w" / "ck")
    if not (world / checkpoints).exists():
        make_tree(world / checkpoints)
    before = state(world)

    args = archive_argv(world / checkpoints, world / archive, CUTOFF, 1)
    if staging_dir is not None:
        url = staging_dir.format(tmp=world)
        args += ["--staging", url if "://" in url else str(world / url)]
    proc = ccarchive(args, world / "tmp")

    flag = "--staging" if staging_dir is not None else "--archive"
    assert_one_line_usage_error(proc, "overlaps", flag, other_flag)
    assert state(world) == before  # every byte and every timestamp, of every root


def test_the_reproduction_of_issue_11_deletes_nothing(world: Path) -> None:
    """`--staging` = the checkpoint root with every file older than the grace period."""
    ck = world / "w" / "ck"
    before = state(ck)
    proc = ccarchive(
        [*archive_argv(ck, world / "out", 1795590000, 1), "--staging", str(ck)], world / "tmp"
    )
    assert_one_line_usage_error(proc, "--staging", "--checkpoints")
    assert state(ck) == before
    assert not (world / "out").exists()  # refused before the archive root is made


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("s3://b/x", "s3://b/x", True),
        ("s3://b/x/", "s3://b/x", True),
        ("s3://b/x", "s3://b/x/y", True),
        ("s3://b/x/y/", "s3://b/x", True),
        ("s3://b", "s3://b/x", True),
        ("s3a://b/x", "s3://b/x/y", True),
        ("S3://b/x", "s3://b/x", True),
        ("s3://b//x", "s3://b/x/", True),
        ("s3://b/x", "s3://b/xy", False),
        ("s3://b/xy/z", "s3://b/x", False),
        ("s3://b/x", "s3://c/x", False),
        ("s3://b/x", "/b/x", False),
        ("s3://tmp/x", "/tmp/x", False),
        ("/tmp/x", "file:///tmp/x/y", True),
        ("/tmp/x", "/tmp/xy", False),
        ("/tmp/x/../y", "/tmp/y", True),
    ],
)
def test_location_overlap_is_component_wise(a: str, b: str, expected: bool) -> None:
    assert roots.overlaps(a, b) is expected
    assert roots.overlaps(b, a) is expected


@pytest.mark.s3
def test_s3_staging_inside_the_s3_archive_is_refused(world: Path, s3_bucket: S3Bucket) -> None:
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="arc/alpha/1.parquet", Body=b"x")
    ck = world / "w" / "ck"
    before = state(ck)
    args = archive_argv(ck, f"{s3_bucket.url}/arc", CUTOFF, 1)
    proc = ccarchive(
        [*args, "--staging", f"s3a://{s3_bucket.name}/arc/staging"],
        world / "tmp",
        **s3_bucket.env(),
    )
    assert_one_line_usage_error(proc, "--staging", "--archive", "overlaps")
    assert state(ck) == before
    assert s3_bucket.keys() == ["arc/alpha/1.parquet"]
    # A sibling prefix sharing a leading string is not inside: that run goes through.
    proc = ccarchive(
        [*args, "--staging", f"{s3_bucket.url}/arcstaging"], world / "tmp", **s3_bucket.env()
    )
    assert proc.returncode == 0, proc.stderr
    assert s3_bucket.keys() == [  # archives written, the run's staging removed
        "arc/alpha/1.parquet",
        f"arc/alpha/{CUTOFF}.parquet",
        f"arc/beta/{CUTOFF}.parquet",
    ]


# --- the sweep removes only what the archiver made --------------------------------------------


def marked_run(root: Path, run_id: str, content: str | None = None) -> Path:
    """A run directory as the archiver leaves it (a chunk), marked with `content`."""
    run = root / run_id
    (run / "alpha").mkdir(parents=True)
    (run / "alpha" / "h0.arrow").write_bytes(b"chunk")
    (run / staging.MARKER).write_text(run_id if content is None else content)
    return run


@pytest.mark.slow
def test_sweep_of_a_shared_staging_root_removes_only_marked_dead_runs(world: Path) -> None:
    shared = world / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("someone's notes")
    (shared / "data" / "x").mkdir(parents=True)
    (shared / "data" / "x" / "y.json").write_text("{}")
    lookalike = staging.new_run_id(CUTOFF)
    (shared / lookalike / "alpha").mkdir(parents=True)  # a run id's name, but no marker
    (shared / lookalike / "alpha" / "h0.arrow").write_bytes(b"not ours")
    marked_run(shared, "myrun")  # a marker, but not a run id's name
    marked_run(shared, staging.new_run_id(CUTOFF), content="another-run")  # wrong marker
    (shared / staging.new_run_id(CUTOFF)).write_text(staging.new_run_id(CUTOFF))  # a file
    elsewhere = marked_run(world / "elsewhere", staging.new_run_id(CUTOFF))
    (shared / elsewhere.name).symlink_to(elsewhere)  # a marked run, but through a link
    dead = marked_run(shared, staging.new_run_id(CUTOFF))
    empty_dead = shared / staging.new_run_id(CUTOFF)  # died before its first chunk
    empty_dead.mkdir()
    (empty_dead / staging.MARKER).write_text(empty_dead.name)
    age(world)
    survivors = {rel: v for rel, v in state(shared).items() if not rel.startswith(dead.name)}
    survivors = {k: v for k, v in survivors.items() if not k.startswith(empty_dead.name)}
    outside = state(world / "elsewhere")

    proc = ccarchive(
        [
            *archive_argv(world / "w" / "ck", world / "w" / "arc", CUTOFF, 1),
            "--staging",
            str(shared),
        ],
        world / "tmp",
    )

    assert proc.returncode == 0, proc.stderr
    assert not dead.exists() and not empty_dead.exists()  # provably ours and dead: swept
    assert state(shared) == survivors  # everything else: every byte and timestamp kept
    assert state(world / "elsewhere") == outside
    assert (world / "w" / "arc" / "alpha" / f"{CUTOFF}.parquet").exists()  # the run did run


def test_a_young_marked_run_survives_the_sweep(tmp_path: Path) -> None:
    young = marked_run(tmp_path, staging.new_run_id(CUTOFF))
    assert recovery.sweep_staging(str(tmp_path), staging.new_run_id(CUTOFF), 3600) == []
    assert young.exists()
    age(young, 7200)
    assert recovery.sweep_staging(str(tmp_path), staging.new_run_id(CUTOFF), 3600) == [str(young)]


def test_run_ids_are_recognised_and_the_marker_is_written(tmp_path: Path) -> None:
    run_id = staging.new_run_id(CUTOFF)
    assert staging.is_run_id(run_id)
    assert not staging.is_run_id(run_id + "x") and not staging.is_run_id("../" + run_id)
    staging.mark_run(str(tmp_path), run_id)
    assert (tmp_path / run_id / staging.MARKER).read_text() == run_id
    assert staging.owned_run(str(tmp_path), run_id)
    assert not staging.owned_run(str(tmp_path), staging.new_run_id(CUTOFF))  # none there


# --- the default temporary staging ----------------------------------------------------------


def stalled_run(world: Path, workers: int) -> AbstractContextManager[subprocess.Popen[str]]:
    """An embedded run that stalls after its first chunk, given once stalled."""
    argv = archive_argv(world / "w" / "ck", world / "w" / "arc", CUTOFF, workers)
    return helpers.stalled_run(argv, cli_env(world / "tmp"), world / "fault")


def run_dirs(world: Path) -> list[Path]:
    """Run directories in the default temporary staging."""
    return sorted(private_root(world / "tmp").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signo", "workers"),
    [(signal.SIGTERM, 2), (signal.SIGINT, 2)],  # with one worker nothing is staged
)
def test_sigterm_and_sigint_leave_no_run_directory(
    world: Path, signo: signal.Signals, workers: int
) -> None:
    before = state(world / "w" / "ck")
    with stalled_run(world, workers) as proc:
        [run] = run_dirs(world)  # the run is staged there: the test does test something
        assert list(run.rglob("*.arrow"))
        assert (run / staging.MARKER).read_text() == run.name

        proc.send_signal(signo)
        _, err = proc.communicate(timeout=60)

    assert proc.returncode == 128 + signo, err
    assert "Traceback" not in err and signo.name in err
    assert run_dirs(world) == []
    root = os.lstat(private_root(world / "tmp"))
    assert root.st_mode & 0o777 == 0o700 and root.st_uid == os.geteuid()
    assert state(world / "w" / "ck") == before  # nothing archived, so nothing deleted
    assert [p.name for p in (world / "w" / "arc").rglob("*.parquet")] == ["123.parquet"]
    assert not [p for p in (world / "w" / "arc").rglob("*") if p.name.endswith(".partial")]


@pytest.mark.slow
def test_after_sigkill_the_next_run_sweeps_the_dead_run_but_not_a_live_one(world: Path) -> None:
    with stalled_run(world, 2) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    [dead] = run_dirs(world)
    assert (dead / staging.MARKER).read_text() == dead.name
    # A live run of this user (another process holds its lock): never swept.
    live = staging.PrivateRun(str(private_root(world / "tmp")), staging.new_run_id(CUTOFF))
    try:
        proc2 = ccarchive(
            archive_argv(world / "w" / "ck", world / "w" / "arc", CUTOFF, 1), world / "tmp"
        )
        assert proc2.returncode == 0, proc2.stderr
        # Swept at once, long before the grace period: its lock was free.
        assert run_dirs(world) == [Path(live.path)]
    finally:
        live.close()
    assert run_dirs(world) == []
    assert (world / "w" / "arc" / "alpha" / f"{CUTOFF}.parquet").exists()


def _owned_by_nobody(path: Path) -> None:
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)


def _world_writable(path: Path) -> None:
    path.mkdir()
    path.chmod(0o777)


def _group_writable(path: Path) -> None:
    path.mkdir()
    path.chmod(0o770)


def _symlink(path: Path) -> None:
    (path.parent / "elsewhere").mkdir(mode=0o700)
    path.symlink_to(path.parent / "elsewhere")


def _file(path: Path) -> None:
    path.write_text("x")


PLANTED: dict[str, Any] = {
    "owned by another user": (_owned_by_nobody, "owned by uid 65534"),
    "world-writable": (_world_writable, "writable by group or others"),
    "group-writable": (_group_writable, "writable by group or others"),
    "a symlink": (_symlink, "symbolic link"),
    "a file": (_file, "not a directory"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PLANTED), ids=list(PLANTED))
def test_a_planted_temporary_staging_folder_is_refused(world: Path, case: str) -> None:
    plant, words = PLANTED[case]
    folder = private_root(world / "tmp")
    plant(folder)
    before, planted = state(world / "w"), state(world / "tmp")

    proc = ccarchive(
        archive_argv(world / "w" / "ck", world / "w" / "arc", CUTOFF, 1), world / "tmp"
    )

    assert_one_line_usage_error(proc, str(folder), words, "--staging")
    assert state(world / "w") == before
    assert state(world / "tmp") == planted  # nothing written into the planted folder


# --- a Celery worker whose own settings overlap -----------------------------------------------


@pytest.fixture
def overlapping_worker(world: Path, clean_settings: pytest.MonkeyPatch) -> Any:
    """workers.distributed.tasks with this process's settings: staging = the checkpoint root."""
    from workers.distributed import tasks

    ck = world / "w" / "ck"
    clean_settings.setenv("CCARCHIVE_CHECKPOINTS", str(ck))
    clean_settings.setenv("CCARCHIVE_ARCHIVE", str(world / "w" / "arc"))
    clean_settings.setenv("CCARCHIVE_STAGING", str(ck))
    tasks.settings.cache_clear()
    yield tasks
    tasks.settings.cache_clear()


def test_a_worker_whose_settings_overlap_refuses_and_never_sweeps(
    world: Path, overlapping_worker: Any
) -> None:
    tasks = overlapping_worker
    ck = world / "w" / "ck"
    dead = marked_run(ck, staging.new_run_id(CUTOFF))  # would be swept by a working launch
    age(ck)
    before = state(world / "w")
    run_id = staging.new_run_id(CUTOFF)

    planned = tasks.plan(cutoff=CUTOFF, mode="archive")
    launched = tasks.launch([], CUTOFF, "archive", run_id, None, time.time())
    loaded = tasks.load_host("alpha", "h0", CUTOFF, run_id)

    assert "overlaps" in planned["error"] and "--staging" in planned["error"]
    assert launched["clusters"] == [] and "overlaps" in launched["errors"][0]
    [bad] = loaded["manifest"]["bad"]
    assert "refused" in bad["reason"] and "overlaps" in bad["reason"]
    assert loaded["manifest"]["files"] == []
    assert dead.exists() and state(world / "w") == before  # nothing swept, staged or deleted

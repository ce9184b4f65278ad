"""Run records (`ccarchive status`'s memory), with real files and real `ccarchive` processes.

- the default location is keyed by the resolved archive location, not its spelling, and
  lies under $STATE_DIRECTORY (systemd's StateDirectory=), else $XDG_STATE_HOME; a home
  that cannot hold it is one warning, and the run still succeeds;
- a run stopped by SIGTERM or SIGINT is recorded as `interrupted`; one killed outright
  leaves its start record, shown as `unfinished`, until a later run ends;
- records are pruned by count and by age, and nothing else in their directory is touched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import archive_argv, clean_env, run_cli, write_tree
from workers import runlog
from workers.config import default_run_log, load_settings, location_id
from workers.manifest import ClusterReport

CUTOFF = 5_000_000


def make_tree(root: Path, clusters: tuple[str, ...] = ("alpha",), hosts: int = 2) -> None:
    """Small checkpoint files, all older than CUTOFF."""
    write_tree(root, clusters, hosts, seed=3, formats=("json",), values=30, sockets=0)


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    """A `ccarchive` subprocess's environment: this worktree, no CCARCHIVE_*/state leaking in."""
    env = clean_env(TMPDIR=str(tmp), HOME=str(tmp / "home"), **extra)
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
        if name not in extra:
            env.pop(name, None)
    return env


def cli(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `ccarchive <args>` to the end."""
    return run_cli(args, env, cwd=cwd)


def status_json(env: dict[str, str], archive: Path) -> tuple[int, dict[str, dict]]:
    """`ccarchive status --json`: exit code and the clusters by name."""
    proc = cli(["status", "--archive", str(archive), "--json"], env)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, {c["cluster"]: c for c in json.loads(proc.stdout)["clusters"]}


# --- where records go -----------------------------------------------------------------------


def test_the_key_is_the_resolved_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "one")
    monkeypatch.chdir(tmp_path / "one")
    here = default_run_log("arc")
    assert default_run_log(str(tmp_path / "one" / "arc")) == here
    assert default_run_log(str(tmp_path / "link" / "arc")) == here
    assert default_run_log(f"file://{tmp_path}/one/arc/") == here
    monkeypatch.chdir(tmp_path / "two")
    assert default_run_log("arc") != here  # another tree's relative `arc`: other records
    assert location_id("s3://bucket//prefix/") == "s3://bucket/prefix"
    assert default_run_log("s3a://bucket/prefix") == default_run_log("s3://bucket/prefix/")
    assert default_run_log("s3://bucket/prefix") != default_run_log("s3://bucket/other")


def test_state_directory_then_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CCARCHIVE_RUN_LOG", raising=False)
    archive = str(tmp_path / "arc")
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/svc:{tmp_path}/other")
    run_log = load_settings({"archive": archive}).run_log
    assert run_log is not None and run_log.startswith(f"{tmp_path}/svc/runs/")
    monkeypatch.delenv("STATE_DIRECTORY")
    run_log = load_settings({"archive": archive}).run_log
    assert run_log is not None and run_log.startswith(f"{tmp_path}/xdg/ccarchive/runs/")
    monkeypatch.delenv("XDG_STATE_HOME")
    run_log = load_settings({"archive": archive}).run_log
    assert run_log is not None and run_log.startswith(f"{tmp_path}/home/.local/state/ccarchive/")


@pytest.mark.slow
def test_relative_and_absolute_archive_share_records(tmp_path: Path) -> None:
    make_tree(tmp_path / "ck")
    env = env_for(tmp_path, STATE_DIRECTORY=str(tmp_path / "state"))
    proc = cli(archive_argv(Path("ck"), "arc", CUTOFF, 1), env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    code, clusters = status_json(env, tmp_path / "arc")  # the absolute path
    assert code == 0 and clusters["alpha"]["runs"] == 1
    assert clusters["alpha"]["last_run"]["outcome"] == "ok"
    [record] = (tmp_path / "state" / "runs").glob("*/alpha/*.json")
    assert json.loads(record.read_text())["run_id"] == clusters["alpha"]["last_run"]["run_id"]


@pytest.mark.slow
def test_an_unwritable_home_is_one_clear_warning(tmp_path: Path) -> None:
    make_tree(tmp_path / "ck", clusters=("alpha", "beta"))
    (tmp_path / "home").write_text("a file, not a directory: no ~/.local/state below it")
    proc = cli(archive_argv(tmp_path / "ck", tmp_path / "arc", CUTOFF, 1), env_for(tmp_path))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "run records off" in line]
    assert len(warnings) == 1, proc.stderr  # once per run, not once per cluster
    assert "StateDirectory=" in warnings[0] and "CCARCHIVE_RUN_LOG" in warnings[0]
    assert (tmp_path / "arc" / "beta" / f"{CUTOFF}.parquet").exists()


# --- runs that do not end normally ----------------------------------------------------------


def stalled(
    tmp: Path, env: dict[str, str], workers: int
) -> AbstractContextManager[subprocess.Popen[str]]:
    """An embedded run held after its first host is read, given once it is held."""
    argv = archive_argv(tmp / "ck", tmp / "arc", CUTOFF, workers)
    return helpers.stalled_run(argv, env, tmp / "fault", "load:read")


@pytest.mark.slow
@pytest.mark.parametrize(("signo", "workers"), [(signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_an_interrupted_run_is_recorded(
    tmp_path: Path, signo: signal.Signals, workers: int
) -> None:
    make_tree(tmp_path / "ck")
    env = env_for(tmp_path, STATE_DIRECTORY=str(tmp_path / "state"))
    assert cli(archive_argv(tmp_path / "ck", tmp_path / "arc", 1_000_000, 1), env).returncode == 0
    code, clusters = status_json(env, tmp_path / "arc")
    assert clusters["alpha"]["last_run"]["outcome"] == "ok"  # a previous run, clean

    with stalled(tmp_path, env, workers) as proc:
        [start] = (tmp_path / "state" / "runs").glob("*/alpha/*.started.json")
        assert json.loads(start.read_text())["outcome"] == "unfinished"
        proc.send_signal(signo)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signo, err

    code, clusters = status_json(env, tmp_path / "arc")
    last = clusters["alpha"]["last_run"]
    assert code == 1 and last["outcome"] == "interrupted", last
    assert last["errors"] == [f"interrupted by {signo.name}"] and last["finished"]
    assert clusters["alpha"]["runs"] == 2
    assert not list((tmp_path / "state").rglob("*.started.json"))  # replaced by the end record
    text = cli(["status", "--archive", str(tmp_path / "arc")], env)
    assert text.returncode == 1 and " interrupted (archive, cutoff 5000000" in text.stdout


@pytest.mark.slow
def test_a_killed_run_shows_as_unfinished_until_a_later_run(tmp_path: Path) -> None:
    make_tree(tmp_path / "ck")
    env = env_for(tmp_path, STATE_DIRECTORY=str(tmp_path / "state"))
    with stalled(tmp_path, env, 1) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)

    code, clusters = status_json(env, tmp_path / "arc")
    last = clusters["alpha"]["last_run"]
    assert code == 1 and last["outcome"] == "unfinished" and last["finished"] == ""
    assert last["pid"] == proc.pid and last["started"]
    text = cli(["status", "--archive", str(tmp_path / "arc")], env)
    assert "unfinished" in text.stdout and "still running, or killed" in text.stdout

    time.sleep(1.1)  # record names have one-second resolution: the next run ends later
    again = cli(archive_argv(tmp_path / "ck", tmp_path / "arc", CUTOFF, 1), env)
    assert again.returncode == 0, again.stderr
    code, clusters = status_json(env, tmp_path / "arc")
    assert code == 0 and clusters["alpha"]["last_run"]["outcome"] == "ok"
    assert clusters["alpha"]["runs"] == 2  # the dead run's start record stays as history


# --- pruning --------------------------------------------------------------------------------


def test_records_are_pruned_by_count_and_age(tmp_path: Path) -> None:
    run_log = str(tmp_path / "runs")
    now = time.time()
    day = 86400.0
    foreign = tmp_path / "runs" / "c" / "notes.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("an operator's file")
    ids = []
    for age_days in (40, 30, 20, 10, 5, 1):
        run_id = f"{CUTOFF}-{age_days:04d}-00000000"
        ids.append(run_id)
        report = ClusterReport("c", CUTOFF, run_id, hosts=1)
        assert runlog.record_run(
            run_log, report, "archive", finished=now - age_days * day, keep=5, max_age=25 * day
        )
    names = sorted(p.name for p in foreign.parent.iterdir())
    # Count: the newest 5 (40 days goes); age: 30 days is older than 25 (goes), 20 is not.
    assert names == sorted(
        [
            *(
                f"{_stamp(now - d * day)}-{i}.json"
                for d, i in zip((20, 10, 5, 1), ids[2:], strict=True)
            ),
            "notes.txt",
        ]
    )
    # A much shorter age limit prunes the old ones, but never the record just written.
    report = ClusterReport("c", CUTOFF, f"{CUTOFF}-9999-00000000", hosts=1)
    assert runlog.record_run(
        run_log, report, "archive", finished=now - 3 * day, keep=4, max_age=2 * day
    )
    left = sorted(p.name for p in foreign.parent.iterdir())
    assert left == sorted(
        [
            f"{_stamp(now - day)}-{ids[-1]}.json",
            f"{_stamp(now - 3 * day)}-{CUTOFF}-9999-00000000.json",
            "notes.txt",
        ]
    )
    urls, last = runlog.read_runs(run_log, "c")
    assert len(urls) == 2 and last is not None and last.run_id == ids[-1]


def _stamp(ts: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts))


def test_prune_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCARCHIVE_RUN_LOG_KEEP", "7")
    monkeypatch.setenv("CCARCHIVE_RUN_LOG_MAX_AGE", "240h")
    settings = load_settings({"archive": "/srv/arc"})
    assert settings.run_log_keep == 7 and settings.run_log_max_age_seconds == 240 * 3600
    monkeypatch.setenv("CCARCHIVE_RUN_LOG_MAX_AGE", "10d")
    with pytest.raises(ValueError, match=r"run_log_max_age.*CCARCHIVE_RUN_LOG_MAX_AGE"):
        load_settings({"archive": "/srv/arc"})

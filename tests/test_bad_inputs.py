"""Bad input, everywhere: one line on stderr, never a traceback, the documented exit code.

A catalogue of mistakes an operator makes (wrong flags, invalid values in the environment,
a missing bucket, a reader that stops early), run against every `ccarchive` subcommand and
the Celery entry points (`celery -A workers worker|beat`) as real processes. The broker
URL points at a closed loopback port: nothing needs to run for a configuration error.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fixtures_s3 import S3Bucket
from tests.helpers import ROOT, archive_argv, clean_env, free_port
from workers.cli_parser import build_parser
from workers.usage import EXIT_PIPE

CELERY = str(Path(sys.executable).with_name("celery"))
CUTOFF = "2000000000"


@dataclass
class Case:
    """One bad invocation: argv after `ccarchive` (or a full command), env, expected exit."""

    argv: list[str]
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    celery: bool = False


def subcommands() -> list[str]:
    """Every subcommand `ccarchive --help` lists."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


BAD_ROUTES = {"CCARCHIVE_ROUTES": '{"fritz": storage-a}'}
BAD_RETENTION = {"CCARCHIVE_RETENTION": "48hr"}

CATALOGUE: dict[str, Case] = {
    # argparse: unknown flag, wrong type, no command
    "no-command": Case([]),
    "unknown-flag": Case(["archive", "--bogus"]),
    "workers-not-int": Case(["archive", "--workers", "x"]),
    # archive
    "archive-broker-http": Case(
        ["archive", "--broker", "http://127.0.0.1:1", "--archive", "{tmp}/a", "--cutoff", CUTOFF]
    ),
    "archive-broker-closed-port": Case(
        [
            "archive",
            "--broker",
            "redis://127.0.0.1:{port}/0",
            "--archive",
            "{tmp}/a",
            "--cutoff",
            CUTOFF,
        ]
    ),
    "archive-bad-routes": Case(archive_argv("{cp}", "{tmp}/a"), env=BAD_ROUTES),
    "archive-bad-retention": Case(archive_argv("{cp}", "{tmp}/a"), env=BAD_RETENTION),
    "archive-retention-flag": Case([*archive_argv("{cp}", "{tmp}/a"), "--retention", "2 days"]),
    "archive-no-checkpoints": Case(archive_argv("{tmp}/none", "{tmp}/a", CUTOFF)),
    "archive-unknown-cluster": Case(
        [*archive_argv("{cp}", "{tmp}/a", CUTOFF), "--cluster", "fritz", "--cluster", "fritzz"]
    ),
    # generate
    "generate-no-hosts": Case(["generate", "--root", "{tmp}/g", "--hosts", "0"]),
    # status
    "status-bad-routes": Case(["status", "--archive", "{tmp}"], env=BAD_ROUTES),
    "status-no-archive": Case(["status", "--archive", "{tmp}/none"]),
    # inspect
    "inspect-missing": Case(["inspect", "{tmp}/none.parquet"]),
    "inspect-not-parquet": Case(["inspect", "{cp}/fritz/f0001/{first}"]),
    "inspect-bad-routes": Case(["inspect", "{tmp}/none.parquet"], env=BAD_ROUTES),
    # query
    "query-bad-time": Case(["query", "--archive", "{tmp}", "--from", "yesterday-ish"]),
    "query-negative-limit": Case(["query", "--archive", "{tmp}", "--limit", "-1"]),
    "query-bad-routes": Case(["query", "--archive", "{tmp}"], env=BAD_ROUTES),
    # plan
    "plan-no-checkpoints": Case(["plan", "--checkpoints", "{tmp}/none", "--cutoff", CUTOFF]),
    "plan-bad-retention": Case(
        ["plan", "--checkpoints", "{cp}", "--archive", "{tmp}/a"], env=BAD_RETENTION
    ),
    "plan-unknown-cluster": Case(
        [
            "plan",
            "--checkpoints",
            "{cp}",
            "--archive",
            "{tmp}/a",
            "--cutoff",
            CUTOFF,
            "--cluster",
            "fritzz",
        ]
    ),
    # Celery entry points: the app is built from the environment when it is imported
    "worker-bad-retention": Case(["worker", "--pool", "solo"], env=BAD_RETENTION, celery=True),
    "worker-bad-routes": Case(["worker", "--pool", "solo"], env=BAD_ROUTES, celery=True),
    "beat-bad-retention": Case(["beat"], env=BAD_RETENTION, celery=True),
    "flower-bad-retention": Case(["flower", "--port=0"], env=BAD_RETENTION, celery=True),
    "beat-bad-broker": Case(
        ["beat"], env={"CCARCHIVE_BROKER_URL": "http://127.0.0.1:1"}, celery=True
    ),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint tree (one cluster `fritz`, two hosts)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "generate",
            "--root",
            str(root / "cp"),
            "--hosts",
            "2",
        ],
        {},
    )
    return root


def run(
    argv: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a command with the worktree on the path and a broker nobody listens on."""
    return subprocess.run(
        argv, env=clean_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Exactly one line on stderr, an error and no traceback, and the expected exit code."""
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert re.match(r"^(ccarchive|ccarchive \w+): error: ", lines[0]), lines[0]
    assert result.returncode == code, (result.returncode, result.stderr)
    return lines[0]


def test_catalogue_covers_every_subcommand() -> None:
    """A new subcommand must get its bad inputs here too."""
    covered = {c.argv[0] for c in CATALOGUE.values() if c.argv and not c.celery}
    assert covered == set(subcommands())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_bad_input(name: str, tree: Path) -> None:
    """Every catalogued mistake: one `error:` line, no traceback, exit 2."""
    case = CATALOGUE[name]
    first = sorted(p.name for p in (tree / "cp" / "fritz" / "f0001").iterdir())[0]
    values = {"tmp": tree, "cp": tree / "cp", "first": first, "port": free_port()}
    argv = [a.format(**values) for a in case.argv]
    if case.celery:
        # --pool solo and a short timeout: the app must refuse before it connects anywhere.
        cmd = [CELERY, "-A", "workers", *argv]
        env = {"CCARCHIVE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", **case.env}
    else:
        cmd = [sys.executable, "-m", "workers.cli", *argv]
        env = case.env
    line = assert_one_line(run(cmd, env, timeout=30), case.code)
    if case.env:  # the line names the variable that is wrong
        assert any(k in line for k in case.env), line


@pytest.mark.s3
@pytest.mark.parametrize("option", ["--staging", "--archive"])
def test_missing_bucket(option: str, tree: Path, s3_bucket: S3Bucket) -> None:
    """A bucket that does not exist is a usage error before anything runs, like a local
    unwritable archive; nothing is deleted."""
    before = sorted(p for p in (tree / "cp").rglob("*") if p.is_file())
    argv = archive_argv(tree / "cp", cutoff=CUTOFF)
    argv += ["--archive", str(tree / "arc")] if option == "--staging" else []
    argv += [option, "s3://no-such-bucket-here/x"]
    result = run([sys.executable, "-m", "workers.cli", *argv], s3_bucket.env())
    line = assert_one_line(result, 2)
    assert "no-such-bucket-here" in line and option in line
    assert sorted(p for p in (tree / "cp").rglob("*") if p.is_file()) == before


@pytest.fixture(scope="module")
def archived(tree: Path) -> Path:
    """An archive of a tree big enough that its rows overflow a pipe's buffer."""
    cp, arc = tree / "big", tree / "big-arc"
    gen = ["generate", "--root", str(cp), "--hosts", "4", "--files-per-host", "2"]
    assert run([sys.executable, "-m", "workers.cli", *gen], {}).returncode == 0
    archive = archive_argv(cp, arc, CUTOFF)
    assert run([sys.executable, "-m", "workers.cli", *archive], {}).returncode == 0
    return arc


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "table"])
def test_reader_gone_is_quiet(fmt: str, archived: Path) -> None:
    """`ccarchive query ... | head -2`: the first rows, nothing on stderr, exit 141
    (128 + SIGPIPE, like any filter whose reader left)."""
    query = [sys.executable, "-m", "workers.cli", "query", "--archive", str(archived)]
    query += ["--format", fmt, "--limit", "20000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(query, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        head = [proc.stdout.readline() for _ in range(2)]
        proc.stdout.close()  # what `head -2` does after its lines
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=60)
    assert head[1].startswith(b'"fritz"' if fmt == "csv" else b"fritz")
    assert err == ""
    assert code == EXIT_PIPE


@pytest.mark.slow
def test_unknown_cluster_names_it_and_does_nothing(tree: Path) -> None:
    """`--cluster fritzz` (a typo) next to a real one: exit 2 naming only the missing one
    and the clusters that are there; nothing archived, nothing deleted."""
    before = sorted(p for p in (tree / "cp").rglob("*") if p.is_file())
    argv = archive_argv(tree / "cp", tree / "typo")
    argv += ["--cutoff", CUTOFF, "--cluster", "fritz", "--cluster", "fritzz"]
    line = assert_one_line(run([sys.executable, "-m", "workers.cli", *argv], {}), 2)
    assert "'fritzz'" in line and "'fritz'" not in line and "(clusters there: fritz)" in line
    assert sorted(p for p in (tree / "cp").rglob("*") if p.is_file()) == before
    assert not (tree / "typo" / "fritz").exists()


# --- silent no-ops ---------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("retention", [None, "48h"])
def test_beat_without_retention_warns_at_start_and_every_tick(
    tmp_path: Path, retention: str | None
) -> None:
    """A real `celery beat` for a few seconds (ticking every second, its broker a closed
    loopback port: with nothing scheduled it never connects): without a retention it warns
    at start and at every tick; with one, never."""
    import signal
    import time

    env = clean_env(CCARCHIVE_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    if retention:
        env["CCARCHIVE_RETENTION"] = retention
    log = tmp_path / "beat.log"
    argv = [CELERY, "-A", "workers", "beat", "-l", "info", "--max-interval", "1"]
    argv += ["-s", str(tmp_path / "s")]
    with log.open("wb") as out:
        beat = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "beat: Starting" not in log.read_text():
                time.sleep(0.2)
            time.sleep(4)  # about four ticks
        finally:
            beat.send_signal(signal.SIGTERM)
            beat.wait(timeout=30)
    text = log.read_text()
    assert "beat: Starting" in text, text
    warnings = [ln for ln in text.splitlines() if "no retention configured" in ln]
    if retention is None:
        # one at start, then one per tick
        assert len(warnings) >= 3, text
        assert all("WARNING" in w and "CCARCHIVE_RETENTION" in w for w in warnings)
    else:
        assert warnings == [], text


# --- --help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", *subcommands()])
def test_help_describes_every_option_with_example_and_exit_codes(name: str) -> None:
    """Every option has a one-line description; every --help ends with an example and
    the exit codes."""
    parser = build_parser()
    if name:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    for act in parser._actions:
        if isinstance(act, argparse._HelpAction | argparse._SubParsersAction):
            continue
        assert act.help and "\n" not in act.help, (name, act.option_strings or act.dest)
    text = parser.format_help()
    assert "Example:\n  ccarchive " in text
    assert all(f"\n  {code} " in text for code in ("0", "1", "2", "130"))


@pytest.mark.slow
def test_verbose_and_log_level_flags(tmp_path: Path) -> None:
    """-v logs INFO lines that are not shown by default; --log-level beats -v."""
    cp = tmp_path / "cp"
    (cp / "fritz" / "h1").mkdir(parents=True)
    base = [sys.executable, "-m", "workers.cli", *archive_argv(cp, tmp_path / "a", 5)]
    quiet, verbose = run(base, {}), run([*base, "-v"], {})
    error_only = run([*base, "-v", "--log-level", "error"], {})
    assert quiet.returncode == verbose.returncode == error_only.returncode == 0
    assert " INFO " not in quiet.stderr and " INFO " not in error_only.stderr
    assert " INFO workers.runner" in verbose.stderr

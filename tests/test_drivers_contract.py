"""One pipeline, two drivers: the same scenarios through the embedded runner and Celery.

Each scenario builds the same checkpoint tree twice, runs it once through the embedded
runner (`workers.runner.run`, in a subprocess so a crash point or a dropped capability
only affects that process) and once through real Celery workers on a real redis-server
(`distributed_harness.Deployment`), then compares field by field: every cluster report
(run ids, times and absolute roots normalised), every archive file (rows and footer
commit record), the checkpoint tree left behind and the metrics each cluster reached.

Where the drivers used to differ, this file states the one behaviour both must have:

- a host whose load fails as a whole is reported as `cluster/host` (no root: roots are
  each worker's configuration and may differ between machines); no tree makes a load
  raise the same way in both drivers, so `ClusterRun` is checked for it directly;
- recovery runs once per cluster, before any load, and counts its deletions once;
- a cluster skipped because another run holds it reaches the metrics;
- deletions are checked against the published archive's listing in both.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.distributed_harness import Deployment
from tests.fixtures_redis import drop_dac_prefix, wait_until, worker_argv
from tests.helpers import archive_argv, archive_rows, clean_env, snapshot
from workers import metrics, sink
from workers.generate import Level, Metric, write_checkpoint
from workers.locks import DirectoryLock

pytestmark = [pytest.mark.timeout(300), pytest.mark.distributed, pytest.mark.slow]

CUTOFF = 2_000_000
LATER = 2_100_000
NEVER = 4_000_000_000
TREE = {"alpha": ["h1", "h2", "h3"], "beta": ["n1", "n2"]}

#: Runs the embedded driver in a fresh process; prints the reports as JSON.
EMBEDDED = """
import json, sys
from workers import metrics, runner
args = json.loads(sys.argv[1])
metrics.set_textfile(args.pop("textfile"))
reports = runner.run(runner.RunOptions(**args))
print(json.dumps([r.to_dict() for r in reports]))
"""


# --- trees ----------------------------------------------------------------------------------


def _level(seed: int, start: int) -> Level:
    rng = np.random.default_rng(seed)

    def series() -> Metric:
        v = np.round(rng.uniform(0, 100, 20), 1)
        v[::5] = np.nan
        return Metric(60, start, v)

    return Level(
        metrics={"cpu_load": series()},
        children={"socket0": Level(metrics={"mem_bw": series()})},
    )


def _write(path: Path, seed: int, ts: int, fmt: str = "json") -> None:
    write_checkpoint(path, _level(seed, ts), ts, ts + 1800, fmt)


def base_tree(checkpoints: Path) -> None:
    """Two clusters; per host two selected files (JSON and binary) and one never selected."""
    seed = 0
    for cluster, hosts in TREE.items():
        for host in hosts:
            d = checkpoints / cluster / host
            for k, ts in enumerate((CUTOFF - 3600, CUTOFF - 1800)):
                seed += 1
                _write(d / f"{ts}.{('json', 'bin')[k]}", seed, ts, ("json", "bin")[k])
            _write(d / f"{NEVER}.json", 1000 + seed, NEVER)
            (d / "current.wal").write_bytes(b"\x00wal")


def bad_file_tree(checkpoints: Path) -> None:
    """The base tree plus, on alpha/h2, a corrupt JSON file and a file whose stem is no number."""
    base_tree(checkpoints)
    (checkpoints / "alpha" / "h2" / f"{CUTOFF - 900}.json").write_text('{"metrics": {')
    (checkpoints / "alpha" / "h2" / "abc.json").write_text("{}")


def unreadable_host_tree(checkpoints: Path) -> None:
    """The base tree with alpha/h3 unreadable: reported, the rest of alpha archived."""
    base_tree(checkpoints)
    (checkpoints / "alpha" / "h3").chmod(0)


def crash_after_commit(checkpoints: Path, archive: Path, env: dict[str, str]) -> None:
    """An embedded run killed right after publishing alpha's archive: alpha's files are
    committed and not deleted; then a newer file arrives on alpha/h1 for the next run."""
    fault = checkpoints.parent / "fault"
    fault.write_text("finalize:committed")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            *archive_argv(checkpoints, archive, CUTOFF, 1),
            "--cluster",
            "alpha",
        ],
        env={**env, "CCARCHIVE_FAULT_FILE": str(fault)},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]  # SIGKILL at the crash point
    assert not fault.exists()
    assert list((archive / "alpha").glob("*.parquet"))  # committed ...
    assert (checkpoints / "alpha" / "h1" / f"{CUTOFF - 3600}.json").exists()  # ... not deleted
    _write(checkpoints / "alpha" / "h1" / f"{CUTOFF + 600}.json", 777, CUTOFF + 600)


@dataclass(frozen=True)
class Scenario:
    """A tree, the run's cutoff and mode, and what the test does around the run."""

    name: str
    build: Callable[[Path], None]
    cutoff: int = CUTOFF
    mode: str = "archive"
    locked: str | None = None  # a cluster another run holds during the run
    crashed_before: bool = False  # an earlier run committed alpha and died (recovery)
    needs_dac_drop: bool = False


SCENARIOS = [
    Scenario("normal", base_tree),
    Scenario("bad-file", bad_file_tree),
    Scenario("unreadable-host", unreadable_host_tree, needs_dac_drop=True),
    Scenario("locked", base_tree, locked="beta"),
    Scenario("recovery", base_tree, cutoff=LATER, crashed_before=True),
    Scenario("delete-mode", base_tree, mode="delete"),
]


# --- what a run left, normalised --------------------------------------------------------------


def _normal(text: str, roots: list[Path]) -> str:
    for root in roots:
        text = text.replace(str(root), "<ROOT>")
    text = re.sub(r"\b\d+-\d{8}T\d{6}-[0-9a-f]{8}\b", "<RUN>", text)  # run ids
    text = re.sub(r"load failed after \d+ attempts: ", "", text)  # retries: Celery's own
    return text


def normal_report(report: dict[str, Any], roots: list[Path]) -> dict[str, Any]:
    """A report without run id and time, roots replaced; a skip's reason only as `skipped`."""
    out = {k: v for k, v in report.items() if k not in ("run_id", "seconds")}
    out["archive"] = report["archive"] and _normal(report["archive"], roots)
    out["bad"] = sorted(
        (_normal(b["path"], roots), _normal(b["reason"], roots)) for b in report["bad"]
    )
    # Who holds a lock is said differently by a flock and a Redis key: that it skipped is the contract.
    out["errors"] = [
        "skipped" if e.startswith("skipped:") else _normal(e, roots) for e in report["errors"]
    ]
    return out


def archives(archive: Path) -> dict[str, Any]:
    """Per archive file: its rows and its footer's commit record without run-specific ids."""
    out: dict[str, Any] = {}
    for path in sorted(archive.rglob("*.parquet")):
        sources = sink.footer_sources(sink.read_footer(str(path)))
        out[str(path.relative_to(archive))] = {
            "rows": archive_rows(path),
            "sources": {
                host: sorted(
                    (f["name"], f["size"], f.get("rows"), f.get("digest")) for f in e["files"]
                )
                for host, e in sources.items()
            },
        }
    leftovers = [p for p in archive.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    assert not leftovers, leftovers  # no partial file under the archive root
    return out


def metric_deltas(before: metrics.Series, after: metrics.Series) -> dict[str, float]:
    """The counters a run moved: runs by outcome, files archived and deleted, bad files."""
    wanted = (
        "ccarchive_runs_total",
        "ccarchive_files_archived_total",
        "ccarchive_files_deleted_total",
        "ccarchive_bad_files_total",
    )
    out = {}
    for key, value in after.items():
        if key[0] in wanted and value != before.get(key, 0.0):
            out[f"{key[0]}{dict(key[1])}"] = value - before.get(key, 0.0)
    return out


@dataclass
class Outcome:
    """What one driver left: reports per cluster, archives, the tree, metric deltas."""

    reports: dict[str, dict[str, Any]]
    archives: dict[str, Any]
    tree: dict[str, bytes | None]
    metrics: dict[str, float]


def _tree(checkpoints: Path) -> dict[str, bytes | None]:
    for d in checkpoints.rglob("*"):
        if d.is_dir():
            d.chmod(0o755)  # the unreadable host: snapshot it (and let pytest remove it)
    return snapshot(checkpoints)


# --- the drivers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dac_prefix() -> list[str]:
    """How to start a process that file permissions apply to (root drops two capabilities)."""
    prefix = drop_dac_prefix()
    return prefix if prefix is not None else []


@pytest.fixture(scope="module")
def celery(tmp_path_factory: pytest.TempPathFactory, dac_prefix: list[str]) -> Iterator[Deployment]:
    """One worker (one process: the metrics textfile sees one writer) on a real redis-server."""
    root = tmp_path_factory.mktemp("contract-celery")
    d = Deployment(root, env={"CCARCHIVE_METRICS_TEXTFILE": str(root / "metrics.prom")})
    try:
        argv = [*dac_prefix, *worker_argv("w1", ["celery"], 1)]
        d.workers["w1"] = d.procs.start("w1", argv, d.env)
        d.wait_workers(["w1"])
        yield d
    finally:
        d.close()


def _reset(*dirs: Path) -> None:
    for d in dirs:
        if d.exists():
            for p in d.rglob("*"):
                if p.is_dir():
                    p.chmod(0o755)
            subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir(parents=True)


def run_embedded(s: Scenario, root: Path, prefix: list[str]) -> Outcome:
    """The scenario through `runner.run` in a fresh process (its own metrics textfile)."""
    checkpoints, archive = root / "checkpoints", root / "archive"
    _reset(checkpoints, archive)
    s.build(checkpoints)
    env = clean_env()
    if s.crashed_before:
        crash_after_commit(checkpoints, archive, env)
    textfile = root / "metrics.prom"
    args = {
        "checkpoints": str(checkpoints),
        "archive": str(archive) if s.mode == "archive" else None,
        "cutoff": s.cutoff,
        "mode": s.mode,
        "workers": 2,
        "textfile": str(textfile),
    }
    lock = DirectoryLock(checkpoints / s.locked) if s.locked else None
    if lock is not None:
        lock.acquire()
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", EMBEDDED, json.dumps(args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if lock is not None:
            lock.release()
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    return Outcome(
        {r["cluster"]: normal_report(r, [checkpoints, archive]) for r in reports},
        archives(archive),
        _tree(checkpoints),
        metric_deltas({}, metrics.read_textfile(str(textfile))),
    )


def run_celery(s: Scenario, d: Deployment) -> Outcome:
    """The scenario through `ccarchive.plan` on the Celery workers; waits for every report."""
    checkpoints, archive = d.checkpoints, Path(d.archive)
    _reset(checkpoints, archive)
    s.build(checkpoints)
    if s.crashed_before:
        crash_after_commit(checkpoints, archive, clean_env())
    textfile = d.env["CCARCHIVE_METRICS_TEXTFILE"]
    before = metrics.read_textfile(textfile)
    client = d.redis.client()
    if s.locked:
        client.set(f"ccarchive:lock:{s.locked}", "1999999-20260101T000000-0badc0de", px=60_000)
    try:
        planned = d.result(d.send_plan(s.cutoff, mode=s.mode))
        assert "error" not in planned, planned
        run_id = planned["run_id"]

        def mine() -> list[dict[str, Any]] | None:
            got = [r for r in d.reports() if r["run_id"] == run_id]
            return got if len(got) == len(TREE) else None

        reports = wait_until(mine, 90, f"the reports of run {run_id}", interval=0.2)
        d.wait_quiet(locks=False)
    finally:
        client.delete(f"ccarchive:lock:{s.locked}")
    return Outcome(
        {r["cluster"]: normal_report(r, [checkpoints, archive]) for r in reports},
        archives(archive),
        _tree(checkpoints),
        metric_deltas(before, metrics.read_textfile(textfile)),
    )


# --- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_both_drivers_agree(
    scenario: Scenario, celery: Deployment, tmp_path: Path, dac_prefix: list[str]
) -> None:
    """Reports, archives, the tree left behind and the metrics are the same in both drivers."""
    if scenario.needs_dac_drop and os.geteuid() == 0 and not dac_prefix:
        pytest.skip("running as root without setpriv: cannot make a directory unreadable")
    embedded = run_embedded(scenario, tmp_path / "embedded", dac_prefix)
    distributed = run_celery(scenario, celery)

    assert sorted(embedded.reports) == sorted(TREE)
    for cluster in TREE:
        assert embedded.reports[cluster] == distributed.reports[cluster], cluster
    assert embedded.archives == distributed.archives
    assert embedded.tree == distributed.tree
    assert embedded.metrics == distributed.metrics
    check_scenario(scenario, embedded)


def check_scenario(s: Scenario, out: Outcome) -> None:
    """What each scenario must show, beyond the two drivers agreeing."""
    alpha, beta = out.reports["alpha"], out.reports["beta"]
    runs = {k: v for k, v in out.metrics.items() if k.startswith("ccarchive_runs_total")}
    if s.name == "normal":
        assert alpha["files_archived"] == alpha["files_deleted"] == 6 and alpha["errors"] == []
        assert beta["files_archived"] == beta["files_deleted"] == 4 and beta["bad"] == []
        assert len(out.archives) == 2
    elif s.name == "bad-file":
        paths = [p for p, _ in alpha["bad"]]
        assert paths == [f"<ROOT>/alpha/h2/{CUTOFF - 900}.json", "<ROOT>/alpha/h2/abc.json"]
        assert alpha["files_archived"] == 6
    elif s.name == "unreadable-host":
        assert alpha["bad"] == [("<ROOT>/alpha/h3", "cannot list: Permission denied")]
        assert alpha["files_archived"] == alpha["files_deleted"] == 4
    elif s.name == "locked":
        # (c) the skipped cluster reaches the metrics, as an error run.
        assert beta["errors"] == ["skipped"] and beta["files_archived"] == 0
        assert runs == {
            "ccarchive_runs_total{'cluster': 'alpha', 'outcome': 'ok'}": 1.0,
            "ccarchive_runs_total{'cluster': 'beta', 'outcome': 'error'}": 1.0,
        }
    elif s.name == "recovery":
        # (b) recovery once per cluster: alpha's 6 committed files deleted once, counted once;
        # only the newer file is archived again.
        assert alpha["files_deleted"] == 7 and alpha["files_archived"] == 1
        assert beta["files_archived"] == beta["files_deleted"] == 4
        assert sorted(out.archives) == [
            f"alpha/{CUTOFF}.parquet",
            f"alpha/{LATER}.parquet",
            f"beta/{LATER}.parquet",
        ]
    elif s.name == "delete-mode":
        assert alpha["files_deleted"] == 6 and alpha["files_archived"] == 0
        assert out.archives == {}
    assert set(runs) >= {
        f"ccarchive_runs_total{{'cluster': '{c}', 'outcome': '{_outcome(r)}'}}"
        for c, r in out.reports.items()
    }


def _outcome(report: dict[str, Any]) -> str:
    return "error" if report["errors"] else "reported" if report["bad"] else "ok"


# --- the shared object itself -------------------------------------------------------------------


def test_a_failed_load_is_named_by_cluster_and_host_and_the_run_survives_a_message() -> None:
    """(a) in the one place both drivers record it; and a chord callback's rebuild of the
    run from its message loses nothing a later stage needs."""
    from workers.pipeline import ClusterRun, failed_load
    from workers.recovery import Recovery

    run = ClusterRun.begin("alpha", CUTOFF, "r1", ["h1", "h2"], mode="archive", started=5.0)
    found = Recovery("alpha", deleted=["/cp/alpha/h1/1.json"], exclude={"h2": ["2.json"]})
    run.recovered(found)
    assert run.loaded("h1", error="OSError: boom") is None
    rebuilt = ClusterRun.from_message(json.loads(json.dumps(run.to_message())))
    assert rebuilt.to_message() == run.to_message()
    assert rebuilt.report.bad[0].path == "alpha/h1"  # no root: roots are configuration
    assert rebuilt.report.files_deleted == 1 and rebuilt.exclude == {"h2": ["2.json"]}
    assert failed_load("alpha", "h1", CUTOFF, "r1", "x").bad[0].path == "alpha/h1"
    assert failed_load("..", "h1\n", CUTOFF, "r1", "x").bad[0].path == "cluster '..', host 'h1\\n'"
    assert rebuilt.finalized(error="OSError: disk full") == []  # nothing may be deleted
    assert rebuilt.report.errors == ["archive not written, all files kept: OSError: disk full"]

"""Distributed vs embedded on the same data: rows/s, and the chord callback's share of a run.

    .venv/bin/python -m bench.celery_vs_embedded [--hosts 16] [--samples 720] [--repeat 3]

The tree is the core benchmark's (bench/run.py): `generate_tree(root, ["fritz"], hosts,
fmt="json", samples=720, seed=1)`, ~0.7 M values per host. Each run starts from a fresh
copy of it (copying is not timed) and archives everything (cutoff = now). Measured:

- embedded: `runner.run` with 1 and 2 worker processes, wall time of the whole run, and
  finalize's time as the gap between the last "loaded" and the "finalized" progress event;
- celery: a real redis-server and one `celery -A workers worker -c N` (prefork) with
  N = 1 and 2, a run submitted like `ccarchive archive --broker` (`remote.submit`), wall
  time from sending the planning task to the last cluster report (the client's own
  start-up, ~0.5 s for its first broker round trips, is recorded apart as
  `client_seconds`); plus the time finalize (the chord callback: stream chunks to
  Parquet, verify, publish) spends inside its task body.

All processes started here are stopped by pid before the script ends. Results go to
bench/results/celery_vs_embedded-<time>.json and stdout (a markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CELERY = str(Path(sys.executable).parent / "celery")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM by pid; SIGKILL the process group (started with its own session) if needed."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=log.parent,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _fresh(pristine: Path, work: Path) -> dict[str, Path]:
    """A new copy of the tree and empty archive/staging directories."""
    shutil.rmtree(work, ignore_errors=True)
    dirs = {
        "checkpoints": work / "checkpoints",
        "archive": work / "archive",
        "staging": work / "staging",
    }
    shutil.copytree(pristine, dirs["checkpoints"])
    dirs["archive"].mkdir()
    dirs["staging"].mkdir()
    return dirs


def run_embedded(pristine: Path, work: Path, workers: int, cutoff: int) -> dict[str, Any]:
    """One embedded run; wall seconds and rows."""
    from workers.runner import RunOptions, run

    d = _fresh(pristine, work)
    seen: dict[str, float] = {}

    def progress(event: str, _cluster: str, _detail: dict[str, Any]) -> None:
        # One cluster: finalize runs between the last "loaded" and "finalized".
        seen[event] = time.perf_counter()

    t0 = time.perf_counter()
    reports = run(
        RunOptions(
            checkpoints=str(d["checkpoints"]),
            cutoff=cutoff,
            archive=str(d["archive"]),
            workers=workers,
            staging=str(d["staging"]),
        ),
        progress,
    )
    seconds = time.perf_counter() - t0
    assert all(r.ok for r in reports), [r.errors + [b.reason for b in r.bad] for r in reports]
    finalize = seen["finalized"] - seen["loaded"]
    return {
        "seconds": seconds,
        "rows": sum(r.rows for r in reports),
        "finalize_seconds": finalize,
        "finalize_share": finalize / seconds,
    }


def run_celery(
    pristine: Path, work: Path, workers: int, cutoff: int, redis_url: str
) -> dict[str, Any]:
    """One run through Redis and a worker with `workers` processes (started and stopped here)."""
    from workers.config import Settings
    from workers.distributed.app import make_app
    from workers.distributed.remote import submit

    d = _fresh(pristine, work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCARCHIVE_")}
    env.update(
        CCARCHIVE_BROKER_URL=redis_url,
        CCARCHIVE_CHECKPOINTS=str(d["checkpoints"]),
        CCARCHIVE_ARCHIVE=str(d["archive"]),
        CCARCHIVE_STAGING=str(d["staging"]),
    )
    worker = _start(
        [
            CELERY,
            "-A",
            "workers",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(workers),
            "--without-mingle",
            "--without-gossip",
            "-l",
            os.environ.get("BENCH_WORKER_LOG", "WARNING"),  # INFO: task runtimes in worker.log
        ],
        env,
        work / "worker.log",
    )
    try:
        app = make_app(Settings(broker_url=redis_url))
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "worker.log").read_text()[-3000:])
        app.close()
        t0 = time.perf_counter()
        result = submit(Settings(broker_url=redis_url), cutoff, "archive")
        total = time.perf_counter() - t0
        # The run: from sending the planning task to the last report. `total` adds the
        # client's connection set-up and worker check (a ping, ~0.5 s for a new client).
        seconds = result.seconds
    finally:
        _stop(worker)
    assert not result.errors and all(r.ok for r in result.reports), result
    finalize = sum(result.finalize_seconds.values())
    return {
        "seconds": seconds,
        "client_seconds": total,
        "rows": sum(r.rows for r in result.reports),
        "finalize_seconds": finalize,
        "finalize_share": finalize / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    """Generate the tree, run every configuration `--repeat` times, print medians."""
    p = argparse.ArgumentParser(prog="python -m bench.celery_vs_embedded")
    p.add_argument("--hosts", type=int, default=16)
    p.add_argument("--samples", type=int, default=720)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    opts = p.parse_args(argv)

    from workers.generate import generate_tree

    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    base = Path(opts.workdir or tempfile.mkdtemp(prefix="ccarchive-celery-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    pristine = base / "tree"
    shutil.rmtree(pristine, ignore_errors=True)
    tree = generate_tree(
        pristine,
        ["fritz"],
        hosts=opts.hosts,
        fmt="json",
        samples=opts.samples,
        seed=opts.seed,
        workers=os.cpu_count() or 1,
    )
    print(
        f"tree: {tree.hosts} hosts, {tree.files} files, {tree.values:,} rows, {tree.bytes:,} bytes"
    )
    cutoff = int(time.time())
    port = _free_port()
    redis = _start(
        [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        dict(os.environ),
        base / "redis.log",
    )
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        time.sleep(0.5)
        for name, fn in (
            ("embedded, 1 process", lambda: run_embedded(pristine, base / "work", 1, cutoff)),
            ("embedded, 2 processes", lambda: run_embedded(pristine, base / "work", 2, cutoff)),
            (
                "celery, 1 worker process",
                lambda: run_celery(
                    pristine, base / "work", 1, cutoff, f"redis://127.0.0.1:{port}/0"
                ),
            ),
            (
                "celery, 2 worker processes",
                lambda: run_celery(
                    pristine, base / "work", 2, cutoff, f"redis://127.0.0.1:{port}/0"
                ),
            ),
        ):
            results[name] = []
            for i in range(opts.repeat):
                r = fn()
                results[name].append(r)
                print(f"  {name} #{i + 1}: {r['seconds']:.2f} s", flush=True)
    finally:
        _stop(redis)
        if opts.workdir is None:
            shutil.rmtree(base, ignore_errors=True)

    lines = [
        f"{tree.hosts} hosts x {opts.samples} samples, {tree.values:,} rows, "
        f"{os.cpu_count()} cores, median of {opts.repeat}",
        "",
        "| run | seconds | rows/s | finalize (chord callback) s | share of run |",
        "|---|---:|---:|---:|---:|",
    ]
    summary: dict[str, Any] = {}
    for name, runs in results.items():
        med = statistics.median(r["seconds"] for r in runs)
        rows = runs[0]["rows"]
        fin = [r["finalize_seconds"] for r in runs if "finalize_seconds" in r]
        fin_s = statistics.median(fin) if fin else None
        share = statistics.median(r["finalize_share"] for r in runs) if fin else None
        summary[name] = {
            "seconds": med,
            "rows": rows,
            "rows_per_s": rows / med,
            "finalize_seconds": fin_s,
            "finalize_share": share,
            "runs": runs,
        }
        lines.append(
            f"| {name} | {med:.2f} | {rows / med:,.0f} | "
            f"{'-' if fin_s is None else f'{fin_s:.2f}'} | "
            f"{'-' if share is None else f'{share:.0%}'} |"
        )
    print("\n" + "\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"celery_vs_embedded-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {"hosts": tree.hosts, "samples": opts.samples, "rows": tree.values, "results": summary},
            indent=1,
        )
    )
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

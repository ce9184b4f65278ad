"""Where the peak RSS of an embedded run goes: per step, and whole processes against Go.

    python -m bench.memory [--trees a,b] [--turns 5] [--go PATH] [--steps-only | --whole-only]
                           [--sides ours,go] [--env NAME=VALUE] [--json FILE]

Trees are the side-by-side trees of `bench.vs_go` (`--root`, default /tmp/ccarchive-vsgo:
`tree-a` 16 hosts of JSON, `tree-b` the same in binary, cluster `fritz`, `cutoff` selecting
every file). Two kinds of figures, medians over `--turns`:

- **steps**, each turn in a fresh interpreter (`python -m bench.memory --child ...`): the
  RSS after the imports a CLI run pays, then the peak above the RSS before each step
  (VmHWM after `clear_refs` 5 resets it; Linux only): `read_host` of the tree's largest host,
  the Parquet write of that host's rows (one row group), and a direct embedded run,
  every host read then written at once (`read_host` + `HeldRows` + `finalize_streaming`,
  what `--workers 1` is to do). CPU is `time.process_time()` of the step.
- **whole**: `ccarchive archive --workers 1` and the Go archiver (`-workers 1`) as whole
  processes on a fresh copy of the tree: CPU (user + system), wall, peak RSS as GNU time
  reports it.

`CCARCHIVE_MALLOC_TUNING` and `MALLOC_*` variables pass through to the children, so the
allocator settings can be compared (`--env CCARCHIVE_MALLOC_TUNING=0`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLUSTER = "fritz"
TIME = "/usr/bin/time"


def _status(key: str) -> float:
    """A /proc/self/status figure in MB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    # Linux >= 4.0: VmHWM becomes the current RSS, so the next peak is the step's own.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _largest_host(tree: str) -> str:
    hosts = Path(tree, CLUSTER)
    return max(
        sorted(p.name for p in hosts.iterdir()),
        key=lambda h: sum(f.stat().st_size for f in (hosts / h).iterdir()),
    )


def child(step: str, tree: str, cutoff: int) -> dict[str, Any]:
    """One measurement in this (fresh) process; returns MB and CPU seconds."""
    import importlib

    for name in ("workers.runner", "workers.cli"):  # what a CLI run imports before any file
        importlib.import_module(name)
    import pyarrow as pa

    from workers import sink, steps
    from workers.alloc import tune_allocator
    from workers.manifest import HostManifest

    tune_allocator()
    out: dict[str, Any] = {"imports_mb": _status("VmRSS")}
    work = Path(tempfile.mkdtemp(prefix="ccmem"))
    try:
        if step in ("read", "write"):
            host = _largest_host(tree)
            before = _status("VmRSS")
            _reset_peak()
            cpu = time.process_time()
            manifest, table = steps.read_host(tree, CLUSTER, host, cutoff, "r1")
            out["read_cpu"] = time.process_time() - cpu
            out["read_peak_mb"] = _status("VmHWM") - before
            out["read_kept_mb"] = _status("VmRSS") - before
            out["table_mb"] = table.nbytes / 2**20
            out["rows"] = manifest.rows
            if step == "write":
                before = _status("VmRSS")
                _reset_peak()
                cpu = time.process_time()
                with open(work / "one.parquet", "wb") as f:
                    sink.write_parquet(
                        f, CLUSTER, [(host, iter(table.to_batches()))], dict, sink.ParquetOptions()
                    )
                out["write_cpu"] = time.process_time() - cpu
                out["write_peak_mb"] = _status("VmHWM") - before
        elif step == "direct":
            hosts = sorted(p.name for p in Path(tree, CLUSTER).iterdir())
            held = steps.HeldRows()
            before = _status("VmRSS")
            _reset_peak()
            cpu = time.process_time()

            def manifests() -> Iterator[HostManifest]:
                for host in hosts:
                    yield held.hold(*steps.read_host(tree, CLUSTER, host, cutoff, "r1"))

            info = steps.finalize_streaming(
                CLUSTER, cutoff, "r1", manifests(), str(work), rows_of=held
            )
            out["direct_cpu"] = time.process_time() - cpu
            out["direct_peak_mb"] = _status("VmHWM") - before
            out["direct_process_mb"] = _status("VmHWM")
            out["rows"] = info.rows if info else 0
            out["bytes"] = info.bytes if info else 0
        out["pool_max_mb"] = pa.default_memory_pool().max_memory() / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _run_child(step: str, tree: str, cutoff: int, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.memory", "--child", step, tree, str(cutoff)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def _whole(side: str, tree: str, cutoff: int, go: str, env: dict[str, str]) -> dict[str, Any]:
    """One whole process on a fresh copy of the tree: cpu, wall, peak RSS (MB), bytes."""
    work = Path(tempfile.mkdtemp(prefix="ccmemw"))
    try:
        shutil.copytree(tree, work / "tree")
        (work / "arch").mkdir()
        if side == "ours":
            cmd = [sys.executable, "-m", "workers.cli", "archive", "--checkpoints"]
            cmd += [str(work / "tree"), "--archive", str(work / "arch")]
            cmd += ["--cutoff", str(cutoff), "--workers", "1"]
        else:
            cmd = [go, "-checkpoints", str(work / "tree"), "-archive", str(work / "arch")]
            cmd += ["-cutoff", str(cutoff), "-workers", "1", "-quiet"]
        timing = work / "time"
        started = time.perf_counter()
        subprocess.run(
            [TIME, "-f", "%U %S %M", "-o", str(timing), *cmd],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - started
        user, system, rss_kib = timing.read_text().split()[-3:]
        size = sum(p.stat().st_size for p in (work / "arch").rglob("*") if p.is_file())
        return {
            "cpu": float(user) + float(system),
            "wall": wall,
            "rss_mb": int(rss_kib) / 1024,
            "bytes": size,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _medians(turns: list[dict[str, Any]]) -> dict[str, float]:
    keys = turns[0].keys()
    return {k: statistics.median(t[k] for t in turns) for k in keys}


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print one line per figure (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, metavar=("STEP", "TREE", "CUTOFF"), help=argparse.SUPPRESS)
    p.add_argument("--root", default="/tmp/ccarchive-vsgo")
    p.add_argument("--trees", default="a,b")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--go", default=os.environ.get("GOREF", "/work/gobuild/goref"))
    p.add_argument("--steps-only", action="store_true")
    p.add_argument("--whole-only", action="store_true")
    p.add_argument("--sides", default="ours,go", help="whole processes to run")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the children")
    p.add_argument("--json", type=Path, help="write every turn here")
    opts = p.parse_args(argv)
    if opts.child:
        step, tree, cutoff = opts.child
        print(json.dumps(child(step, tree, int(cutoff))))
        return 0
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(kv.split("=", 1) for kv in opts.env)
    cutoff = int(Path(opts.root, "cutoff").read_text())
    results: dict[str, Any] = {}
    for key in opts.trees.split(","):
        tree = str(Path(opts.root, f"tree-{key}"))
        if not opts.whole_only:
            for step in ("write", "direct"):
                turns = [_run_child(step, tree, cutoff, env) for _ in range(opts.turns)]
                results[f"{key}:{step}"] = {"median": _medians(turns), "turns": turns}
                med = results[f"{key}:{step}"]["median"]
                print(f"tree-{key} {step}: " + " ".join(f"{k}={v:.3f}" for k, v in med.items()))
        if not opts.steps_only:
            for side in opts.sides.split(","):
                turns = []
                for _ in range(opts.turns):
                    turns.append(_whole(side, tree, cutoff, opts.go, env))
                results[f"{key}:whole:{side}"] = {"median": _medians(turns), "turns": turns}
                med = results[f"{key}:whole:{side}"]["median"]
                print(
                    f"tree-{key} whole {side}: cpu={med['cpu']:.2f}s wall={med['wall']:.2f}s "
                    f"rss={med['rss_mb']:.0f}MB bytes={med['bytes']:.0f}"
                )
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Finalize's rows per CPU-second on big and small row groups, per-host load cost, and the
wall time of one run of a large cluster on 1 to 64 storage nodes (docs/scaling.md).

    python -m bench.finalize_rate                  # 4 trees, 3 turns each, ~3 min on 2 cores
    python -m bench.finalize_rate --turns 5 --json bench/results/finalize_rate.json
    python -m bench.finalize_rate --render bench/results/finalize_rate.json --readme

Every step runs in a fresh interpreter through `bench.probes` (load: `steps.load_host` for
every host; finalize: `steps.finalize_cluster` from the staged chunks), timed with the
process's CPU time (`time.process_time`, all threads) and wall time. The machine is shared
(2 cores, other engineers' jobs): wall time is reported but the model uses CPU seconds,
and the load average around each step is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import _machine, _probe, write_section
from bench.scaling_model import Costs, render_model
from bench.shapes import FINALIZE_ON, TREES, generate
from bench.stitch import measure as measure_stitch
from bench.stitch import render as stitch_table

MARK_START = "<!-- finalize-rate:start -->"
MARK_END = "<!-- finalize-rate:end -->"


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def measure_tree(name: str, work: Path, cutoff: int, turns: int) -> dict[str, Any]:
    """Load (and, for FINALIZE_ON, finalize) one tree `turns` times, each in a fresh process."""
    desc, kwargs = TREES[name]
    tree = work / f"tree-{name}"
    print(f"{name}: generating ({desc}) ...", flush=True)
    gen = generate(tree, **kwargs)
    staging, archive = work / f"staging-{name}", work / f"archive-{name}"
    manifests = work / f"manifests-{name}.json"
    load_args = {
        "tree": str(tree),
        "cutoff": cutoff,
        "staging": str(staging),
        "run_id": "bench",
        "manifests": str(manifests),
    }
    fin_args = {"manifests": str(manifests), "cutoff": cutoff, "run_id": "bench"}
    loads: list[dict[str, Any]] = []
    finals: list[dict[str, Any]] = []
    for turn in range(turns):
        shutil.rmtree(staging, ignore_errors=True)
        load = _probe("load", load_args)
        load["loadavg"] = os.getloadavg()[0]
        loads.append(load)
        if name in FINALIZE_ON:
            shutil.rmtree(archive, ignore_errors=True)
            fin = _probe("finalize", {**fin_args, "archive": str(archive)})
            fin["loadavg"] = os.getloadavg()[0]
            finals.append(fin)
        print(
            f"  turn {turn + 1}: load {load['cpu']:.2f} CPU-s / {load['wall']:.2f} s"
            + (
                f", finalize {finals[-1]['cpu']:.2f} CPU-s / {finals[-1]['wall']:.2f} s"
                if finals
                else ""
            )
            + f" (load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    rows, hosts = gen["rows"], gen["hosts"]
    out: dict[str, Any] = {
        "description": desc,
        "rows": rows,
        "hosts": hosts,
        "rows_per_host": rows / hosts,
        "input_bytes": gen["bytes"],
        "chunk_bytes_per_row": loads[-1]["chunk_bytes"] / rows,
        "load_cpu": _median(loads, "cpu"),
        "load_wall": _median(loads, "wall"),
        "load_cpu_all": [r["cpu"] for r in loads],
        "loadavg": [r["loadavg"] for r in loads + finals],
    }
    out["load_cpu_per_host"] = out["load_cpu"] / hosts
    out["load_cpu_per_row"] = out["load_cpu"] / rows
    if finals:
        out.update(
            finalize_cpu=_median(finals, "cpu"),
            finalize_wall=_median(finals, "wall"),
            finalize_cpu_all=[r["cpu"] for r in finals],
            finalize_rss_mb=max(r["rss_mb"] for r in finals),
            archive_bytes_per_row=finals[-1]["bytes_out"] / finals[-1]["rows_out"],
        )
        out["finalize_rows_per_cpu_s"] = rows / out["finalize_cpu"]
        out["finalize_rows_per_wall_s"] = rows / out["finalize_wall"]
    for path in (tree, staging, archive):
        shutil.rmtree(path, ignore_errors=True)
    return out


def render(res: dict[str, Any]) -> str:
    """The measurement as Markdown tables, then the model's table."""
    m = res["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores (shared), "
        f"Python {m['python']}, pyarrow {m['pyarrow']}. Medians of {res['turns']} turns, "
        "each step a fresh process; CPU = the process's CPU time.",
        "",
        "| tree | rows | rows / host (= row group) | load CPU-s / host | load µs / row "
        "| finalize M rows / CPU-s | finalize M rows / wall-s | chunk bytes / row | load average |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, t in res["trees"].items():
        fin = (
            f"{t['finalize_rows_per_cpu_s'] / 1e6:.2f} | {t['finalize_rows_per_wall_s'] / 1e6:.2f}"
            if "finalize_cpu" in t
            else "| "
        )
        avg = f"{min(t['loadavg']):.1f}-{max(t['loadavg']):.1f}"
        lines.append(
            f"| {name}: {t['description']} | {t['rows']:,} | {t['rows_per_host']:,.0f} "
            f"| {t['load_cpu_per_host']:.3f} | {t['load_cpu_per_row'] * 1e6:.3f} | {fin} "
            f"| {t['chunk_bytes_per_row']:.2f} | {avg} |"
        )
    if res.get("stitch"):
        lines += [
            "",
            "Prototype (bench/stitch.py): each host's row group written alone, then stitched.",
            "",
            stitch_table(res["stitch"]),
        ]
    lines += ["", render_model(costs_from(res))]
    return "\n".join(lines)


def costs_from(res: dict[str, Any]) -> dict[str, Costs]:
    """The model's inputs per input shape, from measured trees."""
    trees = res["trees"]
    out = {}
    stitched = {r["tree"]: r for r in res.get("stitch", [])}
    for label, load_tree, rows_tree in (
        ("12 h node files, binary", "big-bin", "big-bin"),
        ("12 h node files, JSON", "big-json", "big-bin"),  # same rows as big-bin
        ("hourly files (12 per host), mixed", "big-hourly", "big-hourly"),
    ):
        t, fin = trees[load_tree], trees[rows_tree]
        s = stitched.get(rows_tree)
        out[label] = Costs(
            load_s_per_row=t["load_cpu_per_row"],
            finalize_rows_per_s=fin["finalize_rows_per_cpu_s"],
            chunk_bytes_per_row=t["chunk_bytes_per_row"],
            archive_bytes_per_row=fin["archive_bytes_per_row"],
            encode_s_per_row=s["parts_cpu"] / s["rows"] if s else None,
            stitch_s_per_host=s["stitch_cpu"] / s["hosts"] if s else None,
            check_s_per_row=s["readback_cpu"] / s["rows"] if s and "readback_cpu" in s else 0.0,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Generate the trees, measure load and finalize, print the tables (and the model)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.finalize_rate", description=__doc__.splitlines()[0]
    )
    p.add_argument("--turns", type=int, default=3)
    p.add_argument(
        "--trees", default=",".join(TREES), help="comma-separated subset of " + ",".join(TREES)
    )
    p.add_argument("--workdir", default="/tmp/ccarchive-finalize-rate")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--readme", action="store_true", help="write the report into bench/README.md")
    p.add_argument(
        "--no-stitch", dest="stitch", action="store_false", help="skip bench/stitch.py's prototype"
    )
    p.add_argument("--render", help="print the report of an earlier --json file, measure nothing")
    opts = p.parse_args(argv)
    if opts.render:
        text = render(json.loads(Path(opts.render).read_text()))
        print(text)
        if opts.readme:
            write_section(text, MARK_START, MARK_END)
        return 0
    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cutoff = int(time.time())
    res: dict[str, Any] = {"machine": _machine(), "turns": opts.turns, "trees": {}}
    for name in opts.trees.split(","):
        res["trees"][name] = measure_tree(name, work, cutoff, opts.turns)
    if opts.stitch:
        res["stitch"] = [
            measure_stitch(name, work / f"stitch-{name}", 2)
            for name in FINALIZE_ON
            if name in res["trees"]
        ]
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(res, indent=1))
    text = render(res)
    print()
    print(text)
    if opts.readme:
        write_section(text, MARK_START, MARK_END)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

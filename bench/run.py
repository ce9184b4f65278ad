"""The benchmark harness: generate a realistic tree, measure every step, report ratios.

    .venv/bin/python -m bench.run [--hosts 16] [--quick] [--readme] [--baseline FILE]

Every figure of one report comes from the same run on the same machine, so the ratios
(ours vs the naive script, vs the parse-only and read-only limits) hold even where the
absolute numbers would not transfer. See bench/README.md for what each line means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
README = REPO / "bench" / "README.md"
RESULTS = REPO / "bench" / "results"
MARK_START = "<!-- results:start -->"
MARK_END = "<!-- results:end -->"

# Ratios against the upstream Go archiver are not made here: they come from running both
# programs in the same run (bench/vs_go.py), never from a figure measured elsewhere.


def _probe(name: str, args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.probes", name, json.dumps(args)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"probe {name} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _repeat(
    name: str, args: dict[str, Any], times: int, fresh: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Median (by CPU time) of `times` runs; `fresh` names directories emptied before each."""
    runs = []
    for _ in range(times):
        for key in fresh:
            shutil.rmtree(args[key], ignore_errors=True)
        runs.append(_probe(name, args))
    runs.sort(key=lambda r: r["cpu"])
    out = dict(runs[len(runs) // 2])
    out["runs"] = len(runs)
    out["cpu_all"] = [r["cpu"] for r in runs]
    return out


def _generate(root: Path, hosts: int, fmt: str, samples: int, seed: int) -> dict[str, Any]:
    from workers.generate import generate_tree

    shutil.rmtree(root, ignore_errors=True)
    s = generate_tree(
        root,
        ["fritz"],
        hosts=hosts,
        fmt=fmt,
        samples=samples,
        seed=seed,
        workers=os.cpu_count() or 1,
    )
    return {"rows": s.values, "bytes": s.bytes, "files": s.files, "hosts": s.hosts}


def _machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "numpy": version("numpy"),
        "pyarrow": version("pyarrow"),
        "orjson": version("orjson"),
    }


def measure(opts: argparse.Namespace) -> dict[str, Any]:
    """Generate the trees and run every probe; the raw results."""
    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cutoff = int(time.time())
    res: dict[str, Any] = {"machine": _machine(), "hosts": opts.hosts, "samples": opts.samples}
    if opts.scaling_only:
        res["scaling"] = scaling(opts, work, cutoff)
        return res
    print(f"generating {opts.hosts} hosts x {opts.samples} samples (json and bin) ...", flush=True)
    trees = {fmt: work / f"tree-{fmt}" for fmt in ("json", "bin")}
    gen = {fmt: _generate(trees[fmt], opts.hosts, fmt, opts.samples, opts.seed) for fmt in trees}
    res["tree"] = gen
    rows = gen["json"]["rows"]
    steps: dict[str, dict[str, Any]] = {}
    n = opts.repeat

    def step(key: str, name: str, args: dict[str, Any], fresh: tuple[str, ...] = ()) -> None:
        print(f"  {key} ...", end=" ", flush=True)
        r = _repeat(name, args, n, fresh)
        r.setdefault("rows_out", rows)
        steps[key] = r
        rate = "" if key == "noop" else f"{r['rows_out'] / r['cpu'] / 1e6:.2f} M rows/CPU-s, "
        print(f"{rate}{_peak(r):.0f} MB", flush=True)

    step("noop", "noop", {})
    for fmt, suffix in (("json", ".json"), ("bin", ".bin")):
        step(f"read_{fmt}", "read", {"tree": str(trees[fmt]), "suffix": suffix})
    step("parse_only_json", "parse_only", {"tree": str(trees["json"])})
    for fmt, suffix in (("json", ".json"), ("bin", ".bin")):
        step(f"decode_{fmt}", "decode", {"tree": str(trees[fmt]), "suffix": suffix})
    for fmt in ("json", "bin"):
        args = {
            "tree": str(trees[fmt]),
            "cutoff": cutoff,
            "staging": str(work / f"staging-{fmt}"),
            "run_id": "bench",
            "manifests": str(work / f"manifests-{fmt}.json"),
        }
        step(f"load_{fmt}", "load", args, fresh=("staging",))
    step(
        "finalize",
        "finalize",
        {
            "manifests": str(work / "manifests-json.json"),
            "cutoff": cutoff,
            "run_id": "bench",
            "archive": str(work / "archive-finalize"),
        },
        fresh=("archive",),
    )
    step(
        "pyarrow_write",
        "pyarrow_write",
        {"manifests": str(work / "manifests-json.json"), "out": str(work / "probe-write")},
    )
    print("  parquet settings sweep ...", flush=True)
    try:
        res["parquet_sweep"] = _probe(
            "parquet_sweep", {"manifests": str(work / "manifests-json.json")}
        )["variants"]
    except RuntimeError as exc:  # e.g. measuring an older tree without _writer_options
        print(f"    skipped: {str(exc).splitlines()[-1]}", flush=True)
    step("naive", "naive", {"tree": str(trees["json"]), "out": str(work / "naive-out")})
    for fmt in ("json", "bin"):
        for w in (1, 2):
            args = {
                "tree": str(trees[fmt]),
                "scratch": str(work / "scratch"),
                "cutoff": cutoff,
                "archive": str(work / f"archive-run-{fmt}-{w}"),
                "workers": w,
            }
            step(f"run_{fmt}_{w}w", "run", args)
    res["steps"] = steps
    if opts.scaling:
        res["scaling"] = scaling(opts, work, cutoff)
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def scaling(opts: argparse.Namespace, work: Path, cutoff: int) -> list[dict[str, Any]]:
    """Peak RSS of load and finalize as the cluster grows (same data per host)."""
    out = []
    for hosts in opts.scaling:
        print(f"scaling: {hosts} hosts ...", end=" ", flush=True)
        tree = work / "scale-tree"
        gen = _generate(tree, hosts, "bin", opts.scaling_samples, opts.seed)
        staging = work / "scale-staging"
        load_args: dict[str, Any] = {
            "tree": str(tree),
            "cutoff": cutoff,
            "staging": str(work / "scale-staging"),
            "run_id": "bench",
            "manifests": str(work / "scale-manifests.json"),
        }
        shutil.rmtree(staging, ignore_errors=True)
        ld = _probe("load", load_args)
        shutil.rmtree(tree)
        archive = work / "scale-archive"
        shutil.rmtree(archive, ignore_errors=True)
        fin = _probe(
            "finalize",
            {
                "manifests": load_args["manifests"],
                "cutoff": cutoff,
                "run_id": "bench",
                "archive": str(archive),
            },
        )
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(archive, ignore_errors=True)
        row = {
            "hosts": hosts,
            "rows": gen["rows"],
            "load_rss_mb": ld["rss_mb"],
            "finalize_rss_mb": fin["rss_mb"],
            "finalize_rows_per_cpu_s": fin["rows_out"] / fin["cpu"],
            "bytes_per_row": fin["bytes_out"] / fin["rows_out"],
        }
        out.append(row)
        print(f"load {ld['rss_mb']:.0f} MB, finalize {fin['rss_mb']:.0f} MB", flush=True)
    return out


# --- report -----------------------------------------------------------------------------


def _rate(r: dict[str, Any]) -> float:
    return r["rows_out"] / r["cpu"]


def ratios(res: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(what, value, target) for the headline comparisons; NaN where a step is missing."""
    s = res["steps"]
    nan = float("nan")

    def rate(key: str) -> float:
        return _rate(s[key]) if key in s else nan

    def bpr(key: str, field: str = "bytes_out") -> float:
        return s[key][field] / s[key]["rows_out"] if field in s.get(key, {}) else nan

    one_host = res["tree"]["json"]["bytes"] / res["tree"]["json"]["hosts"]
    load_extra = (s["load_json"]["rss_mb"] - s["noop"]["rss_mb"]) * 2**20
    return [
        (
            "JSON load / parse-only probe (orjson)",
            rate("load_json") / rate("parse_only_json"),
            ">= 0.8",
        ),
        ("JSON load / naive script", rate("load_json") / rate("naive"), ">= 3"),
        (
            "JSON decode (our reader) / parse-only probe",
            rate("decode_json") / rate("parse_only_json"),
            "",
        ),
        (
            "binary decode (our reader) / read-bytes probe",
            rate("decode_bin") / rate("read_bin"),
            "values never copied",
        ),
        ("binary load / JSON load", rate("load_bin") / rate("load_json"), ""),
        ("finalize / pyarrow plain-zstd write probe", rate("finalize") / rate("pyarrow_write"), ""),
        ("whole run JSON (1 worker) / naive script", rate("run_json_1w") / rate("naive"), ""),
        ("bytes/row: ours / naive (plain zstd)", bpr("finalize") / bpr("naive"), "<= 0.6"),
        (
            "bytes/row: ours / pyarrow defaults on the same sorted rows",
            bpr("finalize") / bpr("pyarrow_write", "bytes_out_default"),
            "",
        ),
        (
            "peak RSS, naive / ours (whole run, 1 worker)",
            _peak(s["naive"]) / _peak(s["run_json_1w"]),
            "",
        ),
        ("load: peak RSS above imports / one host's JSON bytes", load_extra / one_host, "small"),
    ]


def _peak(r: dict[str, Any]) -> float:
    """Peak RSS of the step's largest process (the runner's pool workers are children)."""
    return float(max(r["rss_mb"], r.get("children_rss_mb", 0.0)))


_LABELS = {
    "noop": "interpreter + imports (RSS floor)",
    "read_json": "probe: read JSON bytes",
    "read_bin": "probe: read binary bytes",
    "parse_only_json": "probe: read + orjson.loads, nothing else",
    "decode_json": "read + our JSON reader (parse_json)",
    "decode_bin": "read + our binary reader (parse_binary)",
    "load_json": "**load, JSON** (steps.load_host)",
    "load_bin": "**load, binary**",
    "finalize": "**finalize** (chunks -> Parquet, verified)",
    "pyarrow_write": "probe: pyarrow writes the rows from memory (plain zstd)",
    "naive": "naive script (bench/naive.py)",
    "run_json_1w": "whole run, JSON, 1 worker",
    "run_json_2w": "whole run, JSON, 2 workers",
    "run_bin_1w": "whole run, binary, 1 worker",
    "run_bin_2w": "whole run, binary, 2 workers",
}


def render(res: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """The results as markdown (machine, steps, ratios, scaling); `baseline` adds 'before'."""
    m = res["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; "
        f"Python {m['python']}, numpy {m['numpy']}, pyarrow {m['pyarrow']}, orjson {m['orjson']}.",
    ]
    if "steps" in res:
        rows = res["tree"]["json"]["rows"]
        steps, old = res["steps"], (baseline or {}).get("steps", {})
        b = " before |" if baseline else ""
        lines += [
            f"Tree: {res['hosts']} hosts x {res['samples']} samples, {rows:,} rows; "
            f"JSON {res['tree']['json']['bytes'] / 2**20:.0f} MiB, binary "
            f"{res['tree']['bin']['bytes'] / 2**20:.0f} MiB. Median of "
            f"{steps['load_json']['runs']} runs per step. Peak RSS: the step's largest process.",
            "",
            f"| step | M rows / CPU-s |{b} M rows / wall-s | CPU s | peak RSS MB |{b} bytes / row |{b}",
            "|---|---:|"
            + ("---:|" if baseline else "")
            + "---:|---:|---:|"
            + ("---:|" if baseline else "")
            + "---:|"
            + ("---:|" if baseline else ""),
        ]
        for key, label in _LABELS.items():
            r, o = steps[key], old.get(key)

            def was(text: str, o: dict[str, Any] | None = o) -> str:
                return (f" {text} |" if o else " |") if baseline else ""

            if key == "noop":
                lines.append(
                    f"| {label} | |{was('')} | | {_peak(r):.0f} |{was(f'{_peak(o):.0f}' if o else '')} |{was('')}"
                )
                continue
            bpr = f"{r['bytes_out'] / r['rows_out']:.3f}" if r.get("bytes_out") else ""
            old_bpr = f"{o['bytes_out'] / o['rows_out']:.3f}" if o and o.get("bytes_out") else ""
            lines.append(
                f"| {label} | {_rate(r) / 1e6:.2f} |{was(f'{_rate(o) / 1e6:.2f}' if o else '')} "
                f"{r['rows_out'] / r['wall'] / 1e6:.2f} | {r['cpu']:.2f} | {_peak(r):.0f} |"
                f"{was(f'{_peak(o):.0f}' if o else '')} {bpr} |{was(old_bpr)}"
            )
        lines += [
            "",
            "| ratio | value | target |" + (" before |" if baseline else ""),
            "|---|---:|---|" + ("---:|" if baseline else ""),
        ]
        before = {k: v for k, v, _ in ratios(baseline)} if baseline and "steps" in baseline else {}
        for what, value, target in ratios(res):
            extra = f" {before.get(what, float('nan')):.2f} |" if baseline else ""
            lines.append(f"| {what} | {value:.2f} | {target} |{extra}")
    if res.get("parquet_sweep"):
        lines += [
            "",
            "| Parquet writer settings (same rows) | bytes / row | M rows / CPU-s |",
            "|---|---:|---:|",
        ]
        for label, v in res["parquet_sweep"].items():
            lines.append(
                f"| {label} | {v['bytes_per_row']:.3f} | {v['rows_per_cpu_s'] / 1e6:.1f} |"
            )
    if res.get("scaling"):
        lines += [
            "",
            "| hosts | rows | load peak RSS MB | finalize peak RSS MB | finalize M rows / CPU-s | bytes / row |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for sc in res["scaling"]:
            lines.append(
                f"| {sc['hosts']} | {sc['rows']:,} | {sc['load_rss_mb']:.0f} | "
                f"{sc['finalize_rss_mb']:.0f} | {sc['finalize_rows_per_cpu_s'] / 1e6:.2f} | "
                f"{sc['bytes_per_row']:.3f} |"
            )
    return "\n".join(lines)


def write_section(text: str, mark_start: str = MARK_START, mark_end: str = MARK_END) -> None:
    """Replace what stands between two markers in bench/README.md."""
    doc = README.read_text()
    start, end = doc.index(mark_start) + len(mark_start), doc.index(mark_end)
    README.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print (and optionally record) the report."""
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=16)
    p.add_argument("--samples", type=int, default=720, help="values per series per file")
    p.add_argument("--repeat", type=int, default=3, help="runs per step (median reported)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4 hosts, 1 run per step, no scaling")
    p.add_argument(
        "--scaling",
        default="16,64,256",
        help="host counts for the memory-scaling series ('' to skip)",
    )
    p.add_argument("--scaling-samples", type=int, default=720)
    p.add_argument("--scaling-only", action="store_true", help="only the memory-scaling series")
    p.add_argument("--workdir", default="/tmp/ccarchive-bench")
    p.add_argument("--keep", action="store_true", help="keep the generated trees and outputs")
    p.add_argument("--readme", action="store_true", help="write the report into bench/README.md")
    p.add_argument("--baseline", help="earlier results JSON: adds a 'before' column to ratios")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.hosts, opts.repeat, opts.scaling = min(opts.hosts, 4), 1, ""
    opts.scaling = [int(x) for x in str(opts.scaling).split(",") if x.strip()]
    res = measure(opts)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=1))
    baseline = json.loads(Path(opts.baseline).read_text()) if opts.baseline else None
    text = render(res, baseline)
    print()
    print(text)
    print(f"\nraw results: {out}")
    if opts.readme:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our archiver against the upstream Go archiver, as whole processes on the same trees.

    python -m bench.vs_go [--go PATH] [--turns 3] [--hourly-hosts 1000] [--readme]

Both programs run as a user runs them (start-up included) on a fresh copy of the same tree,
in alternating turns, in the same run on the same machine. Per process tree: CPU = user +
system of the process and every descendant it waited for (os.wait4's rusage, which on Linux
includes reaped children; the bench's own RUSAGE_CHILDREN delta is recorded as a cross-check),
wall time, peak RSS (ru_maxrss of the program as GNU time reports it: the largest of the
process and its reaped children), output bytes and rows. Medians over the turns; ratios from those medians. The rows of both
outputs are compared host by host as multisets (float32 bit patterns).
Build the Go peer with bench/build_go_peer.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.run import write_section

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MARK_START = "<!-- vs-go:start -->"
MARK_END = "<!-- vs-go:end -->"
DEFAULT_GO = os.environ.get("GOREF", "/work/gobuild/goref")
TIME = "/usr/bin/time"  # GNU time, for the peak RSS (see run_process)
CLUSTER = "fritz"

# (label, tree key, workers). a/b: the 16-host node tree in JSON and binary; c: hourly.
CONFIGS = {
    "a1": ("a", 1),
    "b1": ("b", 1),
    "a2": ("a", 2),
    "c2": ("c", 2),
}
KEY_COLUMNS = ["cluster", "hostname", "metric", "scope", "scope_id", "timestamp", "frequency"]


def _py_env() -> dict[str, str]:
    # The code of this checkout, whatever is installed in the interpreter's environment.
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tree_commands(opts: argparse.Namespace, work: Path) -> dict[str, tuple[Path, list[str], str]]:
    """Per tree key: (root, the `ccarchive generate` command that writes it, description)."""
    gen = [sys.executable, "-m", "workers.cli", "generate", "--clusters", CLUSTER]
    gen += ["--seed", str(opts.seed), "--workers", str(os.cpu_count() or 1)]
    node = ["--hosts", str(opts.hosts), "--samples", "720"]
    hourly = ["--shape", "hourly", "--hosts", str(opts.hourly_hosts)]
    hourly += ["--files-per-host", str(opts.hourly_files), "--format", "mixed"]
    return {
        "a": (
            work / "tree-a",
            [*gen, "--root", str(work / "tree-a"), *node, "--format", "json"],
            f"{opts.hosts} hosts x ~984 series x 720 one-decimal values, JSON",
        ),
        "b": (
            work / "tree-b",
            [*gen, "--root", str(work / "tree-b"), *node, "--format", "bin"],
            f"the same {opts.hosts} hosts, binary",
        ),
        "c": (
            work / "tree-c",
            [*gen, "--root", str(work / "tree-c"), *hourly],
            f"hourly: {opts.hourly_hosts} hosts x {opts.hourly_files} files x ~984 series x 60 "
            "values, 4-6 significant digits, ~2 % nulls, mixed JSON/binary",
        ),
    }


def ensure_tree(root: Path, cmd: list[str]) -> dict[str, Any]:
    """Generate the tree unless an identical command already wrote it (stamp file)."""
    stamp = root.parent / f"{root.name}.cmd"
    wanted = shlex.join(cmd[1:])
    if root.is_dir() and stamp.is_file() and stamp.read_text() == wanted:
        return json.loads((root.parent / f"{root.name}.json").read_text())
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    out = subprocess.run(cmd, env=_py_env(), check=True, capture_output=True, text=True).stdout
    files = [p for p in root.rglob("*") if p.is_file()]
    info = {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "generate_s": round(time.perf_counter() - started, 1),
        "summary": out.strip(),
    }
    (root.parent / f"{root.name}.json").write_text(json.dumps(info))
    stamp.write_text(wanted)
    return info


def run_process(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run cmd to completion; its process tree's CPU, wall time and peak RSS."""
    # Linux carries the high-water RSS of the address space a process replaces at exec into
    # its ru_maxrss: a program started straight from this (large) Python process would
    # report at least this process's RSS. GNU time (a few MB) starts it instead and reports
    # the program's own ru_maxrss, which includes the children it waited for.
    rss_file = log.with_suffix(".rss")
    timed = [TIME, "-f", "%M", "-o", str(rss_file), *cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(timed, env=env, stdout=out, stderr=subprocess.STDOUT)
        # wait4's rusage covers the reaped descendants: time, the program, its pool.
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}; see {log}")
    cross = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "cpu": ru.ru_utime + ru.ru_stime,
        "user": ru.ru_utime,
        "sys": ru.ru_stime,
        "cpu_children_delta": cross,
        "wall": wall,
        "rss_mb": int(rss_file.read_text().split()[-1]) / 1024,  # KiB
    }


def _output(archive: Path) -> tuple[Path, int, int]:
    files = sorted(archive.rglob("*.parquet"))
    if len(files) != 1:
        raise RuntimeError(f"expected one Parquet file under {archive}, found {files}")
    return files[0], files[0].stat().st_size, pq.ParquetFile(files[0]).metadata.num_rows


def one_turn(
    side: str, src: Path, work: Path, workers: int, cutoff: int, go: str, keep_as: Path | None
) -> dict[str, Any]:
    """Copy the tree, run one side on it, record the figures; keep_as keeps the output."""
    tree, archive = work / "turn-tree", work / "turn-archive"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.rmtree(archive, ignore_errors=True)
    shutil.copytree(src, tree)
    archive.mkdir()
    if side == "ours":
        cmd = [sys.executable, "-m", "workers.cli", "archive", "--checkpoints", str(tree)]
        cmd += ["--archive", str(archive), "--cutoff", str(cutoff), "--workers", str(workers)]
    else:
        cmd = [go, "-checkpoints", str(tree), "-archive", str(archive)]
        cmd += ["-cutoff", str(cutoff), "-workers", str(workers), "-quiet"]
    r = run_process(cmd, _py_env(), work / f"{side}.log")
    path, size, rows = _output(archive)
    # Other users of the machine inflate CPU time too (shared caches, SMT siblings): record it.
    r.update(side=side, workers=workers, bytes=size, rows=rows, load1=os.getloadavg()[0])
    r["sources_left"] = sum(1 for p in tree.rglob("*") if p.is_file())
    if keep_as is not None:
        shutil.rmtree(keep_as, ignore_errors=True)
        keep_as.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), keep_as)
    shutil.rmtree(tree, ignore_errors=True)
    shutil.rmtree(archive, ignore_errors=True)
    return r


# --- same rows ----------------------------------------------------------------------------------


def _host_row_groups(pf: pq.ParquetFile) -> dict[str, list[int]]:
    """hostname -> row groups holding it, from statistics (or the column when missing)."""
    col = pf.schema_arrow.get_field_index("hostname")
    out: dict[str, list[int]] = defaultdict(list)
    for i in range(pf.num_row_groups):
        st = pf.metadata.row_group(i).column(col).statistics
        if st is not None and st.has_min_max and st.min == st.max:
            host = st.min.decode() if isinstance(st.min, bytes) else str(st.min)
        else:
            hosts = pf.read_row_group(i, columns=["hostname"]).column(0).unique().to_pylist()
            if len(hosts) != 1:
                raise RuntimeError(f"row group {i} spans hosts {hosts[:3]}...")
            host = hosts[0]
        out[host].append(i)
    return out


def _canonical(pf: pq.ParquetFile, groups: list[int]) -> pa.Table:
    t = pf.read_row_groups(groups)
    cols = {}
    for name in KEY_COLUMNS:
        want = pa.string() if name not in ("timestamp", "frequency") else pa.int64()
        cols[name] = t.column(name).cast(want).combine_chunks()
    values = t.column("value").combine_chunks().to_numpy(zero_copy_only=False)
    cols["value_bits"] = pa.array(np.ascontiguousarray(values, np.float32).view(np.uint32))
    table = pa.table(cols)
    return table.sort_by([(c, "ascending") for c in table.column_names])


def compare_rows(ours: Path, theirs: Path, every: int = 1) -> dict[str, Any]:
    """Per-host row counts of both files, and the rows of every `every`-th host as multisets."""
    a, b = pq.ParquetFile(ours), pq.ParquetFile(theirs)
    ga, gb = _host_row_groups(a), _host_row_groups(b)
    counts_a = {h: sum(a.metadata.row_group(i).num_rows for i in g) for h, g in ga.items()}
    counts_b = {h: sum(b.metadata.row_group(i).num_rows for i in g) for h, g in gb.items()}
    checked, differ = 0, []
    for k, host in enumerate(sorted(ga)):
        if k % every or host not in gb:
            continue
        checked += 1
        if not _canonical(a, ga[host]).equals(_canonical(b, gb[host])):
            differ.append(host)
    return {
        "rows_ours": a.metadata.num_rows,
        "rows_go": b.metadata.num_rows,
        "host_counts_equal": counts_a == counts_b,
        "hosts": len(counts_a),
        "hosts_compared": checked,
        "hosts_differing": differ,
        "same": counts_a == counts_b and not differ,
    }


# --- report -------------------------------------------------------------------------------------


def _machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{model}, {os.cpu_count()} cores, {mem_gb:.1f} GB; Python {platform.python_version()}, "
        f"pyarrow {version('pyarrow')}, numpy {version('numpy')}"
    )


def _median(turns: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(t[key] for t in turns))


def render(res: dict[str, Any]) -> str:
    """The markdown report: trees, one row per configuration, the ratios."""
    lines = [
        f"Run started {res['date']} on {res['machine']}.",
        f"Command: `{res['command']}`; Go peer: `{res['go_version']}`.",
        f"Medians of {res['turns']} turns per side, alternating which side goes first; CPU = "
        "user + system of the whole process tree, peak RSS = the largest process of the tree.",
        "",
        "| tree | files | input MB | rows |",
        "|---|---:|---:|---:|",
    ]
    for key, t in res["trees"].items():
        lines.append(
            f"| ({key}) {t['description']} | {t['files']:,} | {t['bytes'] / 2**20:,.0f} "
            f"| {t.get('rows', 0):,} |"
        )
    lines += [
        "",
        "| tree, workers | ours CPU s | Go CPU s | ours wall s | Go wall s | ours RSS MB | "
        "Go RSS MB | **Go CPU / our CPU** | Go wall / our wall | **RSS ours / Go** | "
        "bytes/row ours / Go | same rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    loads = [
        t["load1"] for c in res["configs"].values() for t in c["ours"] + c["go"] if "load1" in t
    ]
    if loads:
        lines.insert(
            3,
            f"Load average (1 min) after the turns: {min(loads):.1f} to {max(loads):.1f} "
            f"(median {statistics.median(loads):.1f}) on {os.cpu_count()} cores.",
        )
    for c in res["configs"].values():
        o, g = c["ours"], c["go"]
        oc, gc = _median(o, "cpu"), _median(g, "cpu")
        ow, gw = _median(o, "wall"), _median(g, "wall")
        orss, grss = _median(o, "rss_mb"), _median(g, "rss_mb")
        obpr = _median(o, "bytes") / max(1, o[0]["rows"])
        gbpr = _median(g, "bytes") / max(1, g[0]["rows"])
        cmp_ = c["compare"]
        same = (
            f"yes ({cmp_['hosts_compared']}/{cmp_['hosts']} hosts compared row by row)"
            if cmp_["same"]
            else f"**NO**: {cmp_}"
        )
        lines.append(
            f"| ({c['tree']}) {c['workers']} worker{'s' if c['workers'] > 1 else ''} "
            f"| {oc:.2f} | {gc:.2f} | {ow:.2f} | {gw:.2f} | {orss:.0f} | {grss:.0f} "
            f"| **{gc / oc:.2f}** | {gw / ow:.2f} | **{orss / grss:.2f}** "
            f"| {obpr / gbpr:.2f} ({obpr:.3f} / {gbpr:.3f}) | {same} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, generate the trees, run the turns, print (and record) the report."""
    p = argparse.ArgumentParser(prog="python -m bench.vs_go", description=__doc__.splitlines()[0])
    p.add_argument("--go", default=DEFAULT_GO, help="the goref binary (bench/build_go_peer.sh)")
    p.add_argument("--turns", type=int, default=3, help="turns per side and configuration")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {list(CONFIGS)}")
    p.add_argument("--hosts", type=int, default=16, help="hosts of trees a and b")
    p.add_argument("--hourly-hosts", type=int, default=1000, help="hosts of tree c")
    p.add_argument("--hourly-files", type=int, default=3, help="files per host of tree c")
    p.add_argument("--compare-every", type=int, default=1, help="tree c: compare every k-th host")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/ccarchive-vsgo")
    p.add_argument("--readme", action="store_true", help="write the report into bench/README.md")
    p.add_argument("--render", metavar="JSON", help="only print (and --readme) earlier results")
    opts = p.parse_args(argv)
    if opts.render:
        text = render(json.loads(Path(opts.render).read_text()))
        print(text)
        if opts.readme:
            write_section(text, MARK_START, MARK_END)
        return 0
    labels = [x.strip() for x in opts.configs.split(",") if x.strip()]
    if unknown := [x for x in labels if x not in CONFIGS]:
        p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    if not os.access(opts.go, os.X_OK):
        p.error(f"no Go peer at {opts.go}: build it with bench/build_go_peer.sh")
    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cmds = tree_commands(opts, work)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "command": shlex.join(["python", "-m", "bench.vs_go", *(argv or sys.argv[1:])]),
        "go_version": f"{opts.go} (goref: cc-backend 3bfd3d06, parquet-go v0.30.1, go1.27.3)",
        "turns": opts.turns,
        "trees": {},
        "configs": {},
    }
    # Every generated file is at least 3 days old: this cutoff selects them all.
    cutoff = int(time.time())
    for label in labels:
        key, workers = CONFIGS[label]
        root, cmd, desc = cmds[key]
        if key not in res["trees"]:
            print(f"tree ({key}): {shlex.join(cmd[1:])}", flush=True)
            res["trees"][key] = {"description": desc, **ensure_tree(root, cmd)}
        turns: dict[str, list[dict[str, Any]]] = {"ours": [], "go": []}
        for turn in range(opts.turns):
            order = ("ours", "go") if turn % 2 == 0 else ("go", "ours")
            for side in order:
                keep = work / "out" / label / f"{side}.parquet" if turn == 0 else None
                r = one_turn(side, root, work, workers, cutoff, opts.go, keep)
                turns[side].append(r)
                print(
                    f"  {label} turn {turn} {side:4}: cpu {r['cpu']:.2f}s wall {r['wall']:.2f}s "
                    f"rss {r['rss_mb']:.0f}MB rows {r['rows']:,} bytes {r['bytes']:,}",
                    flush=True,
                )
        every = opts.compare_every if key == "c" else 1
        cmp_ = compare_rows(
            work / "out" / label / "ours.parquet", work / "out" / label / "go.parquet", every
        )
        print(f"  {label} rows: {cmp_}", flush=True)
        res["trees"][key]["rows"] = cmp_["rows_ours"]
        res["configs"][label] = {
            "tree": key,
            "workers": workers,
            "ours": turns["ours"],
            "go": turns["go"],
            "compare": cmp_,
        }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"vs_go-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=1))
    text = render(res)
    print()
    print(text)
    print(f"\nraw results: {out}")
    if opts.readme:
        write_section(text, MARK_START, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B of `steps.load_host` CPU time: two code trees, interleaved rounds, one process each.

    python -m bench.load_ab TREE [TREE...] --a DIR_A --b DIR_B [--rounds 5] [--hosts N]

Each round runs, per tree, a fresh interpreter with PYTHONPATH=DIR_A and one with DIR_B
(alternating which goes first) that loads every host (at most N) and prints the CPU time
(time.process_time) of the loads alone. Prints the medians and B / A per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import os, sys, tempfile, time
from workers import steps
assert steps.__file__.startswith(os.environ["PYTHONPATH"]), steps.__file__
tree, limit = sys.argv[1], int(sys.argv[2])
hosts = [(c, h) for c in sorted(os.listdir(tree)) for h in sorted(os.listdir(os.path.join(tree, c)))]
hosts = hosts[:limit]
rows = 0
with tempfile.TemporaryDirectory() as staging:
    t0 = time.process_time()
    for c, h in hosts:
        m = steps.load_host(tree, c, h, 2**62, staging, "ab")
        rows += m.rows
        assert not m.bad, m.bad
    cpu = time.process_time() - t0
print(cpu, rows, len(hosts))
"""


def _run(code_dir: str, tree: str, hosts: int) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=code_dir)
    # -P: the current directory (maybe one of the two trees) must not shadow PYTHONPATH.
    out = subprocess.run(
        [sys.executable, "-P", "-c", _CHILD, tree, str(hosts)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    """Run the interleaved rounds and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hosts", type=int, default=10**9)
    args = ap.parse_args()
    res: dict[str, dict[str, list[float]]] = {t: {"a": [], "b": []} for t in args.trees}
    for r in range(args.rounds):
        for tree in args.trees:
            order = ("a", "b") if r % 2 == 0 else ("b", "a")
            rows = set()
            for side in order:
                cpu, n = _run(getattr(args, side), tree, args.hosts)
                res[tree][side].append(cpu)
                rows.add(n)
            assert len(rows) == 1, rows
        print(json.dumps({"round": r, **{t: v for t, v in res.items()}}), file=sys.stderr)
    print("| tree | A CPU-s | B CPU-s | B / A |")
    print("|---|---:|---:|---:|")
    for tree, v in res.items():
        a, b = statistics.median(v["a"]), statistics.median(v["b"])
        print(f"| {tree} | {a:.3f} | {b:.3f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()

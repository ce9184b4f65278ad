"""`ccarchive generate`: write a synthetic checkpoint tree (demo, tests, benchmarks)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .generate import generate_tree
from .usage import EXIT_OK, UsageError


def cmd_generate(args: argparse.Namespace) -> int:
    """Write a synthetic checkpoint tree."""
    clusters = [c.strip() for c in args.clusters.split(",") if c.strip()]
    hourly = args.shape == "hourly"
    if args.files_per_host is None:
        args.files_per_host = 4 if hourly else 1
    if args.samples is None:
        args.samples = 60 if hourly else 720
    if not clusters or args.hosts < 1 or args.files_per_host < 1 or args.samples < 1:
        raise UsageError("need at least one cluster, host, file per host and sample")
    started = time.perf_counter()
    summary = generate_tree(
        Path(args.root),
        clusters,
        hosts=args.hosts,
        files_per_host=args.files_per_host,
        fmt=args.format,
        samples=args.samples,
        gpus=args.gpus,
        seed=args.seed,
        workers=args.workers,
        shape=args.shape,
    )
    print(
        f"wrote {summary.files} files ({summary.values:,} values, {summary.bytes:,} bytes) for "
        f"{len(summary.clusters)} cluster(s) x {summary.hosts} hosts under {summary.root} "
        f"in {time.perf_counter() - started:.1f}s; timestamps {summary.first_ts}..{summary.last_ts}"
    )
    return EXIT_OK

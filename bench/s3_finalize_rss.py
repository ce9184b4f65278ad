"""Peak RSS of the finalize step writing one 64-host cluster to S3 (moto) vs to local disk.

    python -m bench.s3_finalize_rss [--hosts 64] [--samples 720] [--work DIR]

Generates a cluster (workers.generate, ~0.7 M values per host at the default 720 samples),
loads every host once into local staging (and copies the chunks to S3 staging), then runs
`steps.finalize_cluster` once per configuration, each in a fresh interpreter, and reports
that process's peak RSS during finalize next to its RSS right before finalize began (imports,
S3 client). moto runs in its own process, so its memory is not counted. Results go to
stdout and bench/results/s3_finalize_rss.json. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

CLUSTER = "fritz"
MiB = 1 << 20


def _load(args: tuple[str, str, int, str, str]) -> dict[str, Any]:
    from workers import steps

    checkpoints, host, cutoff, staging, run_id = args
    return steps.load_host(checkpoints, CLUSTER, host, cutoff, staging, run_id).to_dict()


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One finalize in this (fresh) process: RSS before, and the peak during finalize.

    The peak is VmHWM after resetting it (/proc/self/clear_refs) right before finalize:
    ru_maxrss would not do, Linux carries it over exec() from the forking parent.
    """
    import s3fs  # noqa: F401  (imported in every configuration: same floor for all)

    from workers import sink, steps, storage
    from workers.manifest import HostManifest

    storage.configure(spec["storage"])
    manifests = [HostManifest.from_dict(m) for m in spec["manifests"]]
    if spec["archive"].startswith("s3://"):
        storage.filesystem(spec["archive"])[0].ls(spec["archive"].split("/")[2])  # connect
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    started = time.perf_counter()
    info = steps.finalize_cluster(
        CLUSTER, spec["cutoff"], spec["run_id"], manifests, spec["archive"], sink.ParquetOptions()
    )
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    assert info is not None
    footer = sink.read_metadata(info.url)
    return {
        "rss_before_mib": before / 1024,
        "peak_rss_mib": peak / 1024,
        "seconds": seconds,
        "rows": info.rows,
        "bytes": info.bytes,
        "row_groups": info.row_groups,
        "footer_bytes": footer.serialized_size,
    }


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.s3_finalize_rss", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    """Generate, stage, and measure every configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=720)
    parser.add_argument("--work", help="work directory (default: a temporary one, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from tests.fixtures_s3 import KEY_ID, SECRET, start_moto
    from workers import storage
    from workers.generate import generate_tree

    work = Path(args.work or tempfile.mkdtemp(prefix="ccarchive-s3-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    server = start_moto(work)
    try:
        t0 = time.perf_counter()
        summary = generate_tree(
            work / "cp",
            [CLUSTER],
            hosts=args.hosts,
            samples=args.samples,
            workers=os.cpu_count() or 1,
        )
        cutoff = summary.last_ts + 1
        print(
            f"generated {summary.values:,} values, {summary.bytes / MiB:.0f} MiB of JSON "
            f"in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )

        run_id = "bench"
        staging = str(work / "staging")
        hosts = sorted(os.listdir(work / "cp" / CLUSTER))
        t0 = time.perf_counter()
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            manifests = list(
                pool.map(_load, [(str(work / "cp"), h, cutoff, staging, run_id) for h in hosts])
            )
        chunk_bytes = sum(os.path.getsize(m["chunk"]) for m in manifests)
        print(
            f"staged {len(manifests)} chunks, {chunk_bytes / MiB:.0f} MiB, "
            f"in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )

        s3_base = {
            "endpoint_url": server.endpoint_url,
            "key": KEY_ID,
            "secret": SECRET,
            "client_kwargs": {"region_name": "us-east-1"},
        }
        server.client().create_bucket(Bucket="bench")
        storage.configure({"s3": s3_base})
        fs = storage.filesystem("s3://bench")[0]
        fs.put(staging + "/", "bench/staging/", recursive=True)
        s3_manifests = [
            {**m, "chunk": m["chunk"].replace(staging, "s3://bench/staging")} for m in manifests
        ]

        configs: list[tuple[str, str, list[dict[str, Any]], int | None]] = [
            ("local staging -> local disk", str(work / "archive"), manifests, None),
            ("local staging -> S3, 16 MiB parts", "s3://bench/a16", manifests, 16),
            ("S3 staging -> S3, 16 MiB parts", "s3://bench/s3s16", s3_manifests, 16),
            ("local staging -> S3, 5 MiB parts", "s3://bench/a5", manifests, 5),
            ("local staging -> S3, 64 MiB parts", "s3://bench/a64", manifests, 64),
        ]
        results = []
        for name, archive, ms, part in configs:
            options = {"s3": {**s3_base, "default_block_size": (part or 16) * MiB}}
            spec: dict[str, Any] = {"storage": options, "manifests": ms, "archive": archive}
            spec.update(cutoff=cutoff, run_id=run_id)
            r = _run_child(spec)
            r["config"] = name
            results.append(r)
            print(
                f"{name:36s} peak RSS {r['peak_rss_mib']:6.0f} MiB "
                f"(before finalize {r['rss_before_mib']:4.0f}, +{r['peak_rss_mib'] - r['rss_before_mib']:4.0f}) "
                f"{r['seconds']:5.1f}s  {r['rows']:,} rows  {r['bytes'] / MiB:.0f} MiB  "
                f"{r['row_groups']} row groups, footer {r['footer_bytes'] / 1024:.0f} KiB",
                flush=True,
            )
        out = Path(__file__).with_name("results") / "s3_finalize_rss.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "hosts": args.hosts,
                    "samples": args.samples,
                    "values": summary.values,
                    "chunk_bytes": chunk_bytes,
                    "results": results,
                },
                indent=2,
            )
        )
        print(f"results: {out}")
    finally:
        server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

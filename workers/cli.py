"""`ccarchive`: the command line. Exit codes: 0 all archived, 1 something reported, 2 usage."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .config import Settings, parse_duration
from .manifest import ClusterReport

EXIT_OK, EXIT_REPORTED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with how the command was called or configured: one line, exit 2."""


def _fail(message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"ccarchive: error: {message}", markup=False
    )
    sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccarchive",
        description="Archive ClusterCockpit metric-store checkpoints into one Parquet file per cluster.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    archive = sub.add_parser("archive", help="archive (or delete) checkpoints older than a cutoff")
    archive.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="checkpoint root: <DIR>/<cluster>/<host>/<ts>.json|.bin",
    )
    archive.add_argument(
        "--archive", metavar="DIR|URL", help="where <cluster>/<T>.parquet files go"
    )
    when = archive.add_mutually_exclusive_group()
    when.add_argument("--cutoff", metavar="UNIX_TS", type=int, help="archive files with ts <= this")
    when.add_argument(
        "--retention", metavar="DURATION", help="cutoff = now - DURATION (Go syntax: 48h, 90m)"
    )
    archive.add_argument(
        "--mode", choices=("archive", "delete"), help="delete: remove without archiving"
    )
    archive.add_argument(
        "--workers", type=int, metavar="N", help="worker processes (default: cores)"
    )
    archive.add_argument(
        "--staging", metavar="DIR|URL", help="staging for Arrow chunks (default: a temp dir)"
    )
    archive.add_argument(
        "--broker", metavar="URL", help="submit to Celery workers through this broker"
    )
    archive.add_argument(
        "--cluster", action="append", metavar="NAME", help="only this cluster (repeatable)"
    )

    gen = sub.add_parser(
        "generate", help="write a synthetic checkpoint tree (demo, tests, benchmarks)"
    )
    gen.add_argument("--root", required=True, metavar="DIR")
    gen.add_argument("--clusters", default="fritz", help="comma-separated cluster names")
    gen.add_argument("--hosts", type=int, default=4, metavar="N", help="hosts per cluster")
    gen.add_argument("--files-per-host", type=int, default=1, metavar="K")
    gen.add_argument("--format", choices=("json", "bin", "mixed"), default="json")
    gen.add_argument("--samples", type=int, default=720, help="values per series per file")
    gen.add_argument("--gpus", type=int, default=0, help="accelerators per host")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N")
    return parser


def _settings(overrides: dict[str, Any]) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        raise UsageError(f"invalid {key}: {err['msg']}") from None


def _check_archive_writable(archive: str) -> None:
    if "://" in archive and not archive.startswith("file://"):
        return  # remote stores are checked by the first write
    path = Path(archive.removeprefix("file://"))
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ccarchive-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"archive directory {archive} is not writable: {exc.strerror or exc}"
        ) from None


def _cutoff(args: argparse.Namespace, settings: Settings) -> int:
    if args.cutoff is not None:
        return int(args.cutoff)
    retention = args.retention or settings.retention
    if retention is None:
        raise UsageError("give --cutoff UNIX_TS or --retention DURATION")
    try:
        seconds = parse_duration(retention)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if seconds <= 0:
        raise UsageError(f"retention {retention!r} must be positive")
    return int(time.time() - seconds)


def cmd_archive(args: argparse.Namespace) -> int:
    """Run one archive (or delete) pass; print a summary per cluster."""
    settings = _settings(
        {
            "checkpoints": args.checkpoints,
            "archive": args.archive,
            "mode": args.mode,
            "workers": args.workers,
            "staging": args.staging,
            "broker_url": args.broker,
        }
    )
    if not settings.checkpoints:
        raise UsageError("give --checkpoints DIR (or set CCARCHIVE_CHECKPOINTS)")
    if not Path(settings.checkpoints).is_dir():
        raise UsageError(f"checkpoint directory {settings.checkpoints} does not exist")
    if settings.mode == "archive":
        if not settings.archive:
            raise UsageError("give --archive DIR|URL (or set CCARCHIVE_ARCHIVE)")
        _check_archive_writable(settings.archive)
    cutoff = _cutoff(args, settings)

    from . import runner  # deferred: `ccarchive --help` stays instant
    from .sink import ParquetOptions

    options = runner.RunOptions(
        checkpoints=settings.checkpoints,
        cutoff=cutoff,
        archive=settings.archive,
        mode=settings.mode,
        workers=settings.workers,
        staging=settings.staging,
        parquet=ParquetOptions(
            row_group_rows=settings.row_group_rows, zstd_level=settings.zstd_level
        ),
        chunk_compression=settings.ipc_compression,
        grace_seconds=settings.grace_seconds,
        clusters=args.cluster,
    )
    console = Console(stderr=True)
    with _ProgressDisplay(console) as display:
        reports = runner.run(options, display.update)
    _print_summary(reports, settings.mode)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_REPORTED


class _ProgressDisplay:
    """A progress bar per cluster on a terminal; silent otherwise."""

    def __init__(self, console: Console) -> None:
        self.enabled = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stage]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _ProgressDisplay:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, event: str, cluster: str, detail: dict[str, Any]) -> None:
        """Progress callback for the runner."""
        if not self.enabled:
            return
        if event == "plan":
            self.tasks[cluster] = self.progress.add_task(
                cluster, total=detail["hosts"] or 1, stage="loading"
            )
        elif event == "loaded":
            self.progress.advance(self.tasks[cluster])
        elif event in ("finalized", "done"):
            stage = "deleting" if event == "finalized" else "done"
            self.progress.update(self.tasks[cluster], stage=stage)


def _print_summary(reports: Sequence[ClusterReport], mode: str) -> None:
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=200)  # logs and pipes: never truncate columns
    table = Table(title=f"ccarchive {mode}: cutoff {reports[0].cutoff}" if reports else None)
    for name in (
        "cluster",
        "hosts",
        "files archived",
        "files deleted",
        "kept (bad)",
        "rows",
        "bytes written",
        "seconds",
        "archive",
    ):
        table.add_column(name, justify="left" if name in ("cluster", "archive") else "right")
    for r in reports:
        archived = str(r.files_archived) if mode == "archive" else "-"
        table.add_row(
            r.cluster,
            str(r.hosts),
            archived,
            str(r.files_deleted),
            str(len(r.bad)),
            f"{r.rows:,}",
            f"{r.bytes_written:,}",
            f"{r.seconds:.1f}",
            r.archive or "-",
        )
    if not reports:
        out.print("no clusters found")
        return
    out.print(table)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for r in reports:
        for bad in r.bad:
            err.print(f"kept: {bad.path}: {bad.reason}", markup=False)
        for e in r.errors:
            err.print(f"error: {r.cluster}: {e}", markup=False)


def cmd_generate(args: argparse.Namespace) -> int:
    """Write a synthetic checkpoint tree."""
    from .generate import generate_tree

    clusters = [c.strip() for c in args.clusters.split(",") if c.strip()]
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
    )
    print(
        f"wrote {summary.files} files ({summary.values:,} values, {summary.bytes:,} bytes) for "
        f"{len(summary.clusters)} cluster(s) x {summary.hosts} hosts under {summary.root} "
        f"in {time.perf_counter() - started:.1f}s; timestamps {summary.first_ts}..{summary.last_ts}"
    )
    return EXIT_OK


COMMANDS = {"archive": cmd_archive, "generate": cmd_generate}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ccarchive` console script."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

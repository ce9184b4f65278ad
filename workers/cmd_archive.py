"""`ccarchive archive`: check the settings, run the embedded runner (or hand the run to the
Celery workers with `--broker`), show progress and the summary, pick the exit code."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

from rich.console import Console

from . import metrics, roots, runner, storage
from .config import Settings, configure_storage
from .display import ProgressDisplay, print_summary
from .manifest import ParquetOptions
from .usage import (
    EXIT_OK,
    EXIT_REPORTED,
    UsageError,
    check_clusters,
    command_settings,
    run_cutoff,
)


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


def _check_bucket(url: str, option: str) -> None:
    """An object-store location's bucket must exist before a run starts: one line, exit 2."""
    if "://" not in url or url.startswith("file://"):
        return  # local directories: see _check_archive_writable
    try:
        fs, path = storage.filesystem(url)
        if storage.is_local(fs):
            return
        bucket = path.split("/", 1)[0]
        found = fs.exists(bucket)
    except Exception as exc:  # any store error (endpoint, credentials) is one line
        raise UsageError(f"cannot reach {option} {url}: {type(exc).__name__}: {exc}") from None
    if not found:
        raise UsageError(
            f"{option} {url}: bucket {bucket!r} not found (it does not exist, these "
            "credentials cannot see it, or the endpoint is unreachable)"
        )


def _serve_metrics(settings: Settings) -> None:
    try:
        metrics.configure(settings)
    except OSError as exc:  # the port is taken, or the address is not ours
        where = f"{settings.metrics_addr}:{settings.metrics_port}"
        raise UsageError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None


def _check_locations(settings: Settings) -> None:
    """The checkpoint, archive and staging settings of an embedded run, or UsageError."""
    if not settings.checkpoints:
        raise UsageError("give --checkpoints DIR (or set CCARCHIVE_CHECKPOINTS)")
    if not Path(settings.checkpoints).is_dir():
        raise UsageError(f"checkpoint directory {settings.checkpoints} does not exist")
    if settings.mode == "archive":
        if not settings.archive:
            raise UsageError("give --archive DIR|URL (or set CCARCHIVE_ARCHIVE)")
        # Before anything is created: an archive root inside the tree would be made there.
        problem = roots.roots_problem(settings.checkpoints, settings.archive, settings.staging)
        if problem is not None:
            raise UsageError(problem)
        if not settings.staging:
            try:
                roots.private_staging_root()  # refused (planted by someone else?): exit 2
            except roots.RootsRefused as exc:
                raise UsageError(str(exc)) from None
        _check_archive_writable(settings.archive)
        _check_bucket(settings.archive, "--archive")
    if settings.staging:
        _check_bucket(settings.staging, "--staging")


def _run_options(args: argparse.Namespace, settings: Settings, cutoff: int) -> runner.RunOptions:
    assert settings.checkpoints is not None  # _check_locations
    return runner.RunOptions(
        checkpoints=settings.checkpoints,
        cutoff=cutoff,
        archive=settings.archive,
        mode=settings.mode,
        workers=settings.workers,
        staging=settings.staging,
        parquet=ParquetOptions.from_settings(settings),
        chunk_compression=settings.ipc_compression,
        grace_seconds=settings.grace_seconds,
        run_log=settings.run_log,
        run_log_keep=settings.run_log_keep,
        run_log_max_age=settings.run_log_max_age_seconds,
        clusters=args.cluster,
    )


def cmd_archive(args: argparse.Namespace) -> int:
    """Run one archive (or delete) pass; print a summary per cluster."""
    settings = command_settings(
        {
            "checkpoints": args.checkpoints,
            "archive": args.archive,
            "mode": args.mode,
            "workers": args.workers,
            "staging": args.staging,
            "broker_url": args.broker,
            "config": args.config,
            "cc_backend_config": args.cc_backend_config,
        }
    )
    configure_storage(settings)  # S3 endpoint, region, credentials for s3:// locations
    if args.broker is not None or os.environ.get("CCARCHIVE_BROKER_URL"):
        # Deferred: Celery, kombu and redis load only for a run on the Celery workers.
        from .distributed import remote

        return remote.cmd_archive(args, settings)
    _check_locations(settings)
    cutoff = run_cutoff(args, settings)
    assert settings.checkpoints is not None  # _check_locations
    check_clusters(settings.checkpoints, args.cluster)
    _serve_metrics(settings)  # Prometheus endpoint and textfile, when configured
    options = _run_options(args, settings, cutoff)
    console = Console(stderr=True)
    try:
        # SIGTERM/SIGINT become an exception: the run's clean-up (staging, locks) runs.
        with runner.signals_interrupt(), ProgressDisplay(console) as display:
            reports = runner.run(options, display.update)
    except roots.RootsRefused as exc:
        raise UsageError(str(exc)) from None
    except runner.Interrupted as exc:
        print(f"ccarchive: {exc}; files not yet archived are kept", file=sys.stderr)
        return 128 + exc.signo
    print_summary(reports, settings.mode)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_REPORTED

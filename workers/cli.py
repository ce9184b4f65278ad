"""`ccarchive`: the command line. Exit codes: 0 all archived, 1 something reported, 2 usage."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .config import ConfigError, Settings, load_settings, parse_duration
from .logs import setup_logging
from .manifest import ClusterReport

EXIT_OK, EXIT_REPORTED, EXIT_USAGE = 0, 1, 2
#: The reader of standard output went away (`ccarchive query ... | head`): 128 + SIGPIPE,
#: what the shell reports for any filter stopped that way, and quietly, like them.
EXIT_PIPE = 141


class UsageError(Exception):
    """A problem with how the command was called or configured: one line, exit 2."""


def _fail(message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"ccarchive: error: {message}", markup=False
    )
    sys.exit(EXIT_USAGE)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (README: one line on stderr, exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print `ccarchive <command>: error: ... (see --help)` and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        "--workers",
        type=int,
        metavar="N",
        help="processes (default: cores/2+1, at most 10, like cc-backend)",
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
    _add_config_options(archive)

    gen = sub.add_parser(
        "generate", help="write a synthetic checkpoint tree (demo, tests, benchmarks)"
    )
    gen.add_argument("--root", required=True, metavar="DIR", help="where the tree is written")
    gen.add_argument("--clusters", default="fritz", help="comma-separated cluster names")
    gen.add_argument("--hosts", type=int, default=4, metavar="N", help="hosts per cluster")
    gen.add_argument(
        "--shape",
        choices=("node", "hourly"),
        default="node",
        help="node: 12 h files of one-decimal values; hourly: 60-sample files, 4-6 "
        "significant digits, ~2%% nulls",
    )
    gen.add_argument("--files-per-host", type=int, metavar="K", help="default 1 (node), 4 (hourly)")
    gen.add_argument(
        "--format",
        choices=("json", "bin", "mixed"),
        default="json",
        help="file format (mixed: alternate by host and file)",
    )
    gen.add_argument(
        "--samples", type=int, help="values per series per file; default 720 (node), 60 (hourly)"
    )
    gen.add_argument("--gpus", type=int, default=0, help="accelerators per host")
    gen.add_argument(
        "--seed",
        type=int,
        default=0,
        help="values, and the default start: seed %% 1000 minutes earlier (other file names)",
    )
    gen.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="processes writing hosts (default: all cores)",
    )
    _add_ops_parsers(sub)
    _add_plan_parser(sub)
    parser.epilog = f"Example:\n  {EXAMPLES['archive']}\n\n{EXIT_CODES}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for name, command in sub.choices.items():
        command.epilog = f"Example:\n  {EXAMPLES[name]}\n\n{EXIT_CODES}"
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


EXAMPLES = {
    "archive": "ccarchive archive --checkpoints /var/lib/cc-metric-store/checkpoints \\\n"
    "      --archive /srv/metric-archive --retention 48h",
    "generate": "ccarchive generate --root /tmp/cp --clusters fritz,alex --hosts 8",
    "status": "ccarchive status --archive /srv/metric-archive --checkpoints /var/lib/cc/cp",
    "inspect": "ccarchive inspect /srv/metric-archive/fritz/1742292902.parquet",
    "query": "ccarchive query --archive /srv/metric-archive --host f0101 --metric cpu_load "
    "--from 2026-03-01",
    "plan": "ccarchive plan --checkpoints /var/lib/cc-metric-store/checkpoints \\\n"
    "      --archive /srv/metric-archive --retention 48h",
}

EXIT_CODES = """Exit codes:
  0    done: everything selected was archived (status: nothing needs a look)
  1    something was reported and kept (see the kept:/error: lines); the rest was done
  2    usage or configuration error: one line on stderr, nothing done
  130  interrupted; 141: the reader of stdout went away (... | head)
Docs: README.md, docs/operations.md"""


#: Flags every command shares (-v, --log-level), set by `main` for `_settings`.
_COMMON_FLAGS: dict[str, Any] = {}


def _log_level_flag(args: argparse.Namespace) -> str | None:
    """--log-level, else -v (INFO) / -vv (DEBUG), else None (settings decide)."""
    if getattr(args, "log_level", None):
        return str(args.log_level)
    verbose = getattr(args, "verbose", 0) or 0
    return None if verbose == 0 else ("INFO" if verbose == 1 else "DEBUG")


def _settings(overrides: dict[str, Any]) -> Settings:
    """Settings with these flags on top (None: not given); then logging as they say."""
    try:
        settings = load_settings(
            {**_COMMON_FLAGS, **overrides}
        )  # flags > env > TOML > cc-backend > defaults
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    setup_logging(settings.log_level)
    return settings


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
    from . import storage

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


def missing_clusters(
    asked: Sequence[str] | None, found: Sequence[str], where: str, listed: bool = True
) -> str | None:
    """The usage error for `--cluster` names not among `found`, or None if all are there;
    `listed`: `found` is every cluster there, worth naming."""
    missing = sorted(set(asked or ()) - set(found))
    if not missing:
        return None
    names = ", ".join(repr(m) for m in missing)
    there = f" (clusters there: {', '.join(sorted(found)) or 'none'})" if listed else ""
    return f"no cluster {names} {where}{there}"


def _check_clusters(checkpoints: str, asked: Sequence[str] | None) -> None:
    """A `--cluster` typo must not be a quiet no-op of a timer that never archives."""
    if not asked:
        return
    with os.scandir(checkpoints) as entries:
        found = [e.name for e in entries if e.is_dir()]
    problem = missing_clusters(asked, found, f"under {checkpoints}")
    if problem:
        raise UsageError(problem)


def _cutoff(args: argparse.Namespace, settings: Settings) -> int:
    """The run's cutoff from --cutoff or the retention; UsageError unless 0 < T <= int64 max."""
    from .steps import UnsafeName, check_cutoff

    if args.cutoff is not None:
        try:
            return check_cutoff(int(args.cutoff))
        except UnsafeName:
            raise UsageError(
                f"--cutoff {args.cutoff} must be a Unix timestamp > 0 that fits in int64"
            ) from None
    retention = args.retention or settings.retention
    if retention is None:
        raise UsageError("give --cutoff UNIX_TS or --retention DURATION")
    try:
        seconds = parse_duration(retention)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if seconds <= 0:
        raise UsageError(f"retention {retention!r} must be positive")
    try:
        return check_cutoff(int(time.time() - seconds))
    except UnsafeName:
        raise UsageError(f"retention {retention!r} reaches back before 1970") from None


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
            "config": args.config,
            "cc_backend_config": args.cc_backend_config,
        }
    )
    from .config import configure_storage

    configure_storage(settings)  # S3 endpoint, region, credentials for s3:// locations
    if args.broker is not None or os.environ.get("CCARCHIVE_BROKER_URL"):
        # --broker (or CCARCHIVE_BROKER_URL): run on the Celery workers
        from .distributed import remote

        return remote.cmd_archive(args, settings)
    if not settings.checkpoints:
        raise UsageError("give --checkpoints DIR (or set CCARCHIVE_CHECKPOINTS)")
    if not Path(settings.checkpoints).is_dir():
        raise UsageError(f"checkpoint directory {settings.checkpoints} does not exist")
    from . import roots

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
    cutoff = _cutoff(args, settings)
    _check_clusters(settings.checkpoints, args.cluster)
    _serve_metrics(settings)  # Prometheus endpoint and textfile, when configured

    from . import runner  # deferred: `ccarchive --help` stays instant
    from .sink import ParquetOptions

    options = runner.RunOptions(
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
    console = Console(stderr=True)
    try:
        # SIGTERM/SIGINT become an exception: the run's clean-up (staging, locks) runs.
        with runner.signals_interrupt(), _ProgressDisplay(console) as display:
            reports = runner.run(options, display.update)
    except roots.RootsRefused as exc:
        raise UsageError(str(exc)) from None
    except runner.Interrupted as exc:
        print(f"ccarchive: {exc}; files not yet archived are kept", file=sys.stderr)
        return 128 + exc.signo
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
                escape(cluster), total=detail["hosts"] or 1, stage="loading"
            )
        elif event == "loaded":
            self.progress.advance(self.tasks[cluster])
        elif event in ("finalized", "done"):
            stage = "deleting" if event == "finalized" else "done"
            self.progress.update(self.tasks[cluster], stage=stage)


def _print_summary(reports: Sequence[ClusterReport], mode: str) -> None:
    """The table per cluster, then each cluster's archive path on a line of its own.

    Readable at 80 columns: short headers, numbers never cut, and the long values (bytes
    written, the archive path) on a line per cluster that a terminal wraps, never truncates.
    """
    from .ops import iso

    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=200)  # logs and pipes: never truncate columns
    if not reports:
        out.print("no clusters found")
        return
    cutoff = reports[0].cutoff
    table = Table(
        title=f"ccarchive {mode}: cutoff {cutoff} ({iso(cutoff)})",
        box=box.MINIMAL_HEAVY_HEAD,
        pad_edge=False,
    )
    for name in ("cluster", "hosts", "archived", "deleted", "kept", "rows", "secs"):
        if name == "cluster":
            table.add_column(name, overflow="fold", min_width=12)  # long names wrap, never cut
        else:  # "fold": on a very narrow terminal a number wraps, it is never cut to "…"
            table.add_column(name, justify="right", overflow="fold")
    for r in reports:
        archived = str(r.files_archived) if mode == "archive" else "-"
        table.add_row(  # Text: a name such as `c[x]` is not rich markup
            Text(r.cluster),
            str(r.hosts),
            archived,
            str(r.files_deleted),
            str(len(r.bad)),
            f"{r.rows:,}",
            f"{r.seconds:.1f}",
        )
    out.print(table)
    for r in reports:  # the long values, each cluster on a line of its own
        where = f" in {r.archive}" if r.archive else ""
        # soft_wrap: the terminal wraps a long path; it stays one line to copy and paste
        out.print(
            f"{r.cluster}: {r.bytes_written:,} bytes written{where}", markup=False, soft_wrap=True
        )
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


# --- operators: status, inspect, query (workers.ops) ---------------------------------------


def _serve_metrics(settings: Settings) -> None:
    from . import metrics

    try:
        metrics.configure(settings)
    except OSError as exc:  # the port is taken, or the address is not ours
        where = f"{settings.metrics_addr}:{settings.metrics_port}"
        raise UsageError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v info, -vv debug (default: warnings; CCARCHIVE_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="log level (overrides -v and CCARCHIVE_LOG_LEVEL)",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file (also CCARCHIVE_CONFIG)")
    parser.add_argument(
        "--cc-backend-config",
        metavar="FILE",
        help="take directories, mode, retention and workers from a cc-backend config.json",
    )


def _add_ops_parsers(sub: Any) -> None:
    status = sub.add_parser(
        "status", help="per cluster: archives, last run and its outcome, pending recoveries"
    )
    status.add_argument("--archive", metavar="DIR|URL", help="the archive root")
    status.add_argument(
        "--checkpoints", metavar="DIR", help="checkpoint root, to find pending recoveries"
    )
    status.add_argument("--run-log", metavar="DIR|URL", help="where runs record their outcome")
    status.add_argument("--cluster", action="append", metavar="NAME", help="only this cluster")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_options(status)

    inspect = sub.add_parser(
        "inspect", help="schema, row groups, hosts, time range, metrics and sources of a file"
    )
    inspect.add_argument("file", metavar="FILE|URL", help="a Parquet archive file")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_options(inspect)

    query = sub.add_parser("query", help="read archived values back (filters push down)")
    query.add_argument("--archive", metavar="DIR|URL", help="the archive root")
    query.add_argument(
        "--cluster", action="append", metavar="NAME", help="only this cluster (repeatable)"
    )
    query.add_argument(
        "--host", action="append", metavar="NAME", help="only this host (repeatable)"
    )
    query.add_argument(
        "--metric", action="append", metavar="NAME", help="only this metric (repeatable)"
    )
    query.add_argument(
        "--from", dest="start", metavar="TIME", help="timestamp >= TIME (Unix or ISO 8601, UTC)"
    )
    query.add_argument("--to", dest="end", metavar="TIME", help="timestamp < TIME")
    query.add_argument(
        "--format",
        choices=("table", "csv", "parquet"),
        default="table",
        help="table on a terminal; csv or parquet for other programs",
    )
    query.add_argument("--output", "-o", metavar="FILE|URL", help="default: standard output")
    query.add_argument("--limit", type=int, metavar="N", help="at most N rows (table default: 100)")
    _add_config_options(query)


@contextmanager
def _progress_bar(description: str) -> Iterator[Any]:
    """A transient progress bar on stderr when it is a terminal; a no-op callback otherwise."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda _done, _total: None
        return
    with Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _out() -> Console:
    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=200, soft_wrap=True)


def _when(ts: int | None) -> str:
    from .ops import iso

    return f"{ts} ({iso(ts)})" if ts is not None else "-"


def cmd_status(args: argparse.Namespace) -> int:
    """Per cluster: archives, last run, pending recoveries. Exit 1 if anything needs a look."""
    from . import ops
    from .config import configure_storage

    settings = _settings(
        {
            "archive": args.archive,
            "checkpoints": args.checkpoints,
            "run_log": args.run_log,
            "config": args.config,
            "cc_backend_config": args.cc_backend_config,
        }
    )
    if not settings.archive and not settings.run_log:
        raise UsageError("give --archive DIR|URL or --run-log DIR|URL (or set CCARCHIVE_ARCHIVE)")
    archive = settings.archive
    if archive and "://" not in archive and not Path(archive).is_dir():
        raise UsageError(f"archive directory {archive} does not exist")
    if settings.checkpoints and not Path(settings.checkpoints).is_dir():
        raise UsageError(f"checkpoint directory {settings.checkpoints} does not exist")
    configure_storage(settings)
    with _progress_bar("reading archive footers") as progress:
        result = ops.status(archive, settings.checkpoints, settings.run_log, args.cluster, progress)
    attention = any(
        c.problems
        or c.partial_files
        or c.pending
        or (c.last_run is not None and c.last_run.outcome != "ok")
        for c in result.clusters
    )
    if args.json:
        print(ops.to_json(result))
        return EXIT_REPORTED if attention else EXIT_OK
    out = _out()
    if not settings.checkpoints and archive:
        out.print("pending recoveries: unknown (checkpoints not configured: give --checkpoints)")
    if not settings.run_log:
        out.print("last runs: unknown (run records are off: set CCARCHIVE_RUN_LOG)")
    if not result.clusters:
        out.print(f"no clusters under {archive or settings.run_log}")
    if not archive:  # only run records: say what was read, not "0 archive(s)"
        out.print(
            f"run records in {settings.run_log} only; archives not read (give --archive)",
            markup=False,
        )
    for c in result.clusters:
        out.print()
        if archive:
            out.print(
                f"[bold]{escape(c.cluster)}[/bold]: {len(c.archives)} archive(s), {c.rows:,} rows, "
                f"{c.bytes:,} bytes"
            )
        else:
            out.print(f"[bold]{escape(c.cluster)}[/bold]: {c.runs} run record(s)")
        if c.archives:
            table = Table(box=None, pad_edge=False)
            for name in ("cutoff", "cutoff (UTC)", "hosts", "rows", "bytes", "source files"):
                table.add_column(name, justify="left" if "UTC" in name else "right")
            table.add_column("run id")
            for a in c.archives:
                table.add_row(
                    str(a.cutoff),
                    ops.iso(a.cutoff) or "",
                    "-" if a.hosts is None else str(a.hosts),
                    f"{a.rows:,}",
                    f"{a.bytes:,}",
                    "-" if a.source_files is None else str(a.source_files),
                    a.run_id or "- (no ccarchive commit record)",
                )
            out.print(table)
        run = c.last_run
        if run is not None and run.outcome == "unfinished":
            out.print(
                f"  last run: started {run.started} unfinished ({run.mode}, cutoff "
                f"{run.cutoff}, run {run.run_id}, pid {run.pid} on {run.host}): still running, "
                f"or killed; the next run finishes its work; {c.runs} recorded",
                markup=False,
            )
        elif run is not None:
            out.print(
                f"  last run: {run.finished} {run.outcome} ({run.mode}, cutoff {run.cutoff}, "
                f"{run.files_archived} archived, {run.files_deleted} deleted, "
                f"{run.bad_count} kept, {run.seconds:.1f}s, run {run.run_id}); {c.runs} recorded",
                markup=False,
            )
            for e in run.errors:
                out.print(f"    error: {e}", markup=False)
        elif settings.run_log:
            out.print("  last run: none recorded")
        if c.pending is not None:
            deletes = [p for p in c.pending if p.action == "delete"]
            keeps = [p for p in c.pending if p.action == "keep"]
            out.print(
                f"  pending recoveries: {len(deletes)} archived file(s) to delete, "
                f"{len(keeps)} changed since archived (kept)"
            )
            for p in c.pending:
                out.print(
                    f"    {p.action}: {c.cluster}/{p.host}/{p.name} ({p.size} bytes, "
                    f"archived with {p.archived_size}) in {p.archive}",
                    markup=False,
                )
        for path in c.partial_files:
            out.print(f"  temporary file of an unfinished run: {path}", markup=False)
        for problem in c.problems:
            out.print(f"  problem: {problem}", markup=False)
    return EXIT_REPORTED if attention else EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe one archive file."""
    from . import ops, storage
    from .config import configure_storage

    settings = _settings({"config": args.config, "cc_backend_config": args.cc_backend_config})
    configure_storage(settings)
    fs, path = storage.filesystem(args.file)
    if not fs.exists(path):
        raise UsageError(f"{args.file} does not exist")
    try:
        kind = ops.file_kind_problem(fs, path)
        if kind is not None:
            raise UsageError(f"{args.file} is {kind}")
        with _progress_bar("scanning row groups") as progress:
            info = ops.inspect_file(args.file, progress)
    except UsageError:
        raise
    except Exception as exc:  # pyarrow: ArrowInvalid is a ValueError, and others
        raise UsageError(
            f"{args.file} is not a readable Parquet file: {ops.one_line(exc)}"
        ) from None
    _print_problems(info.problems)
    status = EXIT_REPORTED if info.problems else EXIT_OK
    if args.json:
        print(ops.to_json(info))
        return status
    out = _out()
    out.print(f"[bold]{escape(info.url)}[/bold]", markup=True, highlight=False)
    out.print(
        f"{info.bytes:,} bytes, {info.rows:,} rows, {len(info.row_groups)} row groups, "
        f"written by {info.created_by}",
        markup=False,
    )
    out.print(f"time range: {_when(info.time_min)} .. {_when(info.time_max)}", markup=False)
    out.print(f"sorted by: {', '.join(info.sorting_columns) or '-'}", markup=False)
    for key, value in info.metadata.items():
        out.print(f"{key}: {value}", markup=False)
    schema = Table(title="schema", box=None, pad_edge=False, title_justify="left")
    for name in ("column", "arrow", "physical", "logical", "required", "compression", "encodings"):
        schema.add_column(name)
    for col in info.columns:
        schema.add_row(
            col.name,
            col.arrow_type,
            col.physical_type,
            col.logical_type,
            "yes" if col.required else "no",
            col.compression,
            ",".join(col.encodings),
        )
    out.print(schema)
    groups = Table(title="row groups", box=None, pad_edge=False, title_justify="left")
    for name in ("#", "rows", "bytes", "host", "metrics", "time min", "time max"):
        groups.add_column(name, justify="right" if name in ("#", "rows", "bytes") else "left")
    for g in info.row_groups:
        groups.add_row(
            str(g.index),
            f"{g.rows:,}",
            f"{g.bytes:,}",
            "..".join(g.hosts),
            "..".join(g.metrics),
            str(g.time_min),
            str(g.time_max),
        )
    out.print(groups)
    out.print(f"hosts ({len(info.hosts)}): {', '.join(info.hosts)}", markup=False)
    out.print(f"metrics ({len(info.metrics)}): {', '.join(info.metrics)}", markup=False)
    sources = Table(title="sources (footer)", box=None, pad_edge=False, title_justify="left")
    for name in ("host", "rows", "files"):
        sources.add_column(name, justify="right" if name == "rows" else "left")
    for host, entry in info.sources.items():
        files = ", ".join(f"{f['name']} ({f['size']} B)" for f in entry.get("files", []))
        sources.add_row(host, f"{entry.get('rows', 0):,}", files)
    out.print(sources)
    return status


def _print_problems(problems: Sequence[str]) -> None:
    """One `problem: <file>: <reason>` line per problem, on stderr."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for problem in problems:
        err.print(f"problem: {problem}", markup=False)


def cmd_query(args: argparse.Namespace) -> int:
    """Read archived rows back, filtered by cluster, host, metric and time."""
    from . import ops, storage
    from .config import configure_storage

    settings = _settings(
        {
            "archive": args.archive,
            "config": args.config,
            "cc_backend_config": args.cc_backend_config,
        }
    )
    if not settings.archive:
        raise UsageError("give --archive DIR|URL (or set CCARCHIVE_ARCHIVE)")
    if "://" not in settings.archive and not Path(settings.archive).is_dir():
        raise UsageError(f"archive directory {settings.archive} does not exist")
    if args.limit is not None and args.limit < 0:
        raise UsageError("--limit must not be negative")
    try:
        start = ops.parse_time(args.start) if args.start is not None else None
        end = ops.parse_time(args.end) if args.end is not None else None
        from .steps import check_name

        for name in args.cluster or ():
            check_name(name, "cluster")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    to_terminal = args.output is None and sys.stdout.isatty()
    if args.format == "parquet" and to_terminal:
        raise UsageError("parquet output goes to --output FILE or a pipe, not a terminal")
    configure_storage(settings)
    with _progress_bar("planning (reading footers)") as progress:
        plan = ops.plan_query(
            settings.archive, args.cluster, args.host, args.metric, start, end, progress
        )
    limit = args.limit if args.limit is not None or args.format != "table" else 100
    if args.format == "table":
        code = _query_table(plan, limit, explicit=args.limit is not None)
        _print_problems(plan.problems)
        return EXIT_REPORTED if plan.problems else code
    from .rows import ARCHIVE_SCHEMA

    schema = plan.dataset.schema if plan.dataset is not None else ARCHIVE_SCHEMA
    rows = 0
    if args.output is None:
        sink: Any = sys.stdout.buffer
        rows = _write_rows(plan, schema, sink, args.format, limit)
        sink.flush()
    else:
        fs, path = storage.filesystem(args.output)
        with fs.open(path, "wb") as f:
            rows = _write_rows(plan, schema, f, args.format, limit)
    if Console(stderr=True).is_terminal:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"{rows:,} rows from {len(plan.files)} file(s); read {plan.row_groups_selected} "
            f"of {plan.row_groups_total} row groups",
            markup=False,
        )
    _print_problems(plan.problems)
    return EXIT_REPORTED if plan.problems else EXIT_OK


def _write_rows(plan: Any, schema: Any, sink: Any, fmt: str, limit: int | None) -> int:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from . import ops

    rows = 0
    # The footer metadata of the archives read does not describe the result: drop it.
    schema = schema.remove_metadata()
    writer: Any = (
        pacsv.CSVWriter(sink, schema)
        if fmt == "csv"
        else pq.ParquetWriter(sink, schema, compression="zstd")
    )
    try:
        for batch in ops.query_batches(plan, limit):
            writer.write_batch(batch.replace_schema_metadata(None))
            rows += batch.num_rows
    finally:
        writer.close()
    return rows


def _query_table(plan: Any, limit: int | None, explicit: bool = False) -> int:
    from . import ops

    out = _out()
    table = Table(box=None, pad_edge=False)
    names = ("cluster", "hostname", "metric", "scope", "scope_id", "timestamp", "frequency")
    for name in (*names, "time (UTC)", "value"):
        right = name in ("timestamp", "frequency", "value")
        table.add_column(name, justify="right" if right else "left")
    shown = 0
    more = False
    for batch in ops.query_batches(plan, None if limit is None else limit + 1):
        columns = [batch.column(n).to_pylist() for n in (*names, "value")]
        for row in zip(*columns, strict=True):
            if limit is not None and shown == limit:
                more = True
                break
            *keys, value = row
            table.add_row(*(str(k) for k in keys), ops.iso(keys[5]) or "", f"{value:.7g}")
            shown += 1
    out.print(table)
    if _stdout_reader_gone():
        raise BrokenPipeError  # `| head`: no note about rows nobody reads
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    note = f"{shown:,} rows; read {plan.row_groups_selected} of {plan.row_groups_total} row groups"
    if more and explicit:  # the operator asked for this many: no advice to ask for it
        note += f"; more rows match (--limit {limit})"
    elif more:
        note += f"; more rows match, not shown (the table stops at {limit}: use --limit N or --format csv)"
    if more or err.is_terminal:  # a pipe gets the rows only, unless some were left out
        err.print(note, markup=False)
    return EXIT_OK


def _add_plan_parser(sub: Any) -> None:
    plan = sub.add_parser(
        "plan", help="what the next archive run would take and keep; writes and deletes nothing"
    )
    plan.add_argument("--checkpoints", metavar="DIR", help="checkpoint root")
    plan.add_argument("--archive", metavar="DIR|URL", help="the archive root (read only)")
    when = plan.add_mutually_exclusive_group()
    when.add_argument("--cutoff", metavar="UNIX_TS", type=int, help="files with ts <= this")
    when.add_argument("--retention", metavar="DURATION", help="cutoff = now - DURATION")
    plan.add_argument("--mode", choices=("archive", "delete"), help="the run's mode")
    plan.add_argument(
        "--cluster", action="append", metavar="NAME", help="only this cluster (repeatable)"
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_options(plan)


def cmd_plan(args: argparse.Namespace) -> int:
    """Per cluster: files, bytes and estimated rows the next run would take, what it would
    keep and why; nothing is written or deleted and no pool is started."""
    import json

    from .dryrun import outlook

    settings = _settings(
        {
            "checkpoints": args.checkpoints,
            "archive": args.archive,
            "mode": args.mode,
            "config": args.config,
            "cc_backend_config": args.cc_backend_config,
        }
    )
    from .config import configure_storage

    configure_storage(settings)
    if not settings.checkpoints:
        raise UsageError("give --checkpoints DIR (or set CCARCHIVE_CHECKPOINTS)")
    if not Path(settings.checkpoints).is_dir():
        raise UsageError(f"checkpoint directory {settings.checkpoints} does not exist")
    if settings.mode == "archive" and not settings.archive:
        raise UsageError("give --archive DIR|URL (or set CCARCHIVE_ARCHIVE)")
    cutoff = _cutoff(args, settings)
    _check_clusters(settings.checkpoints, args.cluster)
    views = outlook(settings.checkpoints, settings.archive, cutoff, settings.mode, args.cluster)
    reported = any(v.kept or v.skipped for v in views)
    if args.json:
        doc = {"cutoff": cutoff, "mode": settings.mode, "clusters": [v.to_dict() for v in views]}
        print(json.dumps(doc, indent=2))
        return EXIT_REPORTED if reported else EXIT_OK
    verb = "archive" if settings.mode == "archive" else "delete"
    print(f"plan (nothing written or deleted): {verb} up to cutoff {_when(cutoff)}")
    print(f"{'cluster':<16} {'hosts':>6} {'files':>8} {'bytes':>15} {'rows (est.)':>14}")
    for v in views:
        print(f"{v.cluster:<16} {v.hosts:>6} {v.files:>8} {v.bytes:>15,} {v.rows_estimate:>14,}")
    for v in views:
        if v.skipped:
            print(f"{v.cluster}: skipped: {v.skipped}")
        for line in v.recovered:
            print(f"{v.cluster}: not archived again, recovery deletes it: {line}")
        for bad in v.kept:
            print(f"{v.cluster}: kept: {bad.path}: {bad.reason}")
    print("rows (est.): from file sizes, binary bytes/4 and JSON bytes/5 (docs/operations.md)")
    return EXIT_REPORTED if reported else EXIT_OK


COMMANDS = {
    "plan": cmd_plan,
    "archive": cmd_archive,
    "generate": cmd_generate,
    "status": cmd_status,
    "inspect": cmd_inspect,
    "query": cmd_query,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ccarchive` console script."""
    args = _parser().parse_args(argv)
    # rich exits 1 itself on a broken pipe, our "something was reported": let main decide.
    Console.on_broken_pipe = _reraise_broken_pipe  # type: ignore[method-assign,assignment]
    _COMMON_FLAGS["log_level"] = _log_level_flag(args)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()
        # A large write the reader stopped reading in the middle of returns short, without
        # an error: Python then drops the rest. Ask the pipe itself whether its reader left.
        return _closed_stdout() if _stdout_reader_gone() else code
    except UsageError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_stdout()


def _reraise_broken_pipe(_console: Console) -> None:
    raise BrokenPipeError


def _stdout_reader_gone() -> bool:
    """True if stdout is a pipe whose reading end is closed (poll reports POLLERR)."""
    import select
    import stat

    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):  # no real stdout (closed, or replaced by a test)
        return False


def _closed_stdout() -> int:
    """Exit quietly when the reader of stdout is gone (see EXIT_PIPE)."""
    # Python's own advice: point stdout at /dev/null, or its flush at exit prints
    # "Exception ignored ... BrokenPipeError" to stderr.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


if __name__ == "__main__":
    # `python -m workers.cli`: run the imported module's main, not this `__main__` copy, or
    # UsageError raised by workers.distributed.remote (workers.cli.UsageError) would not be
    # caught here.
    from workers.cli import main as _main

    sys.exit(_main())

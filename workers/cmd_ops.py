"""The operators' commands: `status`, `inspect`, `query` (read archives back) and `plan`
(what the next run would do); they read, present and pick the exit code, never write."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import status, storage
from .config import configure_storage
from .display import out as display_out
from .display import print_problems, progress_bar, when
from .dryrun import outlook
from .inspection import Inspection, file_kind_problem, inspect_file
from .paths import check_name
from .query import QueryPlan, parse_time, plan_query, query_batches
from .reporting import iso, one_line, to_json
from .rows import ARCHIVE_SCHEMA
from .usage import (
    EXIT_OK,
    EXIT_REPORTED,
    UsageError,
    check_clusters,
    command_settings,
    run_cutoff,
    stdout_reader_gone,
)


def cmd_status(args: argparse.Namespace) -> int:
    """Per cluster: archives, last run, pending recoveries. Exit 1 if anything needs a look."""
    settings = command_settings(
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
    with progress_bar("reading archive footers") as progress:
        result = status.status(
            archive, settings.checkpoints, settings.run_log, args.cluster, progress
        )
    attention = any(
        c.problems
        or c.partial_files
        or c.pending
        or (c.last_run is not None and c.last_run.outcome != "ok")
        for c in result.clusters
    )
    if args.json:
        print(to_json(result))
        return EXIT_REPORTED if attention else EXIT_OK
    _print_status(result, settings.checkpoints, settings.run_log)
    return EXIT_REPORTED if attention else EXIT_OK


def _print_status(result: status.Status, checkpoints: str | None, run_log: str | None) -> None:
    out = display_out()
    archive = result.archive
    if not checkpoints and archive:
        out.print("pending recoveries: unknown (checkpoints not configured: give --checkpoints)")
    if not run_log:
        out.print("last runs: unknown (run records are off: set CCARCHIVE_RUN_LOG)")
    if not result.clusters:
        out.print(f"no clusters under {archive or run_log}")
    if not archive:  # only run records: say what was read, not "0 archive(s)"
        out.print(
            f"run records in {run_log} only; archives not read (give --archive)", markup=False
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
            out.print(_archives_table(c.archives))
        _print_last_run(out, c, run_log)
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


def _archives_table(archives: list[status.ArchiveSummary]) -> Table:
    table = Table(box=None, pad_edge=False)
    for name in ("cutoff", "cutoff (UTC)", "hosts", "rows", "bytes", "source files"):
        table.add_column(name, justify="left" if "UTC" in name else "right")
    table.add_column("run id")
    for a in archives:
        table.add_row(
            str(a.cutoff),
            iso(a.cutoff) or "",
            "-" if a.hosts is None else str(a.hosts),
            f"{a.rows:,}",
            f"{a.bytes:,}",
            "-" if a.source_files is None else str(a.source_files),
            a.run_id or "- (no ccarchive commit record)",
        )
    return table


def _print_last_run(out: Console, c: status.ClusterStatus, run_log: str | None) -> None:
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
    elif run_log:
        out.print("  last run: none recorded")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe one archive file."""
    settings = command_settings(
        {"config": args.config, "cc_backend_config": args.cc_backend_config}
    )
    configure_storage(settings)
    fs, path = storage.filesystem(args.file)
    if not fs.exists(path):
        raise UsageError(f"{args.file} does not exist")
    try:
        kind = file_kind_problem(fs, path)
        if kind is not None:
            raise UsageError(f"{args.file} is {kind}")
        with progress_bar("scanning row groups") as progress:
            info = inspect_file(args.file, progress)
    except UsageError:
        raise
    except Exception as exc:  # pyarrow: ArrowInvalid is a ValueError, and others
        raise UsageError(f"{args.file} is not a readable Parquet file: {one_line(exc)}") from None
    print_problems(info.problems)
    code = EXIT_REPORTED if info.problems else EXIT_OK
    if args.json:
        print(to_json(info))
        return code
    _print_inspection(info)
    return code


def _print_inspection(info: Inspection) -> None:
    out = display_out()
    out.print(f"[bold]{escape(info.url)}[/bold]", markup=True, highlight=False)
    out.print(
        f"{info.bytes:,} bytes, {info.rows:,} rows, {len(info.row_groups)} row groups, "
        f"written by {info.created_by}",
        markup=False,
    )
    out.print(f"time range: {when(info.time_min)} .. {when(info.time_max)}", markup=False)
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
    out.print(_row_groups_table(info))
    out.print(f"hosts ({len(info.hosts)}): {', '.join(info.hosts)}", markup=False)
    out.print(f"metrics ({len(info.metrics)}): {', '.join(info.metrics)}", markup=False)
    out.print(_sources_table(info))


def _row_groups_table(info: Inspection) -> Table:
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
    return groups


def _sources_table(info: Inspection) -> Table:
    sources = Table(title="sources (footer)", box=None, pad_edge=False, title_justify="left")
    for name in ("host", "rows", "files"):
        sources.add_column(name, justify="right" if name == "rows" else "left")
    for host, entry in info.sources.items():
        files = ", ".join(f"{f['name']} ({f['size']} B)" for f in entry.get("files", []))
        sources.add_row(host, f"{entry.get('rows', 0):,}", files)
    return sources


def cmd_query(args: argparse.Namespace) -> int:
    """Read archived rows back, filtered by cluster, host, metric and time."""
    settings = command_settings(
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
        start = parse_time(args.start) if args.start is not None else None
        end = parse_time(args.end) if args.end is not None else None
        for name in args.cluster or ():
            check_name(name, "cluster")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    to_terminal = args.output is None and sys.stdout.isatty()
    if args.format == "parquet" and to_terminal:
        raise UsageError("parquet output goes to --output FILE or a pipe, not a terminal")
    configure_storage(settings)
    with progress_bar("planning (reading footers)") as progress:
        plan = plan_query(
            settings.archive, args.cluster, args.host, args.metric, start, end, progress
        )
    limit = args.limit if args.limit is not None or args.format != "table" else 100
    if args.format == "table":
        code = _query_table(plan, limit, explicit=args.limit is not None)
        print_problems(plan.problems)
        return EXIT_REPORTED if plan.problems else code
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
    print_problems(plan.problems)
    return EXIT_REPORTED if plan.problems else EXIT_OK


def _write_rows(plan: QueryPlan, schema: Any, sink: Any, fmt: str, limit: int | None) -> int:
    rows = 0
    # The footer metadata of the archives read does not describe the result: drop it.
    schema = schema.remove_metadata()
    writer: Any = (
        pacsv.CSVWriter(sink, schema)
        if fmt == "csv"
        else pq.ParquetWriter(sink, schema, compression="zstd")
    )
    try:
        for batch in query_batches(plan, limit):
            writer.write_batch(batch.replace_schema_metadata(None))
            rows += batch.num_rows
    finally:
        writer.close()
    return rows


def _query_table(plan: QueryPlan, limit: int | None, explicit: bool = False) -> int:
    out = display_out()
    table = Table(box=None, pad_edge=False)
    names = ("cluster", "hostname", "metric", "scope", "scope_id", "timestamp", "frequency")
    for name in (*names, "time (UTC)", "value"):
        right = name in ("timestamp", "frequency", "value")
        table.add_column(name, justify="right" if right else "left")
    shown = 0
    more = False
    for batch in query_batches(plan, None if limit is None else limit + 1):
        columns = [batch.column(n).to_pylist() for n in (*names, "value")]
        for row in zip(*columns, strict=True):
            if limit is not None and shown == limit:
                more = True
                break
            *keys, value = row
            table.add_row(*(str(k) for k in keys), iso(keys[5]) or "", f"{value:.7g}")
            shown += 1
    out.print(table)
    if stdout_reader_gone():
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


def cmd_plan(args: argparse.Namespace) -> int:
    """Per cluster: files, bytes and estimated rows the next run would take, what it would
    keep and why; nothing is written or deleted and no pool is started."""
    settings = command_settings(
        {
            "checkpoints": args.checkpoints,
            "archive": args.archive,
            "mode": args.mode,
            "config": args.config,
            "cc_backend_config": args.cc_backend_config,
        }
    )
    configure_storage(settings)
    if not settings.checkpoints:
        raise UsageError("give --checkpoints DIR (or set CCARCHIVE_CHECKPOINTS)")
    if not Path(settings.checkpoints).is_dir():
        raise UsageError(f"checkpoint directory {settings.checkpoints} does not exist")
    if settings.mode == "archive" and not settings.archive:
        raise UsageError("give --archive DIR|URL (or set CCARCHIVE_ARCHIVE)")
    cutoff = run_cutoff(args, settings)
    check_clusters(settings.checkpoints, args.cluster)
    views = outlook(settings.checkpoints, settings.archive, cutoff, settings.mode, args.cluster)
    reported = any(v.kept or v.skipped for v in views)
    if args.json:
        doc = {"cutoff": cutoff, "mode": settings.mode, "clusters": [v.to_dict() for v in views]}
        print(json.dumps(doc, indent=2))
        return EXIT_REPORTED if reported else EXIT_OK
    verb = "archive" if settings.mode == "archive" else "delete"
    print(f"plan (nothing written or deleted): {verb} up to cutoff {when(cutoff)}")
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

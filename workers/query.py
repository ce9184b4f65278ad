"""`ccarchive query`: archived rows back, filtered by cluster, host, metric and time.

Files are chosen by their names, row groups by their statistics (footers only); then only
the selected row groups are read, file by file, so a broken file never hides the others.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as ds

from . import storage
from .inspection import file_kind_problem, not_an_archive
from .paths import archive_files as cluster_archive_files
from .paths import cluster_dirs
from .reporting import ProgressFn, no_progress, one_line


@dataclass
class QueryPlan:
    """What a query reads: the files, and the row groups statistics could not rule out."""

    archive: str
    files: list[str]
    row_groups_total: int
    row_groups_selected: int
    dataset: ds.Dataset | None = field(default=None, repr=False)
    filter: ds.Expression | None = field(default=None, repr=False)
    #: Per readable file, its selected row groups (`query_batches` reads file by file).
    parts: list[tuple[str, list[ds.Fragment]]] = field(default_factory=list, repr=False)
    #: "<file>: <reason>" per file that could not be read; the others are read all the same.
    problems: list[str] = field(default_factory=list)


def parse_time(text: str) -> int:
    """A Unix timestamp from `1742380800`, `2026-03-19`, `2026-03-19T12:00` or `...Z`.

    Times without a zone are UTC, like the timestamps in the archive.
    """
    s = text.strip()
    if s.lstrip("-").isdigit():
        return int(s)
    try:
        moment = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r} (expected a Unix timestamp or ISO 8601, e.g. 2026-03-19T12:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _any_of(name: str, values: Sequence[str]) -> ds.Expression:
    # An OR of equalities rather than is_in: each term is checked against the row group's
    # min/max statistics, so row groups of other hosts and metrics are never read.
    expr = ds.field(name) == values[0]
    for v in values[1:]:
        expr = expr | (ds.field(name) == v)
    return expr


def archive_files(archive: str, clusters: Sequence[str] | None = None) -> list[str]:
    """The published archives `<archive>/<cluster>/<T>.parquet`, in cluster and cutoff order."""
    names = clusters or cluster_dirs(archive)
    return [url for cluster in names for url in cluster_archive_files(archive, cluster)]


def _filter(
    hosts: Sequence[str] | None,
    metrics: Sequence[str] | None,
    start: int | None,
    end: int | None,
) -> ds.Expression | None:
    """The row filter: any of the hosts, any of the metrics, start <= timestamp < end."""
    conditions: list[ds.Expression] = []
    if hosts:
        conditions.append(_any_of("hostname", hosts))
    if metrics:
        conditions.append(_any_of("metric", metrics))
    if start is not None:
        conditions.append(ds.field("timestamp") >= start)
    if end is not None:
        conditions.append(ds.field("timestamp") < end)
    expr: ds.Expression | None = None
    for c in conditions:
        expr = c if expr is None else expr & c
    return expr


def plan_query(
    archive: str,
    clusters: Sequence[str] | None = None,
    hosts: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    start: int | None = None,
    end: int | None = None,
    progress: ProgressFn = no_progress,
) -> QueryPlan:
    """Select files by cluster and row groups by statistics; `start` <= timestamp < `end`.

    Reads only footers. Row groups whose host, metric or time range cannot match are
    dropped here, before any data is read.
    """
    files = archive_files(archive, clusters)
    plan = QueryPlan(archive, files, 0, 0)
    expr = plan.filter = _filter(hosts, metrics, start, end)
    if not files:
        return plan
    fs, _ = storage.filesystem(files[0])  # one archive root: one filesystem
    parquet = ds.ParquetFileFormat()
    schema: pa.Schema | None = None
    for i, url in enumerate(files):
        path = storage.filesystem(url)[1]
        try:
            # One file at a time: a broken or foreign file is reported, not fatal.
            reason = file_kind_problem(fs, path)
            if reason is None:
                one = ds.dataset([path], format=parquet, filesystem=fs)  # reads the footer
                reason = not_an_archive(one.schema)
        except Exception as exc:
            reason = f"cannot read: {one_line(exc)}"
        if reason is not None:
            plan.problems.append(f"{url}: {reason}")
            progress(i + 1, len(files))
            continue
        if schema is None:
            schema = one.schema
            filesystem = one.filesystem
        for fragment in one.get_fragments():
            plan.row_groups_total += fragment.metadata.num_row_groups
            parts = fragment.split_by_row_group(expr) if expr is not None else [fragment]
            if expr is None:
                plan.row_groups_selected += fragment.metadata.num_row_groups
            else:
                plan.row_groups_selected += len(parts)
            plan.parts.append((url, parts))
        progress(i + 1, len(files))
    if schema is not None:
        selected = [f for _, fragments in plan.parts for f in fragments]
        plan.dataset = ds.FileSystemDataset(selected, schema, parquet, filesystem)
    return plan


def query_batches(plan: QueryPlan, limit: int | None = None) -> Iterator[pa.RecordBatch]:
    """The matching rows, batch by batch, in file order (each file sorted by host, metric,
    scope, scope_id, timestamp); at most `limit` rows.

    A file that fails while it is read (a corrupt page) is added to `plan.problems`; the
    rows it gave before stay written, and the next file is read.
    """
    if plan.dataset is None:
        return
    left = limit
    for url, fragments in plan.parts:
        one = ds.FileSystemDataset(
            fragments, plan.dataset.schema, plan.dataset.format, plan.dataset.filesystem
        )
        try:
            for batch in one.to_batches(filter=plan.filter):
                if left is not None:
                    if left <= 0:
                        return
                    if batch.num_rows > left:
                        batch = batch.slice(0, left)
                    left -= batch.num_rows
                if batch.num_rows:
                    yield batch
        except Exception as exc:  # a broken file must not hide the others
            plan.problems.append(f"{url}: cannot read: {one_line(exc)}")


__all__ = [
    "QueryPlan",
    "archive_files",
    "parse_time",
    "plan_query",
    "query_batches",
]

"""`ccarchive inspect`: a Parquet file's layout, contents and commit record, from its footer.

Also the checks `query` shares: is this path a regular file, are these an archive's columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import sink, storage
from .reporting import ProgressFn, no_progress
from .rows import ARCHIVE_SCHEMA


def not_an_archive(schema: pa.Schema) -> str | None:
    """Why a Parquet file's columns are not an archive's (SPEC §3), or None if they are."""
    missing, wrong = [], []
    for f in ARCHIVE_SCHEMA:
        i = schema.get_field_index(f.name)  # -1: absent or ambiguous
        if i < 0:
            missing.append(f.name)
        elif not schema.field(i).type.equals(f.type):
            wrong.append(f"{f.name} is {schema.field(i).type}, not {f.type}")
    if not missing and not wrong:
        return None
    parts = ([f"no column {', '.join(missing)}"] if missing else []) + wrong
    return f"not a metric archive: {'; '.join(parts)}"


def file_kind_problem(fs: Any, path: str) -> str | None:
    """None for a regular file; else why it cannot be read as one (never opens it)."""
    kind = fs.info(path).get("type")
    if kind == "directory":
        return "a directory, not a Parquet file"
    if kind != "file":  # a FIFO would block the reader forever
        return f"not a regular file ({kind})"
    return None


@dataclass(frozen=True)
class ColumnInfo:
    """One column as stored."""

    name: str
    arrow_type: str
    physical_type: str
    logical_type: str
    required: bool
    compression: str
    encodings: list[str]


@dataclass(frozen=True)
class RowGroupInfo:
    """One row group: its rows, size and the ranges its statistics declare."""

    index: int
    rows: int
    bytes: int  # compressed
    hosts: list[str]  # min and max hostname (one entry when they are equal)
    metrics: list[str]  # min and max metric
    time_min: int | None
    time_max: int | None


@dataclass
class Inspection:
    """`ccarchive inspect`: a Parquet file's layout, contents and commit record."""

    url: str
    bytes: int
    rows: int
    created_by: str
    metadata: dict[str, str]  # ccarchive.* footer keys, without the source list
    sorting_columns: list[str]
    columns: list[ColumnInfo]
    row_groups: list[RowGroupInfo]
    hosts: dict[str, int]  # rows per host, from row group statistics
    metrics: list[str]
    time_min: int | None
    time_max: int | None
    sources: dict[str, Any]  # per host {rows, files: [{name, size, rows}]}
    problems: list[str] = field(default_factory=list)  # e.g. not an archive's columns


def _stat_range(stats: Any) -> tuple[Any, Any]:
    if stats is None or not stats.has_min_max:
        return None, None
    return stats.min, stats.max


def _field_type(schema: pa.Schema, name: str) -> pa.DataType:
    i = schema.get_field_index(name)
    return schema.field(i).type if i >= 0 else pa.null()


def _columns(pf: pq.ParquetFile, names: list[str], arrow: pa.Schema) -> list[ColumnInfo]:
    """The stored columns, with the compression and encodings of the first row group."""
    md = pf.metadata
    first = md.row_group(0) if md.num_row_groups else None
    columns = []
    for i, name in enumerate(names):
        col = pf.schema.column(i)
        chunk = first.column(i) if first is not None else None
        columns.append(
            ColumnInfo(
                name=name,
                arrow_type=str(_field_type(arrow, name)) if "." not in name else "",
                physical_type=str(col.physical_type),
                logical_type=str(col.logical_type),
                required=col.max_definition_level == 0,
                compression=str(chunk.compression) if chunk is not None else "",
                encodings=[str(e) for e in chunk.encodings] if chunk is not None else [],
            )
        )
    return columns


@dataclass
class _Scan:
    """What the row groups tell, gathered group by group."""

    row_groups: list[RowGroupInfo] = field(default_factory=list)
    hosts: dict[str, int] = field(default_factory=dict)
    metrics: set[str] = field(default_factory=set)
    tmin: int | None = None
    tmax: int | None = None


def _group_info(rg: Any, g: int, cols: dict[str, int | None]) -> RowGroupInfo:
    """One row group's rows, size and statistics ranges (the columns given by leaf index)."""

    def stat_range(name: str) -> tuple[Any, Any]:
        c = cols[name]
        return _stat_range(rg.column(c).statistics) if c is not None else (None, None)

    h, m, (lo, hi) = stat_range("hostname"), stat_range("metric"), stat_range("timestamp")
    return RowGroupInfo(
        index=g,
        rows=rg.num_rows,
        bytes=sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)),
        hosts=sorted({x for x in h if x is not None}),
        metrics=sorted({x for x in m if x is not None}),
        time_min=lo,
        time_max=hi,
    )


def _scan(pf: pq.ParquetFile, cols: dict[str, int | None], progress: ProgressFn) -> _Scan:
    """Row group infos, rows per host, time range and the metric names, group by group."""
    md = pf.metadata
    scan = _Scan()
    for g in range(md.num_row_groups):
        info = _group_info(md.row_group(g), g, cols)
        scan.row_groups.append(info)
        if info.hosts:
            # Our row groups hold one host each; an upstream file's may span several,
            # then the rows are attributed to the range's first host.
            scan.hosts[info.hosts[0]] = scan.hosts.get(info.hosts[0], 0) + info.rows
        lo, hi = info.time_min, info.time_max
        if lo is not None and hi is not None:
            scan.tmin = lo if scan.tmin is None else min(scan.tmin, lo)
            scan.tmax = hi if scan.tmax is None else max(scan.tmax, hi)
        if cols["metric"] is not None:
            for chunk in pf.read_row_group(g, columns=["metric"]).column(0).chunks:
                if isinstance(chunk, pa.DictionaryArray):
                    used = chunk.dictionary.take(chunk.indices.unique().drop_null())
                else:
                    used = chunk.unique()
                scan.metrics.update(used.to_pylist())
        progress(g + 1, md.num_row_groups)
    return scan


#: The columns whose statistics `inspect` reads, and the types they must have.
_STAT_COLUMNS = {
    "hostname": pa.types.is_string,
    "metric": pa.types.is_string,
    "timestamp": pa.types.is_integer,
}


def inspect_file(url: str, progress: ProgressFn = no_progress) -> Inspection:
    """Describe one archive file: schema, row groups, hosts, time range, metrics, sources.

    Everything but the metric list comes from the footer; the metric names are read from
    the dictionary-encoded `metric` column one row group at a time (bounded memory).
    """
    fs, path = storage.filesystem(url)
    size = int(fs.size(path))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        foreign = not_an_archive(pf.schema_arrow)
        if pa.types.is_string(_field_type(pf.schema_arrow, "metric")):
            pf = pq.ParquetFile(f, read_dictionary=["metric"])  # names, not values, per group
        md = pf.metadata
        # Leaf columns by path ("a.b" for nested ones, only in files of another kind).
        names = [pf.schema.column(i).path for i in range(len(pf.schema))]
        index = {n: i for i, n in enumerate(names)}
        arrow = pf.schema.to_arrow_schema()  # not schema_arrow: that shows read_dictionary
        cols = {
            name: index[name] if name in index and ok(_field_type(arrow, name)) else None
            for name, ok in _STAT_COLUMNS.items()
        }
        columns = _columns(pf, names, arrow)
        scan = _scan(pf, cols, progress)
        footer = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    first = md.row_group(0) if md.num_row_groups else None
    sorting = []
    if first is not None and first.sorting_columns:
        sorting = [names[c.column_index] for c in first.sorting_columns]
    return Inspection(
        url=url,
        bytes=size,
        rows=md.num_rows,
        created_by=str(md.created_by),
        metadata={
            k: v
            for k, v in footer.items()
            if k.startswith(sink.META_PREFIX) and k != sink.META_PREFIX + "sources"
        },
        sorting_columns=sorting,
        columns=columns,
        row_groups=scan.row_groups,
        hosts=dict(sorted(scan.hosts.items())),
        metrics=sorted(m for m in scan.metrics if m is not None),
        time_min=scan.tmin,
        time_max=scan.tmax,
        sources=sink.footer_sources(footer),
        problems=[f"{url}: {foreign}"] if foreign else [],
    )


__all__ = [
    "ColumnInfo",
    "Inspection",
    "RowGroupInfo",
    "file_kind_problem",
    "inspect_file",
    "not_an_archive",
]

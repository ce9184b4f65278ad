"""From series to rows: one host's values as an Arrow table in archive order.

The output schema is SPEC §3. Within a host, rows are sorted by (metric, scope, scope_id,
timestamp); string columns are dictionary-encoded with sorted dictionaries, which is what
the Parquet sink stores anyway and costs a few bytes per distinct name instead of per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np
import pyarrow as pa
import xxhash

from .alloc import tune_allocator
from .checkpoint import FileBatch, Series

_DICT = pa.dictionary(pa.int32(), pa.string())

#: Columns of a host's staging chunk: the archive schema less cluster and hostname,
#: which are constant per chunk and added back when the archive is written.
CHUNK_SCHEMA = pa.schema(
    [
        pa.field("metric", _DICT, nullable=False),
        pa.field("scope", _DICT, nullable=False),
        pa.field("scope_id", _DICT, nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("frequency", pa.int64(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ]
)

#: The archive's row schema (SPEC §3), every column required.
ARCHIVE_SCHEMA = pa.schema(
    [
        pa.field("cluster", pa.string(), nullable=False),
        pa.field("hostname", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("scope", pa.string(), nullable=False),
        pa.field("scope_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("frequency", pa.int64(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ]
)

SORT_KEY = ("hostname", "metric", "scope", "scope_id", "timestamp")


def _dictionary(tables: Sequence[Sequence[str]]) -> tuple[list[str], list[np.ndarray]]:
    """The sorted distinct names of several small tables, and each table's codes into it."""
    dictionary = sorted(set().union(*tables))
    index = {name: code for code, name in enumerate(dictionary)}
    return dictionary, [np.array([index[n] for n in t], np.int32) for t in tables]


def host_table(parts: Sequence[FileBatch] | Sequence[Series]) -> pa.Table:
    """All rows of one host, missing values dropped, sorted by (metric, scope, scope_id, ts).

    `parts` are the host's files in order (or plain series, taken as one file); ties keep
    that order.
    """
    tune_allocator()
    if parts and not isinstance(parts[0], FileBatch):
        parts = [FileBatch.from_series(cast(Sequence[Series], parts))]
    batches = [b for b in cast(Sequence[FileBatch], parts) if len(b)]
    if not batches:
        return CHUNK_SCHEMA.empty_table()

    # Host-wide sorted dictionaries from the files' small tables, used entries only (a
    # level without metrics adds no scope): a string comparison per name, none per series.
    used = [
        np.bincount(b.level_codes, minlength=len(b.scopes)).astype(bool).tolist() for b in batches
    ]
    scope_tables = [
        [x for x, u in zip(b.scopes, keep, strict=True) if u]
        for b, keep in zip(batches, used, strict=True)
    ]
    scope_id_tables = [
        [x for x, u in zip(b.scope_ids, keep, strict=True) if u]
        for b, keep in zip(batches, used, strict=True)
    ]
    metric_dict, metric_maps = _dictionary([b.metric_names for b in batches])
    scope_dict, scope_maps = _dictionary(scope_tables)
    scope_id_dict, scope_id_maps = _dictionary(scope_id_tables)

    def level_map(b: FileBatch, keep: list[bool], codes: np.ndarray) -> np.ndarray:
        # Level -> code, through the used levels' table (unused levels never occur).
        full = np.zeros(len(b.scopes), np.int32)
        full[np.flatnonzero(keep)] = codes
        return full[b.level_codes]

    metric = np.concatenate([m[b.metric_codes] for b, m in zip(batches, metric_maps, strict=True)])
    scope = np.concatenate(
        [level_map(b, k, m) for b, k, m in zip(batches, used, scope_maps, strict=True)]
    )
    scope_id = np.concatenate(
        [level_map(b, k, m) for b, k, m in zip(batches, used, scope_id_maps, strict=True)]
    )
    starts = np.concatenate([b.starts for b in batches])
    freqs = np.concatenate([b.frequencies for b in batches])
    lengths = np.concatenate([b.lengths for b in batches])
    base = np.cumsum([0] + [len(b.values) for b in batches[:-1]])
    value_at = np.concatenate([b.offsets + o for b, o in zip(batches, base.tolist(), strict=True)])
    all_values = (
        np.concatenate([b.values for b in batches]) if len(batches) > 1 else batches[0].values
    )

    # Order whole series; lexsort is stable, so ties keep file and reader order. Rows
    # then only need sorting when two series of one key overlap in time or a frequency is
    # negative, which is rare.
    order = np.lexsort((starts, scope_id, scope, metric))
    metric, scope, scope_id = metric[order], scope[order], scope_id[order]
    starts, freqs, lengths, value_at = starts[order], freqs[order], lengths[order], value_at[order]
    n = len(order)
    offsets = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    values = _in_order(all_values, value_at, lengths, offsets, total)

    # Every slot's timestamp, start + (slot - offset) * frequency, from whole-series runs
    # (np.repeat) instead of per-row gathers; then the missing slots are dropped.
    if np.all(freqs == freqs[0]):
        f = int(freqs[0])
        timestamps = np.repeat(starts - offsets * f, lengths)
        timestamps += np.arange(total, dtype=np.int64) * f
    else:
        timestamps = np.repeat(starts - offsets * freqs, lengths)
        timestamps += np.arange(total, dtype=np.int64) * np.repeat(freqs, lengths)
    missing = np.flatnonzero(np.isnan(values))
    counts = lengths
    if len(missing):
        keep = np.ones(total, bool)
        keep[missing] = False
        values, timestamps = values[keep], timestamps[keep]
        owner = np.searchsorted(offsets, missing, side="right") - 1
        counts = lengths - np.bincount(owner, minlength=n)

    same_key = (
        (metric[1:] == metric[:-1]) & (scope[1:] == scope[:-1]) & (scope_id[1:] == scope_id[:-1])
    )
    if _needs_row_sort(same_key, starts, freqs, lengths):
        # Stable, so equal timestamps keep series order: the result is deterministic.
        rank = np.zeros(n, np.int32)
        np.cumsum(~same_key, out=rank[1:])
        owner = np.repeat(np.arange(n, dtype=np.int32), counts)
        perm = np.lexsort((timestamps, rank[owner]))
        owner, timestamps, values = owner[perm], timestamps[perm], values[perm]

        def column(codes: np.ndarray) -> np.ndarray:
            return codes[owner]

        frequency = freqs[owner]
    else:

        def column(codes: np.ndarray) -> np.ndarray:
            return np.repeat(codes, counts)

        frequency = np.repeat(freqs, counts)

    def encoded(codes: np.ndarray, dictionary: list[str]) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(
            _arrow(column(codes), pa.int32()), pa.array(dictionary, pa.string())
        )

    return pa.Table.from_arrays(
        [
            encoded(metric, metric_dict),
            encoded(scope, scope_dict),
            encoded(scope_id, scope_id_dict),
            _arrow(timestamps, pa.int64()),
            _arrow(frequency, pa.int64()),
            _arrow(values, pa.float32()),
        ],
        schema=CHUNK_SCHEMA,
    )


def _arrow(array: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A numpy array as an Arrow array without a copy (and without `pa.array`, whose first
    numpy argument costs every process ~25 ms importing numpy.ma)."""
    array = np.ascontiguousarray(array, type_.to_pandas_dtype())
    return pa.Array.from_buffers(type_, len(array), [None, pa.py_buffer(array)])


def _in_order(
    values: np.ndarray, at: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, total: int
) -> np.ndarray:
    """values[at[i]:][:lengths[i]] for every series i, back to back."""
    if total >= 200 * len(at):
        # Long series: one slice each (~0.9 us per series) beats a gather (~5 ns per value).
        return np.concatenate(
            [values[i : i + n] for i, n in zip(at.tolist(), lengths.tolist(), strict=True)]
        )
    # Short series: one gather, by int32 positions where they fit (half the traffic).
    index_type = np.int32 if len(values) < 2**31 and total < 2**31 else np.int64
    index = np.repeat((at - offsets).astype(index_type), lengths)
    index += np.arange(total, dtype=index_type)
    return values[index]


def _needs_row_sort(
    same_key: np.ndarray,
    starts: np.ndarray,
    freqs: np.ndarray,
    lengths: np.ndarray,
) -> bool:
    """Whether rows in series order are out of timestamp order within some key.

    `same_key[i]`: series i + 1 has the key of series i (the series are ordered by key,
    then start).
    """
    if np.any(freqs < 0):
        return True  # timestamps fall within a series
    # A series whose first slot lies before the last slot of the previous series of the
    # same key: two overlapping files.
    last = starts + (lengths - 1) * freqs
    return bool(np.any((starts[1:] < last[:-1]) & same_key))


_PLAIN_COLUMNS = ("timestamp", "frequency", "value")
_DICT_COLUMNS = ("metric", "scope", "scope_id")


class RowDigest:
    """A digest of one host's rows in order, the same however they are cut into batches.

    Load computes it from the rows it stages, finalize again from the rows it writes: a
    mismatch means the archive would not hold this host's very rows (SPEC §6.8), which
    row counts alone cannot tell. Each column is hashed as one stream (xxh3: ~10 GB/s, a
    few ms per million rows); a dictionary is hashed whenever it differs from the last.
    """

    def __init__(self) -> None:
        self.rows = 0
        self._hashes = {name: xxhash.xxh3_64() for name in (*_PLAIN_COLUMNS, *_DICT_COLUMNS)}
        self._dict_hashes = {name: xxhash.xxh3_64() for name in _DICT_COLUMNS}
        self._dicts: dict[str, pa.Array | None] = dict.fromkeys(_DICT_COLUMNS)

    def update(self, batch: pa.RecordBatch) -> None:
        """Fold in the next rows (columns named as in CHUNK_SCHEMA)."""
        self.rows += batch.num_rows
        for name in _PLAIN_COLUMNS:
            self._hashes[name].update(batch.column(name).to_numpy(zero_copy_only=True))
        for name in _DICT_COLUMNS:
            column = batch.column(name)
            last = self._dicts[name]
            if last is None or not (last is column.dictionary or last.equals(column.dictionary)):
                self._dicts[name] = column.dictionary
                self._dict_hashes[name].update("\0".join(column.dictionary.to_pylist()).encode())
                self._dict_hashes[name].update(b"\1")  # where one dictionary ends
            self._hashes[name].update(column.indices.to_numpy(zero_copy_only=True))

    def update_all(self, batches: Iterable[pa.RecordBatch]) -> None:
        """Fold in every batch."""
        for batch in batches:
            self.update(batch)

    def hexdigest(self) -> str:
        """The digest so far, with the row count: `<rows>:<hex>`."""
        parts = [h.intdigest() for h in (*self._hashes.values(), *self._dict_hashes.values())]
        return f"{self.rows}:{xxhash.xxh3_64_hexdigest(np.array(parts, np.uint64).tobytes())}"


def table_digest(table: pa.Table) -> str:
    """RowDigest of a whole table."""
    digest = RowDigest()
    digest.update_all(table.to_batches())
    return digest.hexdigest()

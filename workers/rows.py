"""From series to rows: one host's values as an Arrow table in archive order.

The output schema is SPEC §3. Within a host, rows are sorted by (metric, scope, scope_id,
timestamp); string columns are dictionary-encoded with sorted dictionaries, which is what
the Parquet sink stores anyway and costs a few bytes per distinct name instead of per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import xxhash

from .alloc import tune_allocator
from .checkpoint import Series

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


def count_values(series: Sequence[Series]) -> int:
    """Number of rows these series produce: their non-missing values."""
    if not series:
        return 0
    values = np.concatenate([s.values for s in series])
    return len(values) - int(np.count_nonzero(np.isnan(values)))


def _encode(names: Sequence[str]) -> tuple[np.ndarray, pa.Array]:
    """Per-item codes into a sorted dictionary of the distinct names."""
    dictionary = sorted(set(names))
    index = {name: code for code, name in enumerate(dictionary)}
    codes = np.fromiter((index[n] for n in names), dtype=np.int32, count=len(names))
    return codes, pa.array(dictionary, pa.string())


def host_table(series: Sequence[Series]) -> pa.Table:
    """All rows of one host, missing values dropped, sorted by (metric, scope, scope_id, ts)."""
    tune_allocator()
    # Order whole series (a few thousand tuples): rows then only need sorting when two
    # series of one key overlap in time or a frequency is negative, which is rare.
    order = sorted(
        range(len(series)),
        key=lambda i: (series[i].metric, series[i].scope, series[i].scope_id, series[i].start),
    )
    ordered = [series[i] for i in order]
    if not ordered:
        return CHUNK_SCHEMA.empty_table()
    n = len(ordered)
    lengths = np.fromiter((len(s.values) for s in ordered), dtype=np.int64, count=n)
    starts = np.fromiter((s.start for s in ordered), dtype=np.int64, count=n)
    freqs = np.fromiter((s.frequency for s in ordered), dtype=np.int64, count=n)
    offsets = np.cumsum(lengths) - lengths
    values = np.concatenate([s.values for s in ordered]).astype(np.float32, copy=False)
    total = len(values)

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

    metric_codes, metric_dict = _encode([s.metric for s in ordered])
    scope_codes, scope_dict = _encode([s.scope for s in ordered])
    scope_id_codes, scope_id_dict = _encode([s.scope_id for s in ordered])
    keys = [(s.metric, s.scope, s.scope_id) for s in ordered]
    if _needs_row_sort(keys, starts, freqs, lengths):
        # Stable, so equal timestamps keep file order: the result is deterministic.
        rank = np.repeat(np.asarray(_key_ranks(keys), dtype=np.int32), counts)
        owner = np.repeat(np.arange(n, dtype=np.int32), counts)
        perm = np.lexsort((timestamps, rank))
        owner, timestamps, values = owner[perm], timestamps[perm], values[perm]

        def column(codes: np.ndarray) -> np.ndarray:
            return codes[owner]

        frequency = freqs[owner]
    else:

        def column(codes: np.ndarray) -> np.ndarray:
            return np.repeat(codes, counts)

        frequency = np.repeat(freqs, counts)

    return pa.Table.from_arrays(
        [
            pa.DictionaryArray.from_arrays(column(metric_codes), metric_dict),
            pa.DictionaryArray.from_arrays(column(scope_codes), scope_dict),
            pa.DictionaryArray.from_arrays(column(scope_id_codes), scope_id_dict),
            pa.array(timestamps, pa.int64()),
            pa.array(frequency, pa.int64()),
            pa.array(values, pa.float32()),
        ],
        schema=CHUNK_SCHEMA,
    )


def _needs_row_sort(
    keys: Sequence[tuple[str, str, str]],
    starts: np.ndarray,
    freqs: np.ndarray,
    lengths: np.ndarray,
) -> bool:
    """Whether rows in series order are out of timestamp order within some key."""
    if np.any(freqs < 0):
        return True  # timestamps fall within a series
    # A series whose first slot lies before the last slot of the previous series of the
    # same key (the series are ordered by key, then start): two overlapping files.
    last = starts + (lengths - 1) * freqs
    overlap = np.flatnonzero(starts[1:] < last[:-1])
    return any(keys[i] == keys[i + 1] for i in overlap.tolist())


def _key_ranks(keys: Sequence[tuple[str, str, str]]) -> list[int]:
    """Dense rank of each (already sorted) key: equal neighbours share a rank."""
    ranks: list[int] = []
    rank = -1
    previous: tuple[str, str, str] | None = None
    for k in keys:
        if k != previous:
            rank += 1
            previous = k
        ranks.append(rank)
    return ranks


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

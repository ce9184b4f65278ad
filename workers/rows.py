"""From series to rows: one host's values as an Arrow table in archive order.

The output schema is SPEC §3. Within a host, rows are sorted by (metric, scope, scope_id,
timestamp); string columns are dictionary-encoded with sorted dictionaries, which is what
the Parquet sink stores anyway and costs a few bytes per distinct name instead of per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

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
    return sum(len(s.values) - int(np.count_nonzero(np.isnan(s.values))) for s in series)


def _encode(names: Sequence[str]) -> tuple[np.ndarray, pa.Array]:
    """Per-item codes into a sorted dictionary of the distinct names."""
    dictionary = sorted(set(names))
    index = {name: code for code, name in enumerate(dictionary)}
    codes = np.fromiter((index[n] for n in names), dtype=np.int32, count=len(names))
    return codes, pa.array(dictionary, pa.string())


def host_table(series: Sequence[Series]) -> pa.Table:
    """All rows of one host, missing values dropped, sorted by (metric, scope, scope_id, ts)."""
    # Order whole series first (a few thousand tuples), so rows only need sorting when two
    # series of one key overlap in time or a frequency is not positive.
    order = sorted(
        range(len(series)),
        key=lambda i: (series[i].metric, series[i].scope, series[i].scope_id, series[i].start),
    )
    ordered = [series[i] for i in order]
    if not ordered:
        return CHUNK_SCHEMA.empty_table()
    lengths = np.fromiter((len(s.values) for s in ordered), dtype=np.int64, count=len(ordered))
    starts = np.fromiter((s.start for s in ordered), dtype=np.int64, count=len(ordered))
    freqs = np.fromiter((s.frequency for s in ordered), dtype=np.int64, count=len(ordered))
    values = np.concatenate([s.values for s in ordered]).astype(np.float32, copy=False)
    present = ~np.isnan(values)

    # Row -> series, then timestamp = start + (position within series) * frequency.
    owner = np.repeat(np.arange(len(ordered), dtype=np.int32), lengths)[present]
    offsets = np.cumsum(lengths) - lengths
    position = np.flatnonzero(present) - offsets[owner]
    timestamps = starts[owner] + position * freqs[owner]
    values = values[present]

    metric_codes, metric_dict = _encode([s.metric for s in ordered])
    scope_codes, scope_dict = _encode([s.scope for s in ordered])
    scope_id_codes, scope_id_dict = _encode([s.scope_id for s in ordered])

    key = np.fromiter(
        _key_ranks([(s.metric, s.scope, s.scope_id) for s in ordered]),
        dtype=np.int32,
        count=len(ordered),
    )[owner]
    same_key = key[1:] == key[:-1]
    if np.any(same_key & (timestamps[1:] < timestamps[:-1])):
        # Stable, so equal timestamps keep file order: the result is deterministic.
        perm = np.lexsort((timestamps, key))
        owner, timestamps, values = owner[perm], timestamps[perm], values[perm]

    def column(codes: np.ndarray, dictionary: pa.Array) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(codes[owner]), dictionary)

    return pa.Table.from_arrays(
        [
            column(metric_codes, metric_dict),
            column(scope_codes, scope_dict),
            column(scope_id_codes, scope_id_dict),
            pa.array(timestamps, pa.int64()),
            pa.array(freqs[owner], pa.int64()),
            pa.array(values, pa.float32()),
        ],
        schema=CHUNK_SCHEMA,
    )


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

"""Checkpoint files of the ClusterCockpit metric store: the JSON and binary readers.

A reader turns one file into a `FileBatch`: its series as columns (starts, frequencies,
lengths, value offsets, and codes into small per-file tables of metric names and levels),
one per metric of every level, with the scope taken from the level's name (SPEC §2–3).
Missing values are NaN and are dropped later, when rows are built. `Series` (one object
per metric) is the same content for tests and tools; the hot path never makes one.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from .alloc import tune_allocator
from .paths import INT64_MAX, BadCheckpoint

MAGIC = 0xCC5B0001
INT64_MIN = -(2**63)

#: How deep levels may nest below the top level (node -> socket -> core -> hwthread is 3).
#: A deeper file is bad: a nesting bomb must cost neither quadratic time nor memory.
MAX_DEPTH = 64
#: orjson refuses documents nested deeper than this (objects and arrays together).
JSON_MAX_NESTING = 1024

# Order matters: "cpu" must not shadow "core", and "hwthread" is tried before "cpu".
_SCOPE_PREFIXES = (
    ("socket", "socket"),
    ("memoryDomain", "memoryDomain"),
    ("core", "core"),
    ("hwthread", "hwthread"),
    ("cpu", "hwthread"),
    ("accelerator", "accelerator"),
)


@dataclass(frozen=True, slots=True)
class Series:
    """One metric of one level: values[i] was sampled at start + i * frequency."""

    metric: str
    scope: str
    scope_id: str
    frequency: int
    start: int
    values: np.ndarray  # float32, NaN = missing


@dataclass(frozen=True, slots=True, eq=False)
class FileBatch:
    """One file's series as columns; series i's values are values[offsets[i]:][:lengths[i]].

    Series are in the reader's order (which breaks ties when rows are sorted). Metric
    names and levels are small per-file tables: `metric_codes` index `metric_names`,
    `level_codes` index `scopes` / `scope_ids` (one entry per level, used or not).
    """

    metric_names: list[str]
    metric_codes: np.ndarray  # int32
    scopes: list[str]
    scope_ids: list[str]
    level_codes: np.ndarray  # int32
    starts: np.ndarray  # int64
    frequencies: np.ndarray  # int64
    lengths: np.ndarray  # int64
    offsets: np.ndarray  # int64
    values: np.ndarray  # float32, NaN = missing; may hold values no series refers to
    rows: int  # non-missing values of the series: the rows this file gives

    def __len__(self) -> int:
        return len(self.starts)

    def series(self) -> list[Series]:
        """The same content as one `Series` per metric (tests and tools)."""
        return [
            Series(
                self.metric_names[m],
                self.scopes[lv],
                self.scope_ids[lv],
                f,
                s,
                self.values[o : o + n],
            )
            for m, lv, f, s, o, n in zip(
                self.metric_codes.tolist(),
                self.level_codes.tolist(),
                self.frequencies.tolist(),
                self.starts.tolist(),
                self.offsets.tolist(),
                self.lengths.tolist(),
                strict=True,
            )
        ]

    @classmethod
    def from_series(cls, series: Sequence[Series]) -> FileBatch:
        """Columns of a list of series (the general readers' output, tests)."""
        n = len(series)
        names: dict[str, int] = {}
        levels: dict[tuple[str, str], int] = {}
        metric_codes = np.fromiter(
            (names.setdefault(s.metric, len(names)) for s in series), np.int32, n
        )
        level_codes = np.fromiter(
            (levels.setdefault((s.scope, s.scope_id), len(levels)) for s in series), np.int32, n
        )
        lengths = np.fromiter((len(s.values) for s in series), np.int64, n)
        values = (
            np.concatenate([s.values for s in series]).astype(np.float32, copy=False)
            if n
            else np.empty(0, np.float32)
        )
        return cls(
            metric_names=list(names),
            metric_codes=metric_codes,
            scopes=[scope for scope, _ in levels],
            scope_ids=[scope_id for _, scope_id in levels],
            level_codes=level_codes,
            starts=np.fromiter((s.start for s in series), np.int64, n),
            frequencies=np.fromiter((s.frequency for s in series), np.int64, n),
            lengths=lengths,
            offsets=np.cumsum(lengths) - lengths,
            values=values,
            rows=len(values) - int(np.count_nonzero(np.isnan(values))),
        )


def _present(values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> int:
    """Non-missing values in the ranges values[offsets[i]:][:lengths[i]] (disjoint)."""
    missing = np.isnan(values)
    if int(lengths.sum()) == len(values):  # the ranges cover every value
        return len(values) - int(np.count_nonzero(missing))
    before = np.zeros(len(values) + 1, np.int64)
    np.cumsum(missing, out=before[1:])
    return int(lengths.sum() - (before[offsets + lengths] - before[offsets]).sum())


def _timestamps_fit(starts: np.ndarray, frequencies: np.ndarray, lengths: np.ndarray) -> bool:
    """Whether every series' last timestamp, start + (length - 1) * frequency, fits in int64."""
    # In float64 first: a last timestamp beyond int64 is >= 2**63 in magnitude, far above
    # 2**62 even after rounding; only series near that are checked exactly, one by one.
    with np.errstate(over="ignore", invalid="ignore"):
        last = starts.astype(np.float64) + (lengths - 1).astype(np.float64) * frequencies
    near = np.flatnonzero((np.abs(last) >= 2.0**62) & (lengths > 1))
    return all(
        INT64_MIN <= s + (n - 1) * f <= INT64_MAX
        for s, f, n in zip(
            starts[near].tolist(), frequencies[near].tolist(), lengths[near].tolist(), strict=True
        )
    )


def parse_scope(name: str) -> tuple[str, str]:
    """Map a child level's name to (scope, scope_id), e.g. `cpu7` -> ("hwthread", "7")."""
    for prefix, scope in _SCOPE_PREFIXES:
        if (
            name.startswith(prefix)
            and len(name) > len(prefix)
            and name[len(prefix)] in "0123456789"
        ):
            return scope, name[len(prefix) :]
    return name, ""


@functools.lru_cache(maxsize=4096)
def _cached_scope(name: str) -> tuple[str, str]:
    return parse_scope(name)


def _scope_of(name: str) -> tuple[str, str]:
    """parse_scope, remembered for short names (`cpu7` recurs in every file of a host)."""
    # Long names are not kept: a hostile file must not fill the cache with megabytes.
    return _cached_scope(name) if len(name) <= 40 else parse_scope(name)


# --- JSON -----------------------------------------------------------------------------


class _NegativeZero(float):
    """The integer token `-0`: orjson would return int 0 and lose the sign."""


_NEG_ZERO_INT = re.compile(rb"-0(?![0-9.eE])")
_VALUE_TYPES = frozenset({float, int, type(None), _NegativeZero})


def _loads(data: bytes) -> Any:
    """The document as orjson reads it; BadCheckpoint if it is no JSON or nested too deep."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in exc.msg or "recursion limit" in exc.msg:
            raise BadCheckpoint(
                f"nesting deeper than {JSON_MAX_NESTING} JSON objects and arrays "
                f"at byte {exc.pos} (levels may nest {MAX_DEPTH} deep)"
            ) from None
        if "memory" in exc.msg:  # orjson could not allocate: not the file's fault
            raise BadCheckpoint(f"out of memory while parsing the JSON: {exc.msg}") from None
        raise BadCheckpoint(f"invalid JSON: {exc}") from exc


def _loads_keeping_negative_zero(data: bytes) -> Any:
    """The document as the standard library reads it, with the integer `-0` as -0.0."""
    try:
        return json.loads(data, parse_int=_parse_int_keep_negative_zero)
    except RecursionError:
        # Only unknown keys can still nest this deep: the levels were checked before.
        raise BadCheckpoint(
            "nested too deep for Python's JSON parser (needed to keep the sign of -0)"
        ) from None
    except MemoryError:
        raise BadCheckpoint("out of memory re-reading the file to keep the sign of -0") from None


def _parse_int_keep_negative_zero(text: str) -> int | float:
    return _NegativeZero(-0.0) if text == "-0" else int(text)


def _as_int64(value: Any, what: str) -> int:
    if type(value) is _NegativeZero:
        return 0
    if type(value) is not int:  # bool is an int subclass but not a JSON integer
        raise BadCheckpoint(f"{what} is not an integer: {value!r:.40}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadCheckpoint(f"{what} does not fit in int64: {value}")
    return value


def _json_values(data: Any) -> np.ndarray:
    if not isinstance(data, list):
        raise BadCheckpoint("data is not an array")
    if not _VALUE_TYPES.issuperset(map(type, data)):
        bad = next(v for v in data if type(v) not in _VALUE_TYPES)
        raise BadCheckpoint(f"value {bad!r:.40} is not a number or null")
    try:
        # None becomes NaN here; huge integers that overflow float64 raise.
        values64 = np.array(data, dtype=np.float64)
    except OverflowError as exc:
        raise BadCheckpoint("a value overflows float64") from exc
    if values64.ndim != 1:
        raise BadCheckpoint("data is not a flat array")
    with np.errstate(over="ignore"):
        # float64 -> float32 rounds to nearest-even and saturates to ±inf: Go's float32(x).
        return values64.astype(np.float32)


def parse_json(data: bytes) -> list[Series]:
    """Parse a JSON checkpoint into series; raise BadCheckpoint naming the first problem."""
    return parse_json_batch(data).series()


def parse_json_batch(data: bytes) -> FileBatch:
    """Parse a JSON checkpoint into a FileBatch; raise BadCheckpoint naming the first problem.

    Two readers, one result: the vectorised reader below handles what checkpoint writers
    produce (plain decimals, no backslashes) at several times orjson's speed; whenever it
    cannot vouch for a file, the general reader (orjson, value by value) decides, and it
    alone reports errors.
    """
    tune_allocator()
    try:
        return _json_batch_fast(data)
    except Exception:  # any doubt at all: the general reader is the authority
        return FileBatch.from_series(_parse_json_general(data))


def _parse_json_general(data: bytes) -> list[Series]:
    doc = _loads(data)
    if b"-0" in data and _NEG_ZERO_INT.search(data):
        # Rare (the upstream writer prints "-0.0"): orjson reads the integer `-0` as 0, the
        # standard library keeps its sign. Its parser recurses, so it gets only a document
        # whose levels were checked (depth included) on orjson's reading first.
        _walk_json(doc, _json_values)
        doc = _loads_keeping_negative_zero(data)
    return _walk_json(doc, _json_values)


# Where a level sits, for messages only: a chain (name, parent's chain), None at the top.
# Levels share their parents' links, so a deep file costs one small tuple per level, not
# one path string per level (quadratic in the depth).
_Trail = tuple[str, Any] | None


def _path(names: list[str]) -> str:
    """`/socket0/cpu7` for a message; a long path shows its first and last names only."""
    if len(names) > 8:
        names = [*names[:4], f"...{len(names) - 7} more...", *names[-3:]]
    return "".join("/" + (n if len(n) <= 64 else n[:61] + "...") for n in names)


def _trail_path(trail: _Trail, name: str | None = None) -> str:
    names = [] if name is None else [name]
    while trail is not None:
        names.append(trail[0])
        trail = trail[1]
    return _path(names[::-1])


def _walk_json(doc: Any, values_of: Callable[[Any], np.ndarray]) -> list[Series]:
    """Series of a parsed document, levels depth first; `values_of(data)` decodes an array.

    A problem raises BadCheckpoint with the place it was found, spelled out only then.
    """
    if not isinstance(doc, dict):
        raise BadCheckpoint("top level is not a JSON object")
    out: list[Series] = []
    # Explicit stack (a hostile file must not hit Python's recursion limit) of
    # (level, scope, scope_id, depth, where): `where` is the level's trail.
    stack: list[tuple[dict[str, Any], str, str, int, _Trail]] = [(doc, "node", "", 0, None)]
    while stack:
        level, scope, scope_id, depth, where = stack.pop()
        metrics = level.get("metrics")
        if not isinstance(metrics, dict):
            raise BadCheckpoint(
                f"{_trail_path(where) or '/'}: 'metrics' is missing or not an object"
            )
        # Only inner levels may omit "children" (SPEC §2).
        children = level.get("children", None if depth == 0 else {})
        if not isinstance(children, dict):
            raise BadCheckpoint(
                f"{_trail_path(where) or '/'}: 'children' is missing or not an object"
            )
        for name, metric in metrics.items():
            try:
                if not isinstance(metric, dict):
                    raise BadCheckpoint("metric is not an object")
                frequency = _as_int64(metric.get("frequency"), "frequency")
                start = _as_int64(metric.get("start"), "start")
                values = values_of(metric.get("data"))
                n = len(values)
                if n > 1 and not INT64_MIN <= start + (n - 1) * frequency <= INT64_MAX:
                    raise BadCheckpoint("timestamps overflow int64")
            except BadCheckpoint as exc:
                raise BadCheckpoint(f"{_trail_path(where, name)}: {exc.reason}") from None
            out.append(Series(name, scope, scope_id, frequency, start, values))
        if children and depth == MAX_DEPTH:
            first = next(iter(children))
            raise BadCheckpoint(
                f"nesting deeper than {MAX_DEPTH} levels at {_trail_path(where, first)}"
            )
        for child_name, child in children.items():
            if not isinstance(child, dict):
                raise BadCheckpoint(
                    f"{_trail_path(where, child_name)}: child level is not an object"
                )
            stack.append((child, *parse_scope(child_name), depth + 1, (child_name, where)))
    return out


# --- JSON, vectorised -------------------------------------------------------------------
#
# A checkpoint is ~99 % number arrays. This reader finds every innermost ("flat") array
# outside strings, checks and converts all their tokens at once, and hands orjson only the
# skeleton, in which each flat array's text is replaced by its index: `"data":[0.1,null]`
# becomes `"data":[17]`. The original is valid JSON exactly when the skeleton is and every
# replaced array is a valid list of numbers and nulls, so orjson still checks everything
# else (strings, nesting, keys, trailing bytes) and the same walker runs on the skeleton.
#
# Tokens: byte rules (character classes and neighbours) admit exactly the JSON number
# grammar and `null`, except for a second "." or exponent in one token or a "." after the
# exponent, which the float parser then rejects. pyarrow's string -> float64 cast
# (fast_float: correctly rounded for any number of digits) converts them; SPEC §3 wants
# exactly that float64, then rounded to float32.

_JSON_SPACE = (b" ", b"\t", b"\n", b"\r")
_COMMA, _OPEN, _CLOSE, _QUOTE = ord(","), ord("["), ord("]"), ord('"')
_ZERO, _DOT, _MINUS, _PLUS = ord("0"), ord("."), ord("-"), ord("+")


class _NotFast(Exception):
    """The vectorised reader cannot vouch for this file: the general reader decides."""


def _parse_json_fast(data: bytes) -> list[Series]:
    """The vectorised reader alone, as series (tests compare it with the general one)."""
    return _json_batch_fast(data).series()


_FREQUENCY, _START, _DATA, _FIRST = (
    itemgetter("frequency"),
    itemgetter("start"),
    itemgetter("data"),
    itemgetter(0),
)
_EMPTY: dict[str, Any] = {}


def _json_batch_fast(data: bytes) -> FileBatch:
    """The vectorised reader: raises (anything) where it cannot vouch for the file."""
    skeleton, values, offsets = _flat_arrays(data)
    try:
        doc = orjson.loads(skeleton)
    except orjson.JSONDecodeError as exc:
        raise _NotFast from exc
    # Levels depth first in _walk_json's order (children popped last first): the same
    # series order, hence the same order of rows that tie. Per level only list extends;
    # the metrics of the whole file are then checked and converted in one pass each.
    names: list[str] = []
    metrics: list[Any] = []
    level_sizes: list[int] = []
    scopes: list[str] = []
    scope_ids: list[str] = []
    stack: list[tuple[Any, str, str, int]] = [(doc, "node", "", 0)]
    while stack:
        level, scope, scope_id, depth = stack.pop()
        if type(level) is not dict:
            raise _NotFast
        level_metrics = level["metrics"]
        children = level["children"] if depth == 0 else level.get("children", _EMPTY)
        if type(level_metrics) is not dict or type(children) is not dict:
            raise _NotFast
        names.extend(level_metrics)
        metrics.extend(level_metrics.values())
        level_sizes.append(len(level_metrics))
        scopes.append(scope)
        scope_ids.append(scope_id)
        if children:
            if depth == MAX_DEPTH:
                raise _NotFast
            for child_name, child in children.items():
                stack.append((child, *_scope_of(child_name), depth + 1))
    n = len(metrics)
    if n:
        if set(map(type, metrics)) != {dict}:
            raise _NotFast
        frequencies, starts, datas = (
            list(map(_FREQUENCY, metrics)),
            list(map(_START, metrics)),
            list(map(_DATA, metrics)),
        )
        # Exactly int (bool is a subclass); every data a `[k]`, which only flat array k became.
        if set(map(type, frequencies)) != {int} or set(map(type, starts)) != {int}:
            raise _NotFast
        if set(map(type, datas)) != {list} or set(map(len, datas)) != {1}:
            raise _NotFast
        ks = list(map(_FIRST, datas))
        if set(map(type, ks)) != {int}:
            raise _NotFast
    else:
        frequencies, starts, ks = [], [], []
    # Integers beyond int64 raise OverflowError here: the general reader reports them.
    freq_a = np.array(frequencies, np.int64)
    start_a = np.array(starts, np.int64)
    k = np.array(ks, np.int64)
    if n and (int(k.min()) < 0 or int(k.max()) >= len(offsets) - 1):
        raise _NotFast
    value_offsets = offsets[k]
    lengths = offsets[k + 1] - value_offsets
    if not _timestamps_fit(start_a, freq_a, lengths):
        raise _NotFast
    metric_names, metric_codes = _codes(names)
    return _file_batch(
        metric_names,
        metric_codes,
        (scopes, scope_ids, level_sizes),
        (start_a, freq_a, lengths, value_offsets),
        values,
        _present(values, value_offsets, lengths),
    )


def _file_batch(
    metric_names: list[str],
    metric_codes: np.ndarray,
    levels: tuple[list[str], list[str], list[int]],
    series: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    values: np.ndarray,
    rows: int,
) -> FileBatch:
    """A FileBatch from the levels' (scopes, scope ids, metric counts) and the series'
    (starts, frequencies, lengths, value offsets): both readers end here."""
    scopes, scope_ids, level_sizes = levels
    starts, frequencies, lengths, offsets = series
    return FileBatch(
        metric_names=metric_names,
        metric_codes=metric_codes,
        scopes=scopes,
        scope_ids=scope_ids,
        level_codes=np.repeat(np.arange(len(level_sizes), dtype=np.int32), level_sizes),
        starts=starts,
        frequencies=frequencies,
        lengths=lengths,
        offsets=offsets,
        values=values,
        rows=rows,
    )


def _codes(names: list[Any]) -> tuple[list[Any], np.ndarray]:
    """(distinct names in first-seen order, each name's index among them) without a sort."""
    table = dict.fromkeys(names)
    index = dict(zip(table, range(len(table)), strict=True))
    return list(table), np.fromiter(map(index.__getitem__, names), np.int32, len(names))


def _flat_spans(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of "[" and "]" of every array outside strings that holds no "["."""
    marks = np.flatnonzero((buf == _QUOTE) | (buf == _OPEN) | (buf == _CLOSE))
    if not len(marks):
        return marks, marks  # no strings, no arrays: nothing to decode
    kind = buf[marks]
    quote = kind == _QUOTE
    # Without backslashes every quote opens or closes a string: a bracket is inside a
    # string iff an odd number of quotes precede it.
    in_string = (np.cumsum(quote) & 1).astype(bool)
    if in_string[-1]:
        raise _NotFast  # unterminated string
    opens = marks[(kind == _OPEN) & ~in_string]
    closes = marks[(kind == _CLOSE) & ~in_string]
    if not len(opens):
        return opens, opens  # no arrays: nothing to decode
    first_close = np.searchsorted(closes, opens)
    if first_close[-1] >= len(closes):
        raise _NotFast
    ends = closes[first_close]
    flat = ends < np.append(opens[1:], len(buf))  # no "[" before the next "]"
    return opens[flat], ends[flat]


def _flat_arrays(data: bytes) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(skeleton, float32 values of all flat arrays, offsets of each array in them)."""
    if b"\\" in data:
        raise _NotFast  # escapes: a quote would not always delimit a string
    buf = np.frombuffer(data, np.uint8)
    starts, ends = _flat_spans(buf)
    full = ends > starts + 1
    # The non-empty arrays' "[" + text back to back, and one "[" closing the last one:
    # every token then sits between two separators ("[" or ",").
    s_full, e_full = starts[full], ends[full]
    view = memoryview(data)
    text = bytearray().join(
        [view[s:e] for s, e in zip(s_full.tolist(), e_full.tolist(), strict=True)]
    )
    text += b"["
    opens = np.zeros(len(s_full) + 1, np.int64)
    np.cumsum(e_full - s_full, out=opens[1:])
    if any(c in data for c in _JSON_SPACE) and _space(np.frombuffer(text, np.uint8)).any():
        return _flat_arrays(_without_space_in_arrays(buf, starts, ends))
    counts = np.zeros(len(starts), np.int64)
    if len(s_full):
        values, first = _decode_tokens(text, opens)
        counts[full] = np.diff(first)
    else:
        values = np.empty(0, np.float32)
    offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])

    # The skeleton: the text between flat arrays, each array's text replaced by its index.
    n = len(starts)
    gaps = [
        data[i:j]
        for i, j in zip([0, *ends.tolist()], [*(starts + 1).tolist(), len(data)], strict=True)
    ]
    parts: list[bytes] = [b""] * (2 * n + 1)
    parts[0::2] = gaps
    parts[1::2] = _indices(n)
    return b"".join(parts), values, offsets


_INDICES = [b"%d" % k for k in range(1 << 14)]


def _indices(n: int) -> list[bytes]:
    """[b"0", b"1", ..., b"<n - 1>"]; the first 16 k are made once (a host file has ~1 k)."""
    if n <= len(_INDICES):
        return _INDICES[:n]
    return _INDICES + [b"%d" % k for k in range(len(_INDICES), n)]


def _space(chars: np.ndarray) -> np.ndarray:
    return (chars == 32) | (chars == 9) | (chars == 10) | (chars == 13)


def _without_space_in_arrays(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> bytes:
    """The document without whitespace inside flat arrays, unless it separates two tokens."""
    space = np.flatnonzero(_space(buf))
    k = np.searchsorted(starts, space) - 1
    gone = space[(k >= 0) & (space < ends[np.maximum(k, 0)])]
    run_first = gone[np.r_[True, np.diff(gone) != 1]]
    run_last = gone[np.r_[np.diff(gone) != 1, True]]
    separators = np.array([_COMMA, _OPEN, _CLOSE], np.uint8)
    if not np.all(np.isin(buf[run_first - 1], separators) | np.isin(buf[run_last + 1], separators)):
        raise _NotFast  # "[1 2]"
    return np.delete(buf, gone).tobytes()


def _decode_tokens(text: bytearray, opens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 values (NaN for null) of the tokens in `text`; index of each array's first.

    `text` holds, per array, "[" and its tokens separated by ","; then a final "[".
    `opens` are the positions of all "[". `text` is modified in place for pyarrow.
    """
    chars = np.frombuffer(text, np.uint8)
    # Dense rules for the bytes of plain decimals, with Python int operands: numpy scalar
    # operands take a much slower path here. (chars - 48) wraps below "0".
    digit = (chars - _ZERO) < 10
    sep = chars == _COMMA
    sep[opens] = True  # a flat array's text holds no "[": these are all of them
    dot = chars == _DOT
    M, P, N = slice(1, -1), slice(None, -2), slice(2, None)  # a byte, the one before, after
    bad = sep[:-1] & sep[1:]  # empty token: "[,", ",,", trailing ","
    bad[1:] |= dot[M] & ~(digit[P] & digit[N])  # "1.", ".5"
    bad[1:] |= (chars[M] == _ZERO) & sep[P] & digit[N]  # leading zero: "01"
    if bad.any():
        raise _NotFast
    other = np.flatnonzero(~(digit | sep | dot))
    del digit, dot, bad  # a host's masks are megabytes each: free them before the cast
    nulls = _check_rare(chars, other) if len(other) else other

    bounds = np.flatnonzero(sep)
    # Token i is the string from its separator to the next one. The separator becomes a
    # leading "0" ("[12.5" -> "012.5"), or the sign of a negative number ("-05.5"); a
    # null becomes "00000" and NaN afterwards.
    fill = (chars - _ZERO) * sep.view(np.uint8)
    chars -= fill
    signs = other[(chars[other] == _MINUS) & sep[other - 1]]
    chars[signs - 1] = _MINUS
    chars[signs] = _ZERO
    for i in range(4):
        chars[nulls + i] = _ZERO
    del sep, fill
    strings = pa.LargeStringArray.from_buffers(
        len(bounds) - 1, pa.py_buffer(bounds), pa.py_buffer(text)
    )
    try:
        values64 = pc.cast(strings, pa.float64()).to_numpy()
    except pa.ArrowInvalid as exc:
        raise _NotFast from exc  # "1.2.3", "1e5e5"
    del strings
    if np.isinf(values64).any():
        raise _NotFast  # overflows float64: a bad file, reported by the general reader
    with np.errstate(over="ignore"):
        # float64 -> float32 rounds to nearest-even and saturates to ±inf: Go's float32(x).
        values = values64.astype(np.float32)
    values[np.searchsorted(bounds, nulls) - 1] = np.nan
    return values, np.searchsorted(bounds, opens)


def _check_rare(chars: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Check the bytes at `at` (signs, exponents, nulls); return where each `null` starts."""
    # at is never the first or last byte (both "["); reads past the end clip to that "[".
    c, before, after = chars[at], chars[at - 1], chars[at + 1]

    def digit(x: np.ndarray) -> np.ndarray:
        return (x - _ZERO) < 10

    def sep(x: np.ndarray) -> np.ndarray:
        return (x == _COMMA) | (x == _OPEN)

    def exp(x: np.ndarray) -> np.ndarray:
        return (x | 0x20) == ord("e")

    minus, plus, e, n = c == _MINUS, c == _PLUS, exp(c), c == ord("n")
    u, ell = c == ord("u"), c == ord("l")
    ok = minus & (sep(before) | exp(before)) & digit(after)
    # A number's own sign: its first digit must not be a leading zero ("-01").
    ok &= ~(minus & sep(before) & (after == _ZERO) & digit(chars.take(at + 2, mode="clip")))
    ok |= e & digit(before) & (digit(after) | (after == _PLUS) | (after == _MINUS))
    ok |= plus & exp(before) & digit(after)
    # "n", "u", "l" only as the exact token "null": each "n" starts one, and there are
    # exactly as many "u" and twice as many "l" as "n".
    starts = at[n]
    null = sep(chars[starts - 1]) & sep(chars.take(starts + 4, mode="clip"))
    for i, letter in enumerate(b"ull", 1):
        null &= chars.take(starts + i, mode="clip") == letter
    ok |= (n | u | ell) & bool(null.all())
    if (
        not ok.all()
        or np.count_nonzero(u) != len(starts)
        or np.count_nonzero(ell) != 2 * len(starts)
    ):
        raise _NotFast
    return starts


# --- binary ---------------------------------------------------------------------------

_HEADER = struct.Struct("<Iqq")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_METRIC_HEAD = struct.Struct("<qqI")

#: What a read is for, in a message: a string, or a function making it (for paths, which
#: are built only when a message needs them).
_What = str | Callable[[], str]


def _said(what: _What) -> str:
    return what if isinstance(what, str) else what()


class _Cursor:
    """Bounds-checked little-endian reads over one file's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: _What) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise BadCheckpoint(f"truncated: {_said(what)} at byte {self.pos} runs past the end")
        view = self.data[self.pos : end]
        self.pos = end
        return view

    def unpack(self, fmt: struct.Struct, what: _What) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))

    def name(self, what: _What) -> str:
        (length,) = self.unpack(_U16, lambda: f"{_said(what)} name length")
        raw = self.take(length, lambda: f"{_said(what)} name")
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise BadCheckpoint(
                f"{_said(what)} name at byte {self.pos - length} is not UTF-8"
            ) from exc


def parse_binary(data: bytes) -> list[Series]:
    """Parse a binary checkpoint into series; raise BadCheckpoint on wrong magic or truncation."""
    return parse_binary_batch(data).series()


def parse_binary_batch(data: bytes) -> FileBatch:
    """Parse a binary checkpoint into a FileBatch; raise BadCheckpoint saying what is wrong.

    The fast reader below does as little as it can per metric and checks the rest for the
    whole file at once; wherever it fails, the checked reader reads the file again and
    says why it is bad (it is the authority, as the general JSON reader is).
    """
    tune_allocator()
    try:
        return _binary_batch_fast(data)
    except Exception:
        return FileBatch.from_series(_parse_binary_checked(data))


_U32_FROM = _U32.unpack_from


def _binary_batch_fast(data: bytes) -> FileBatch:
    """The layout is sequential, so a loop per metric stays; it only notes where each begins.

    Reads past the end raise (IndexError, struct.error) and a length running past the end
    makes the next read fail, since every level ends with a child count.
    """
    magic, _from, _to = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise _NotFast
    size = len(data)
    pos = _HEADER.size
    at: list[int] = []  # where each metric (its name length) begins
    at_append = at.append
    level_sizes: list[int] = []
    scopes: list[str] = ["node"]
    scope_ids: list[str] = [""]
    left: list[int] = []  # per open level, the children still to read
    while True:
        (n_metrics,) = _U32_FROM(data, pos)
        pos += 4
        level_sizes.append(n_metrics)
        for _ in range(n_metrics):
            at_append(pos)
            # name length, name, frequency and start (skipped), n_values, values
            head = pos + 2 + (data[pos] | data[pos + 1] << 8)
            pos = head + 20 + 4 * _U32_FROM(data, head + 16)[0]
        (n_children,) = _U32_FROM(data, pos)
        pos += 4
        left.append(n_children)
        while left[-1] == 0:
            left.pop()
            if not left:
                return _binary_batch(data, at, level_sizes, scopes, scope_ids)
        left[-1] -= 1
        end = pos + 2 + (data[pos] | data[pos + 1] << 8)
        if end > size or len(left) > MAX_DEPTH:
            raise _NotFast
        scope, scope_id = _scope_of(str(data[pos + 2 : end], "utf-8"))
        scopes.append(scope)
        scope_ids.append(scope_id)
        pos = end


def _field(buf: np.ndarray, at: np.ndarray, dtype: str) -> np.ndarray:
    """The little-endian integer of type `dtype` at each position `at` of `buf`, as int64."""
    width = np.dtype(dtype).itemsize
    raw = buf[at[:, None] + np.arange(width, dtype=at.dtype)]  # (metrics, width) bytes
    return raw.view(dtype).reshape(-1).astype(np.int64)


def _binary_batch(
    data: bytes,
    at: list[int],
    level_sizes: list[int],
    scopes: list[str],
    scope_ids: list[str],
) -> FileBatch:
    """The FileBatch of what _binary_batch_fast found: the metrics' fields, names and values
    gathered for the whole file at once (the fast loop proved every header in bounds)."""
    buf = np.frombuffer(data, np.uint8)
    begin = np.array(at, np.int64)
    head = begin + 2 + (buf[begin].astype(np.int64) | buf[begin + 1].astype(np.int64) << 8)
    # Positions as int32 where they fit: the index arrays are the largest temporaries
    # here (a file of empty metrics has one per 22 bytes).
    at32 = head.astype(np.int32 if len(data) < 2**31 - 32 else np.int64)
    frequencies = _field(buf, at32, "<i8")
    starts = _field(buf, at32 + 8, "<i8")
    lengths = _field(buf, at32 + 16, "<u4")
    if not _timestamps_fit(starts, frequencies, lengths):
        raise _NotFast
    names = [data[i:j] for i, j in zip((begin + 2).tolist(), head.tolist(), strict=True)]
    distinct, metric_codes = _codes(names)
    metric_names = [str(name, "utf-8") for name in distinct]  # UnicodeDecodeError: bad
    # The values are most of the file: one copy of each metric's run of bytes, in file
    # order, which is series order.
    view = memoryview(data)
    first = head + 20
    last = first + 4 * lengths
    raw = b"".join([view[i:j] for i, j in zip(first.tolist(), last.tolist(), strict=True)])
    values = np.frombuffer(raw, "<f4").astype(np.float32, copy=False)
    offsets = np.cumsum(lengths) - lengths
    return _file_batch(
        metric_names,
        metric_codes,
        (scopes, scope_ids, level_sizes),
        (starts, frequencies, lengths, offsets),
        values,
        len(values) - int(np.count_nonzero(np.isnan(values))),
    )


def _parse_binary_checked(data: bytes) -> list[Series]:
    """The checked reader: series of a good file, else BadCheckpoint saying what is wrong."""
    cur = _Cursor(data)
    (magic, _from, _to) = cur.unpack(_HEADER, "header")
    if magic != MAGIC:
        raise BadCheckpoint(f"wrong magic 0x{magic:08X} (expected 0x{MAGIC:08X})")
    out: list[Series] = []
    # Levels are stored depth first, each child right after its name, so two stacks replace
    # recursion: per open level (the top first) the children still to read, and the names
    # of the open levels below the top. Paths are spelled out only for a message.
    left: list[int] = []
    names: list[str] = []
    scope, scope_id = "node", ""
    size = len(data)
    while True:
        n_metrics = _u32(cur, lambda: f"{_path(names) or '/'} metric count")
        for _ in range(n_metrics):
            # Fast path: one bounds check per metric, no cursor calls, values as a view of
            # the file's bytes. Anything off and the checked reads below say what.
            pos = cur.pos
            if pos + 2 <= size:
                head = pos + 2 + _U16.unpack_from(data, pos)[0]
                if head + 20 <= size:
                    frequency, start, n_values = _METRIC_HEAD.unpack_from(data, head)
                    end = head + 20 + 4 * n_values
                    if end <= size and (
                        n_values < 2 or INT64_MIN <= start + (n_values - 1) * frequency <= INT64_MAX
                    ):
                        try:
                            name = str(data[pos + 2 : head], "utf-8")
                        except UnicodeDecodeError:
                            pass
                        else:
                            values = np.frombuffer(data, "<f4", n_values, head + 20)
                            out.append(Series(name, scope, scope_id, frequency, start, values))
                            cur.pos = end
                            continue
            _bad_metric(cur, _path(names))
        n_children = _u32(cur, lambda: f"{_path(names) or '/'} child count")
        left.append(n_children)
        while left[-1] == 0:
            left.pop()
            if not left:
                return out
            names.pop()
        left[-1] -= 1
        # Inline, like a metric's name: files may hold very many small levels.
        pos, child = cur.pos, None
        if pos + 2 <= size and (end := pos + 2 + _U16.unpack_from(data, pos)[0]) <= size:
            try:
                child = str(data[pos + 2 : end], "utf-8")
                cur.pos = end
            except UnicodeDecodeError:
                pass
        if child is None:  # the checked read says what is wrong
            child = cur.name(lambda: f"{_path(names)}/ child")
        if len(left) > MAX_DEPTH:  # the child's depth: the top's children are at depth 1
            raise BadCheckpoint(
                f"nesting deeper than {MAX_DEPTH} levels at {_path([*names, child])}"
            )
        names.append(child)
        scope, scope_id = parse_scope(child)


def _u32(cur: _Cursor, what: _What) -> int:
    """The next uint32 (a count); BadCheckpoint if the file ends before it."""
    pos = cur.pos
    if pos + 4 <= len(cur.data):
        cur.pos = pos + 4
        return int.from_bytes(cur.data[pos : pos + 4], "little")
    (value,) = cur.unpack(_U32, what)
    return int(value)


def _bad_metric(cur: _Cursor, path: str) -> None:
    """Re-read the metric at the cursor with checked reads: raise BadCheckpoint saying why."""
    name = cur.name(f"{path}/ metric")
    where = f"{path}/{name}"
    frequency, start, n_values = cur.unpack(_METRIC_HEAD, f"{where} header")
    cur.take(4 * n_values, f"{where} values")
    if n_values > 1 and not INT64_MIN <= start + (n_values - 1) * frequency <= INT64_MAX:
        raise BadCheckpoint(f"{where}: timestamps overflow int64")
    raise AssertionError(f"the fast path refused a good metric at {where}")  # pragma: no cover

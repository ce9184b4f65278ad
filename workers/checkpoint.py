"""Checkpoint files of the ClusterCockpit metric store: naming, JSON and binary readers.

A reader turns one file into a list of `Series`: one per metric of every level, with the
scope taken from the level's name (SPEC §2–3). Values stay whole numpy arrays; missing
values are NaN and are dropped later, when rows are built.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

MAGIC = 0xCC5B0001
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
CHECKPOINT_SUFFIXES = (".json", ".bin")

# Order matters: "cpu" must not shadow "core", and "hwthread" is tried before "cpu".
_SCOPE_PREFIXES = (
    ("socket", "socket"),
    ("memoryDomain", "memoryDomain"),
    ("core", "core"),
    ("hwthread", "hwthread"),
    ("cpu", "hwthread"),
    ("accelerator", "accelerator"),
)


class BadCheckpoint(Exception):
    """A checkpoint file that cannot be archived; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Series:
    """One metric of one level: values[i] was sampled at start + i * frequency."""

    metric: str
    scope: str
    scope_id: str
    frequency: int
    start: int
    values: np.ndarray  # float32, NaN = missing


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


def checkpoint_timestamp(name: str) -> int | BadCheckpoint | None:
    """Classify a file name: its timestamp, None when it is no checkpoint, or why it is bad."""
    stem, dot, ext = name.rpartition(".")
    if not dot or "." + ext not in CHECKPOINT_SUFFIXES:
        return None
    # isdigit() alone would accept non-ASCII digits such as "٣".
    if not stem or not stem.isascii() or not stem.isdigit():
        return BadCheckpoint(f"file name stem {stem!r} is not a Unix timestamp")
    ts = int(stem)
    if ts > INT64_MAX:
        return BadCheckpoint(f"file name stem {stem!r} does not fit in int64")
    return ts


def read_checkpoint(path: Path) -> list[Series]:
    """Read one checkpoint file (format chosen by its extension); raise BadCheckpoint."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadCheckpoint(f"cannot read: {exc.strerror or exc}") from exc
    if path.suffix == ".bin":
        return parse_binary(data)
    return parse_json(data)


# --- JSON -----------------------------------------------------------------------------


class _NegativeZero(float):
    """The integer token `-0`: orjson would return int 0 and lose the sign."""


_NEG_ZERO_INT = re.compile(rb"-0(?![0-9.eE])")
_VALUE_TYPES = frozenset({float, int, type(None), _NegativeZero})


def _loads(data: bytes) -> Any:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadCheckpoint(f"invalid JSON: {exc}") from exc
    if b"-0" in data and _NEG_ZERO_INT.search(data):
        # Rare (the upstream writer prints "-0.0"): re-parse keeping the sign of `-0`.
        import json

        doc = json.loads(data, parse_int=_parse_int_keep_negative_zero)
    return doc


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


def _json_values(data: Any, where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise BadCheckpoint(f"{where}: data is not an array")
    if not _VALUE_TYPES.issuperset(map(type, data)):
        bad = next(v for v in data if type(v) not in _VALUE_TYPES)
        raise BadCheckpoint(f"{where}: value {bad!r:.40} is not a number or null")
    try:
        # None becomes NaN here; huge integers that overflow float64 raise.
        values64 = np.array(data, dtype=np.float64)
    except OverflowError as exc:
        raise BadCheckpoint(f"{where}: a value overflows float64") from exc
    if values64.ndim != 1:
        raise BadCheckpoint(f"{where}: data is not a flat array")
    with np.errstate(over="ignore"):
        # float64 -> float32 rounds to nearest-even and saturates to ±inf: Go's float32(x).
        return values64.astype(np.float32)


def parse_json(data: bytes) -> list[Series]:
    """Parse a JSON checkpoint into series; raise BadCheckpoint naming the first problem."""
    doc = _loads(data)
    if not isinstance(doc, dict):
        raise BadCheckpoint("top level is not a JSON object")
    out: list[Series] = []
    # Explicit stack: a hostile file must not hit Python's recursion limit.
    stack: list[tuple[dict[str, Any], str, str, str, bool]] = [(doc, "node", "", "", True)]
    while stack:
        level, scope, scope_id, path, top = stack.pop()
        metrics = level.get("metrics")
        if not isinstance(metrics, dict):
            raise BadCheckpoint(f"{path or '/'}: 'metrics' is missing or not an object")
        # Only inner levels may omit "children" (SPEC §2).
        children = level.get("children", None if top else {})
        if not isinstance(children, dict):
            raise BadCheckpoint(f"{path or '/'}: 'children' is missing or not an object")
        for name, metric in metrics.items():
            where = f"{path}/{name}"
            if not isinstance(metric, dict):
                raise BadCheckpoint(f"{where}: metric is not an object")
            frequency = _as_int64(metric.get("frequency"), f"{where}: frequency")
            start = _as_int64(metric.get("start"), f"{where}: start")
            values = _json_values(metric.get("data"), where)
            out.append(_series(name, scope, scope_id, frequency, start, values, where))
        for child_name, child in children.items():
            if not isinstance(child, dict):
                raise BadCheckpoint(f"{path}/{child_name}: child level is not an object")
            stack.append((child, *parse_scope(child_name), f"{path}/{child_name}", False))
    return out


def _series(
    metric: str,
    scope: str,
    scope_id: str,
    frequency: int,
    start: int,
    values: np.ndarray,
    where: str,
) -> Series:
    if len(values) > 1 and not INT64_MIN <= start + (len(values) - 1) * frequency <= INT64_MAX:
        raise BadCheckpoint(f"{where}: timestamps overflow int64")
    return Series(metric, scope, scope_id, frequency, start, values)


# --- binary ---------------------------------------------------------------------------

_HEADER = struct.Struct("<Iqq")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_METRIC_HEAD = struct.Struct("<qqI")


class _Cursor:
    """Bounds-checked little-endian reads over one file's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise BadCheckpoint(f"truncated: {what} at byte {self.pos} runs past the end")
        view = self.data[self.pos : end]
        self.pos = end
        return view

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))

    def name(self, what: str) -> str:
        (length,) = self.unpack(_U16, f"{what} name length")
        raw = self.take(length, f"{what} name")
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise BadCheckpoint(f"{what} name at byte {self.pos - length} is not UTF-8") from exc


def parse_binary(data: bytes) -> list[Series]:
    """Parse a binary checkpoint into series; raise BadCheckpoint on wrong magic or truncation."""
    cur = _Cursor(data)
    (magic, _from, _to) = cur.unpack(_HEADER, "header")
    if magic != MAGIC:
        raise BadCheckpoint(f"wrong magic 0x{magic:08X} (expected 0x{MAGIC:08X})")
    out: list[Series] = []
    # Levels are stored depth first, each child right after its name, so a stack of
    # (path, children still to read) frames replaces recursion.
    frames: list[list[Any]] = []
    scope, scope_id, path = "node", "", ""
    while True:
        (n_metrics,) = cur.unpack(_U32, f"{path or '/'} metric count")
        for _ in range(n_metrics):
            name = cur.name(f"{path}/ metric")
            where = f"{path}/{name}"
            frequency, start, n_values = cur.unpack(_METRIC_HEAD, f"{where} header")
            raw = cur.take(4 * n_values, f"{where} values")
            values = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
            out.append(_series(name, scope, scope_id, frequency, start, values, where))
        (n_children,) = cur.unpack(_U32, f"{path or '/'} child count")
        frames.append([path, n_children])
        while frames and frames[-1][1] == 0:
            frames.pop()
        if not frames:
            return out
        frames[-1][1] -= 1
        parent = frames[-1][0]
        child = cur.name(f"{parent}/ child")
        scope, scope_id = parse_scope(child)
        path = f"{parent}/{child}"

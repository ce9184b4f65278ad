"""How results read: ISO 8601 times, one-line errors, JSON of results, progress callbacks."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

#: progress(done, total): called as long work advances (the CLI draws a bar on a terminal).
ProgressFn = Callable[[int, int], None]


def no_progress(_done: int, _total: int) -> None:
    """A progress callback that shows nothing."""
    return None


def iso(ts: float | None) -> str | None:
    """A Unix time as an ISO 8601 UTC string (None stays None)."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # beyond year 9999: any int64 is valid
        return None


def to_json(obj: Any) -> str:
    """A dataclass result as indented JSON (for `--json`)."""
    data = (
        dataclasses.asdict(obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type)
        else obj
    )
    return json.dumps(data, indent=2, default=str, ensure_ascii=False)


def one_line(exc: BaseException) -> str:
    """An exception as one line of a problem report."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())

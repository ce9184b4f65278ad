"""Configuration in one place: `CCARCHIVE_*` environment variables (and, later, files).

Every process (CLI, embedded runner, Celery worker, beat) builds one `Settings` and passes
plain values from it to the steps, which never read the environment themselves.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string such as `48h`, `1h30m` or `90s`; ValueError if invalid."""
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    pos, total = 0, 0.0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r} (expected e.g. 48h, 1h30m, 90s)")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f"invalid duration {text!r} (expected e.g. 48h, 1h30m, 90s)")
    return sign * total


class Settings(BaseSettings):
    """All settings of the archiver; env vars are the field names upper-cased, prefixed CCARCHIVE_."""

    model_config = SettingsConfigDict(env_prefix="CCARCHIVE_", extra="ignore")

    checkpoints: str | None = None
    archive: str | None = None
    staging: str | None = None
    mode: Literal["archive", "delete"] = "archive"
    retention: str | None = None  # Go duration, e.g. "48h"
    interval: str | None = None  # beat interval; defaults to the retention
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None  # defaults to the broker

    row_group_rows: int = Field(default=1_048_576, ge=1)
    zstd_level: int = Field(default=3, ge=1, le=22)
    chunk_compression: Literal["lz4", "zstd", "none"] = "lz4"
    # Temporary archive files and staging runs older than this belong to dead runs.
    recovery_grace: str = "6h"

    @field_validator("retention", "interval", "recovery_grace")
    @classmethod
    def _valid_duration(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) <= 0:
            raise ValueError("must be a positive duration")
        return value

    @property
    def retention_seconds(self) -> float | None:
        """The retention as seconds, if configured."""
        return parse_duration(self.retention) if self.retention else None

    @property
    def grace_seconds(self) -> float:
        """The recovery grace period in seconds."""
        return parse_duration(self.recovery_grace)

    @property
    def results_url(self) -> str:
        """Where Celery keeps task results."""
        return self.result_backend or self.broker_url

    @property
    def ipc_compression(self) -> str | None:
        """Arrow IPC codec for staging chunks (None = uncompressed)."""
        return None if self.chunk_compression == "none" else self.chunk_compression

"""Small typed records that travel between the steps (and, as JSON, through task messages)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def shown_name(name: str) -> str:
    """A name or path as reports show it: itself when printable UTF-8, else quoted with
    its control characters and undecodable bytes escaped (`'a\\tb'`, `'a\\xffb'`)."""
    try:  # undecodable bytes from a directory listing come as surrogate escapes
        text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # any other lone surrogate (from a JSON message)
        text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    if text == name and name.isprintable():
        return name
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return f"'{escaped}'"


@dataclass(frozen=True)
class SourceFile:
    """A checkpoint file as read: its name in the host directory, size, row count and identity.

    The identity (device, inode, times, content digest) is what a deletion checks first:
    only the very bytes that were archived may go (SPEC §6.7).
    """

    name: str
    size: int
    rows: int = 0
    dev: int = 0
    ino: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    digest: str = ""  # xxh3-64 of the file's bytes as parsed; "" when never read (delete mode)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceFile:
        """From a message or a footer entry; unknown keys (newer writers) are ignored."""
        return cls(**{k: v for k, v in data.items() if k in _SOURCE_FIELDS})

    @property
    def identified(self) -> bool:
        """True when the record names one inode (older commit records do not)."""
        return self.ino != 0


_SOURCE_FIELDS = frozenset(SourceFile.__dataclass_fields__)


@dataclass(frozen=True)
class BadFile:
    """An input that was reported and left in place."""

    path: str
    reason: str


@dataclass
class HostManifest:
    """What loading one host produced: the files it covers and where its rows are staged."""

    cluster: str
    host: str
    cutoff: int
    run_id: str
    files: list[SourceFile] = field(default_factory=list)
    rows: int = 0
    chunk: str | None = None  # staging URL; None when the host has no rows
    digest: str = ""  # rows.digest of the host's rows, checked again by finalize
    bad: list[BadFile] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, for task messages and results."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostManifest:
        """Inverse of `to_dict`."""
        data = dict(data)
        data["files"] = [SourceFile.from_dict(f) for f in data.get("files", [])]
        data["bad"] = [BadFile(**b) for b in data.get("bad", [])]
        return cls(**data)


@dataclass
class DeleteResult:
    """Outcome of deleting one host's archived (or expired) checkpoint files."""

    cluster: str
    host: str
    deleted: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    kept: list[BadFile] = field(default_factory=list)  # changed since loading, or unremovable

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeleteResult:
        """Inverse of `to_dict`."""
        data = dict(data)
        data["kept"] = [BadFile(**b) for b in data.get("kept", [])]
        return cls(**data)


@dataclass
class ClusterReport:
    """One cluster's outcome, as shown in the CLI summary."""

    cluster: str
    cutoff: int
    run_id: str
    hosts: int = 0
    files_archived: int = 0
    files_deleted: int = 0
    rows: int = 0
    bytes_written: int = 0
    archive: str | None = None  # URL of the Parquet file, None when there was nothing
    bad: list[BadFile] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when everything selected was archived and nothing was reported."""
        return not self.bad and not self.errors

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterReport:
        """Inverse of `to_dict`."""
        data = dict(data)
        data["bad"] = [BadFile(**b) for b in data.get("bad", [])]
        return cls(**data)


@dataclass(frozen=True)
class ParquetOptions:
    """Knobs of the Parquet writer; defaults chosen by measurement (bench/README.md)."""

    row_group_rows: int = 1_048_576
    zstd_level: int = 3
    data_page_bytes: int = 1 << 20
    #: Rows per data page: the page index's granularity. 64 Ki rows is about one metric of
    #: a host's hardware threads; pyarrow's smaller default costs bytes and writer CPU for
    #: finer page skipping than queries need.
    page_rows: int = 65_536

    @classmethod
    def from_settings(cls, settings: Any) -> ParquetOptions:
        """The options a `workers.config.Settings` asks for."""
        return cls(
            row_group_rows=settings.row_group_rows,
            zstd_level=settings.zstd_level,
            page_rows=settings.page_rows,
        )


@dataclass(frozen=True)
class ArchiveInfo:
    """A published archive file."""

    url: str
    rows: int
    bytes: int
    row_groups: int
    already_existed: bool = False

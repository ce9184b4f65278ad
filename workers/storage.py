"""Where staging chunks and archives live: any fsspec URL (a local path, file://, s3://).

Everything above this module speaks URLs; this is the one place that knows how to open,
publish and remove objects on each kind of storage.

New files are written through `create()`, one small interface with a backend per kind of
storage (fsspec style):

- local disk: a temporary name in the target directory, fsync, then `link()` (never
  replaces an existing file) or `rename()`, then fsync of the directory;
- S3: a multipart upload straight to the final key, streamed part by part (bounded
  memory). S3 makes an object visible only when the upload is completed, so nothing
  partial is ever visible; a failure aborts the upload (no object, no orphaned parts);
  an exclusive create completes with `If-None-Match: *`, so an existing object is never
  replaced, even by a writer that raced us;
- any other fsspec backend: a temporary name and a move (best effort, not atomic).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, BinaryIO, cast

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from .manifest import shown_name

log = logging.getLogger(__name__)

#: Extra keyword arguments per protocol (e.g. S3 endpoint and credentials), set once per
#: process from configuration with `configure()` (see `config.configure_storage`).
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}

MiB = 1 << 20

#: First size of an S3 upload part, and so the write buffer: AWS needs >= 5 MiB (but the
#: last part), allows 10,000 parts. Parts go up one at a time while the writer waits, so a
#: part should be large against the request latency (16 MiB at 100 MB/s: ~160 ms against
#: ~30 ms per request) yet small next to finalize's own memory: an upload costs about three
#: part sizes of RSS (bench/s3_finalize_rss.py: +60 MiB over local disk at 16 MiB).
S3_PART_BYTES = 16 * MiB
#: The part size doubles after this many parts, so an upload never runs into the
#: 10,000-part limit (16 MiB parts alone would stop at 156 GiB) and memory grows only for
#: objects far larger than any archive we expect.
S3_PARTS_PER_SIZE = 1_000
#: Read-ahead of S3 reads: a chunk is read batch by batch (~1-4 MB each); each GET
#: fetches the batch plus this much, and only the last fetch is kept in memory.
S3_READ_AHEAD_BYTES = 8 * MiB
#: An S3 output keeps its last bytes (at least this many, in memory), and everything after
#: `mark_tail()` (in a temporary file once past SPOOL_MEMORY_BYTES), so the Parquet footer
#: can be read back before the upload is completed. 256 KiB > pyarrow's first footer read
#: (64 KiB). The marked tail of an archive is its page index and footer: ~14 KiB per host,
#: so it is spooled to disk rather than held, to keep memory flat for any cluster size.
TAIL_BYTES = 256 * 1024
SPOOL_MEMORY_BYTES = 1 * MiB

# fsspec caches directory listings per filesystem instance. Our processes share the
# storage with other workers that add and remove objects, so a cached listing would be a
# stale view (an archive "missing" that another worker just published): never cache.
_PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"use_listings_cache": False, "default_block_size": S3_PART_BYTES},
}


def configure(options: Mapping[str, Mapping[str, Any]]) -> None:
    """Set this process's storage options per protocol (replacing earlier ones).

    Called once per process: by the CLI, by each process of the runner's pool (as its
    initializer) and by Celery workers at startup.
    """
    STORAGE_OPTIONS.clear()
    STORAGE_OPTIONS.update({protocol: dict(kw) for protocol, kw in options.items()})


def current_options() -> dict[str, dict[str, Any]]:
    """A copy of this process's storage options, to hand to child processes."""
    return {protocol: dict(kw) for protocol, kw in STORAGE_OPTIONS.items()}


#: A URL starts with `scheme://`; anything else is a local path, taken literally.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def split_url(url: str) -> tuple[str | None, str]:
    """(scheme, rest) for `scheme://rest`, else (None, url): a local path.

    Only this prefix is ever parsed: `::`, `?`, `#`, `%`, `~` or glob characters in the
    rest are part of names (SPEC §6.8), never a chain of filesystems, a query or a pattern.
    """
    match = _SCHEME.match(url)
    if match is None:
        return None, url
    return match.group(1).lower(), url[match.end() :]


def _protocol(url: str) -> str:
    scheme, _ = split_url(url)
    if scheme in (None, "file", "local"):
        return "file"
    return "s3" if scheme == "s3a" else scheme  # s3a: Hadoop's spelling of the same


class LiteralLocalFileSystem(LocalFileSystem):
    """The local filesystem with every path taken literally.

    fsspec's own strips a `file:`/`local:` prefix, expands `~` and globs patterns in
    `expand_path` (copy, find, rm of a list): here a path is only made absolute.
    """

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, (list, tuple, set)):
            return type(path)(cls._strip_protocol(p) for p in path)
        return os.path.abspath(os.fspath(path))

    def expand_path(
        self,
        path: Any,
        recursive: bool = False,
        maxdepth: int | None = None,
        assume_literal: bool = True,
        **kwargs: Any,
    ) -> list[str]:
        """Like fsspec's, but a path with `*`, `?` or `[` names itself, never a pattern."""
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        return cast(
            "list[str]",
            super().expand_path(paths, recursive, maxdepth, assume_literal=True, **kwargs),
        )


_S3_CLASS: type[AbstractFileSystem] | None = None


def _literal_s3_class() -> type[AbstractFileSystem]:
    """s3fs's filesystem with keys taken literally (built on first use: s3fs is slow to import).

    s3fs cuts a key at `?versionId=` (two hosts `h?versionId=1`, `h?versionId=2` would
    share one object) and `rm(recursive=True)` globs a key holding `*`, `?` or `[`.
    """
    global _S3_CLASS
    if _S3_CLASS is None:
        from s3fs import S3FileSystem

        class LiteralS3FileSystem(S3FileSystem):  # type: ignore[misc]
            def split_path(self, path: str) -> tuple[str, str, None]:
                trail = path[len(path.rstrip("/")) :]
                path = self._strip_protocol(path).lstrip("/")
                if "/" not in path:
                    return path, "", None
                bucket, key = self._find_bucket_key(path)
                return bucket, key + trail, None

            async def _expand_path(
                self,
                path: Any,
                recursive: bool = False,
                maxdepth: int | None = None,
                assume_literal: bool = True,
            ) -> list[str]:
                paths = [path] if isinstance(path, str) else list(path)
                return cast(
                    "list[str]",
                    await super()._expand_path(paths, recursive, maxdepth, assume_literal=True),
                )

        _S3_CLASS = LiteralS3FileSystem
    return _S3_CLASS


#: Characters S3 cannot list: its listings are XML 1.0, which has no way to write these
#: (S3 answers with an error, or a listing no parser reads, and a prefix holding such a key
#: could never be cleaned up again). Undecodable bytes (surrogates) are not UTF-8 at all.
_NOT_IN_S3 = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def check_s3_key(path: str) -> str:
    """Return `bucket/key` if S3 can store and list it, else raise ValueError naming it."""
    bad = _NOT_IN_S3.search(path)
    if bad is None:
        return path
    code = ord(bad.group())
    why = "not UTF-8" if 0xD800 <= code <= 0xDFFF else f"U+{code:04X} cannot appear in its listings"
    raise ValueError(f"{shown_name(path)} cannot be stored in S3: {why}")


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for a URL and the path inside it, taken literally.

    A local path (no `scheme://`) or a `file://` URL: the local filesystem and the absolute
    path; `s3://bucket/key`: s3fs and `bucket/key`. The scheme is the only part parsed.
    """
    _, rest = split_url(url)
    protocol = _protocol(url)
    kwargs = {**_PROTOCOL_DEFAULTS.get(protocol, {}), **STORAGE_OPTIONS.get(protocol, {})}
    if protocol == "file":
        return LiteralLocalFileSystem(**kwargs), os.path.abspath(rest)
    if protocol == "s3":
        return _literal_s3_class()(**kwargs), check_s3_key(rest)
    # Any other fsspec backend: one filesystem, never a chain (`::` is not split).
    cls = fsspec.get_filesystem_class(protocol)
    fs = cls(**{**cls._get_kwargs_from_urls(url), **kwargs})
    return fs, cls._strip_protocol(url)


def _protocol_of(fs: AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local filesystem, where rename and fsync are available."""
    return _protocol_of(fs) in ("file", "local")


def is_s3(fs: AbstractFileSystem) -> bool:
    """True for S3 (s3fs), where new objects are written as multipart uploads."""
    return _protocol_of(fs) in ("s3", "s3a")


def join(url: str, *parts: str) -> str:
    """Append path parts (names, taken literally) to a URL or local path."""
    scheme, rest = split_url(url)
    if scheme is not None:
        return f"{url[: len(url) - len(rest)]}{posixpath.join(rest.rstrip('/'), *parts)}"
    return os.path.join(url, *parts)


def size_of(url: str) -> int:
    """Size in bytes of an existing object."""
    fs, path = filesystem(url)
    return int(fs.size(path))


def open_input(url: str) -> BinaryIO:
    """Open an object for reading with bounded memory (S3: ranged GETs, small read-ahead)."""
    fs, path = filesystem(url)
    if is_s3(fs):
        # The default read-ahead (the filesystem's block size, 50 MiB in s3fs) would be
        # held per open chunk; a few MiB is enough to serve a batch per request.
        return fs.open(path, "rb", block_size=S3_READ_AHEAD_BYTES, cache_type="readahead")
    return fs.open(path, "rb")


def remove_tree(url: str) -> None:
    """Remove a directory or prefix and everything below it; missing is fine.

    On S3 this also aborts unfinished multipart uploads below the prefix (left by a worker
    that died mid-upload), which would otherwise be stored, and billed, invisibly.
    """
    fs, path = filesystem(url)
    if is_s3(fs):
        _abort_uploads(fs, path, exact=False, older_than=None)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def abort_uploads(url: str, exact: bool = False, older_than: datetime | None = None) -> list[str]:
    """Abort unfinished S3 multipart uploads below a prefix (or for exactly one key).

    `older_than` (timezone-aware) spares uploads started later, e.g. by a running worker.
    Returns the keys whose uploads were aborted; a no-op for other storage.
    """
    fs, path = filesystem(url)
    if not is_s3(fs):
        return []
    return _abort_uploads(fs, path, exact, older_than)


def _abort_uploads(
    fs: AbstractFileSystem, path: str, exact: bool, older_than: datetime | None
) -> list[str]:
    bucket, key, _ = fs.split_path(path)
    prefix = key if exact or not key else key.rstrip("/") + "/"
    aborted: list[str] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kwargs)
        for upload in page.get("Uploads", []):
            if exact and upload["Key"] != key:
                continue
            if older_than is not None and upload["Initiated"] >= older_than:
                continue
            try:
                fs.call_s3(
                    "abort_multipart_upload",
                    Bucket=bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
            except FileNotFoundError:
                continue  # completed or aborted meanwhile
            aborted.append(upload["Key"])
            log.info("aborted unfinished upload of s3://%s/%s", bucket, upload["Key"])
        if not page.get("IsTruncated"):
            return aborted
        kwargs["KeyMarker"] = page["NextKeyMarker"]
        kwargs["UploadIdMarker"] = page["NextUploadIdMarker"]


# --- new files: written completely, then published -----------------------------------------


class Output(ABC):
    """A new file being written; nobody sees it under its final name before `commit()`.

    A write-only stream (`write`, `tell`, `flush`, `close`), so it can be handed to pyarrow
    writers directly. `close()` finishes the bytes (durably where the backend can);
    `readback()` then reads them before they are published; `commit()` publishes. Use it as
    a context manager: leaving the block without a commit aborts, leaving nothing behind.
    """

    def __init__(self, url: str, exclusive: bool) -> None:
        self.url = url
        self.exclusive = exclusive
        self.size = 0  # bytes written so far
        self.committed = False
        self._closed = False

    # the stream ------------------------------------------------------------------------

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append bytes; return how many."""

    def tell(self) -> int:
        """Bytes written so far (the stream position)."""
        return self.size

    def flush(self) -> None:  # noqa: B027 (deliberately a no-op for every backend)
        """No-op: the backends send data as their buffers fill and on `close()`."""

    def writable(self) -> bool:
        """True until closed."""
        return not self._closed

    def seekable(self) -> bool:
        """False: a sequential stream."""
        return False

    def readable(self) -> bool:
        """False: use `readback()`."""
        return False

    @property
    def closed(self) -> bool:
        """True once the bytes are finished."""
        return self._closed

    def close(self) -> None:
        """Finish writing: push out buffered bytes (no commit). Idempotent."""
        if not self._closed:
            self._closed = True
            self._finish()

    @abstractmethod
    def _finish(self) -> None: ...

    # publication -----------------------------------------------------------------------

    def mark_tail(self) -> None:  # noqa: B027 (only S3 needs the hint)
        """Hint that what follows must stay readable by `readback()` (no-op by default)."""

    @abstractmethod
    def readback(self) -> BinaryIO:
        """After `close()`, before `commit()`: a seekable reader of the written bytes.

        Local files read back completely. An S3 upload cannot be read before it is
        completed: there, only the kept tail is readable (the last 256 KiB and all since
        `mark_tail`), and reading elsewhere raises OSError.
        """

    def commit(self) -> bool:
        """Publish under the final name; False (and nothing published) if an exclusive
        create found the name taken."""
        self.close()
        self.committed = self._commit()
        return self.committed

    @abstractmethod
    def _commit(self) -> bool: ...

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written (idempotent, never raises for cleanup failures)."""

    @abstractmethod
    def retract(self) -> None:
        """After a successful commit: remove the published file again (it is ours)."""

    def __enter__(self) -> Output:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.committed:
            self.abort()


def create(url: str, exclusive: bool = True, durable: bool = True) -> Output:
    """Start writing a new file at `url`, visible only once committed.

    `exclusive`: the commit never replaces an existing file (archives); otherwise it
    replaces it (staging chunks, which a re-run rewrites with the same rows).
    `durable`: on local disk, fsync the file and its directory (S3 is always durable).
    """
    fs, path = filesystem(url)
    if is_local(fs):
        return _LocalOutput(url, path, exclusive, durable)
    if is_s3(fs):
        return _S3Output(url, fs, path, exclusive)
    return _GenericOutput(url, fs, path, exclusive)


def _temp_name(path: str, sep: str) -> str:
    # Hidden, unique, and recognisable by recovery's sweep (`.<name>.<id>.partial`).
    parent, _, name = path.rpartition(sep)
    return f"{parent}{sep}.{name}.{uuid.uuid4().hex[:12]}.partial"


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalOutput(Output):
    """Temporary file in the target directory; fsync; link (exclusive) or rename; dir fsync."""

    def __init__(self, url: str, path: str, exclusive: bool, durable: bool) -> None:
        super().__init__(url, exclusive)
        self._durable = durable
        self._path = os.path.abspath(path)
        self._dir = os.path.dirname(self._path)
        os.makedirs(self._dir, exist_ok=True)
        self._tmp = _temp_name(self._path, os.sep)
        self._file: BinaryIO = open(self._tmp, "xb")  # noqa: SIM115 (closed by close/abort)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self._file.write(data)
        self.size += n
        return n

    def _finish(self) -> None:
        self._file.flush()
        if self._durable:
            os.fsync(self._file.fileno())  # the bytes are on disk before a name points at them
        self._file.close()

    def readback(self) -> BinaryIO:
        return open(self._tmp, "rb")  # the caller closes it

    def _commit(self) -> bool:
        if self.exclusive:
            try:
                # link() fails if the name exists, unlike rename(): never replace a file.
                os.link(self._tmp, self._path)
            except FileExistsError:
                self.abort()
                return False
            os.unlink(self._tmp)
        else:
            os.replace(self._tmp, self._path)
        if self._durable:
            _fsync_dir(self._dir)  # the new name survives a power loss
        return True

    def abort(self) -> None:
        self._closed = True
        try:
            # On a full disk this close fails again (ENOSPC flushing what is still
            # buffered); it closes the descriptor all the same. The error that made us
            # abort is the one the caller reports, so this one is only logged.
            if not self._file.closed:
                self._file.close()
        except Exception as exc:
            log.debug("closing temporary file %s: %s", self._tmp, exc)
        finally:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove temporary file %s: %s", self._tmp, exc)

    def retract(self) -> None:
        os.unlink(self._path)
        _fsync_dir(self._dir)


class _TailView(io.RawIOBase):
    """A read-only file of `size` bytes of which only its end, from `start`, is held (in
    the seekable file `data`, which holds bytes start..size)."""

    def __init__(self, size: int, start: int, data: BinaryIO) -> None:
        super().__init__()
        self._size, self._start, self._data = size, start, data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or not len(view):
            return 0
        if self._pos < self._start:
            raise OSError(
                f"byte {self._pos} was streamed to S3 and is not kept in memory "
                f"(only bytes {self._start}..{self._size} are)"
            )
        self._data.seek(self._pos - self._start)
        chunk = self._data.read(min(len(view), self._size - self._pos))
        view[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


class _S3Output(Output):
    """A multipart upload to the final key: invisible until completed, aborted on failure."""

    def __init__(self, url: str, fs: AbstractFileSystem, path: str, exclusive: bool) -> None:
        super().__init__(url, exclusive)
        self._fs = fs
        self._path = path
        if exclusive:
            # Only one run per cluster writes an archive key at a time (cluster locks), so
            # an unfinished upload of this key belongs to a run that died mid-upload and
            # could not abort it: its parts are invisible but stored. Abort them now.
            _abort_uploads(fs, path, exact=True, older_than=None)
        # autocommit=False: close() uploads the last part but does not complete the upload;
        # commit() completes it (with If-None-Match: * in "xb" mode), discard() aborts it.
        self._file = fs.open(path, "xb" if exclusive else "wb", autocommit=False)
        self._next_growth = S3_PARTS_PER_SIZE
        self._window: deque[bytes] = deque()  # the last >= TAIL_BYTES written
        self._window_bytes = 0
        self._spool: BinaryIO | None = None  # everything since mark_tail()
        self._spool_start = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self._file.write(data)
        self.size += n
        self._keep(data)
        if len(self._file.parts or ()) >= self._next_growth:
            # Parts may differ in size (all but the last >= 5 MiB): grow them rather than
            # hit the 10,000-part limit.
            self._file.blocksize *= 2
            self._next_growth += S3_PARTS_PER_SIZE
        return n

    def _keep(self, data: bytes | bytearray | memoryview) -> None:
        """Keep the last TAIL_BYTES, or everything since mark_tail(), for readback()."""
        view = memoryview(data).cast("B")
        if self._spool is not None:
            self._spool.write(view)
            return
        self._window.append(bytes(view[-TAIL_BYTES:]))  # a copy: pyarrow reuses buffers
        self._window_bytes += len(self._window[-1])
        while self._window_bytes - len(self._window[0]) >= TAIL_BYTES:
            self._window_bytes -= len(self._window.popleft())

    def mark_tail(self) -> None:
        if self._spool is None:
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115
            self._spool = cast(BinaryIO, spool)
            self._spool_start = self.size - self._window_bytes
            for piece in self._window:
                self._spool.write(piece)
            self._window.clear()
            self._window_bytes = 0

    def _finish(self) -> None:
        self._file.close()  # uploads the last part; the upload stays open (autocommit=False)

    def readback(self) -> BinaryIO:
        if self._spool is not None:
            data, start = self._spool, self._spool_start
        else:
            data, start = io.BytesIO(b"".join(self._window)), self.size - self._window_bytes
        return io.BufferedReader(_TailView(self.size, start, data))

    def _commit(self) -> bool:
        try:
            self._file.commit()
        except FileExistsError:  # 412 on If-None-Match: the key exists; it stays as it is
            self.abort()
            return False
        self._drop_tail()
        return True

    def _drop_tail(self) -> None:
        self._window.clear()
        if self._spool is not None:
            self._spool.close()  # a temporary file: removed on close

    def abort(self) -> None:
        self._closed = True
        self._drop_tail()
        try:
            self._file.discard()  # AbortMultipartUpload
        except Exception as exc:
            # The next exclusive create of this key (or remove_tree of its prefix) aborts
            # it; a bucket lifecycle rule AbortIncompleteMultipartUpload is the last resort.
            log.warning("cannot abort the upload of %s: %s", self.url, exc)
        self._file.closed = True  # never flush or complete from fsspec's __del__

    def retract(self) -> None:
        self._fs.rm(self._path)


class _GenericOutput(Output):
    """Other fsspec backends: a temporary name, then a move. Exclusivity is checked, not
    guaranteed, and the move may not be atomic: use local disk or S3 for archives."""

    def __init__(self, url: str, fs: AbstractFileSystem, path: str, exclusive: bool) -> None:
        super().__init__(url, exclusive)
        self._fs = fs
        self._path = path
        fs.makedirs(fs._parent(path), exist_ok=True)
        self._tmp = _temp_name(path, "/")
        self._file = fs.open(self._tmp, "wb")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = int(self._file.write(data))
        self.size += n
        return n

    def _finish(self) -> None:
        self._file.close()

    def readback(self) -> BinaryIO:
        return self._fs.open(self._tmp, "rb")

    def _commit(self) -> bool:
        if self.exclusive and self._fs.exists(self._path):
            self.abort()
            return False
        self._fs.mv(self._tmp, self._path)
        return True

    def abort(self) -> None:
        self._closed = True
        try:
            if not self._file.closed:
                self._file.close()
            if self._fs.exists(self._tmp):
                self._fs.rm(self._tmp)
        except Exception as exc:
            log.warning("cannot remove temporary file %s: %s", self._tmp, exc)

    def retract(self) -> None:
        self._fs.rm(self._path)

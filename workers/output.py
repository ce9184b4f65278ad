"""New files, written completely and then published: one `Output` interface, a backend per
kind of storage (fsspec style), chosen by `create()`.

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
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from types import TracebackType
from typing import Any, BinaryIO, cast

from fsspec import AbstractFileSystem

from . import storage
from .paths import partial_name

log = logging.getLogger(__name__)

#: The part size doubles after this many parts, so an upload never runs into S3's
#: 10,000-part limit and memory grows only for objects far larger than any archive.
#: (The first part size is `storage.S3_PART_BYTES`; bench/README.md has its cost.)
S3_PARTS_PER_SIZE = 1_000
#: An S3 output keeps its last bytes (at least this many, in memory), and everything after
#: `mark_tail()` (in a temporary file once past SPOOL_MEMORY_BYTES), so the Parquet footer
#: can be read back before the upload is completed: more than pyarrow's first footer read
#: (64 KiB). The marked tail (page index and footer) grows with the hosts, so it is
#: spooled to disk rather than held, to keep memory flat for any cluster size.
TAIL_BYTES = 256 * 1024
SPOOL_MEMORY_BYTES = 1 * storage.MiB


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
    fs, path = storage.filesystem(url)
    if storage.is_local(fs):
        return _LocalOutput(url, path, exclusive, durable)
    if storage.is_s3(fs):
        return _S3Output(url, fs, path, exclusive)
    return _GenericOutput(url, fs, path, exclusive)


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
        self._tmp = partial_name(self._path, os.sep)
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
            storage.abort_uploads(url, exact=True)
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
        self._tmp = partial_name(path, "/")
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

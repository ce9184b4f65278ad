"""Checkpoint files as sources: read only what was listed, delete only the bytes archived.

The tree may change while a run goes on (SPEC §6.7). A file is opened without following a
symlink and without blocking, and read only if the descriptor is the regular file that
was listed; the identity recorded while it is read (device, inode, size, mtime, ctime and
an xxh3 digest of its bytes) is what every later deletion checks, right before unlinking.

Why a digest besides the times: file times come from a coarse clock (a jiffy, up to
4 ms), so a same-size rewrite right after the read can keep the recorded mtime and ctime.
Hashing costs ~0.1 ms per MB at read time (the bytes are in memory anyway) and one more
read of the file at deletion, which is cheap next to the parse.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .manifest import SourceFile
from .paths import BadCheckpoint

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Listed:
    """A checkpoint file as the directory listing showed it."""

    name: str
    ts: int
    dev: int
    ino: int


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _recorded(f: SourceFile) -> tuple[int, int, int, int, int]:
    return (f.dev, f.ino, f.size, f.mtime_ns, f.ctime_ns)


def _open(path: Path, dev: int, ino: int) -> tuple[int, os.stat_result]:
    """Open a listed file safely: a regular file with this device and inode, or BadCheckpoint."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadCheckpoint(
                "is a symbolic link now (swapped in after listing); not read"
            ) from exc
        if exc.errno == errno.ENOENT:
            raise BadCheckpoint("vanished after listing") from exc
        raise BadCheckpoint(f"cannot open: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadCheckpoint("not a regular file now (swapped in after listing); not read")
        if (st.st_dev, st.st_ino) != (dev, ino):
            raise BadCheckpoint("replaced by another file after listing; not read")
        # Non-blocking only guarded the open (a FIFO would have waited for a writer).
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_listed(directory: Path, listed: Listed) -> tuple[bytes, SourceFile]:
    """The bytes of a listed file and its identity (rows left 0); raise BadCheckpoint."""
    path = directory / listed.name
    fd, before = _open(path, listed.dev, listed.ino)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
        after = os.fstat(fd)
    except OSError as exc:
        raise BadCheckpoint(f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if _identity(before) != _identity(after) or len(data) != after.st_size:
        raise BadCheckpoint("changed while being read; kept for the next run")
    return data, _source(listed.name, after, xxhash.xxh3_64_hexdigest(data))


def listed_identity(path: Path) -> SourceFile:
    """Identity of a file that is deleted unread (delete mode): no digest."""
    return _source(path.name, os.lstat(path), "")


def _source(name: str, st: os.stat_result, digest: str) -> SourceFile:
    return SourceFile(
        name=name,
        size=st.st_size,
        dev=st.st_dev,
        ino=st.st_ino,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        digest=digest,
    )


def _digest_of(path: Path, f: SourceFile) -> str:
    fd, _ = _open(path, f.dev, f.ino)
    try:
        h = xxhash.xxh3_64()
        with os.fdopen(fd, "rb", closefd=False) as stream:
            while block := stream.read(_BLOCK):
                h.update(block)
        return h.hexdigest()
    finally:
        os.close(fd)


def change(path: Path, f: SourceFile) -> str | None:
    """Why the file at `path` is not the very file recorded in `f` (None: it is).

    Raises FileNotFoundError when nothing is there any more.
    """
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return "changed after it was read: no longer a regular file"
    if not f.identified:
        return "recorded without file identity (archived by an earlier version); check and delete by hand"
    if _identity(st) != _recorded(f):
        return (
            "changed after it was read (device, inode, size or times differ: "
            f"now {st.st_size} bytes, archived {f.size})"
        )
    if f.digest:
        try:
            digest = _digest_of(path, f)
        except BadCheckpoint as exc:
            return f"changed after it was read: {exc.reason}"
        if digest != f.digest:
            return "changed after it was read (same size and times, other content)"
    return None


def delete_if_unchanged(path: Path, f: SourceFile) -> str | None:
    """Unlink `path` if it is still the file recorded in `f`; else return why it was kept.

    Raises FileNotFoundError when the file is already gone, OSError when unlink fails.
    """
    reason = change(path, f)
    if reason is not None:
        return reason
    # The digest check read the file; make the window before unlink as small as it gets:
    # a file renamed over it meanwhile has another inode and is kept.
    if _identity(os.lstat(path)) != _recorded(f):
        return "changed after it was read (replaced while being checked)"
    os.unlink(path)
    return None

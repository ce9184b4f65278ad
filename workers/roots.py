"""Where the archiver may write and remove: its roots must not overlap (SPEC §6.9).

Staging is swept and removed run by run, and the archive root receives new files: either
one inside the checkpoint root (or the other way round) would let the archiver write into,
or remove from, the tree it archives. `check_roots` refuses such settings before anything
is touched; the embedded CLI, the runner and every Celery task that writes use it.

The default temporary staging of the embedded runner is a per-user folder under the
system temp dir (`private_staging_root`), refused when another user could have planted it.
"""

from __future__ import annotations

import os
import stat
import tempfile

from . import storage

#: Schemes that name the local filesystem.
_LOCAL_SCHEMES = ("file", "local")
#: Schemes that name S3 (Hadoop's `s3a` is the same store).
_S3_SCHEMES = ("s3", "s3a")


class RootsRefused(Exception):
    """Settings the archiver refuses to run with (a usage error: one line, exit 2)."""


def location_key(url: str) -> tuple[str, tuple[str, ...]]:
    """What a location is, for comparison: (kind, path components).

    Local paths and `file://` URLs are resolved (symlinks followed, relative paths made
    absolute); S3 locations become (bucket, key components), `s3a` being `s3`. Empty
    components are dropped, so `s3://b/x/` and `s3://b//x` are `s3://b/x`.
    """
    found, rest = storage.split_url(url)  # the scheme is the only part parsed (SPEC §6.8)
    scheme = found or "file"
    if scheme in _LOCAL_SCHEMES:
        return "file", tuple(p for p in os.path.realpath(rest).split(os.sep) if p)
    if scheme in _S3_SCHEMES:
        scheme = "s3"
    return scheme, tuple(p for p in rest.split("/") if p)


def overlaps(a: str, b: str) -> bool:
    """True if location a equals, contains or lies inside location b (component-wise)."""
    kind_a, parts_a = location_key(a)
    kind_b, parts_b = location_key(b)
    if kind_a != kind_b:
        return False  # local and S3 never share an object
    n = min(len(parts_a), len(parts_b))
    return parts_a[:n] == parts_b[:n]


def roots_problem(checkpoints: str | None, archive: str | None, staging: str | None) -> str | None:
    """One line naming the two settings that overlap, or None when the roots are apart."""
    named = [
        ("checkpoint root", "--checkpoints/CCARCHIVE_CHECKPOINTS", checkpoints),
        ("archive root", "--archive/CCARCHIVE_ARCHIVE", archive),
        ("staging", "--staging/CCARCHIVE_STAGING", staging),
    ]
    for i, (what_a, flag_a, a) in enumerate(named):
        for what_b, flag_b, b in named[i + 1 :]:
            if a and b and overlaps(a, b):
                return (
                    f"{what_b} {b} ({flag_b}) overlaps the {what_a} {a} ({flag_a}): "
                    "they must not be equal or lie inside one another"
                )
    return None


def check_roots(checkpoints: str | None, archive: str | None, staging: str | None) -> None:
    """Raise RootsRefused if any two of the roots are equal or nested."""
    problem = roots_problem(checkpoints, archive, staging)
    if problem is not None:
        raise RootsRefused(problem)


def private_staging_root() -> str:
    """The embedded runner's default staging: `<tempdir>/ccarchive-<uid>`, mode 0700.

    Made if missing. Refused (RootsRefused) if it is a symlink, not a directory, owned by
    another user or writable by group or others: in a shared /tmp anybody may create the
    name first and would then see, change or plant staging chunks.
    """
    uid = os.geteuid()
    path = os.path.join(tempfile.gettempdir(), f"ccarchive-{uid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RootsRefused(
            f"cannot create the temporary staging folder {path}: {exc.strerror or exc}"
        ) from None
    st = os.lstat(path)
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "it is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "it is not a directory"
    elif st.st_uid != uid:
        problem = f"it is owned by uid {st.st_uid}, not by this user (uid {uid})"
    elif st.st_mode & 0o022:
        problem = f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem is not None:
        raise RootsRefused(
            f"refusing the temporary staging folder {path}: {problem}; remove it or give --staging"
        )
    return path


__all__ = [
    "RootsRefused",
    "check_roots",
    "location_key",
    "overlaps",
    "private_staging_root",
    "roots_problem",
]

"""Where staging chunks and archives live: any fsspec URL (a local path, file://, s3://).

Everything above this module speaks URLs; this is the one place that turns a URL into a
filesystem and a path, taken literally (no globbing, no `::` chains, no `?versionId=`), and
reads or removes what is there. New files are written through `output.create`.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Mapping
from datetime import datetime
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

#: The block size of S3 files, and so the first size of an upload part (see `output`): AWS
#: needs >= 5 MiB. Parts go up one at a time while the writer waits, so a part is large
#: against the request latency yet small next to finalize's own memory (an upload holds
#: about three parts; bench/README.md, "S3 part size").
S3_PART_BYTES = 16 * MiB
#: Read-ahead of S3 reads: a chunk is read batch by batch (~1-4 MB each); each GET
#: fetches the batch plus this much, and only the last fetch is kept in memory.
S3_READ_AHEAD_BYTES = 8 * MiB

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

"""Where staging chunks and archives live: any fsspec URL (a local path, file://, s3://).

Everything above this module speaks URLs; this is the one place that knows how to open,
publish and remove objects on each kind of storage.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

#: Extra keyword arguments per protocol (e.g. S3 endpoint and credentials), set once from
#: configuration by the process that runs the steps.
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for a URL and the path inside it."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    fs, path = fsspec.core.url_to_fs(url, **STORAGE_OPTIONS.get(protocol, {}))
    return fs, path


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local filesystem, where rename and fsync are available."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(url: str, *parts: str) -> str:
    """Append path parts to a URL or local path (always with '/')."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.join(rest.rstrip('/'), *parts)}"
    return os.path.join(url, *parts)


def size_of(url: str) -> int:
    """Size in bytes of an existing object."""
    fs, path = filesystem(url)
    return int(fs.size(path))


def remove_tree(url: str) -> None:
    """Remove a directory or prefix and everything below it; missing is fine."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)

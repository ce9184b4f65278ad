"""What every command shares: exit codes, the one-line usage error, settings from flags,
the run's cutoff and the `--cluster` check."""

from __future__ import annotations

import argparse
import os
import select
import stat
import sys
import time
from collections.abc import Sequence
from typing import Any

from .config import ConfigError, Settings, load_settings, parse_duration
from .logs import setup_logging
from .paths import UnsafeName, check_cutoff

EXIT_OK, EXIT_REPORTED, EXIT_USAGE = 0, 1, 2
#: The reader of standard output went away (`ccarchive query ... | head`): 128 + SIGPIPE,
#: what the shell reports for any filter stopped that way, and quietly, like them.
EXIT_PIPE = 141

#: Flags every command shares (-v, --log-level), set by `cli.main` for `command_settings`.
COMMON_FLAGS: dict[str, Any] = {}


class UsageError(Exception):
    """A problem with how the command was called or configured: one line, exit 2."""


def log_level_flag(args: argparse.Namespace) -> str | None:
    """--log-level, else -v (INFO) / -vv (DEBUG), else None (settings decide)."""
    if getattr(args, "log_level", None):
        return str(args.log_level)
    verbose = getattr(args, "verbose", 0) or 0
    return None if verbose == 0 else ("INFO" if verbose == 1 else "DEBUG")


def command_settings(overrides: dict[str, Any]) -> Settings:
    """Settings with these flags on top (None: not given); then logging as they say."""
    try:  # flags > env > TOML > cc-backend > defaults
        settings = load_settings({**COMMON_FLAGS, **overrides})
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    setup_logging(settings.log_level)
    return settings


def run_cutoff(args: argparse.Namespace, settings: Settings) -> int:
    """The run's cutoff from --cutoff or the retention; UsageError unless 0 < T <= int64 max."""
    if args.cutoff is not None:
        try:
            return check_cutoff(int(args.cutoff))
        except UnsafeName:
            raise UsageError(
                f"--cutoff {args.cutoff} must be a Unix timestamp > 0 that fits in int64"
            ) from None
    retention = args.retention or settings.retention
    if retention is None:
        raise UsageError("give --cutoff UNIX_TS or --retention DURATION")
    try:
        seconds = parse_duration(retention)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if seconds <= 0:
        raise UsageError(f"retention {retention!r} must be positive")
    try:
        return check_cutoff(int(time.time() - seconds))
    except UnsafeName:
        raise UsageError(f"retention {retention!r} reaches back before 1970") from None


def missing_clusters(
    asked: Sequence[str] | None, found: Sequence[str], where: str, listed: bool = True
) -> str | None:
    """The usage error for `--cluster` names not among `found`, or None if all are there;
    `listed`: `found` is every cluster there, worth naming."""
    missing = sorted(set(asked or ()) - set(found))
    if not missing:
        return None
    names = ", ".join(repr(m) for m in missing)
    there = f" (clusters there: {', '.join(sorted(found)) or 'none'})" if listed else ""
    return f"no cluster {names} {where}{there}"


def check_clusters(checkpoints: str, asked: Sequence[str] | None) -> None:
    """A `--cluster` typo must not be a quiet no-op of a timer that never archives."""
    if not asked:
        return
    with os.scandir(checkpoints) as entries:
        found = [e.name for e in entries if e.is_dir()]
    problem = missing_clusters(asked, found, f"under {checkpoints}")
    if problem:
        raise UsageError(problem)


def stdout_reader_gone() -> bool:
    """True if stdout is a pipe whose reading end is closed (poll reports POLLERR)."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):  # no real stdout (closed, or replaced by a test)
        return False

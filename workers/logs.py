"""Log lines that say which run, cluster and host they are about.

`log_context(run_id=..., cluster=..., host=...)` sets that context for the code inside
the block (a contextvar, so threads and asyncio tasks do not see each other's context);
`ContextFilter` copies it onto every record that passes a handler; `setup_logging` installs
such a handler on the root logger, so lines from any library carry the context too:

    2026-03-20T10:15:02Z INFO workers.steps run=1742... cluster=fritz host=f0101: bad checkpoint ...

The steps are wrapped with `step_context`, which takes the context from their arguments,
so the steps themselves never deal with logging configuration. In Celery workers every
task gets its context the same way, from its arguments (or the cluster report it carries),
for the whole task (`task_started`/`task_ended`, which
`workers.distributed.signals` connects to `task_prerun`/`task_postrun`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any, ParamSpec, TextIO, TypeVar

#: The context fields, in the order they are printed.
FIELDS = ("run_id", "cluster", "host")
#: Environment variables that carry the level into processes that inherit no logging
#: configuration (spawned pool workers). `setup_logging` exports its level under its own
#: name rather than CCARCHIVE_LOG_LEVEL, so it never overrides a level set in a config file.
INHERITED_ENV = "CCARCHIVE_LOG_LEVEL_INHERITED"
LEVEL_ENV = "CCARCHIVE_LOG_LEVEL"
FORMAT = (
    "%(asctime)s %(levelname)s %(name)s "
    "run=%(run_id)s cluster=%(cluster)s host=%(host)s: %(message)s"
)
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_EMPTY: Mapping[str, str] = MappingProxyType({})
_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar("ccarchive_log_context", default=_EMPTY)

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add fields (run_id, cluster, host; None leaves a field as it is) to log lines inside."""
    merged = dict(_CONTEXT.get())
    merged.update({k: str(v) for k, v in fields.items() if v is not None})
    token = _CONTEXT.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> dict[str, str]:
    """The log context in effect here (for handing to code that runs elsewhere)."""
    return dict(_CONTEXT.get())


class ContextFilter(logging.Filter):
    """Puts run_id, cluster and host ('-' when unknown) on every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops one."""
        context = _CONTEXT.get()
        for name in FIELDS:
            # A value passed explicitly (`extra={"host": ...}`) wins over the context.
            if not hasattr(record, name):
                setattr(record, name, context.get(name, "-"))
        return True


def formatter() -> logging.Formatter:
    """The line format: UTC ISO time, level, logger, context, message."""
    fmt = logging.Formatter(FORMAT, DATE_FORMAT)
    fmt.converter = time.gmtime  # UTC, like the timestamps in checkpoint and archive names
    return fmt


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time of the call.

    rich's progress display swaps sys.stderr for a proxy while it is live, so log lines
    appear above the bars instead of tearing them; a handler that kept the original stream
    would write straight through the display.
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: str | int = "WARNING", stream: TextIO | None = None) -> logging.Handler:
    """Log to stderr (or `stream`) with run, cluster and host on every line.

    Idempotent: replaces the handler an earlier call installed. Also exports the level in
    CCARCHIVE_LOG_LEVEL_INHERITED, so spawned pool processes configure themselves the same.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_ccarchive", False)]:
        root.removeHandler(old)
    handler: logging.Handler = (
        logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    )
    handler.setFormatter(formatter())
    handler.addFilter(ContextFilter())
    handler._ccarchive = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    os.environ[INHERITED_ENV] = logging.getLevelName(root.level)
    return handler


def ensure_logging() -> None:
    """Set up logging in a process that has none yet but inherited a level to log at.

    A process of the runner's pool is spawned: it inherits the environment, not the
    parent's handlers, and its log lines would otherwise go nowhere (or unformatted to
    stderr through logging's last resort).
    """
    if logging.getLogger().handlers:
        return
    level = os.environ.get(INHERITED_ENV) or os.environ.get(LEVEL_ENV)
    if level:
        try:
            setup_logging(level)
        except ValueError:
            setup_logging()  # an unknown level name: the default rather than no logging


def step_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a step: its `run_id`, `cluster` and `host` arguments become the log context."""
    signature = inspect.signature(fn)
    wanted = [name for name in FIELDS if name in signature.parameters]

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ensure_logging()
        bound = signature.bind_partial(*args, **kwargs)
        with log_context(**{name: bound.arguments.get(name) for name in wanted}):
            return fn(*args, **kwargs)

    return wrapper


def _shown(value: str) -> str:
    """A name from a message as it may appear in a log line: never a line break or a space
    that could forge or split a line (quoted and escaped then), never very long."""
    shown = value if value.isprintable() and " " not in value else ascii(value)
    return shown if len(shown) <= 200 else shown[:200] + "..."


def arguments_context(
    fn: Callable[..., Any], args: Any, kwargs: Mapping[str, Any] | None
) -> dict[str, str]:
    """run_id, cluster and host from a call's arguments, else from a `report` argument (a
    cluster report as a dict, which the per-cluster Celery tasks carry)."""
    try:
        bound = inspect.signature(fn).bind_partial(*(args or ()), **(kwargs or {})).arguments
    except (TypeError, ValueError):  # a message that does not fit the task: no context
        return {}
    report = bound.get("report")
    found: dict[str, str] = {}
    for name in FIELDS:
        value = bound.get(name)
        if value is None and isinstance(report, Mapping):
            value = report.get(name)
        if isinstance(value, str) and value:
            found[name] = _shown(value)
    return found


#: Context tokens of the tasks running in this process, by task id (start -> end).
_TASK_TOKENS: dict[str, Token[Mapping[str, str]]] = {}


def task_started(
    task_id: str, fn: Callable[..., Any] | None, args: Any, kwargs: Mapping[str, Any] | None
) -> None:
    """A task began: its own context (from its arguments) for every line until it ends."""
    fields = arguments_context(fn or (lambda: None), args, kwargs)
    _TASK_TOKENS[task_id] = _CONTEXT.set(MappingProxyType(fields))


def task_ended(task_id: str) -> None:
    """A task ended: back to the worker's context."""
    token = _TASK_TOKENS.pop(task_id, None)
    if token is not None:
        try:
            _CONTEXT.reset(token)
        except ValueError:  # set in another context (a pool that moved the task): drop it
            _CONTEXT.set(_EMPTY)


def annotate_handlers(logger: logging.Logger) -> None:
    """Give a logger's handlers the context filter and format (once each), keeping the
    handlers themselves: how Celery's own logging setup gets run, cluster and host."""
    for handler in logger.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
            handler.setFormatter(formatter())


__all__ = [
    "FIELDS",
    "ContextFilter",
    "annotate_handlers",
    "arguments_context",
    "current_context",
    "ensure_logging",
    "log_context",
    "setup_logging",
    "step_context",
    "task_ended",
    "task_started",
]

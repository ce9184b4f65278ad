"""`ccarchive`: the command line's entry point. Exit codes: 0 all archived, 1 something
reported, 2 usage (see `usage`); each command lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from rich.console import Console

from .cli_parser import build_parser
from .usage import (
    COMMON_FLAGS,
    EXIT_PIPE,
    EXIT_USAGE,
    UsageError,
    log_level_flag,
    stdout_reader_gone,
)

Command = Callable[[argparse.Namespace], int]


def _command(name: str) -> Command:
    """The function of a command, its module imported only now: an archive run must not
    pay for the readers' pyarrow, nor `--help` for any of it."""
    if name == "archive":
        from .cmd_archive import cmd_archive

        return cmd_archive
    if name == "generate":
        from .cmd_generate import cmd_generate

        return cmd_generate
    from . import cmd_ops

    commands: dict[str, Command] = {
        "plan": cmd_ops.cmd_plan,
        "status": cmd_ops.cmd_status,
        "inspect": cmd_ops.cmd_inspect,
        "query": cmd_ops.cmd_query,
    }
    return commands[name]


def _fail(message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"ccarchive: error: {message}", markup=False
    )
    sys.exit(EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ccarchive` console script."""
    args = build_parser().parse_args(argv)
    # rich exits 1 itself on a broken pipe, our "something was reported": let main decide.
    Console.on_broken_pipe = _reraise_broken_pipe  # type: ignore[method-assign,assignment]
    COMMON_FLAGS["log_level"] = log_level_flag(args)
    try:
        code = _command(args.command)(args)
        sys.stdout.flush()
        # A large write the reader stopped reading in the middle of returns short, without
        # an error: Python then drops the rest. Ask the pipe itself whether its reader left.
        return _closed_stdout() if stdout_reader_gone() else code
    except UsageError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_stdout()


def _reraise_broken_pipe(_console: Console) -> None:
    raise BrokenPipeError


def _closed_stdout() -> int:
    """Exit quietly when the reader of stdout is gone (see EXIT_PIPE)."""
    # Python's own advice: point stdout at /dev/null, or its flush at exit prints
    # "Exception ignored ... BrokenPipeError" to stderr.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())

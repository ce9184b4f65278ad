"""The `ccarchive` command line's grammar: commands, flags, help texts and examples."""

from __future__ import annotations

import argparse
import os
from typing import Any, NoReturn

from . import __version__
from .usage import EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (README: one line on stderr, exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print `ccarchive <command>: error: ... (see --help)` and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, with examples and exit codes in each --help."""
    parser = _Parser(
        prog="ccarchive",
        description="Archive ClusterCockpit metric-store checkpoints into one Parquet file per cluster.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_archive_parser(sub)
    _add_generate_parser(sub)
    _add_ops_parsers(sub)
    _add_plan_parser(sub)
    parser.epilog = f"Example:\n  {EXAMPLES['archive']}\n\n{EXIT_CODES}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for name, command in sub.choices.items():
        command.epilog = f"Example:\n  {EXAMPLES[name]}\n\n{EXIT_CODES}"
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


EXAMPLES = {
    "archive": "ccarchive archive --checkpoints /var/lib/cc-metric-store/checkpoints \\\n"
    "      --archive /srv/metric-archive --retention 48h",
    "generate": "ccarchive generate --root /tmp/cp --clusters fritz,alex --hosts 8",
    "status": "ccarchive status --archive /srv/metric-archive --checkpoints /var/lib/cc/cp",
    "inspect": "ccarchive inspect /srv/metric-archive/fritz/1742292902.parquet",
    "query": "ccarchive query --archive /srv/metric-archive --host f0101 --metric cpu_load "
    "--from 2026-03-01",
    "plan": "ccarchive plan --checkpoints /var/lib/cc-metric-store/checkpoints \\\n"
    "      --archive /srv/metric-archive --retention 48h",
}

EXIT_CODES = """Exit codes:
  0    done: everything selected was archived (status: nothing needs a look)
  1    something was reported and kept (see the kept:/error: lines); the rest was done
  2    usage or configuration error: one line on stderr, nothing done
  130  interrupted; 141: the reader of stdout went away (... | head)
Docs: README.md, docs/operations.md"""


def _add_archive_parser(sub: Any) -> None:
    archive = sub.add_parser("archive", help="archive (or delete) checkpoints older than a cutoff")
    archive.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="checkpoint root: <DIR>/<cluster>/<host>/<ts>.json|.bin",
    )
    archive.add_argument(
        "--archive", metavar="DIR|URL", help="where <cluster>/<T>.parquet files go"
    )
    when = archive.add_mutually_exclusive_group()
    when.add_argument("--cutoff", metavar="UNIX_TS", type=int, help="archive files with ts <= this")
    when.add_argument(
        "--retention", metavar="DURATION", help="cutoff = now - DURATION (Go syntax: 48h, 90m)"
    )
    archive.add_argument(
        "--mode", choices=("archive", "delete"), help="delete: remove without archiving"
    )
    archive.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes (default: cores/2+1, at most 10, like cc-backend)",
    )
    archive.add_argument(
        "--staging", metavar="DIR|URL", help="staging for Arrow chunks (default: a temp dir)"
    )
    archive.add_argument(
        "--broker", metavar="URL", help="submit to Celery workers through this broker"
    )
    archive.add_argument(
        "--cluster", action="append", metavar="NAME", help="only this cluster (repeatable)"
    )
    _add_config_options(archive)


def _add_generate_parser(sub: Any) -> None:
    gen = sub.add_parser(
        "generate", help="write a synthetic checkpoint tree (demo, tests, benchmarks)"
    )
    gen.add_argument("--root", required=True, metavar="DIR", help="where the tree is written")
    gen.add_argument("--clusters", default="fritz", help="comma-separated cluster names")
    gen.add_argument("--hosts", type=int, default=4, metavar="N", help="hosts per cluster")
    gen.add_argument(
        "--shape",
        choices=("node", "hourly"),
        default="node",
        help="node: 12 h files of one-decimal values; hourly: 60-sample files, 4-6 "
        "significant digits, ~2%% nulls",
    )
    gen.add_argument("--files-per-host", type=int, metavar="K", help="default 1 (node), 4 (hourly)")
    gen.add_argument(
        "--format",
        choices=("json", "bin", "mixed"),
        default="json",
        help="file format (mixed: alternate by host and file)",
    )
    gen.add_argument(
        "--samples", type=int, help="values per series per file; default 720 (node), 60 (hourly)"
    )
    gen.add_argument("--gpus", type=int, default=0, help="accelerators per host")
    gen.add_argument(
        "--seed",
        type=int,
        default=0,
        help="values, and the default start: seed %% 1000 minutes earlier (other file names)",
    )
    gen.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="processes writing hosts (default: all cores)",
    )


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v info, -vv debug (default: warnings; CCARCHIVE_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="log level (overrides -v and CCARCHIVE_LOG_LEVEL)",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file (also CCARCHIVE_CONFIG)")
    parser.add_argument(
        "--cc-backend-config",
        metavar="FILE",
        help="take directories, mode, retention and workers from a cc-backend config.json",
    )


def _add_ops_parsers(sub: Any) -> None:
    status = sub.add_parser(
        "status", help="per cluster: archives, last run and its outcome, pending recoveries"
    )
    status.add_argument("--archive", metavar="DIR|URL", help="the archive root")
    status.add_argument(
        "--checkpoints", metavar="DIR", help="checkpoint root, to find pending recoveries"
    )
    status.add_argument("--run-log", metavar="DIR|URL", help="where runs record their outcome")
    status.add_argument("--cluster", action="append", metavar="NAME", help="only this cluster")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_options(status)

    inspect = sub.add_parser(
        "inspect", help="schema, row groups, hosts, time range, metrics and sources of a file"
    )
    inspect.add_argument("file", metavar="FILE|URL", help="a Parquet archive file")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_options(inspect)

    query = sub.add_parser("query", help="read archived values back (filters push down)")
    query.add_argument("--archive", metavar="DIR|URL", help="the archive root")
    query.add_argument(
        "--cluster", action="append", metavar="NAME", help="only this cluster (repeatable)"
    )
    query.add_argument(
        "--host", action="append", metavar="NAME", help="only this host (repeatable)"
    )
    query.add_argument(
        "--metric", action="append", metavar="NAME", help="only this metric (repeatable)"
    )
    query.add_argument(
        "--from", dest="start", metavar="TIME", help="timestamp >= TIME (Unix or ISO 8601, UTC)"
    )
    query.add_argument("--to", dest="end", metavar="TIME", help="timestamp < TIME")
    query.add_argument(
        "--format",
        choices=("table", "csv", "parquet"),
        default="table",
        help="table on a terminal; csv or parquet for other programs",
    )
    query.add_argument("--output", "-o", metavar="FILE|URL", help="default: standard output")
    query.add_argument("--limit", type=int, metavar="N", help="at most N rows (table default: 100)")
    _add_config_options(query)


def _add_plan_parser(sub: Any) -> None:
    plan = sub.add_parser(
        "plan", help="what the next archive run would take and keep; writes and deletes nothing"
    )
    plan.add_argument("--checkpoints", metavar="DIR", help="checkpoint root")
    plan.add_argument("--archive", metavar="DIR|URL", help="the archive root (read only)")
    when = plan.add_mutually_exclusive_group()
    when.add_argument("--cutoff", metavar="UNIX_TS", type=int, help="files with ts <= this")
    when.add_argument("--retention", metavar="DURATION", help="cutoff = now - DURATION")
    plan.add_argument("--mode", choices=("archive", "delete"), help="the run's mode")
    plan.add_argument(
        "--cluster", action="append", metavar="NAME", help="only this cluster (repeatable)"
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_options(plan)

"""What a person sees of a run: a progress bar per cluster, the summary table, kept files.

Shared by the embedded run and the `--broker` client (`remote`), so both look the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .manifest import ClusterReport
from .reporting import ProgressFn, iso


def _bar(console: Console, description: str, stage: bool = False) -> Any:
    """A transient rich progress bar: description, bar, done/total, [stage], elapsed."""
    # Deferred: rich.progress (and its live display) loads only on a terminal.
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    stages = [TextColumn("{task.fields[stage]}")] if stage else []
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        *stages,
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


class ProgressDisplay:
    """A progress bar per cluster on a terminal; silent otherwise."""

    def __init__(self, console: Console) -> None:
        self.enabled = console.is_terminal
        self.progress: Any = None
        if self.enabled:
            self.progress = _bar(console, "{task.description}", stage=True)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressDisplay:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, event: str, cluster: str, detail: dict[str, Any]) -> None:
        """Progress callback for the runner."""
        if not self.enabled:
            return
        if event == "plan":
            self.tasks[cluster] = self.progress.add_task(
                escape(cluster), total=detail["hosts"] or 1, stage="loading"
            )
        elif event == "loaded":
            self.progress.advance(self.tasks[cluster])
        elif event in ("finalized", "done"):
            stage = "deleting" if event == "finalized" else "done"
            self.progress.update(self.tasks[cluster], stage=stage)


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressFn]:
    """A transient progress bar on stderr when it is a terminal; a no-op callback otherwise."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda _done, _total: None
        return
    with _bar(console, description) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def out() -> Console:
    """The console for results on stdout: never truncating columns when not a terminal."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200, soft_wrap=True)


def err() -> Console:
    """The console for problems on stderr: plain, one line per message."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def when(ts: int | None) -> str:
    """A timestamp and its UTC time, `-` for none."""
    return f"{ts} ({iso(ts)})" if ts is not None else "-"


def print_problems(problems: Sequence[str]) -> None:
    """One `problem: <file>: <reason>` line per problem, on stderr."""
    console = err()
    for problem in problems:
        console.print(f"problem: {problem}", markup=False)


def print_summary(reports: Sequence[ClusterReport], mode: str) -> None:
    """The table per cluster, then each cluster's archive path on a line of its own.

    Readable at 80 columns: short headers, numbers never cut, and the long values (bytes
    written, the archive path) on a line per cluster that a terminal wraps, never truncates.
    """
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)  # logs and pipes: never truncate columns
    if not reports:
        console.print("no clusters found")
        return
    console.print(_summary_table(reports, mode))
    for r in reports:  # the long values, each cluster on a line of its own
        where = f" in {r.archive}" if r.archive else ""
        # soft_wrap: the terminal wraps a long path; it stays one line to copy and paste
        console.print(
            f"{r.cluster}: {r.bytes_written:,} bytes written{where}", markup=False, soft_wrap=True
        )
    problems = err()
    for r in reports:
        for bad in r.bad:
            problems.print(f"kept: {bad.path}: {bad.reason}", markup=False)
        for e in r.errors:
            problems.print(f"error: {r.cluster}: {e}", markup=False)


def _summary_table(reports: Sequence[ClusterReport], mode: str) -> Table:
    cutoff = reports[0].cutoff
    table = Table(
        title=f"ccarchive {mode}: cutoff {cutoff} ({iso(cutoff)})",
        box=box.MINIMAL_HEAVY_HEAD,
        pad_edge=False,
    )
    for name in ("cluster", "hosts", "archived", "deleted", "kept", "rows", "secs"):
        if name == "cluster":
            table.add_column(name, overflow="fold", min_width=12)  # long names wrap, never cut
        else:  # "fold": on a very narrow terminal a number wraps, it is never cut to "…"
            table.add_column(name, justify="right", overflow="fold")
    for r in reports:
        archived = str(r.files_archived) if mode == "archive" else "-"
        table.add_row(  # Text: a name such as `c[x]` is not rich markup
            Text(r.cluster),
            str(r.hosts),
            archived,
            str(r.files_deleted),
            str(len(r.bad)),
            f"{r.rows:,}",
            f"{r.seconds:.1f}",
        )
    return table

"""The client side of a distributed run: `ccarchive archive --broker redis://...`.

Sends the planning task to the Celery workers, follows the run's tasks as their results
come in (progress: plan, loaded, finalized, deleted, done — the embedded runner's events),
and returns one `ClusterReport` per cluster, so the CLI prints the same summary and exits
with the same codes as an embedded run. The workers do all the work with their own
configuration; the client only needs to reach Redis.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.utils.url import maybe_sanitize_url

from .config import Settings
from .manifest import ClusterReport

#: progress(event, cluster, detail), as in `workers.runner`.
ProgressFn = Callable[[str, str, dict[str, Any]], None]

#: How long the client waits for a cluster's report after its finalize failed: the failing
#: finalize sends that report first, so it only goes missing if something else broke too.
REPORT_GRACE_SECONDS = 60.0


class RemoteError(Exception):
    """The run could not be started: no worker, or the workers refused it."""


@dataclass
class RemoteRun:
    """What a distributed run produced, as seen by the client."""

    run_id: str
    cutoff: int
    mode: str
    reports: list[ClusterReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # run-level (e.g. a queue's discovery)
    finalize_seconds: dict[str, float] = field(default_factory=dict)  # cluster -> seconds
    seconds: float = 0.0  # from sending the planning task to the last report


def _ready(app: Any, task_ids: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The results among `task_ids` that are ready now: one MGET, however many ids."""
    out: list[tuple[str, dict[str, Any]]] = []
    try:
        # timeout=0: one round trip, then TimeoutError for whatever is not ready yet.
        for task_id, meta in app.backend.get_many(set(task_ids), timeout=0, no_ack=True):
            out.append((task_id, meta))
    except CeleryTimeout:
        pass
    return out


class _Backoff:
    """Poll quickly while results stream in, slowly while a long step runs."""

    def __init__(self, longest: float) -> None:
        self.longest = longest
        self.delay = 0.01

    def wait(self, progressed: bool) -> None:
        self.delay = 0.01 if progressed else min(self.longest, self.delay * 1.5)
        time.sleep(self.delay)


def _wait(app: Any, task_id: str, poll_seconds: float) -> Any:
    """Wait for a task that must succeed (plan, launch); RemoteError if it failed."""
    # Polling (MGET) like `_follow`, not AsyncResult.get(): no pub/sub subscription is
    # left behind for the interpreter to tear down at exit.
    backoff = _Backoff(poll_seconds)
    while not (ready := _ready(app, {task_id})):
        backoff.wait(False)
    meta = ready[0][1]
    if meta["status"] != "SUCCESS":
        raise RemoteError(f"task {task_id} failed: {meta['result']!r}")
    return meta["result"]


def submit(
    settings: Settings,
    cutoff: int,
    mode: str,
    clusters: list[str] | None = None,
    checkpoints: str | None = None,
    archive: str | None = None,
    progress: ProgressFn | None = None,
    poll_seconds: float = 0.25,
) -> RemoteRun:
    """Run one pass on the Celery workers reachable through `settings.broker_url`."""
    from .celery import make_app  # deferred: importing Celery costs a few hundred ms

    notify = progress or (lambda _event, _cluster, _detail: None)
    app = make_app(settings)
    try:
        if not app.control.ping(timeout=2.0, limit=1):
            raise RemoteError(
                f"no Celery worker answers at {maybe_sanitize_url(settings.broker_url)}"
            )
        started = time.perf_counter()
        plan_id = str(uuid.uuid4())
        app.send_task(
            "ccarchive.plan",
            kwargs={
                "cutoff": cutoff,
                "mode": mode,
                "clusters": clusters,
                "checkpoints": checkpoints,
                "archive": archive,
            },
            queue=settings.default_queue,
            task_id=plan_id,
        )
        planned = _wait(app, plan_id, poll_seconds)
        if "error" in planned:
            raise RemoteError(f"the workers refused the run: {planned['error']}")
        launched = _wait(app, planned["launch"], poll_seconds)
        run = RemoteRun(planned["run_id"], planned["cutoff"], planned["mode"])
        run.errors.extend(launched.get("errors", []))
        reports = _follow(app, run, launched["clusters"], notify, poll_seconds)
        run.reports = [reports[e["cluster"]] for e in launched["clusters"]]
        run.seconds = time.perf_counter() - started
        return run
    finally:
        app.close()


def _follow(
    app: Any,
    run: RemoteRun,
    entries: list[dict[str, Any]],
    notify: ProgressFn,
    poll_seconds: float,
) -> dict[str, ClusterReport]:
    """Poll the run's tasks until every cluster has its report; emit progress on the way."""
    reports: dict[str, ClusterReport] = {}
    watch: dict[str, tuple[str, str, str]] = {}  # task id -> (kind, cluster, host)
    for e in entries:
        cluster = e["cluster"]
        notify("plan", cluster, {"hosts": len(e.get("hosts", []))})
        if "report" in e:  # skipped at launch (cluster locked by another run)
            reports[cluster] = ClusterReport.from_dict(e["report"])
            notify("done", cluster, {"ok": reports[cluster].ok})
            continue
        watch.update({t: ("load", cluster, h) for h, t in e.get("loads", {}).items()})
        watch.update({t: ("delete", cluster, h) for h, t in e.get("deletes", {}).items()})
        if "finalize" in e:
            watch[e["finalize"]] = ("finalize", cluster, "")
        watch[e["report_id"]] = ("report", cluster, "")
    deadlines: dict[str, tuple[float, str]] = {}  # report id -> (deadline, why)
    pending = set(watch)
    backoff = _Backoff(poll_seconds)
    while pending:
        ready = _ready(app, pending)
        for task_id, meta in ready:
            pending.discard(task_id)
            kind, cluster, host = watch[task_id]
            failed = meta["status"] != "SUCCESS"
            value = meta["result"]
            if kind == "load":
                rows = 0 if failed else value["manifest"]["rows"]
                notify("loaded", cluster, {"host": host, "rows": rows, "failed": failed})
            elif kind == "delete":
                files = 0 if failed else len(value["deleted"])
                notify("deleted", cluster, {"host": host, "files": files})
            elif kind == "finalize":
                if failed:
                    report_id = _report_id(watch, cluster)
                    deadlines[report_id] = (time.monotonic() + REPORT_GRACE_SECONDS, f"{value!r}")
                    notify("finalized", cluster, {"failed": True})
                else:
                    run.finalize_seconds[cluster] = float(value.get("seconds", 0.0))
                    notify("finalized", cluster, {"archive": value["archive"]})
            else:
                reports[cluster] = _report(run, cluster, value, failed)
                notify("done", cluster, {"ok": reports[cluster].ok})
        now = time.monotonic()
        for report_id, (deadline, why) in list(deadlines.items()):
            if report_id in pending and now > deadline:
                pending.discard(report_id)
                cluster = watch[report_id][1]
                reports[cluster] = ClusterReport(
                    cluster, run.cutoff, run.run_id, errors=[f"finalize failed: {why}"]
                )
                notify("done", cluster, {"ok": False})
        if pending:
            backoff.wait(bool(ready))
    return reports


def _report_id(watch: dict[str, tuple[str, str, str]], cluster: str) -> str:
    return next(t for t, (k, c, _h) in watch.items() if k == "report" and c == cluster)


def _report(run: RemoteRun, cluster: str, value: Any, failed: bool) -> ClusterReport:
    if failed:
        return ClusterReport(
            cluster, run.cutoff, run.run_id, errors=[f"report task failed: {value!r}"]
        )
    return ClusterReport.from_dict(value)


def cmd_archive(args: argparse.Namespace, settings: Settings) -> int:
    """`ccarchive archive` on the Celery cluster: same summary and exit codes as embedded."""
    from rich.console import Console

    from .cli import EXIT_OK, EXIT_REPORTED, UsageError, _cutoff, _print_summary, _ProgressDisplay

    if args.staging is not None or args.workers is not None:
        raise UsageError(
            "--staging and --workers apply to the embedded runner; "
            "with --broker the workers use their own configuration"
        )
    cutoff = _cutoff(args, settings)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(
        f"submitting to {maybe_sanitize_url(settings.broker_url)} (cutoff {cutoff})", markup=False
    )
    try:
        with _ProgressDisplay(console) as display:
            run = submit(
                settings,
                cutoff,
                settings.mode,
                clusters=args.cluster,
                checkpoints=args.checkpoints,
                archive=args.archive if settings.mode == "archive" else None,
                progress=display.update,
            )
    except RemoteError as exc:
        raise UsageError(str(exc)) from None
    _print_summary(run.reports, settings.mode)
    for e in run.errors:
        console.print(f"error: {e}", markup=False)
    ok = not run.errors and all(r.ok for r in run.reports)
    return EXIT_OK if ok else EXIT_REPORTED


__all__ = ["RemoteError", "RemoteRun", "cmd_archive", "submit"]

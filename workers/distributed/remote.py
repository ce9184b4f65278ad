"""The client side of a distributed run: `ccarchive archive --broker redis://...`.

Sends the planning task to the Celery workers, follows the run's tasks as their results
come in (progress: plan, loaded, finalized, deleted, done — the embedded runner's events),
and returns one `ClusterReport` per cluster, so the CLI prints the same summary and exits
with the same codes as an embedded run. The workers do all the work with their own
configuration; the client only needs to reach Redis.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from ..config import Settings, mask_url
from ..manifest import ClusterReport
from . import names
from .connection import Unreachable, check_reachable, redis_client
from .routing import make_router

log = logging.getLogger(__name__)

#: progress(event, cluster, detail), as in `workers.runner`.
ProgressFn = Callable[[str, str, dict[str, Any]], None]

#: How long the client waits for a cluster's report after its finalize failed: the failing
#: finalize sends that report first, so it only goes missing if something else broke too.
REPORT_GRACE_SECONDS = 60.0
#: While nothing arrives, the client checks this often that the run is still alive.
LIVENESS_SECONDS = 5.0
#: A cluster whose lock the run no longer holds, yet without a report after this long, was
#: lost (Redis restarted without its data, or the lock expired): its files stay in place.
LOST_RUN_SECONDS = 15.0
#: How long the client waits for an unreachable broker before it gives up following.
BROKER_OUTAGE_SECONDS = 300.0

#: What a broker or result backend that went away raises.
BROKER_ERRORS = (redis.RedisError, OperationalError, OSError)


class RemoteError(Exception):
    """The run could not be started: no worker, or the workers refused it."""


class RunLost(RemoteError):
    """The run was sent but can no longer be followed to its end (exit 1, not 2: the
    workers may have done part of it; the next run finishes the rest)."""


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


class _Liveness:
    """Tells a run that is merely slow from one that can no longer finish.

    The workers do not report progress to the client, but two facts on the broker's Redis
    say a run is gone: the server restarted without persistence (its queued messages,
    chord counters and locks went with it), or a cluster's lock no longer names the run
    (taken over after it expired, or lost in a restart). Broker outages are survived up to
    BROKER_OUTAGE_SECONDS: with persistence, the run goes on once Redis is back.
    """

    def __init__(self, client: Any, run_id: str | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.server = self._server_id()
        self.unreachable_since: float | None = None
        self.next_check = time.monotonic() + LIVENESS_SECONDS

    def _server_id(self) -> str | None:
        try:
            return str(self.client.info("server")["run_id"])
        except BROKER_ERRORS:
            return None

    def broker_error(self, exc: BaseException) -> None:
        """Note a failed poll; raise RemoteError once the broker was gone for too long."""
        now = time.monotonic()
        if self.unreachable_since is None:
            self.unreachable_since = now
            log.warning("lost the broker (%s); waiting for it to come back", exc)
        elif now - self.unreachable_since > BROKER_OUTAGE_SECONDS:
            raise RunLost(
                f"the broker was unreachable for {BROKER_OUTAGE_SECONDS:.0f} s ({exc}); "
                "the run may go on on the workers (see the report log)"
            )

    def reachable(self) -> None:
        """Note a successful poll."""
        self.unreachable_since = None

    def due(self) -> bool:
        """True every LIVENESS_SECONDS (the caller checks only while nothing arrives)."""
        if time.monotonic() < self.next_check:
            return False
        self.next_check = time.monotonic() + LIVENESS_SECONDS
        return True

    def restarted_empty(self) -> bool:
        """True if Redis restarted since the run began and kept no append-only file."""
        try:
            info = self.client.info()
        except BROKER_ERRORS:
            return False
        if self.server is None:
            self.server = str(info["run_id"])
            return False
        return str(info["run_id"]) != self.server and not info.get("aof_enabled")

    def lock_holder(self, cluster: str) -> str | None:
        """The run id holding the cluster's lock now (None: free); ours if unknown."""
        try:
            holder = self.client.get(names.lock_key(cluster))
        except BROKER_ERRORS:
            return self.run_id
        return holder.decode() if isinstance(holder, bytes) else holder


LOST_RESTART = (
    "lost: Redis restarted without persistence while the run was going on; "
    "files not archived stay in place for the next run"
)


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


def _wait(app: Any, task_id: str, poll_seconds: float, live: _Liveness) -> Any:
    """Wait for a task that must succeed (plan, launch); RemoteError if it failed."""
    # Polling (MGET) like `_follow`, not AsyncResult.get(): no pub/sub subscription is
    # left behind for the interpreter to tear down at exit.
    backoff = _Backoff(poll_seconds)
    while True:
        try:
            ready = _ready(app, {task_id})
        except BROKER_ERRORS as exc:
            live.broker_error(exc)
            backoff.wait(False)
            continue
        live.reachable()
        if ready:
            break
        if live.due() and live.restarted_empty():
            raise RunLost(LOST_RESTART)
        backoff.wait(False)
    meta = ready[0][1]
    if meta["status"] != "SUCCESS":
        raise RemoteError(f"task {task_id} failed: {meta['result']!r}")
    return meta["result"]


#: How long the queue check waits for the workers' answers.
QUEUE_CHECK_SECONDS = 1.5


def needed_queues(settings: Settings) -> list[str]:
    """Every queue a run sends tasks to: discovery goes to all of them, so one without a
    worker holds up the whole run, not only its own hosts."""
    router = make_router(settings.routes, settings.default_queue, settings.finalize_queue)
    return list(dict.fromkeys([*router.queues(), router.finalize_queue]))


def queues_without_worker(
    app: Any,
    queues: list[str],
    timeout: float = QUEUE_CHECK_SECONDS,
    own: AbstractSet[str] = frozenset(),
) -> list[str]:
    """The queues among `queues` that no running worker consumes, in their order.

    Asks every worker (`inspect().active_queues()`) and waits `timeout` for the answers;
    `own` are queues the asking process knows are consumed (a task's own worker, which
    may not be able to answer while it runs the task: the solo pool).
    """
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    consumed = set(own) | {q["name"] for qs in replies.values() for q in qs or []}
    return [q for q in queues if q not in consumed]


def no_worker_message(missing: list[str]) -> str:
    """The one line for queues nobody consumes."""
    names = ", ".join(missing)
    return (
        f"no worker consumes the queue(s) {names}: the run would wait for them; start "
        f"`celery -A workers worker -Q {missing[0]}` where those hosts' files are, "
        "or fix CCARCHIVE_ROUTES"
    )


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
    from .app import make_app  # deferred: importing it builds the environment's app too

    notify = progress or (lambda _event, _cluster, _detail: None)
    # Before Celery: kombu would retry a refused connection for many seconds and wait
    # forever on a TLS handshake with a plaintext server. One bounded PING says why.
    try:
        check_reachable(settings.broker_url, settings, "broker")
        if settings.results_url != settings.broker_url:
            check_reachable(settings.results_url, settings, "result backend")
    except Unreachable as exc:
        raise RemoteError(str(exc)) from None
    app = make_app(settings)
    try:
        try:
            answered = app.control.ping(timeout=2.0, limit=1)
        except BROKER_ERRORS as exc:  # refused, wrong password, certificate not trusted
            raise RemoteError(
                f"cannot reach the broker at {maybe_sanitize_url(settings.broker_url)}: {exc}"
            ) from None
        if not answered:
            raise RemoteError(
                f"no Celery worker answers at {maybe_sanitize_url(settings.broker_url)}"
            )
        # Every queue the run sends to needs a worker, or discovery never completes and
        # every cluster waits. The workers' plan checks again with their own routes.
        missing = queues_without_worker(app, needed_queues(settings))
        if missing:
            raise RemoteError(no_worker_message(missing))
        notify("submitting", "", {})
        live = _Liveness(redis_client(settings.broker_url, settings))
        started = time.perf_counter()
        plan_id = str(uuid.uuid4())
        app.send_task(
            names.PLAN,
            kwargs={
                "cutoff": cutoff,
                "mode": mode,
                "clusters": clusters,
                "checkpoints": checkpoints,
                # Task arguments are stored with results and shown by Flower: a location
                # that carries credentials goes masked (the workers compare it so).
                "archive": archive and mask_url(archive),
            },
            queue=settings.default_queue,
            task_id=plan_id,
        )
        planned = _wait(app, plan_id, poll_seconds, live)
        if "error" in planned:
            raise RemoteError(f"the workers refused the run: {planned['error']}")
        launched = _wait(app, planned["launch"], poll_seconds, live)
        run = RemoteRun(planned["run_id"], planned["cutoff"], planned["mode"])
        live.run_id = run.run_id
        run.errors.extend(launched.get("errors", []))
        reports = _follow(app, run, launched["clusters"], notify, poll_seconds, live)
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
    live: _Liveness,
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
    deadlines: dict[str, tuple[float, str]] = {}  # report id -> (deadline, error if missed)
    pending = set(watch)
    backoff = _Backoff(poll_seconds)
    while pending:
        try:
            ready = _ready(app, pending)
        except BROKER_ERRORS as exc:
            live.broker_error(exc)
            backoff.wait(False)
            continue
        live.reachable()
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
                    deadlines[report_id] = (
                        time.monotonic() + REPORT_GRACE_SECONDS,
                        f"finalize failed: {value!r}",
                    )
                    notify("finalized", cluster, {"failed": True})
                else:
                    run.finalize_seconds[cluster] = float(value.get("seconds", 0.0))
                    notify("finalized", cluster, {"archive": value["archive"]})
            else:
                reports[cluster] = _report(run, cluster, value, failed)
                notify("done", cluster, {"ok": reports[cluster].ok})
                # The report ends the cluster: loads a skip (after recovery) never started
                # will not come.
                pending.difference_update(t for t in list(pending) if watch[t][1] == cluster)
        now = time.monotonic()
        if not ready and live.due():
            restarted = live.restarted_empty()
            for report_id in [t for t in pending if watch[t][0] == "report"]:
                cluster = watch[report_id][1]
                if restarted:
                    deadlines[report_id] = (now, LOST_RESTART)
                elif live.lock_holder(cluster) != run.run_id and report_id not in deadlines:
                    # finish_cluster releases the lock right before it stores the report:
                    # a short grace tells that apart from a run that is gone.
                    deadlines[report_id] = (
                        now + LOST_RUN_SECONDS,
                        f"lost: the run no longer holds the lock of {cluster} and sent no "
                        "report (Redis restarted, or the lock expired); files not archived "
                        "stay in place for the next run",
                    )
        for report_id, (deadline, error) in list(deadlines.items()):
            if report_id in pending and now >= deadline:
                cluster = watch[report_id][1]
                for t in [t for t in pending if watch[t][1] == cluster]:
                    pending.discard(t)  # nothing more will come for this cluster
                reports[cluster] = ClusterReport(cluster, run.cutoff, run.run_id, errors=[error])
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

    from ..display import ProgressDisplay as _ProgressDisplay
    from ..display import print_summary as _print_summary
    from ..usage import EXIT_OK, EXIT_REPORTED, EXIT_USAGE, UsageError, missing_clusters
    from ..usage import run_cutoff as _cutoff

    if args.staging is not None or args.workers is not None:
        raise UsageError(
            "--staging and --workers apply to the embedded runner; "
            "with --broker the workers use their own configuration"
        )
    cutoff = _cutoff(args, settings)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        with _ProgressDisplay(console) as display:

            def progress(event: str, cluster: str, detail: dict[str, Any]) -> None:
                # Said once a worker answered: a broker error stays the only line on stderr.
                if event == "submitting":
                    console.print(
                        f"submitting to {maybe_sanitize_url(settings.broker_url)} "
                        f"(cutoff {cutoff})",
                        markup=False,
                    )
                display.update(event, cluster, detail)

            run = submit(
                settings,
                cutoff,
                settings.mode,
                clusters=args.cluster,
                checkpoints=args.checkpoints,
                archive=args.archive if settings.mode == "archive" else None,
                progress=progress,
            )
    except RunLost as exc:
        console.print(f"error: {exc}", markup=False)
        return EXIT_REPORTED
    except RemoteError as exc:
        raise UsageError(str(exc)) from None
    missing = missing_clusters(
        args.cluster, [r.cluster for r in run.reports], "on the workers", listed=False
    )
    if missing and not run.reports:
        raise UsageError(missing)  # nothing was done: the usual one line
    _print_summary(run.reports, settings.mode)
    for e in run.errors:
        console.print(f"error: {e}", markup=False)
    if missing:  # the clusters that exist were archived; the typo is still a usage error
        console.print(f"ccarchive: error: {missing}", markup=False)
        return EXIT_USAGE
    ok = not run.errors and all(r.ok for r in run.reports)
    return EXIT_OK if ok else EXIT_REPORTED


__all__ = [
    "RemoteError",
    "RemoteRun",
    "RunLost",
    "cmd_archive",
    "needed_queues",
    "queues_without_worker",
    "submit",
]

"""The embedded runner: the whole pipeline on one machine, no Redis, a process pool.

Same steps and the same order of effects as the Celery pipeline: load every host, finalize
each cluster, and once its archive is published, delete its archived files, then its
staging. A cluster never waits for another one.

With `--workers N` for N >= 2, a cluster's finalize does not wait for the last load: it
runs in a thread of this process and writes each host into the Parquet file as soon as
that host and every host before it (in hostname order) are loaded, while a pool of N-1
processes loads. Loading and writing overlap instead of taking turns; the commit still
comes after every load. With `--workers 1` everything runs one step after the other in
this process.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import metrics, recovery, roots, staging, steps, storage
from . import runlog as ops  # run records left ops (now: runlog); rename on merge
from .locks import DirectoryLock, LockBusy
from .manifest import (
    ArchiveInfo,
    BadFile,
    ClusterReport,
    DeleteResult,
    HostManifest,
    ParquetOptions,
)

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

#: progress(event, cluster, detail): events are "plan", "loaded", "finalized", "deleted", "done".
ProgressFn = Callable[[str, str, dict[str, Any]], None]


@dataclass
class RunOptions:
    """What one run does; every location is a plain path or fsspec URL."""

    checkpoints: str
    cutoff: int
    archive: str | None = None
    mode: str = "archive"
    workers: int = 1
    staging: str | None = None  # None: a private temporary directory, removed afterwards
    parquet: ParquetOptions = field(default_factory=ParquetOptions)
    chunk_compression: str | None = "lz4"
    clusters: list[str] | None = None  # restrict to these clusters
    grace_seconds: float = recovery.DEFAULT_GRACE_SECONDS  # age of orphans safe to remove
    run_log: str | None = None  # where run records go (ops.record_run); None: none
    run_log_keep: int = ops.DEFAULT_KEEP_RECORDS  # records kept per cluster ...
    run_log_max_age: float = ops.DEFAULT_MAX_RECORD_AGE  # ... none older (seconds)


#: A unique, sortable id for one run (`staging.new_run_id`; its staging directory's name).
new_run_id = staging.new_run_id


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: the run stops, its `finally` blocks clean up.

    A BaseException, like KeyboardInterrupt, so no `except Exception` of a step turns it
    into a reported failure and goes on.
    """

    def __init__(self, signo: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signo).name}")
        self.signo = signo


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT raise Interrupted in the main thread (once: a
    second signal during the clean-up is ignored); the previous handlers come back after.

    Without it SIGTERM ends the process on the spot and leaves the run's staging behind.
    Outside the main thread (where handlers cannot be installed) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signo: int, _frame: Any) -> None:
        if not fired:
            fired.append(signo)
            raise Interrupted(signo)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signo, old in previous.items():
            signal.signal(signo, old)


class _InlineExecutor(Executor):
    """Runs each call at submit time: `--workers 1` without a second process."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        # Interrupted, KeyboardInterrupt: raised here, so the run stops now, not after
        # every other host was loaded.
        return future


def _executor(options: RunOptions, streaming: bool) -> Executor:
    """Where the steps run: this process for one worker, else a pool of processes.

    When finalize streams behind the loads, it runs in this process (a thread per cluster)
    and counts as one of the workers: N-1 loading processes plus the writer keep N cores
    busy. (Measured, 64 hosts on 2 cores: 2.7 s wall; a pool of 2 beside the writer, 3.0 s.)
    """
    processes = options.workers - 1 if streaming else options.workers
    if processes <= 1 and not streaming:
        return _InlineExecutor()
    # spawn: the parent may hold threads (progress display); fork would copy their locks.
    # A spawned process starts with empty storage options: hand it this process's (S3
    # endpoint, credentials), so every step sees the same storage as the caller configured.
    return ProcessPoolExecutor(
        max(1, processes),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_pool_process,
        initargs=(storage.current_options(),),
    )


def _stop_pool(pool: Executor) -> None:
    """End a pool now: queued calls cancelled, running ones' processes terminated.

    A load that stops midway leaves at most a chunk's temporary file in the run's staging,
    which the runner removes next; waiting instead could take as long as the load.
    """
    if isinstance(pool, ProcessPoolExecutor):
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            with suppress(Exception):
                process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _start_pool_process(storage_options: dict[str, Any]) -> None:
    """Pool process set-up: the caller's storage options, and death with the runner.

    A runner killed outright (OOM killer, SIGKILL) cannot shut its pool down, and its
    processes would wait for work forever, holding the terminal's pipes open. On Linux
    the kernel sends them SIGKILL when the runner goes (PR_SET_PDEATHSIG).
    """
    storage.configure(storage_options)
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() == 1:  # the runner died before the line above: go now
                os._exit(1)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class RunCancelled(Exception):
    """The run stopped (an exception in the runner) while a finalize was waiting for hosts."""


class _HostFeed:
    """A cluster's load results, handed to its finalize thread in hostname order."""

    def __init__(self, hosts: list[str]) -> None:
        self._hosts = sorted(hosts)
        self._loaded: dict[str, HostManifest | None] = {}
        self._cancelled = False
        self._changed = threading.Condition()

    def put(self, host: str, manifest: HostManifest | None) -> None:
        """Record a host's load: its manifest, or None when the load failed."""
        with self._changed:
            self._loaded[host] = manifest
            self._changed.notify_all()

    def cancel(self) -> None:
        """Make the finalize thread stop at its next wait."""
        with self._changed:
            self._cancelled = True
            self._changed.notify_all()

    def _wait_for(self, host: str | None) -> None:
        def ready() -> bool:
            if host is None:
                return len(self._loaded) == len(self._hosts)
            return host in self._loaded

        with self._changed:
            self._changed.wait_for(lambda: ready() or self._cancelled)
            if self._cancelled:
                raise RunCancelled("the run stopped before every host was loaded")

    def __iter__(self) -> Iterator[HostManifest]:
        for host in self._hosts:
            self._wait_for(host)
            manifest = self._loaded[host]
            if manifest is not None:
                yield manifest

    def drain(self) -> None:
        """Wait until every host's load has finished (or the run stopped)."""
        self._wait_for(None)


def _finalize_behind_loads(
    feed: _HostFeed, cluster: str, cutoff: int, run_id: str, options: RunOptions
) -> tuple[Future[Any], threading.Thread]:
    """Start the cluster's finalize in a thread, fed by `feed`. Its future completes only
    after the cluster's last load, failed or not: the runner finishes the cluster then."""
    future: Future[Any] = Future()

    def body() -> None:
        try:
            info = steps.finalize_streaming(
                cluster, cutoff, run_id, feed, options.archive or "", options.parquet
            )
        except BaseException as exc:
            try:
                with suppress(RunCancelled):
                    feed.drain()
            finally:
                future.set_exception(exc)
        else:
            future.set_result(info)

    thread = threading.Thread(target=body, name=f"ccarchive-finalize-{cluster}", daemon=True)
    thread.start()
    return future, thread


@dataclass
class _ClusterState:
    report: ClusterReport
    hosts_left: int
    manifests: list[HostManifest] = field(default_factory=list)
    deletes_left: int = 0
    lock: DirectoryLock | None = None
    exclude: dict[str, list[str]] = field(default_factory=dict)
    mode: str = "archive"
    run_log: str | None = None
    feed: _HostFeed | None = None  # set when finalize runs behind the loads
    done: bool = False  # `_finish` ran: the cluster's end record is written
    keep: int = ops.DEFAULT_KEEP_RECORDS
    max_age: float = ops.DEFAULT_MAX_RECORD_AGE


def run(options: RunOptions, progress: ProgressFn | None = None) -> list[ClusterReport]:
    """Archive (or delete) everything the cutoff selects; one report per cluster."""
    notify = progress or (lambda _event, _cluster, _detail: None)
    run_id = new_run_id(options.cutoff)
    # An unwritable default (a service user whose home is /) is one warning, not one per cluster.
    options = replace(options, run_log=ops.usable_run_log(options.run_log))
    archiving = options.mode == "archive"
    if archiving:
        roots.check_roots(options.checkpoints, options.archive, options.staging)
    # Without --staging: a run directory in this user's private temporary staging, locked
    # while the run lives and removed when it ends (SPEC §6.9).
    private_root = roots.private_staging_root() if archiving and not options.staging else None
    staging_url = private_root or options.staging
    plans = [
        p
        for p in steps.discover(options.checkpoints)
        if not options.clusters or p.cluster in options.clusters
    ]
    states: dict[str, _ClusterState] = {}
    started = time.perf_counter()
    # A directory whose name is refused is reported like a kept file (exit 1), untouched.
    refused = [
        _ClusterState(_refused_report(p, options.cutoff, run_id), 0) for p in plans if p.refused
    ]
    for state in refused:
        notify("plan", state.report.cluster, {"hosts": 0})
        _finish(state, started, notify)
    plans = [p for p in plans if not p.refused]
    for plan in plans:
        report = ClusterReport(plan.cluster, options.cutoff, run_id, hosts=len(plan.hosts))
        report.bad.extend(plan.bad)
        state = states[plan.cluster] = _prepare(plan, report, options)
        notify("plan", plan.cluster, {"hosts": len(plan.hosts)})
        if state.lock is None:  # skipped: recorded like any run (`ccarchive status`, metrics)
            _finish(state, started, notify)
    plans = [p for p in plans if states[p.cluster].lock is not None]
    private_run: staging.PrivateRun | None = None
    # No host with a file to load or delete: no pool (spawning 16 processes for nothing
    # costs seconds and CPU-seconds); the empty steps run inline.
    busy = _hosts_with_files(plans, states, options)
    if not busy:
        log.info("nothing selected at cutoff %d: no process pool started", options.cutoff)
    # A thread per cluster writes its archive while its hosts load (see the module's doc).
    streaming = options.workers > 1 and options.mode == "archive" and busy
    finalizers: list[threading.Thread] = []
    stopped: BaseException | None = None
    try:
        if archiving and staging_url:
            recovery.sweep_staging(
                staging_url, run_id, options.grace_seconds, private=private_root is not None
            )
            if any(p.hosts for p in plans):
                # Marked before any chunk: only a marked run directory may a sweep remove.
                if private_root is not None:
                    private_run = staging.PrivateRun(private_root, run_id)
                else:
                    staging.mark_run(staging_url, run_id)
        executor = _executor(options, streaming) if busy else _InlineExecutor()
        with executor as pool, _stopped_on_error(pool):
            last_run.pool = not isinstance(pool, _InlineExecutor)
            pending: dict[Future[Any], tuple[str, str, str]] = {}

            def submit(
                kind: str, cluster: str, host: str, fn: Callable[..., Any], *args: Any
            ) -> None:
                pending[pool.submit(fn, *args)] = (kind, cluster, host)

            for plan in plans:
                for host in sorted(plan.hosts):
                    if options.mode == "delete":
                        submit(
                            "delete",
                            plan.cluster,
                            host,
                            steps.delete_expired,
                            options.checkpoints,
                            plan.cluster,
                            host,
                            options.cutoff,
                        )
                    else:
                        submit(
                            "load",
                            plan.cluster,
                            host,
                            steps.load_host,
                            options.checkpoints,
                            plan.cluster,
                            host,
                            options.cutoff,
                            staging_url,
                            run_id,
                            options.chunk_compression,
                            states[plan.cluster].exclude.get(host, []),
                        )
                if not plan.hosts:
                    _finish(states[plan.cluster], started, notify)
                elif streaming:
                    state = states[plan.cluster]
                    state.feed = _HostFeed(plan.hosts)
                    future, thread = _finalize_behind_loads(
                        state.feed, plan.cluster, options.cutoff, run_id, options
                    )
                    pending[future] = ("finalize", plan.cluster, "")
                    finalizers.append(thread)

            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    kind, cluster, host = pending.pop(future)
                    state = states[cluster]
                    if kind == "load":
                        manifest = _on_loaded(state, host, future, notify)
                        if state.feed is not None:
                            state.feed.put(host, manifest)
                        elif state.hosts_left == 0:
                            submit(
                                "finalize",
                                cluster,
                                "",
                                steps.finalize_cluster,
                                cluster,
                                options.cutoff,
                                run_id,
                                state.manifests,
                                options.archive,
                                options.parquet,
                            )
                    elif kind == "finalize":
                        for m in _on_finalized(state, future, notify):
                            state.deletes_left += 1
                            submit(
                                "delete",
                                cluster,
                                m.host,
                                steps.delete_files,
                                options.checkpoints,
                                cluster,
                                m.host,
                                m.files,
                            )
                        if state.deletes_left == 0:
                            _finish(state, started, notify, staging_url)
                    else:
                        _on_deleted(state, host, future, notify)
                        if options.mode == "delete":
                            state.hosts_left -= 1
                            if state.hosts_left == 0:
                                _finish(state, started, notify)
                        else:
                            state.deletes_left -= 1
                            if state.deletes_left == 0:
                                _finish(state, started, notify, staging_url)
    except BaseException as exc:
        stopped = exc
        raise
    finally:
        # Stop finalize threads still waiting for hosts, and let any that is publishing
        # finish, before the locks go.
        for state in states.values():
            if state.feed is not None:
                state.feed.cancel()
        for thread in finalizers:
            thread.join()
        if stopped is not None:
            for state in states.values():
                if state.lock is not None and not state.done:
                    _record_stopped(state, started, stopped)
        for state in states.values():
            if state.lock is not None:
                state.lock.release()
        # Nothing in the run's staging is of use once the run ends, finished or not.
        if private_run is not None:
            private_run.close()
        elif archiving and staging_url and plans:
            with suppress(OSError):  # it is marked: a later run's sweep removes it
                staging.remove_run(staging_url, run_id)
    return [state.report for state in [*states.values(), *refused]]


def _record_stopped(state: _ClusterState, started: float, exc: BaseException) -> None:
    """The end record of a cluster the run left midway: `interrupted` for a signal (or
    Ctrl-C), `error` for anything else. Files not yet archived stay for the next run."""
    report = state.report
    report.seconds = time.perf_counter() - started
    signalled = isinstance(exc, Interrupted | KeyboardInterrupt)
    if isinstance(exc, KeyboardInterrupt):
        report.errors.append("interrupted by SIGINT")
    else:
        report.errors.append(str(exc) if isinstance(exc, Interrupted) else _error(exc))
    outcome = "interrupted" if signalled else "error"
    ops.record_run(
        state.run_log, report, state.mode, outcome=outcome, keep=state.keep, max_age=state.max_age
    )
    metrics.observe_cluster(report, result=outcome)


def _refused_report(plan: steps.ClusterPlan, cutoff: int, run_id: str) -> ClusterReport:
    """The report of a cluster directory whose name is refused: its reason, nothing done."""
    return ClusterReport(plan.cluster, cutoff, run_id, bad=list(plan.bad))


@contextmanager
def _stopped_on_error(pool: Executor) -> Iterator[None]:
    """Stop the pool at once when the run ends by an exception (Interrupted, a bug)."""
    try:
        yield
    except BaseException:
        _stop_pool(pool)
        raise


@dataclass
class RunFacts:
    """What the last `run` in this process did beyond its reports (tests, debugging)."""

    pool: bool = False  # a process pool was created (no: everything ran in this process)


last_run = RunFacts()


def _hosts_with_files(
    plans: list[steps.ClusterPlan], states: dict[str, _ClusterState], options: RunOptions
) -> bool:
    """Whether some host has a checkpoint file (or a bad name) at or before the cutoff."""
    root = Path(options.checkpoints)
    for plan in plans:
        exclude = states[plan.cluster].exclude
        for host in plan.hosts:
            try:
                found = steps.select_files(
                    root / plan.cluster / host, options.cutoff, exclude.get(host, [])
                )
            except OSError:  # unreadable: the load step reports it, in the pool as usual
                return True
            if found.files or found.bad:
                return True  # one is enough to need the pool: no second listing of the tree
    return False


def _prepare(plan: steps.ClusterPlan, report: ClusterReport, options: RunOptions) -> _ClusterState:
    """Lock the cluster and run recovery; a cluster that cannot be locked is skipped."""
    state = _ClusterState(
        report,
        hosts_left=len(plan.hosts),
        mode=options.mode,
        run_log=options.run_log,
        keep=options.run_log_keep,
        max_age=options.run_log_max_age,
    )
    lock = DirectoryLock(Path(options.checkpoints) / plan.cluster)
    try:
        lock.acquire()
    except (LockBusy, OSError) as exc:
        report.errors.append(f"skipped: {exc}")
        return state
    if options.mode == "archive":
        try:
            found = recovery.recover_cluster(
                options.checkpoints,
                options.archive,
                plan.cluster,
                plan.hosts,
                options.grace_seconds,
            )
        except Exception as exc:
            # Without the commit records we could archive a file twice: do nothing instead.
            lock.release()
            report.errors.append(f"skipped: cannot read existing archives: {_error(exc)}")
            return state
        report.files_deleted += len(found.deleted)
        report.bad.extend(found.kept)
        state.exclude = found.exclude
    state.lock = lock
    # Replaced by the end record; left alone by a SIGKILL, so `status` shows `unfinished`.
    ops.record_start(state.run_log, report, options.mode)
    return state


def _on_loaded(
    state: _ClusterState, host: str, future: Future[Any], notify: ProgressFn
) -> HostManifest | None:
    """Record a host's load; return its manifest, or None if the load failed."""
    state.hosts_left -= 1
    report = state.report
    try:
        manifest: HostManifest = future.result()
    except Exception as exc:
        # A host that cannot be loaded keeps all its files; the rest of the cluster goes on.
        report.bad.append(BadFile(f"{report.cluster}/{host}", _error(exc)))
        notify("loaded", report.cluster, {"host": host, "rows": 0, "failed": True})
        return None
    state.manifests.append(manifest)
    report.bad.extend(manifest.bad)
    notify("loaded", report.cluster, {"host": host, "rows": manifest.rows})
    return manifest


def _on_finalized(
    state: _ClusterState, future: Future[Any], notify: ProgressFn
) -> list[HostManifest]:
    """Record the archive; return the manifests whose files may now be deleted."""
    report = state.report
    try:
        info: ArchiveInfo | None = future.result()
    except Exception as exc:
        report.errors.append(f"archive not written, all files kept: {_error(exc)}")
        notify("finalized", report.cluster, {"failed": True})
        return []
    with_files = [m for m in state.manifests if m.files]
    report.files_archived = sum(len(m.files) for m in with_files)
    report.rows = sum(m.rows for m in with_files)
    if info is not None:
        report.archive = info.url
        report.bytes_written = 0 if info.already_existed else info.bytes
    notify("finalized", report.cluster, {"archive": report.archive, "rows": report.rows})
    return with_files


def _on_deleted(state: _ClusterState, host: str, future: Future[Any], notify: ProgressFn) -> None:
    report = state.report
    try:
        result: DeleteResult = future.result()
    except Exception as exc:
        report.errors.append(f"{host}: deletion failed: {_error(exc)}")
        return
    report.files_deleted += len(result.deleted)
    report.bad.extend(result.kept)
    notify("deleted", report.cluster, {"host": host, "files": len(result.deleted)})


def _finish(
    state: _ClusterState, started: float, notify: ProgressFn, staging_url: str | None = None
) -> None:
    report = state.report
    if staging_url:
        try:
            # The run's directory itself goes when the run ends (runner.run).
            steps.cleanup_staging(staging_url, report.run_id, report.cluster, whole_run=False)
        except OSError as exc:
            report.errors.append(f"staging not removed: {_error(exc)}")
    report.seconds = time.perf_counter() - started
    if state.lock is not None:
        state.lock.release()
    state.done = True
    # For `ccarchive status`; never raises.
    ops.record_run(state.run_log, report, state.mode, keep=state.keep, max_age=state.max_age)
    metrics.observe_cluster(report)
    notify("done", report.cluster, {"ok": report.ok})

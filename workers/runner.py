"""The embedded runner: the whole pipeline on one machine, no Redis, a process pool.

It walks the pipeline of `workers.pipeline` (the Celery tasks walk the same one): per
cluster recover, load every host, finalize, and once the archive is published, delete
its archived files, then its staging; every report update is `ClusterRun`'s. A cluster
never waits for another one.

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

from . import pipeline, recovery, roots, runlog, staging, steps, storage
from .locks import DirectoryLock, LockBusy
from .manifest import ArchiveInfo, ClusterReport, DeleteResult, HostManifest, ParquetOptions

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
    run_log: str | None = None  # where run records go (runlog.record_run); None: none
    run_log_keep: int = runlog.DEFAULT_KEEP_RECORDS  # records kept per cluster ...
    run_log_max_age: float = runlog.DEFAULT_MAX_RECORD_AGE  # ... none older (seconds)


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
    busy (measured: bench/README.md, "Streaming finalize").
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
class _Cluster:
    """The embedded driver's side of a cluster's run: its lock, pool bookkeeping, feed."""

    run: pipeline.ClusterRun
    hosts: list[str]
    hosts_left: int = 0
    deletes_left: int = 0
    lock: DirectoryLock | None = None
    feed: _HostFeed | None = None  # set when finalize runs behind the loads

    @property
    def report(self) -> ClusterReport:
        """The cluster's report (owned by its ClusterRun)."""
        return self.run.report


@dataclass
class _Run:
    """One embedded run: its options, clusters and pool; walks each cluster's pipeline."""

    options: RunOptions
    notify: ProgressFn
    run_id: str
    staging_url: str | None = None
    clusters: dict[str, _Cluster] = field(default_factory=dict)
    pending: dict[Future[Any], tuple[str, str, str]] = field(default_factory=dict)
    pool: Executor | None = None
    streaming: bool = False
    direct: bool = False  # one worker: each host read, then written at once (no staging)
    finalizers: list[threading.Thread] = field(default_factory=list)

    @property
    def run_log(self) -> pipeline.RunLog:
        """Where the clusters' run records go."""
        o = self.options
        return pipeline.RunLog(o.run_log, o.run_log_keep, o.run_log_max_age)

    def submit(
        self, kind: str, cluster: str, host: str, fn: Callable[..., Any], *args: Any
    ) -> None:
        """Run `fn(*args)` in the pool; its result comes back to `dispatch`."""
        assert self.pool is not None
        self.pending[self.pool.submit(fn, *args)] = (kind, cluster, host)

    def finish(self, c: _Cluster, staging: bool = False) -> None:
        """The cluster's last step (shared bookkeeping), then the progress event."""
        lock = c.lock
        c.run.finish(
            self.run_log,
            staging=self.staging_url if staging and not self.direct else None,
            release=lock.release if lock is not None else None,
        )
        self.notify("done", c.report.cluster, {"ok": c.report.ok})

    def start_cluster(self, c: _Cluster) -> None:
        """Submit the cluster's first per-host stage (and its streaming finalize)."""
        o, cluster = self.options, c.report.cluster
        if self.direct and c.hosts:
            self.submit("finalize", cluster, "", self.read_and_write, c)
            return
        for host in sorted(c.hosts):
            if o.mode == "delete":
                args: tuple[Any, ...] = (o.checkpoints, cluster, host, o.cutoff)
                self.submit("delete", cluster, host, steps.delete_expired, *args)
            else:
                exclude = c.run.exclude.get(host, [])
                args = (o.checkpoints, cluster, host, o.cutoff, self.staging_url, self.run_id)
                args += (o.chunk_compression, exclude)
                self.submit("load", cluster, host, steps.load_host, *args)
        if not c.hosts:
            self.finish(c)
        elif self.streaming:
            c.feed = _HostFeed(c.hosts)
            future, thread = _finalize_behind_loads(c.feed, cluster, o.cutoff, self.run_id, o)
            self.pending[future] = ("finalize", cluster, "")
            self.finalizers.append(thread)

    def read_and_write(self, c: _Cluster) -> ArchiveInfo | None:
        """One worker: read each host and write it into the archive at once, in hostname
        order. Its rows never make the round trip through a staging chunk (an LZ4 IPC write
        and read, and a second copy in memory: bench/README.md, "One worker, no staging")."""
        o, cluster = self.options, c.report.cluster
        held = steps.HeldRows()

        def hosts() -> Iterator[HostManifest]:
            for host in sorted(c.hosts):
                read: Future[Any] = Future()
                try:
                    manifest, table = steps.read_host(
                        o.checkpoints, cluster, host, o.cutoff, self.run_id,
                        c.run.exclude.get(host, []),
                    )  # fmt: skip
                except Exception as exc:
                    read.set_exception(exc)
                else:
                    read.set_result(manifest)
                loaded = self.on_loaded(c, host, read)
                if loaded is not None:
                    yield held.hold(loaded, table)
                table = None  # held (or nothing to hold): this frame keeps no rows

        return steps.finalize_streaming(
            cluster, o.cutoff, self.run_id, hosts(), o.archive or "", o.parquet, rows_of=held
        )

    def dispatch(self, future: Future[Any]) -> None:
        """Fold a finished step into its cluster's run and start what follows."""
        kind, cluster, host = self.pending.pop(future)
        c = self.clusters[cluster]
        if kind == "load":
            manifest = self.on_loaded(c, host, future)
            if c.feed is not None:
                c.feed.put(host, manifest)
            elif c.hosts_left == 0:
                o = self.options
                args = (cluster, o.cutoff, self.run_id, c.run.manifests, o.archive, o.parquet)
                self.submit("finalize", cluster, "", steps.finalize_cluster, *args)
        elif kind == "finalize":
            self.on_finalized(c, future)
        else:
            self.on_deleted(c, host, future)

    def on_loaded(self, c: _Cluster, host: str, future: Future[Any]) -> HostManifest | None:
        """A host's load: into the cluster's run; its manifest, or None if it failed."""
        c.hosts_left -= 1
        try:
            manifest = c.run.loaded(host, future.result())
        except Exception as exc:
            c.run.loaded(host, error=pipeline.error_text(exc))
            self.notify("loaded", c.report.cluster, {"host": host, "rows": 0, "failed": True})
            return None
        assert manifest is not None
        self.notify("loaded", c.report.cluster, {"host": host, "rows": manifest.rows})
        return manifest

    def on_finalized(self, c: _Cluster, future: Future[Any]) -> None:
        """The archive: into the cluster's run, then its deletions (or its end)."""
        o, cluster = self.options, c.report.cluster
        try:
            info: ArchiveInfo | None = future.result()
        except Exception as exc:
            c.run.finalized(error=pipeline.error_text(exc))
            self.notify("finalized", cluster, {"failed": True})
            with_files = []
        else:
            with_files = c.run.finalized(info)
            rows = c.report.rows
            self.notify("finalized", cluster, {"archive": c.report.archive, "rows": rows})
        url = c.report.archive
        for m in with_files:
            c.deletes_left += 1
            args = (o.checkpoints, cluster, m.host, m.files, url, self.run_id)
            self.submit("delete", cluster, m.host, pipeline.delete_archived, *args)
        if c.deletes_left == 0:
            self.finish(c, staging=True)

    def on_deleted(self, c: _Cluster, host: str, future: Future[Any]) -> None:
        """A host's deletions: into the cluster's run; the cluster ends after its last."""
        try:
            result: DeleteResult = future.result()
        except Exception as exc:
            c.run.deleted(host, error=pipeline.error_text(exc))
        else:
            c.run.deleted(host, result)
            self.notify("deleted", c.report.cluster, {"host": host, "files": len(result.deleted)})
        if self.options.mode == "delete":
            c.hosts_left -= 1
            if c.hosts_left == 0:
                self.finish(c)
        else:
            c.deletes_left -= 1
            if c.deletes_left == 0:
                self.finish(c, staging=True)

    def stop(self, stopped: BaseException | None) -> None:
        """End the run: stop finalize threads (letting a publishing one finish) before the
        locks go; record clusters left midway (`interrupted` for a signal, else `error`)."""
        for c in self.clusters.values():
            if c.feed is not None:
                c.feed.cancel()
        for thread in self.finalizers:
            thread.join()
        for c in self.clusters.values():
            if c.lock is None:
                continue
            if stopped is not None and not c.run.finished:
                # Files not yet archived stay for the next run.
                signalled = isinstance(stopped, Interrupted | KeyboardInterrupt)
                outcome = c.run.stopped(stopped, signalled)
                c.run.finish(self.run_log, release=c.lock.release, outcome=outcome)
            c.lock.release()


def run(options: RunOptions, progress: ProgressFn | None = None) -> list[ClusterReport]:
    """Archive (or delete) everything the cutoff selects; one report per cluster."""
    notify = progress or (lambda _event, _cluster, _detail: None)
    run_id = new_run_id(options.cutoff)
    # An unwritable default (a service user whose home is /) is one warning, not one per cluster.
    options = replace(options, run_log=runlog.usable_run_log(options.run_log))
    archiving = options.mode == "archive"
    if archiving:
        roots.check_roots(options.checkpoints, options.archive, options.staging)
    # Without --staging: a run directory in this user's private temporary staging, locked
    # while the run lives and removed when it ends (SPEC §6.9).
    private_root = roots.private_staging_root() if archiving and not options.staging else None
    r = _Run(options, notify, run_id, private_root or options.staging)
    started = time.time()
    plans = [
        p
        for p in steps.discover(options.checkpoints)
        if not options.clusters or p.cluster in options.clusters
    ]
    # A directory whose name is refused is reported like a kept file (exit 1), untouched.
    refused = [_Cluster(_begin(p, options, run_id, started), []) for p in plans if p.refused]
    for c in refused:
        notify("plan", c.report.cluster, {"hosts": 0})
        r.finish(c)
    for plan in [p for p in plans if not p.refused]:
        c = r.clusters[plan.cluster] = _prepare(
            plan, _begin(plan, options, run_id, started), options
        )
        notify("plan", plan.cluster, {"hosts": len(plan.hosts)})
        if c.lock is None:  # skipped: recorded like any run (`ccarchive status`, metrics)
            r.finish(c)
    live = [c for c in r.clusters.values() if c.lock is not None]
    _drive(r, live, private_root)
    return [c.report for c in [*r.clusters.values(), *refused]]


def _begin(
    plan: steps.ClusterPlan, options: RunOptions, run_id: str, started: float
) -> pipeline.ClusterRun:
    hosts = [] if plan.refused else plan.hosts
    return pipeline.ClusterRun.begin(
        plan.cluster, options.cutoff, run_id, hosts, plan.bad, options.mode, started
    )


def _drive(r: _Run, live: list[_Cluster], private_root: str | None) -> None:
    """Run the locked clusters' pipelines to their ends in a pool; clean up whatever happens."""
    options = r.options
    archiving = options.mode == "archive"
    # No host with a file to load or delete: no pool (spawning 16 processes for nothing
    # costs seconds and CPU-seconds); the empty steps run inline.
    busy = _hosts_with_files(live, options)
    if not busy:
        log.info("nothing selected at cutoff %d: no process pool started", options.cutoff)
    # A thread per cluster writes its archive while its hosts load (see the module's doc).
    r.streaming = options.workers > 1 and archiving and busy
    r.direct = options.workers <= 1 and archiving and busy
    private_run: staging.PrivateRun | None = None
    stopped: BaseException | None = None
    try:
        if archiving and r.staging_url:
            recovery.sweep_staging(
                r.staging_url, r.run_id, options.grace_seconds, private=private_root is not None
            )
            if any(c.hosts for c in live) and not r.direct:
                # Marked before any chunk: only a marked run directory may a sweep remove.
                if private_root is not None:
                    private_run = staging.PrivateRun(private_root, r.run_id)
                else:
                    staging.mark_run(r.staging_url, r.run_id)
        executor = _executor(options, r.streaming) if busy else _InlineExecutor()
        with executor as pool, _stopped_on_error(pool):
            r.pool = pool
            last_run.pool = not isinstance(pool, _InlineExecutor)
            for c in live:
                r.start_cluster(c)
            while r.pending:
                done, _ = wait(r.pending, return_when=FIRST_COMPLETED)
                for future in done:
                    r.dispatch(future)
    except BaseException as exc:
        stopped = exc
        raise
    finally:
        r.stop(stopped)
        # Nothing in the run's staging is of use once the run ends, finished or not.
        if private_run is not None:
            private_run.close()
        elif archiving and r.staging_url and live and not r.direct:
            with suppress(OSError):  # it is marked: a later run's sweep removes it
                staging.remove_run(r.staging_url, r.run_id)


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


def _hosts_with_files(clusters: list[_Cluster], options: RunOptions) -> bool:
    """Whether some host has a checkpoint file (or a bad name) at or before the cutoff."""
    root = Path(options.checkpoints)
    for c in clusters:
        for host in c.hosts:
            try:
                found = steps.select_files(
                    root / c.report.cluster / host, options.cutoff, c.run.exclude.get(host, [])
                )
            except OSError:  # unreadable: the load step reports it, in the pool as usual
                return True
            if found.files or found.bad:
                return True  # one is enough to need the pool: no second listing of the tree
    return False


def _prepare(plan: steps.ClusterPlan, run: pipeline.ClusterRun, options: RunOptions) -> _Cluster:
    """Lock the cluster and run its recovery (once, before any load); a cluster that cannot
    be locked, or whose committed archives cannot be read, is skipped."""
    c = _Cluster(run, plan.hosts, hosts_left=len(plan.hosts))
    lock = DirectoryLock(Path(options.checkpoints) / plan.cluster)
    try:
        lock.acquire()
    except (LockBusy, OSError) as exc:
        run.skipped(str(exc))
        return c
    if options.mode == "archive":
        try:
            found = recovery.recover_cluster(
                options.checkpoints, options.archive, plan.cluster, plan.hosts,
                options.grace_seconds,
            )  # fmt: skip
        except Exception as exc:
            lock.release()
            run.recovery_failed(exc)
            return c
        run.recovered(found)
    c.lock = lock
    # Replaced by the end record; left alone by a SIGKILL, so `status` shows `unfinished`.
    runlog.record_start(options.run_log, run.report, options.mode)
    return c

"""Celery tasks: thin wrappers around `workers.steps`, chained into one pipeline per cluster.

    plan ──► chord(discover @ every queue) ──► launch ──► for each cluster:
      archive: chord(load_host @ host's queue) ──► finalize_cluster @ finalize queue
                 ──► chord(delete_files @ host's queue) ──► finish_cluster @ finalize queue
      delete:  chord(delete_expired @ host's queue) ──► finish_cluster

Messages carry names (cluster, host, file), the cutoff and the run id, never paths or
credentials: every task resolves the checkpoint root, staging and archive from its *own*
worker's settings. Each task validates the names of its message before anything else
(refusing it with a report, the name logged quoted) and the steps validate them again
where they build paths, so no message can make a worker touch a path outside its
configured roots (SPEC §6.6).

A task never raises into a chord: a host that cannot be loaded (after its retries, or
after its worker died too often) comes back as a manifest with no files and the reason
in `bad`, so the cluster is archived without it and its files stay for the next run.
Finalize is the one task that may end FAILED (so Flower shows it), and it starts the
cluster's final step first, so the run still ends with a report and a released lock.
If a chord itself breaks (a member's result lost while Redis restarted, a task revoked),
its errback `abandon_cluster` releases the lock and reports instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis
from celery import Task, chord
from celery.canvas import Signature
from celery.exceptions import ChordError

from . import recovery, roots, routing, sink, staging, steps
from . import runlog as ops  # run records left ops (now: runlog); rename on merge
from .celery import app
from .config import (
    Settings,
    configure_storage,
    load_settings,
    mask_url,
    parse_duration,
    redis_client,
)
from .locks import LockBusy, RedisLock, RunHolds
from .manifest import BadFile, ClusterReport, DeleteResult, HostManifest, SourceFile
from .runner import new_run_id

log = logging.getLogger(__name__)

#: Redis list of the latest cluster reports (JSON, newest first): what beat runs leave.
REPORTS_KEY = "ccarchive:reports"
REPORTS_KEEP = 1000
ATTEMPTS_PREFIX = "ccarchive:attempts:"


class LockLost(Exception):
    """The run no longer owns its cluster's lock: another run may have taken over."""


# --- per-process state --------------------------------------------------------------------


@functools.cache
def settings() -> Settings:
    """This worker's settings, read once per process (env > TOML > cc-backend config).

    Reading them also applies the storage options (S3 endpoint, credentials) to this
    process, whatever the pool: prefork children, threads or solo.
    """
    s = load_settings()
    configure_storage(s)
    return s


@functools.cache
def router() -> routing.Router:
    """This worker's routes."""
    s = settings()
    return routing.make_router(s.routes, s.default_queue, s.finalize_queue)


@functools.cache
def _redis() -> redis.Redis:
    # Locks, attempt counters and the report log live on the broker's Redis (same TLS).
    s = settings()
    return redis_client(s.broker_url, s)


def _lock(cluster: str, run_id: str) -> RedisLock:
    s = settings()
    return RedisLock(
        _redis(), steps.check_name(cluster, "cluster"), run_id, parse_duration(s.lock_timeout)
    )


def _roots_problem() -> str | None:
    """Why this worker's roots overlap (SPEC §6.9), or None: such a worker never archives,
    never writes a chunk and never sweeps or removes staging."""
    s = settings()
    return roots.roots_problem(s.checkpoints, s.archive, s.staging)


def _run_goes_on(cluster: str, run_id: str) -> bool:
    """True while the run still holds its cluster's Redis lock."""
    holder = _redis().get(_lock(cluster, run_id).key)
    return (holder.decode() if isinstance(holder, bytes) else holder) == run_id


#: This process's shared flocks on the cluster directories it loaded hosts of, kept while
#: their run goes on: an embedded run on the same tree sees them (workers.locks.RunHolds).
_holds = RunHolds(_run_goes_on)


def _attempt(task: Task) -> int:
    """Count this delivery of the task (retries and redeliveries after a crash alike)."""
    key = ATTEMPTS_PREFIX + str(task.request.id)
    try:
        pipe = _redis().pipeline()
        pipe.incr(key)
        pipe.expire(key, int(parse_duration(settings().lock_timeout)))
        return int(pipe.execute()[0])
    except redis.RedisError:
        return int(task.request.retries) + 1


def _max_attempts() -> int:
    return settings().task_retries + 1


def _countdown(attempt: int) -> float:
    return settings().retry_delay * 2 ** (attempt - 1)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _host_path(cluster: str, host: str) -> str:
    """The host's directory, for reports; names that are not safe are quoted, never joined."""
    root = settings().checkpoints or ""
    try:
        return os.path.join(root, steps.check_name(cluster), steps.check_name(host))
    except steps.UnsafeName:
        return f"{root} (cluster {cluster!r}, host {host!r})"


def _shown(name: Any) -> Any:
    """A name from a refused message as results may echo it: escaped unless printable
    (Celery logs every result; a raw newline in it would forge a log line)."""
    return name if not isinstance(name, str) or name.isprintable() else ascii(name)


def _check_names(**names: Any) -> None:
    """Validate names and the cutoff from a message; raise UnsafeName (logged) if one is bad.

    Workers resolve every path from their own roots plus these names, so this is what keeps
    a forged or corrupted message from reaching outside the roots (SPEC §6.6).
    """
    try:
        for what, value in names.items():
            if what == "cutoff":
                steps.check_cutoff(value)
            else:
                steps.check_name(value, what.replace("_", " "))
    except steps.UnsafeName as exc:
        # %r: a name with a newline must not forge log lines either.
        log.error("refused a task message: %r", str(exc))
        raise


@contextmanager
def _renewing(lock: RedisLock) -> Iterator[None]:
    """Keep renewing the cluster lock while a long step runs."""
    stop = threading.Event()
    period = max(1.0, lock.ttl_seconds / 4)

    def renew() -> None:
        while not stop.wait(period):
            try:
                lock.renew()
            except redis.RedisError:
                log.warning("cannot renew the lock of %s", lock.cluster)

    thread = threading.Thread(target=renew, name="ccarchive-lock-renewal", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _renew(cluster: str, run_id: str) -> None:
    try:
        _lock(cluster, run_id).renew()
    except redis.RedisError as exc:
        log.warning("cannot renew the lock of %s: %s", cluster, exc)


def _launch(header: list[Signature], body: Signature) -> None:
    """Run `header` in parallel, then `body` with the list of their results."""
    if header:
        chord(header)(body)
    else:
        body.apply_async(args=([],))  # a chord needs at least one task


def _same_location(configured: str | None, requested: str | None) -> bool:
    if requested is None:
        return True
    if configured is None:
        return False
    if "://" in configured or "://" in requested:
        return configured.rstrip("/") == requested.rstrip("/")
    return os.path.realpath(configured) == os.path.realpath(requested)


# --- planning -----------------------------------------------------------------------------


@app.task(name="ccarchive.plan")
def plan(
    retention: str | None = None,
    cutoff: int | None = None,
    mode: str | None = None,
    clusters: list[str] | None = None,
    checkpoints: str | None = None,
    archive: str | None = None,
) -> dict[str, Any]:
    """Start one run: T = cutoff or now - retention; discover on every queue, then launch.

    `checkpoints`/`archive`, when a client names them, must be what the workers use:
    workers only ever work on their own configured roots. Returns the run id, the cutoff
    and the id of the `launch` task whose result lists the run's task ids per cluster.
    """
    s = settings()
    mode = mode or s.mode
    problem = None
    if mode not in ("archive", "delete"):
        problem = f"unknown mode {mode!r}"
    elif not s.checkpoints:
        problem = "the workers have no checkpoint directory (CCARCHIVE_CHECKPOINTS)"
    elif mode == "archive" and not s.archive:
        problem = "the workers have no archive location (CCARCHIVE_ARCHIVE)"
    elif mode == "archive" and not s.staging:
        problem = "the workers have no shared staging location (CCARCHIVE_STAGING)"
    elif mode == "archive" and _roots_problem():
        problem = f"refused: {_roots_problem()}"
    elif not _same_location(s.checkpoints, checkpoints):
        problem = f"the workers archive {s.checkpoints}, not {checkpoints}"
    elif mode == "archive" and not _same_location(
        s.archive and mask_url(s.archive), archive and mask_url(archive)
    ):
        # Clients send locations masked (task arguments are shown in Flower): compare so.
        problem = f"the workers write archives to {mask_url(s.archive or '')}, not {archive}"
    elif cutoff is None and not (retention or s.retention):
        problem = "no cutoff and no retention (CCARCHIVE_RETENTION)"
    checked = 0
    if problem is None:
        try:
            if cutoff is None:
                cutoff = int(time.time() - parse_duration(retention or s.retention or ""))
            checked = steps.check_cutoff(cutoff)  # > 0, fits in int64
        except (ValueError, steps.UnsafeName) as exc:
            problem = f"no valid cutoff: {exc}"
    if problem is None:
        problem = _queues_problem(s)
    if problem is None and clusters:
        try:
            clusters = [steps.check_name(c, "cluster") for c in clusters]
        except steps.UnsafeName as exc:
            problem = str(exc)
    if problem is not None:
        log.error("run not started: %s", problem)
        return {"error": problem}
    run_id = new_run_id(checked)
    launch_id = str(uuid.uuid4())
    header = [discover.si(q).set(queue=q) for q in router().queues()]
    body = launch.s(
        cutoff=checked, mode=mode, run_id=run_id, clusters=clusters, started=time.time()
    ).set(queue=s.default_queue, task_id=launch_id)
    _launch(header, body)
    log.info("run %s: cutoff %d, mode %s", run_id, checked, mode)
    return {"run_id": run_id, "cutoff": checked, "mode": mode, "launch": launch_id}


def _queues_problem(s: Settings) -> str | None:
    """Why the run cannot start because a queue it needs has no worker, or None."""
    from .remote import needed_queues, no_worker_message, queues_without_worker

    # This worker cannot answer the broadcast itself while it runs a task in the solo
    # pool: count the queues it consumes (set by -Q) as answered.
    own = set(getattr(app.amqp.queues, "consume_from", None) or {})
    try:
        missing = queues_without_worker(app, needed_queues(s), own=own)
    except Exception as exc:  # the broadcast itself failed: let the run try, as before
        log.warning("could not check the queues' workers: %s", _error(exc))
        return None
    return no_worker_message(missing) if missing else None


@app.task(name="ccarchive.discover")
def discover(queue: str) -> dict[str, Any]:
    """List the clusters and hosts this worker sees (the queue it was sent to is `queue`)."""
    try:
        plans = steps.discover(settings().checkpoints or "")
    except Exception as exc:  # a missing root: reported by launch, the other queues go on
        return {"queue": queue, "clusters": [], "error": _error(exc)}
    return {
        "queue": queue,
        "clusters": [
            {
                "cluster": p.cluster,
                "hosts": p.hosts,
                "bad": [asdict(b) for b in p.bad],
                **({"refused": True} if p.refused else {}),
            }
            for p in plans
        ],
    }


@app.task(name="ccarchive.launch")
def launch(
    discoveries: list[dict[str, Any]],
    cutoff: int,
    mode: str,
    run_id: str,
    clusters: list[str] | None,
    started: float,
) -> dict[str, Any]:
    """Lock each cluster and start its pipeline; return the task ids per cluster."""
    s = settings()
    _check_names(run_id=run_id, cutoff=cutoff)
    if mode not in ("archive", "delete"):
        raise ValueError(f"unknown mode {mode!r}")
    errors = [f"discovery on queue {d['queue']}: {d['error']}" for d in discoveries if "error" in d]
    for e in errors:
        log.error("run %s: %s", run_id, e)
    if mode == "archive" and (problem := _roots_problem()):
        log.error("run %s refused: %s", run_id, problem)  # nothing swept, nothing loaded
        errors.append(f"refused: {problem}")
        return {"run_id": run_id, "cutoff": cutoff, "mode": mode, "errors": errors, "clusters": []}
    if mode == "archive" and s.staging:
        try:
            recovery.sweep_staging(s.staging, run_id, s.grace_seconds)
        except Exception as exc:
            log.warning("staging sweep failed: %s", _error(exc))
    marked = False
    entries = []
    # Cluster directories whose names are refused: reported (exit 1), nothing else done.
    refused: dict[str, list[dict[str, str]]] = {}
    for d in discoveries:
        for c in d.get("clusters", []):
            if c.get("refused") and not clusters:
                refused.setdefault(c["cluster"], c.get("bad", []))
        d["clusters"] = [c for c in d.get("clusters", []) if not c.get("refused")]
    for name, bad in sorted(refused.items()):
        report = ClusterReport(name, cutoff, run_id, bad=[BadFile(**b) for b in bad])
        entries.append({"cluster": name, "hosts": {}, "report": _close(report, started, mode)})
    for ch in routing.select_hosts(discoveries, router()):
        if clusters and ch.cluster not in clusters:
            continue
        try:
            _check_names(cluster=ch.cluster)
            for h in ch.hosts:
                _check_names(host=h)
        except steps.UnsafeName as exc:
            errors.append(f"refused: {exc}")
            continue
        report = ClusterReport(ch.cluster, cutoff, run_id, hosts=len(ch.hosts))
        report.bad.extend(BadFile(**b) for b in ch.bad)
        entry: dict[str, Any] = {"cluster": ch.cluster, "hosts": list(ch.hosts)}
        lock = _lock(ch.cluster, run_id)
        # A redelivered launch finds its own run id in the lock: it may go on.
        if not lock.acquire() and not lock.owned():
            holder = _redis().get(lock.key)
            owner = holder.decode() if isinstance(holder, bytes) else holder or "?"
            report.errors.append(f"skipped: run {owner} is still working on this cluster")
            entry["report"] = _close(report, started, mode)
            entries.append(entry)
            continue
        entry["report_id"] = report_id = str(uuid.uuid4())
        finish = finish_cluster.s(report=report.to_dict(), mode=mode, started=started).set(
            queue=router().finalize_queue, task_id=report_id
        )
        if mode == "archive":
            if not marked and s.staging:
                # Before any chunk: a sweep removes only run directories marked as ours.
                try:
                    staging.mark_run(s.staging, run_id)
                except Exception as exc:
                    lock.release()
                    report.errors.append(f"skipped: cannot mark the run's staging: {_error(exc)}")
                    entry["report"] = _close(report, started, mode)
                    entries.append(entry)
                    continue
                marked = True
            entry["loads"] = {h: str(uuid.uuid4()) for h in ch.hosts}
            entry["finalize"] = finalize_id = str(uuid.uuid4())
            header = [
                load_host.si(ch.cluster, h, cutoff, run_id).set(queue=q, task_id=entry["loads"][h])
                for h, q in ch.hosts.items()
            ]
            body = finalize_cluster.s(
                cluster=ch.cluster,
                cutoff=cutoff,
                run_id=run_id,
                report=report.to_dict(),
                queues=ch.hosts,
                report_id=report_id,
                started=started,
            ).set(queue=router().finalize_queue, task_id=finalize_id)
            _launch(header, body.on_error(_abandon(report, mode, started)))
        else:
            entry["deletes"] = {h: str(uuid.uuid4()) for h in ch.hosts}
            header = [
                delete_expired.si(ch.cluster, h, cutoff).set(queue=q, task_id=entry["deletes"][h])
                for h, q in ch.hosts.items()
            ]
            _launch(header, finish.on_error(_abandon(report, mode, started)))
        entries.append(entry)
    return {"run_id": run_id, "cutoff": cutoff, "mode": mode, "errors": errors, "clusters": entries}


# --- per host -----------------------------------------------------------------------------


def _failed_load(cluster: str, host: str, cutoff: int, run_id: str, reason: str) -> dict[str, Any]:
    log.warning("%s/%s not loaded, its files are kept: %s", cluster, host, reason)
    manifest = HostManifest(
        cluster, host, cutoff, run_id, bad=[BadFile(_host_path(cluster, host), reason)]
    )
    return {"manifest": manifest.to_dict(), "recovered": []}


@app.task(bind=True, name="ccarchive.load_host")
def load_host(self: Task, cluster: str, host: str, cutoff: int, run_id: str) -> dict[str, Any]:
    """Recover and load one host; return `{"manifest": HostManifest, "recovered": [paths]}`."""
    s = settings()
    try:
        _check_names(cluster=cluster, host=host, run_id=run_id, cutoff=cutoff)
    except steps.UnsafeName as exc:
        # Nothing was touched; the chord (if any) goes on without this "host".
        manifest = HostManifest(_shown(cluster), _shown(host), cutoff, _shown(run_id))
        manifest.bad.append(BadFile(_host_path(cluster, host), f"refused: {exc}"))
        return {"manifest": manifest.to_dict(), "recovered": []}
    if problem := _roots_problem():
        return _failed_load(cluster, host, cutoff, run_id, f"refused: {problem}")
    attempt = _attempt(self)
    if attempt > _max_attempts():
        # Redelivered after its worker died every time (e.g. killed for memory): give up
        # on this host for this run instead of looping; the chord goes on without it.
        return _failed_load(
            cluster, host, cutoff, run_id, f"gave up after {attempt - 1} attempts (worker lost)"
        )
    _renew(cluster, run_id)
    try:
        _holds.hold(Path(s.checkpoints or "") / cluster, cluster, run_id)
        found = recovery.recover_cluster(
            s.checkpoints or "", s.archive, cluster, [host], s.grace_seconds
        )
        manifest = steps.load_host(
            s.checkpoints or "",
            cluster,
            host,
            cutoff,
            s.staging or "",
            run_id,
            s.ipc_compression,
            exclude=found.exclude.get(host, ()),
        )
    except steps.UnsafeName as exc:
        return _failed_load(cluster, host, cutoff, run_id, str(exc))
    except LockBusy as exc:  # an embedded run is archiving this cluster: not ours to load
        return _failed_load(cluster, host, cutoff, run_id, f"skipped: {exc}")
    except Exception as exc:
        if attempt < _max_attempts():
            log.warning(
                "%s/%s: attempt %d failed (%s), retrying", cluster, host, attempt, _error(exc)
            )
            raise self.retry(exc=exc, countdown=_countdown(attempt), max_retries=None) from exc
        return _failed_load(
            cluster, host, cutoff, run_id, f"load failed after {attempt} attempts: {_error(exc)}"
        )
    manifest.bad[:0] = found.kept
    for bad in manifest.bad:
        log.warning("kept %s: %s", bad.path, bad.reason)
    return {"manifest": manifest.to_dict(), "recovered": found.deleted}


@functools.lru_cache(maxsize=4)
def _archived_sources(url: str) -> dict[str, Any]:
    """A published archive's commit record, read once per process (archives never change)."""
    return sink.footer_sources(sink.read_footer(url))


def _archived_files(url: str, host: str) -> dict[str, SourceFile]:
    """File name -> identity of a host's files as the published archive lists them."""
    entry = _archived_sources(url).get(host, {})
    return {f["name"]: SourceFile.from_dict(f) for f in entry.get("files", [])}


@app.task(name="ccarchive.delete_files")
def delete_files(
    cluster: str, host: str, files: list[dict[str, Any]], cutoff: int, run_id: str, archived: bool
) -> dict[str, Any]:
    """Delete a host's archived files: only those the published archive lists, same size."""
    s = settings()
    wanted: list[SourceFile] = []
    result = DeleteResult(_shown(cluster), _shown(host))
    try:
        wanted = [SourceFile.from_dict(f) for f in files]
        _check_names(cluster=cluster, host=host, run_id=run_id, cutoff=cutoff)
        _renew(cluster, run_id)
        if archived:
            # Guarantee 1, checked where the deleting happens: the archive under its final
            # name must list each file with this very identity, whatever the message says.
            url = sink.archive_url(s.archive or "", steps.check_name(cluster, "cluster"), cutoff)
            listed = _archived_files(url, host)
            for f in [f for f in wanted if listed.get(f.name) != f]:
                result.kept.append(
                    BadFile(os.path.join(_host_path(cluster, host), f.name), f"not listed in {url}")
                )
            wanted = [f for f in wanted if listed.get(f.name) == f]
        done = steps.delete_files(s.checkpoints or "", cluster, host, wanted)
    except Exception as exc:
        # Kept files listed in a committed archive are deleted by the next run's recovery.
        reason = f"not deleted: {_error(exc)}"
        result.kept.extend(
            BadFile(os.path.join(_host_path(cluster, host), _shown(f.name)), reason) for f in wanted
        )
        if not wanted:  # the message itself was unusable: say so rather than nothing
            result.kept.append(BadFile(_host_path(cluster, host), reason))
        log.error("%r/%r: %s", cluster, host, reason)
        return result.to_dict()
    done.kept[:0] = result.kept
    return done.to_dict()


@app.task(name="ccarchive.delete_expired")
def delete_expired(cluster: str, host: str, cutoff: int) -> dict[str, Any]:
    """Delete mode: remove a host's checkpoint files with 0 < ts <= cutoff, unread."""
    try:
        _check_names(cluster=cluster, host=host, cutoff=cutoff)
        return steps.delete_expired(settings().checkpoints or "", cluster, host, cutoff).to_dict()
    except Exception as exc:
        result = DeleteResult(_shown(cluster), _shown(host))
        result.kept.append(BadFile(_host_path(cluster, host), f"not deleted: {_error(exc)}"))
        return result.to_dict()


# --- per cluster --------------------------------------------------------------------------


@app.task(bind=True, name="ccarchive.finalize_cluster")
def finalize_cluster(
    self: Task,
    loads: list[dict[str, Any]],
    cluster: str,
    cutoff: int,
    run_id: str,
    report: dict[str, Any],
    queues: dict[str, str],
    report_id: str,
    started: float,
) -> dict[str, Any]:
    """Chord callback: write, verify and publish the cluster's archive, then start deletion.

    Returns `{"report", "deletes": {host: task id}, "archive", "seconds"}`.
    """
    s = settings()
    attempt = _attempt(self)
    rep = ClusterReport.from_dict(report)  # built by launch: the report must come out
    finish = finish_cluster.s(report=None, mode="archive", started=started).set(
        queue=router().finalize_queue, task_id=report_id
    )
    t0 = time.perf_counter()
    manifests: list[HostManifest] = []
    try:
        # Inside the try: a refused message still ends with a report (FAILED, permanent).
        _check_names(cluster=cluster, run_id=run_id, cutoff=cutoff)
        if problem := _roots_problem():
            raise roots.RootsRefused(problem)
        lock = _lock(cluster, run_id)

        def still_ours() -> None:
            if not lock.owned():
                raise LockLost(f"the run lost the lock of cluster {cluster}; nothing published")

        for r in loads:
            m = HostManifest.from_dict(r["manifest"])
            steps.check_name(m.host, "host")
            # Chunks are read from this worker's own staging root, not from the message.
            m.chunk = (
                staging.chunk_url(s.staging or "", run_id, cluster, m.host) if m.chunk else None
            )
            manifests.append(m)
        if attempt > _max_attempts():
            raise RuntimeError(f"gave up after {attempt - 1} attempts (worker lost)")
        with _renewing(lock):
            info = steps.finalize_cluster(
                cluster,
                cutoff,
                run_id,
                manifests,
                s.archive or "",
                sink.ParquetOptions.from_settings(s),
                before_publish=still_ours,
            )
    except Exception as exc:
        permanent = isinstance(
            exc, sink.ArchiveConflict | LockLost | steps.UnsafeName | roots.RootsRefused
        )
        # A lost lock may be the twin's doing: it published this very commit, then released
        # the lock when its cluster finished (its staging cleanup may still be to come).
        checkable = not permanent or isinstance(exc, LockLost)
        twin = _published_twin(cluster, cutoff, run_id, manifests) if checkable else None
        if twin is None:
            if not permanent and attempt < _max_attempts():
                raise self.retry(exc=exc, countdown=_countdown(attempt), max_retries=None) from exc
            rep.bad.extend(b for m in manifests for b in m.bad)
            rep.files_deleted += sum(len(r.get("recovered", [])) for r in loads)
            rep.errors.append(f"archive not written, all files kept: {_error(exc)}")
            log.error("%s: archive not written, all files kept: %s", cluster, _error(exc))
            _launch([], finish.clone(kwargs={"report": rep.to_dict()}))
            raise
        log.warning(
            "%s: %s, but this very commit is published (by a second delivery of this task)",
            cluster,
            _error(exc),
        )
        info = twin
    seconds = time.perf_counter() - t0
    rep.bad.extend(b for m in manifests for b in m.bad)
    rep.files_deleted += sum(len(r.get("recovered", [])) for r in loads)
    with_files = [m for m in manifests if m.files]
    rep.files_archived = sum(len(m.files) for m in with_files)
    rep.rows = sum(m.rows for m in with_files)
    if info is not None:
        rep.archive = info.url
        rep.bytes_written = 0 if info.already_existed else info.bytes
    deletes = {m.host: str(uuid.uuid4()) for m in with_files}
    header = [
        delete_files.si(
            cluster,
            m.host,
            [asdict(f) for f in m.files],
            cutoff,
            run_id,
            info is not None,
        ).set(
            queue=queues.get(m.host) or router().queue_for(cluster, m.host), task_id=deletes[m.host]
        )
        for m in with_files
    ]
    finish = finish.clone(kwargs={"report": rep.to_dict()})
    _launch(header, finish.on_error(_abandon(rep, "archive", started)))
    return {"report": rep.to_dict(), "deletes": deletes, "archive": rep.archive, "seconds": seconds}


def _abandon(report: ClusterReport, mode: str, started: float) -> Signature:
    """The errback of a cluster's chord callbacks (finalize, finish): see abandon_cluster."""
    return abandon_cluster.s(report=report.to_dict(), mode=mode, started=started)


@app.task(name="ccarchive.abandon_cluster")
def abandon_cluster(
    request: Any,
    exc: BaseException,
    traceback: Any,
    report: dict[str, Any],
    mode: str,
    started: float,
) -> dict[str, Any] | None:
    """Errback of a cluster's chords: release the lock of a run whose chord broke.

    A chord whose member's result could not be recorded (Redis restarted at that very
    moment) never runs its callback, so nothing would release the cluster's lock before it
    expires (CCARCHIVE_LOCK_TIMEOUT, a day by default) and every run until then would skip
    the cluster. Celery calls this (in the worker that found the chord broken) with the
    ChordError; a callback's own failure is reported by the callback itself and ignored
    here. Nothing is deleted: the next run's recovery finishes a committed archive's
    deletions, and files not archived are still in place.
    """
    if not isinstance(exc, ChordError):
        return None
    rep = ClusterReport.from_dict(report)
    try:
        _check_names(cluster=rep.cluster, run_id=rep.run_id)
    except steps.UnsafeName:
        return None
    rep.errors.append(
        f"the run broke off ({_error(exc)}); files not archived stay in place and the "
        "next run recovers what was committed"
    )
    s = settings()
    if mode == "archive" and s.staging and not _roots_problem():
        with suppress(Exception):  # swept later anyway (recovery.sweep_staging)
            steps.cleanup_staging(s.staging, rep.run_id, rep.cluster)
    try:
        _lock(rep.cluster, rep.run_id).release()
    except redis.RedisError as error:
        log.warning("lock of %s not released (it expires): %s", rep.cluster, error)
    return _close(rep, started, mode)


def _published_twin(
    cluster: str, cutoff: int, run_id: str, manifests: list[HostManifest]
) -> sink.ArchiveInfo | None:
    """The archive of exactly this commit record if it is published and verifies, else None.

    A finalize delivered twice (its acknowledgement lost while Redis restarted) can run
    next to itself: the copy that publishes first goes on to delete the files and remove
    the run's staging, and the other then fails reading a chunk that is gone. Everything
    that copy had to do is done, by its twin: it goes on instead of reporting "archive not
    written" (deleting again is harmless; the files are listed in a verified archive).
    """
    record = sink.commit_record(cluster, cutoff, run_id, manifests)
    if not any(record.rows.values()):
        return None
    try:
        url = sink.archive_url(settings().archive or "", cluster, cutoff)
        return sink.existing_archive(url, record.metadata)
    except Exception:
        return None  # unreadable, or another commit: the failure stands


def _close(report: ClusterReport, started: float, mode: str) -> dict[str, Any]:
    """Time a cluster's report, log and record it (`ccarchive status`), return it as a dict."""
    report.seconds = max(0.0, time.time() - started)
    data = report.to_dict()
    config = settings()
    ops.record_run(  # never raises
        config.run_log,
        report,
        mode,
        keep=config.run_log_keep,
        max_age=config.run_log_max_age_seconds,
    )
    try:
        pipe = _redis().pipeline()
        pipe.lpush(REPORTS_KEY, json.dumps(data))
        pipe.ltrim(REPORTS_KEY, 0, REPORTS_KEEP - 1)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("report of %s not logged: %s", report.cluster, exc)
    level = logging.INFO if report.ok else logging.WARNING
    log.log(
        level,
        "run %s cluster %s: %d hosts, %d files archived, %d deleted, %d rows, %d kept, %d errors, archive %s",
        report.run_id,
        report.cluster,
        report.hosts,
        report.files_archived,
        report.files_deleted,
        report.rows,
        len(report.bad),
        len(report.errors),
        report.archive or "-",
    )
    return data


@app.task(name="ccarchive.finish_cluster")
def finish_cluster(
    deletions: list[dict[str, Any]], report: dict[str, Any], mode: str, started: float
) -> dict[str, Any]:
    """Last step of a cluster: count deletions, remove staging, release the lock, report."""
    s = settings()
    rep = ClusterReport.from_dict(report)
    try:
        # The report names the staging prefix to remove and the lock to release: a forged
        # cluster or run id ("..") must not make this remove a whole root.
        _check_names(cluster=rep.cluster, run_id=rep.run_id)
    except steps.UnsafeName as exc:
        rep.errors.append(f"refused: {exc}")
        rep.cluster, rep.run_id = _shown(rep.cluster), _shown(rep.run_id)
        data = rep.to_dict()
        with suppress(redis.RedisError):  # the log of reports is best effort, as in _close
            _redis().lpush(REPORTS_KEY, json.dumps(data))
        return data
    for d in deletions:
        result = DeleteResult.from_dict(d)
        rep.files_deleted += len(result.deleted)
        rep.bad.extend(result.kept)
    if mode == "archive" and s.staging and not _roots_problem():
        try:
            steps.cleanup_staging(s.staging, rep.run_id, rep.cluster)
        except Exception as exc:
            rep.errors.append(f"staging not removed: {_error(exc)}")
    try:
        _lock(rep.cluster, rep.run_id).release()
    except redis.RedisError as exc:
        log.warning("lock of %s not released (it expires): %s", rep.cluster, exc)
    return _close(rep, started, mode)


__all__ = [
    "REPORTS_KEY",
    "LockLost",
    "abandon_cluster",
    "delete_expired",
    "delete_files",
    "discover",
    "finalize_cluster",
    "finish_cluster",
    "launch",
    "load_host",
    "plan",
    "router",
    "settings",
]

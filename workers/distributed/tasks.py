"""Celery tasks: the pipeline of `workers.pipeline` as chords, one chain per cluster.

    plan ──► chord(discover @ every queue) ──► launch ──► for each cluster:
      archive: chord(recover_hosts @ each queue of its hosts) ──► load_cluster
                 ──► chord(load_host @ host's queue) ──► finalize_cluster @ finalize queue
                 ──► chord(delete_files @ host's queue) ──► finish_cluster @ finalize queue
      delete:  chord(delete_expired @ host's queue) ──► finish_cluster

The stages and every report update are `workers.pipeline`'s (shared with the embedded
runner): each chord callback rebuilds the cluster's `ClusterRun` from the report its
message carries, folds in its chord's results and starts the next stage.

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

from workers import pipeline, recovery, roots, sink, staging, steps
from workers.config import Settings, configure_storage, load_settings, mask_url, parse_duration
from workers.distributed import names, routing
from workers.distributed.app import app
from workers.distributed.connection import redis_client
from workers.distributed.locks import RedisLock
from workers.locks import LockBusy, RunHolds
from workers.manifest import BadFile, DeleteResult, HostManifest, SourceFile

log = logging.getLogger(__name__)

#: Redis list of the latest cluster reports (JSON, newest first): what beat runs leave.
REPORTS_KEY = names.REPORTS_KEY
REPORTS_KEEP = 1000
ATTEMPTS_PREFIX = names.ATTEMPTS_PREFIX


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


def _shown(name: Any) -> Any:
    """A name from a refused message as results may echo it: escaped unless printable
    (Celery logs every result; a raw newline in it would forge a log line)."""
    return name if not isinstance(name, str) or name.isprintable() else ascii(name)


def _check_names(**given: Any) -> None:
    """Validate names and the cutoff from a message; raise UnsafeName (logged) if one is bad.

    Workers resolve every path from their own roots plus these names, so this is what keeps
    a forged or corrupted message from reaching outside the roots (SPEC §6.6).
    """
    try:
        for what, value in given.items():
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


@app.task(name=names.PLAN)
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
    problem = _settings_problem(s, mode, checkpoints, archive)
    if problem is None and cutoff is None and not (retention or s.retention):
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
    run_id = staging.new_run_id(checked)
    launch_id = str(uuid.uuid4())
    header = [discover.si(q).set(queue=q) for q in router().queues()]
    body = launch.s(
        cutoff=checked, mode=mode, run_id=run_id, clusters=clusters, started=time.time()
    ).set(queue=s.default_queue, task_id=launch_id)
    _launch(header, body)
    log.info("run %s: cutoff %d, mode %s", run_id, checked, mode)
    return {"run_id": run_id, "cutoff": checked, "mode": mode, "launch": launch_id}


def _settings_problem(
    s: Settings, mode: str, checkpoints: str | None, archive: str | None
) -> str | None:
    """Why this worker's settings cannot run `mode` on what the client named, or None."""
    if mode not in pipeline.MODES:
        return f"unknown mode {mode!r}"
    if not s.checkpoints:
        return "the workers have no checkpoint directory (CCARCHIVE_CHECKPOINTS)"
    if mode == "archive":
        if not s.archive:
            return "the workers have no archive location (CCARCHIVE_ARCHIVE)"
        if not s.staging:
            return "the workers have no shared staging location (CCARCHIVE_STAGING)"
        if problem := _roots_problem():
            return f"refused: {problem}"
    if not _same_location(s.checkpoints, checkpoints):
        return f"the workers archive {s.checkpoints}, not {checkpoints}"
    if mode == "archive" and not _same_location(
        s.archive and mask_url(s.archive), archive and mask_url(archive)
    ):
        # Clients send locations masked (task arguments are shown in Flower): compare so.
        return f"the workers write archives to {mask_url(s.archive or '')}, not {archive}"
    return None


def _queues_problem(s: Settings) -> str | None:
    """Why the run cannot start because a queue it needs has no worker, or None."""
    from workers.distributed.remote import needed_queues, no_worker_message, queues_without_worker

    # This worker cannot answer the broadcast itself while it runs a task in the solo
    # pool: count the queues it consumes (set by -Q) as answered.
    own = set(getattr(app.amqp.queues, "consume_from", None) or {})
    try:
        missing = queues_without_worker(app, needed_queues(s), own=own)
    except Exception as exc:  # the broadcast itself failed: let the run try, as before
        log.warning("could not check the queues' workers: %s", pipeline.error_text(exc))
        return None
    return no_worker_message(missing) if missing else None


@app.task(name=names.DISCOVER)
def discover(queue: str) -> dict[str, Any]:
    """List the clusters and hosts this worker sees (the queue it was sent to is `queue`)."""
    try:
        plans = steps.discover(settings().checkpoints or "")
    except Exception as exc:  # a missing root: reported by launch, the other queues go on
        return {"queue": queue, "clusters": [], "error": pipeline.error_text(exc)}
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


@app.task(name=names.LAUNCH)
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
    if mode not in pipeline.MODES:
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
            log.warning("staging sweep failed: %s", pipeline.error_text(exc))
    # Cluster directories whose names are refused: reported (exit 1), nothing else done.
    entries = [
        {"cluster": name, "hosts": {}, "report": _finish(run)}
        for name, run in _refused(discoveries, clusters, cutoff, run_id, mode, started)
    ]
    marked = False
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
        bad = [BadFile(**b) for b in ch.bad]
        run = pipeline.ClusterRun.begin(
            ch.cluster, cutoff, run_id, list(ch.hosts), bad, mode, started
        )
        entry, marked = _start_cluster(run, dict(ch.hosts), marked)
        entries.append(entry)
    return {"run_id": run_id, "cutoff": cutoff, "mode": mode, "errors": errors, "clusters": entries}


def _refused(
    discoveries: list[dict[str, Any]],
    clusters: list[str] | None,
    cutoff: int,
    run_id: str,
    mode: str,
    started: float,
) -> list[tuple[str, pipeline.ClusterRun]]:
    """The runs of cluster directories whose names are refused; drops them from `discoveries`."""
    refused: dict[str, list[dict[str, str]]] = {}
    for d in discoveries:
        for c in d.get("clusters", []):
            if c.get("refused") and not clusters:
                refused.setdefault(c["cluster"], c.get("bad", []))
        d["clusters"] = [c for c in d.get("clusters", []) if not c.get("refused")]
    return [
        (
            name,
            pipeline.ClusterRun.begin(
                name, cutoff, run_id, [], [BadFile(**b) for b in bad], mode, started
            ),
        )
        for name, bad in sorted(refused.items())
    ]


def _start_cluster(
    run: pipeline.ClusterRun, queues: dict[str, str], marked: bool
) -> tuple[dict[str, Any], bool]:
    """Lock the cluster and start its first stage; its launch entry, and whether the run's
    staging is marked now."""
    s = settings()
    report = run.report
    cluster, run_id = report.cluster, report.run_id
    entry: dict[str, Any] = {"cluster": cluster, "hosts": list(queues)}
    lock = _lock(cluster, run_id)
    # A redelivered launch finds its own run id in the lock: it may go on.
    if not lock.acquire() and not lock.owned():
        holder = _redis().get(lock.key)
        owner = holder.decode() if isinstance(holder, bytes) else holder or "?"
        run.skipped(f"run {owner} is still working on this cluster")
        entry["report"] = _finish(run)
        return entry, marked
    if run.mode == "archive" and not marked and s.staging:
        # Before any chunk: a sweep removes only run directories marked as ours.
        try:
            staging.mark_run(s.staging, run_id)
        except Exception as exc:
            run.skipped(f"cannot mark the run's staging: {pipeline.error_text(exc)}")
            entry["report"] = _finish(run, release=True)
            return entry, marked
        marked = True
    entry["report_id"] = str(uuid.uuid4())
    if run.mode == "archive":
        entry["loads"] = {h: str(uuid.uuid4()) for h in queues}
        entry["finalize"] = str(uuid.uuid4())
        _start_recovery(run, queues, entry)
    else:
        entry["deletes"] = {h: str(uuid.uuid4()) for h in queues}
        header = [
            delete_expired.si(cluster, h, report.cutoff).set(queue=q, task_id=entry["deletes"][h])
            for h, q in queues.items()
        ]
        _launch(header, _finisher(run, entry["report_id"]).on_error(_abandon(run)))
    return entry, marked


def _by_queue(queues: dict[str, str]) -> dict[str, list[str]]:
    """Hosts grouped by the queue that reaches their files."""
    grouped: dict[str, list[str]] = {}
    for host, queue in sorted(queues.items()):
        grouped.setdefault(queue, []).append(host)
    return grouped


def _start_recovery(
    run: pipeline.ClusterRun, queues: dict[str, str], entry: dict[str, Any]
) -> None:
    """Archive mode's first stage: recovery, once per cluster, before any load.

    It runs where the files are: one task per queue that reaches some of the cluster's
    hosts (one per cluster where one storage node holds it), all done before the first
    load starts (`load_cluster` is their chord's callback)."""
    report = run.report
    header = [
        recover_hosts.si(report.cluster, hosts, report.cutoff, report.run_id).set(queue=q)
        for q, hosts in _by_queue(queues).items()
    ]
    body = load_cluster.s(
        run=run.to_message(),
        queues=queues,
        load_ids=entry["loads"],
        finalize_id=entry["finalize"],
        report_id=entry["report_id"],
    ).set(queue=router().finalize_queue)
    _launch(header, body.on_error(_abandon(run)))


# --- per host -----------------------------------------------------------------------------


@app.task(bind=True, name=names.RECOVER_HOSTS)
def recover_hosts(
    self: Task, cluster: str, hosts: list[str], cutoff: int, run_id: str
) -> dict[str, Any]:
    """Recovery for these hosts of a cluster (`recovery.recover_cluster`): what it deleted
    and kept, the files loading must skip; or why it could not (the cluster is skipped)."""
    s = settings()
    try:
        _check_names(cluster=cluster, run_id=run_id, cutoff=cutoff)
        for h in hosts:
            _check_names(host=h)
    except steps.UnsafeName as exc:
        return {"error": f"refused: {exc}"}
    if problem := _roots_problem():
        return {"error": f"refused: {problem}"}
    attempt = _attempt(self)
    if attempt > _max_attempts():
        return {"error": f"gave up after {attempt - 1} attempts (worker lost)"}
    _renew(cluster, run_id)
    try:
        _holds.hold(Path(s.checkpoints or "") / cluster, cluster, run_id)
        found = recovery.recover_cluster(
            s.checkpoints or "", s.archive, cluster, hosts, s.grace_seconds
        )
    except LockBusy as exc:  # an embedded run is archiving this cluster: not ours
        return {"skipped": str(exc)}
    except Exception as exc:
        if attempt < _max_attempts():
            log.warning("%s: recovery attempt %d failed (%s), retrying", cluster, attempt, exc)
            raise self.retry(exc=exc, countdown=_countdown(attempt), max_retries=None) from exc
        return {"error": pipeline.error_text(exc)}
    return {
        "deleted": found.deleted,
        "kept": [asdict(b) for b in found.kept],
        "exclude": found.exclude,
    }


@app.task(name=names.LOAD_CLUSTER)
def load_cluster(
    recoveries: list[dict[str, Any]],
    run: dict[str, Any],
    queues: dict[str, str],
    load_ids: dict[str, str],
    finalize_id: str,
    report_id: str,
) -> dict[str, Any]:
    """Chord callback of recovery: fold it into the cluster's run, then load every host
    (or, when recovery could not read the committed archives, skip the cluster)."""
    cr = pipeline.ClusterRun.from_message(run)
    report = cr.report
    _check_names(cluster=report.cluster, run_id=report.run_id, cutoff=report.cutoff)
    for r in recoveries:
        if "skipped" in r:
            cr.skipped(r["skipped"])
        elif "error" in r:
            cr.recovery_failed(r["error"])
        else:
            kept = [BadFile(**b) for b in r["kept"]]
            cr.recovered(
                recovery.Recovery(
                    report.cluster, deleted=r["deleted"], kept=kept, exclude=r["exclude"]
                )
            )
    if report.errors:  # nothing loaded: the cluster ends here, its files untouched
        _launch([], _finisher(cr, report_id))
        return {"report": report.to_dict(), "loads": {}}
    header = [
        load_host.si(report.cluster, h, report.cutoff, report.run_id, cr.exclude.get(h, [])).set(
            queue=q, task_id=load_ids[h]
        )
        for h, q in queues.items()
    ]
    body = finalize_cluster.s(
        cluster=report.cluster,
        cutoff=report.cutoff,
        run_id=report.run_id,
        report=report.to_dict(),
        queues=queues,
        report_id=report_id,
        started=cr.started,
    ).set(queue=router().finalize_queue, task_id=finalize_id)
    _launch(header, body.on_error(_abandon(cr)))
    return {"report": report.to_dict(), "loads": load_ids}


@app.task(bind=True, name=names.LOAD_HOST)
def load_host(
    self: Task, cluster: str, host: str, cutoff: int, run_id: str, exclude: list[str] | None = None
) -> dict[str, Any]:
    """Load one host (its cluster's recovery ran before); return `{"manifest": HostManifest}`.

    `exclude`: file names recovery found listed in a committed archive but changed."""
    s = settings()
    try:
        _check_names(cluster=cluster, host=host, run_id=run_id, cutoff=cutoff)
    except steps.UnsafeName as exc:
        # Nothing was touched; the chord (if any) goes on without this "host".
        manifest = HostManifest(_shown(cluster), _shown(host), cutoff, _shown(run_id))
        manifest.bad.append(BadFile(pipeline.host_label(cluster, host), f"refused: {exc}"))
        return {"manifest": manifest.to_dict()}
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
        manifest = steps.load_host(
            s.checkpoints or "",
            cluster,
            host,
            cutoff,
            s.staging or "",
            run_id,
            s.ipc_compression,
            exclude=[str(n) for n in exclude or ()],
        )
    except LockBusy as exc:  # an embedded run is archiving this cluster: not ours to load
        return _failed_load(cluster, host, cutoff, run_id, f"skipped: {exc}")
    except Exception as exc:
        if attempt < _max_attempts():
            log.warning("%s/%s: attempt %d failed (%s), retrying", cluster, host, attempt, exc)
            raise self.retry(exc=exc, countdown=_countdown(attempt), max_retries=None) from exc
        text = pipeline.error_text(exc)
        return _failed_load(
            cluster, host, cutoff, run_id, f"load failed after {attempt} attempts: {text}"
        )
    for bad in manifest.bad:
        log.warning("kept %s: %s", bad.path, bad.reason)
    return {"manifest": manifest.to_dict()}


def _failed_load(cluster: str, host: str, cutoff: int, run_id: str, reason: str) -> dict[str, Any]:
    return {"manifest": pipeline.failed_load(cluster, host, cutoff, run_id, reason).to_dict()}


@app.task(name=names.DELETE_FILES)
def delete_files(
    cluster: str, host: str, files: list[dict[str, Any]], cutoff: int, run_id: str, archived: bool
) -> dict[str, Any]:
    """Delete a host's archived files: only those the published archive lists, same identity."""
    s = settings()
    try:
        wanted = [SourceFile.from_dict(f) for f in files]
        _check_names(cluster=cluster, host=host, run_id=run_id, cutoff=cutoff)
        url = sink.archive_url(s.archive or "", cluster, cutoff) if archived else None
    except Exception as exc:
        # The message itself was unusable: say so rather than nothing.
        result = DeleteResult(_shown(cluster), _shown(host))
        reason = f"not deleted: {pipeline.error_text(exc)}"
        result.kept.append(BadFile(pipeline.host_label(cluster, host), reason))
        log.error("%r/%r: %s", cluster, host, reason)
        return result.to_dict()
    _renew(cluster, run_id)
    return pipeline.delete_archived(
        s.checkpoints or "", cluster, host, wanted, url, run_id
    ).to_dict()


@app.task(name=names.DELETE_EXPIRED)
def delete_expired(cluster: str, host: str, cutoff: int) -> dict[str, Any]:
    """Delete mode: remove a host's checkpoint files with 0 < ts <= cutoff, unread."""
    try:
        _check_names(cluster=cluster, host=host, cutoff=cutoff)
        return steps.delete_expired(settings().checkpoints or "", cluster, host, cutoff).to_dict()
    except Exception as exc:
        result = DeleteResult(_shown(cluster), _shown(host))
        reason = f"not deleted: {pipeline.error_text(exc)}"
        result.kept.append(BadFile(pipeline.host_label(cluster, host), reason))
        return result.to_dict()


# --- per cluster --------------------------------------------------------------------------


@app.task(bind=True, name=names.FINALIZE_CLUSTER)
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
    attempt = _attempt(self)
    # Built by launch: the report must come out, whatever happens here.
    run = pipeline.ClusterRun.from_message({"report": report, "started": started})
    t0 = time.perf_counter()
    try:
        # Inside the try: a refused message still ends with a report (FAILED, permanent).
        _check_names(cluster=cluster, run_id=run_id, cutoff=cutoff)
        if problem := _roots_problem():
            raise roots.RootsRefused(problem)
        _fold_loads(run, loads)
        if attempt > _max_attempts():
            raise RuntimeError(f"gave up after {attempt - 1} attempts (worker lost)")
        info = _publish(run, cutoff, run_id)
    except Exception as exc:
        info = _finalize_failed(self, exc, run, attempt)
        if info is None:
            _launch([], _finisher(run, report_id))
            raise
    seconds = time.perf_counter() - t0
    with_files = run.finalized(info)
    deletes = {m.host: str(uuid.uuid4()) for m in with_files}
    header = [
        delete_files.si(
            cluster, m.host, [asdict(f) for f in m.files], cutoff, run_id, info is not None
        ).set(
            queue=queues.get(m.host) or router().queue_for(cluster, m.host), task_id=deletes[m.host]
        )
        for m in with_files
    ]
    _launch(header, _finisher(run, report_id).on_error(_abandon(run)))
    rep = run.report
    return {"report": rep.to_dict(), "deletes": deletes, "archive": rep.archive, "seconds": seconds}


def _fold_loads(run: pipeline.ClusterRun, loads: list[dict[str, Any]]) -> None:
    """Fold the load results into the run; their chunks are read from this worker's own
    staging root, never from the message."""
    s = settings()
    report = run.report
    for r in loads:
        m = HostManifest.from_dict(r["manifest"])
        steps.check_name(m.host, "host")
        if m.chunk:
            m.chunk = staging.chunk_url(s.staging or "", report.run_id, report.cluster, m.host)
        run.loaded(m.host, m)


def _publish(run: pipeline.ClusterRun, cutoff: int, run_id: str) -> sink.ArchiveInfo | None:
    """Write, verify and publish the archive while the run still holds the cluster's lock."""
    s = settings()
    cluster = run.report.cluster
    lock = _lock(cluster, run_id)

    def still_ours() -> None:
        if not lock.owned():
            raise LockLost(f"the run lost the lock of cluster {cluster}; nothing published")

    with _renewing(lock):
        return steps.finalize_cluster(
            cluster,
            cutoff,
            run_id,
            run.manifests,
            s.archive or "",
            sink.ParquetOptions.from_settings(s),
            before_publish=still_ours,
        )


def _finalize_failed(
    task: Task, exc: Exception, run: pipeline.ClusterRun, attempt: int
) -> sink.ArchiveInfo | None:
    """After a failed finalize: retry (raises), or the published twin's archive to go on
    with, or None when the failure stands (folded into the run)."""
    report = run.report
    permanent = isinstance(
        exc, sink.ArchiveConflict | LockLost | steps.UnsafeName | roots.RootsRefused
    )
    # A lost lock may be the twin's doing: it published this very commit, then released
    # the lock when its cluster finished (its staging cleanup may still be to come).
    checkable = not permanent or isinstance(exc, LockLost)
    twin = (
        _published_twin(report.cluster, report.cutoff, report.run_id, run.manifests)
        if checkable
        else None
    )
    if twin is not None:
        log.warning(
            "%s: %s, but this very commit is published (by a second delivery of this task)",
            report.cluster,
            pipeline.error_text(exc),
        )
        return twin
    if not permanent and attempt < _max_attempts():
        raise task.retry(exc=exc, countdown=_countdown(attempt), max_retries=None) from exc
    run.finalized(error=pipeline.error_text(exc))
    return None


def _finisher(run: pipeline.ClusterRun, report_id: str) -> Signature:
    """The cluster's last task (`finish_cluster`), carrying its run as it stands now."""
    return finish_cluster.s(report=run.report.to_dict(), mode=run.mode, started=run.started).set(
        queue=router().finalize_queue, task_id=report_id
    )


def _abandon(run: pipeline.ClusterRun) -> Signature:
    """The errback of a cluster's chord callbacks: see abandon_cluster."""
    return abandon_cluster.s(report=run.report.to_dict(), mode=run.mode, started=run.started)


@app.task(name=names.ABANDON_CLUSTER)
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
    run = pipeline.ClusterRun.from_message({"report": report, "mode": mode, "started": started})
    rep = run.report
    try:
        _check_names(cluster=rep.cluster, run_id=rep.run_id)
    except steps.UnsafeName:
        return None
    rep.errors.append(
        f"the run broke off ({pipeline.error_text(exc)}); files not archived stay in place "
        "and the next run recovers what was committed"
    )
    s = settings()
    if mode == "archive" and s.staging and not _roots_problem():
        with suppress(Exception):  # swept later anyway (recovery.sweep_staging)
            steps.cleanup_staging(s.staging, rep.run_id, rep.cluster)
    return _finish(run, release=True)


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


def _release(cluster: str, run_id: str) -> None:
    try:
        _lock(cluster, run_id).release()
    except redis.RedisError as exc:
        log.warning("lock of %s not released (it expires): %s", cluster, exc)


def _push_report(data: dict[str, Any]) -> None:
    """Add a cluster's report to the report log in Redis (what beat runs leave); best effort."""
    try:
        pipe = _redis().pipeline()
        pipe.lpush(REPORTS_KEY, json.dumps(data))
        pipe.ltrim(REPORTS_KEY, 0, REPORTS_KEEP - 1)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("report of %s not logged: %s", data.get("cluster"), exc)


def _finish(
    run: pipeline.ClusterRun, cleanup: bool = False, release: bool = False
) -> dict[str, Any]:
    """End a cluster's run (`ClusterRun.finish`: staging, lock, record, metrics, log), log
    its report in Redis and return it as a dict."""
    s = settings()
    rep = run.report
    run_log = pipeline.RunLog(s.run_log, s.run_log_keep, s.run_log_max_age_seconds)
    run.finish(
        run_log,
        staging=s.staging if cleanup and run.mode == "archive" and not _roots_problem() else None,
        release=functools.partial(_release, rep.cluster, rep.run_id) if release else None,
        whole_run=True,
    )
    data = rep.to_dict()
    _push_report(data)
    return data


@app.task(name=names.FINISH_CLUSTER)
def finish_cluster(
    deletions: list[dict[str, Any]], report: dict[str, Any], mode: str, started: float
) -> dict[str, Any]:
    """Last step of a cluster: count deletions, remove staging, release the lock, report."""
    run = pipeline.ClusterRun.from_message({"report": report, "mode": mode, "started": started})
    rep = run.report
    try:
        # The report names the staging prefix to remove and the lock to release: a forged
        # cluster or run id ("..") must not make this remove a whole root.
        _check_names(cluster=rep.cluster, run_id=rep.run_id)
    except steps.UnsafeName as exc:
        rep.errors.append(f"refused: {exc}")
        rep.cluster, rep.run_id = _shown(rep.cluster), _shown(rep.run_id)
        data = rep.to_dict()
        with suppress(redis.RedisError):  # the log of reports is best effort
            _redis().lpush(REPORTS_KEY, json.dumps(data))
        return data
    for d in deletions:
        result = DeleteResult.from_dict(d)
        run.deleted(result.host, result)
    return _finish(run, cleanup=True, release=True)


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
    "load_cluster",
    "load_host",
    "plan",
    "recover_hosts",
    "router",
    "settings",
]

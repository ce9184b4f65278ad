"""The per-cluster pipeline, described once: its stages per mode and a cluster run's bookkeeping.

Both drivers walk the same description: the embedded runner (`workers.runner`, a process
pool) and the Celery tasks (`workers.distributed.tasks`, one chord per stage). Neither touches a
report itself: every transition of a cluster's run goes through `ClusterRun`, which owns
its `ClusterReport`:

    archive: recover (per cluster) → load (per host) → finalize (per cluster)
             → delete (per host) → finish
    delete:  delete-expired (per host) → finish
    either:  skipped (another run holds the cluster) → finish

A `ClusterRun` is plain data that survives a trip through a JSON task message
(`to_message`/`from_message`): a Celery chord callback rebuilds it from the report its
message carries, folds in its results (`loaded`, `deleted`) and starts the next stage.

Where the two drivers used to differ, the decision is made here, once:

- a host whose load fails as a whole is shown as `cluster/host` (`host_label`): roots
  are each worker's configuration, may differ between machines, and a report is read
  where none of them applies;
- recovery runs once per cluster, before any load of it (`recovered`): a recovery per
  host re-read every committed archive's footer once per host, and a recovery after a
  load had started could delete a file that load had just read;
- a skipped cluster ends with `finish` like any other, so it reaches the run records
  and the metrics in both drivers (a skip is exactly what an alert must see);
- deletion re-checks the published archive's listing right before deleting
  (`delete_archived`): the safer choice, guarantee 1 checked where the deleting happens,
  whatever the driver passed along.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import metrics, recovery, runlog, steps
from .manifest import ArchiveInfo, BadFile, ClusterReport, DeleteResult, HostManifest, SourceFile

log = logging.getLogger(__name__)

#: The stages of one cluster's run per mode, in order, and what each runs once for.
STAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "archive": (("recover", "cluster"), ("load", "host"), ("finalize", "cluster"),
                ("delete", "host")),
    "delete": (("delete_expired", "host"),),
}  # fmt: skip

MODES = tuple(STAGES)


def error_text(exc: BaseException) -> str:
    """An exception as reports show it: its type and message."""
    return f"{type(exc).__name__}: {exc}"


def host_label(cluster: str, host: str) -> str:
    """How a report names a host as a whole: `cluster/host`, never under a root (roots are
    configuration and may differ per worker); names that are not safe are quoted."""
    try:
        return f"{steps.check_name(cluster)}/{steps.check_name(host)}"
    except steps.UnsafeName:
        return f"cluster {cluster!r}, host {host!r}"


def failed_load(cluster: str, host: str, cutoff: int, run_id: str, reason: str) -> HostManifest:
    """The manifest of a host that could not be loaded: no files, the reason in `bad`
    (a Celery load never raises into its chord: it returns this)."""
    log.warning("%s/%s not loaded, its files are kept: %s", cluster, host, reason)
    return HostManifest(
        cluster, host, cutoff, run_id, bad=[BadFile(host_label(cluster, host), reason)]
    )


@dataclass
class RunLog:
    """Where and how long run records are kept (`runlog.record_run`); None: no records."""

    url: str | None = None
    keep: int = runlog.DEFAULT_KEEP_RECORDS
    max_age: float = runlog.DEFAULT_MAX_RECORD_AGE


@dataclass
class ClusterRun:
    """One cluster's run: its report and every transition of it, in both drivers."""

    report: ClusterReport
    mode: str = "archive"
    started: float = field(default_factory=time.time)  # wall clock: messages cross machines
    exclude: dict[str, list[str]] = field(default_factory=dict)  # recovery: host -> names
    manifests: list[HostManifest] = field(default_factory=list)  # loaded so far (not sent)
    finished: bool = False

    @classmethod
    def begin(
        cls,
        cluster: str,
        cutoff: int,
        run_id: str,
        hosts: Sequence[str],
        bad: Sequence[BadFile] = (),
        mode: str = "archive",
        started: float | None = None,
    ) -> ClusterRun:
        """A cluster's run as planned: its hosts and what discovery reported."""
        if mode not in STAGES:
            raise ValueError(f"unknown mode {mode!r}")
        report = ClusterReport(cluster, cutoff, run_id, hosts=len(hosts), bad=list(bad))
        return cls(report, mode, time.time() if started is None else started)

    # --- messages ---------------------------------------------------------------------------

    def to_message(self) -> dict[str, Any]:
        """The run as JSON-able data for the next stage's message (manifests travel apart,
        as the results of the stage that made them)."""
        return {
            "report": self.report.to_dict(),
            "mode": self.mode,
            "started": self.started,
            "exclude": self.exclude,
        }

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> ClusterRun:
        """Inverse of `to_message`: how each chord callback picks the run up."""
        mode = data.get("mode", "archive")
        if mode not in STAGES:
            raise ValueError(f"unknown mode {mode!r}")
        exclude = {str(h): [str(n) for n in names] for h, names in data.get("exclude", {}).items()}
        return cls(ClusterReport.from_dict(data["report"]), mode, float(data["started"]), exclude)

    # --- transitions ------------------------------------------------------------------------

    def skipped(self, reason: str) -> None:
        """Another run holds the cluster (or its start failed): nothing is done to it."""
        self.report.errors.append(f"skipped: {reason}")

    def recovered(self, found: recovery.Recovery) -> None:
        """Fold in recovery: deletions a crashed run left, files kept and not to be loaded."""
        self.report.files_deleted += len(found.deleted)
        self.report.bad.extend(found.kept)
        for host, names in found.exclude.items():
            self.exclude.setdefault(host, []).extend(names)

    def recovery_failed(self, exc: BaseException | str) -> None:
        """Without the commit records a file could be archived twice: skip the cluster."""
        text = exc if isinstance(exc, str) else error_text(exc)
        self.skipped(f"cannot read existing archives: {text}")

    def loaded(
        self, host: str, manifest: HostManifest | None = None, error: str | None = None
    ) -> HostManifest | None:
        """Fold in a host's load; its manifest, or None if the load failed (the host keeps
        all its files; the rest of the cluster goes on)."""
        if manifest is None:
            self.report.bad.append(BadFile(host_label(self.report.cluster, host), error or "?"))
            return None
        self.manifests.append(manifest)
        self.report.bad.extend(manifest.bad)
        return manifest

    def finalized(
        self, info: ArchiveInfo | None = None, error: str | None = None
    ) -> list[HostManifest]:
        """Fold in the archive (None: nothing to archive) or why it was not written;
        return the loaded hosts whose files may now be deleted."""
        if error is not None:
            self.report.errors.append(f"archive not written, all files kept: {error}")
            log.error("%s: archive not written, all files kept: %s", self.report.cluster, error)
            return []
        with_files = [m for m in self.manifests if m.files]
        self.report.files_archived = sum(len(m.files) for m in with_files)
        self.report.rows = sum(m.rows for m in with_files)
        if info is not None:
            self.report.archive = info.url
            self.report.bytes_written = 0 if info.already_existed else info.bytes
        return with_files

    def deleted(
        self, host: str, result: DeleteResult | None = None, error: str | None = None
    ) -> None:
        """Fold in a host's deletions (files deleted, files kept) or why they failed."""
        if result is None:
            self.report.errors.append(f"{host}: deletion failed: {error}")
            return
        self.report.files_deleted += len(result.deleted)
        self.report.bad.extend(result.kept)

    def stopped(self, exc: BaseException, signalled: bool) -> str:
        """The run ended midway (a signal, a bug): record why; the outcome to record."""
        self.report.errors.append(
            "interrupted by SIGINT" if isinstance(exc, KeyboardInterrupt)
            else str(exc) if signalled else error_text(exc)
        )  # fmt: skip
        return "interrupted" if signalled else "error"

    def finish(
        self,
        run_log: RunLog,
        staging: str | None = None,
        release: Callable[[], None] | None = None,
        outcome: str | None = None,
        whole_run: bool = False,
    ) -> ClusterReport:
        """End the cluster's run: remove its staging chunks, release its lock, time it,
        write its run record, count it in the metrics and log it. Never raises.

        `whole_run`: also remove the run's staging directory once it is empty (Celery: no
        task ends a whole run; the embedded runner removes it itself when the run ends).
        """
        report = self.report
        if staging:
            try:
                steps.cleanup_staging(staging, report.run_id, report.cluster, whole_run)
            except Exception as exc:
                report.errors.append(f"staging not removed: {error_text(exc)}")
        if release is not None:
            release()
        report.seconds = max(0.0, time.time() - self.started)
        self.finished = True
        runlog.record_run(
            run_log.url, report, self.mode, outcome=outcome, keep=run_log.keep,
            max_age=run_log.max_age,
        )  # fmt: skip
        try:  # metrics must never fail a run
            if outcome is None:
                metrics.observe_cluster(report)
            else:
                metrics.observe_cluster(report, result=outcome)
        except Exception:
            log.exception("cannot count the run of %s in the metrics", report.cluster)
        _log_report(report)
        return report


def _log_report(report: ClusterReport) -> None:
    # INFO even when something was kept: each problem was logged as a warning where it
    # happened, and the CLI prints the summary itself.
    log.info(
        "run %s cluster %s: %d hosts, %d files archived, %d deleted, %d rows, %d kept, "
        "%d errors, archive %s",
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


# --- the delete step, with its re-check ---------------------------------------------------


@functools.lru_cache(maxsize=8)
def _archived_sources(url: str, run_id: str) -> dict[str, Any]:
    """A published archive's commit record, read once per run and process (an archive never
    changes under its final name; keyed by run too, so a later run reads it again)."""
    from . import sink  # deferred: a run with nothing to delete never loads pyarrow

    return sink.footer_sources(sink.read_footer(url))


def delete_archived(
    checkpoints: str,
    cluster: str,
    host: str,
    files: list[SourceFile],
    archive_url: str | None,
    run_id: str,
) -> DeleteResult:
    """Delete a host's archived files: only those the published archive at `archive_url`
    lists with this very identity (guarantee 1, checked where the deleting happens).

    `archive_url` None: the selected files held no value, so no archive was written and
    there is nothing to lose. Names must be valid (UnsafeName otherwise); past that it never
    raises: a file not deleted is kept and reported (a committed one is deleted by the
    next run's recovery).
    """
    result = DeleteResult(cluster, host)
    directory = steps.host_dir(checkpoints, cluster, host)
    wanted = list(files)
    try:
        if archive_url is not None:
            entry = _archived_sources(archive_url, run_id).get(host, {})
            listed = {f["name"]: SourceFile.from_dict(f) for f in entry.get("files", [])}
            for f in [f for f in wanted if listed.get(f.name) != f]:
                reason = f"not listed in {archive_url}"
                result.kept.append(BadFile(str(directory / f.name), reason))
            wanted = [f for f in wanted if listed.get(f.name) == f]
        done = steps.delete_files(checkpoints, cluster, host, wanted)
    except Exception as exc:
        reason = f"not deleted: {error_text(exc)}"
        result.kept.extend(BadFile(str(directory / f.name), reason) for f in wanted)
        log.error("%s/%s: %s", cluster, host, reason)
        return result
    done.kept[:0] = result.kept
    return done


__all__ = [
    "MODES",
    "STAGES",
    "ClusterRun",
    "RunLog",
    "delete_archived",
    "error_text",
    "failed_load",
    "host_label",
]

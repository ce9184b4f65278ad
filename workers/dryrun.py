"""`ccarchive plan`: what the next run would take and keep, touching nothing.

The same steps as a run, read-only: `steps.discover` and `steps.select_files` choose the
files, `paths.archive_files` and `sourcefiles.change` find the files a committed
archive already lists (a run's recovery deletes them if unchanged, keeps them if not, and
never archives them again), and a non-blocking try of the cluster lock finds clusters
another run holds. Nothing is written into the tree or the archive, no file is opened for
writing or deleted, and no process pool is started.

Rows are estimated from bytes, without reading the files: a binary checkpoint stores one
float32 (4 bytes) per value, so `bytes / 4` (an upper bound: headers and missing values
make no rows); a JSON checkpoint needs about 5 bytes per value on cc-metric-store's output
(`bytes / 5`, data-dependent: more digits, fewer rows).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import paths, sink, sourcefiles, steps
from .locks import DirectoryLock, LockBusy
from .manifest import BadFile, SourceFile

#: Bytes per archived row, by file extension (see the module docstring).
BYTES_PER_ROW = {".bin": 4, ".json": 5}


@dataclass
class ClusterOutlook:
    """What the next run would do with one cluster."""

    cluster: str
    hosts: int = 0
    files: int = 0  # selected and not already archived: what the run would read
    bytes: int = 0
    rows_estimate: int = 0
    recovered: list[str] = field(default_factory=list)  # archived already: recovery deletes
    kept: list[BadFile] = field(default_factory=list)  # reported and left in place
    skipped: str | None = None  # the whole cluster is not taken (locked, unreadable archive)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (`--json`)."""
        return asdict(self)


def rows_estimate(name: str, size: int) -> int:
    """Rows a checkpoint file of this name and size would give, from its size alone."""
    return size // BYTES_PER_ROW.get(os.path.splitext(name)[1], 4)


def _committed(
    archive: str, cluster: str, oldest: int
) -> dict[str, dict[str, tuple[str, SourceFile]]]:
    """Per host, file name -> (archive URL, recorded identity) of committed archives."""
    listed: dict[str, dict[str, tuple[str, SourceFile]]] = {}
    for url in paths.archive_files(archive, cluster, oldest):
        for host, entry in sink.footer_sources(sink.read_footer(url)).items():
            for f in entry.get("files", []):
                listed.setdefault(host, {})[f["name"]] = (url, SourceFile.from_dict(f))
    return listed


def outlook(
    checkpoints: str,
    archive: str | None,
    cutoff: int,
    mode: str = "archive",
    clusters: list[str] | None = None,
) -> list[ClusterOutlook]:
    """Per cluster, what a run with this cutoff would take, delete and keep; changes nothing."""
    root = Path(checkpoints)
    out: list[ClusterOutlook] = []
    for plan in steps.discover(checkpoints):
        if clusters and plan.cluster not in clusters:
            continue
        view = ClusterOutlook(plan.cluster, hosts=len(plan.hosts), kept=list(plan.bad))
        out.append(view)
        if plan.refused:
            view.skipped = "refused cluster directory name"
            continue
        try:
            DirectoryLock(root / plan.cluster).acquire().release()
        except (LockBusy, OSError) as exc:
            view.skipped = f"another run holds it ({exc})"
            continue
        selections: dict[str, steps.Selection] = {}
        for host in plan.hosts:
            try:
                selections[host] = steps.select_files(root / plan.cluster / host, cutoff)
            except OSError as exc:
                unreadable = str(root / plan.cluster / host)
                view.kept.append(BadFile(unreadable, f"cannot list: {exc.strerror or exc}"))
        committed: dict[str, dict[str, tuple[str, SourceFile]]] = {}
        oldest = min((f.ts for s in selections.values() for f in s.files), default=None)
        if mode == "archive" and archive and oldest is not None:
            try:
                committed = _committed(archive, plan.cluster, oldest)
            except Exception as exc:  # the run would skip the cluster for the same reason
                view.skipped = f"cannot read existing archives: {type(exc).__name__}: {exc}"
                continue
        for host, selection in selections.items():
            view.kept.extend(selection.bad)
            directory = root / plan.cluster / host
            for f in selection.files:
                path = directory / f.name
                if f.name in committed.get(host, {}):
                    url, recorded = committed[host][f.name]
                    try:
                        why = sourcefiles.change(path, recorded)
                    except FileNotFoundError:
                        continue
                    if why is None:
                        view.recovered.append(f"{path}: already archived in {url}")
                    else:
                        view.kept.append(
                            BadFile(str(path), f"listed in committed archive {url} but {why}")
                        )
                    continue
                try:
                    size = os.lstat(path).st_size
                except FileNotFoundError:
                    continue
                view.files += 1
                view.bytes += size
                view.rows_estimate += rows_estimate(f.name, size)
    return out


__all__ = ["BYTES_PER_ROW", "ClusterOutlook", "outlook", "rows_estimate"]

"""Randomized mutation trials: the tree changes under running archive runs.

    .venv/bin/python -m tests.stress_mutations --trials 20

While a real `ccarchive archive` process runs, a mutator rewrites, truncates, appends to,
renames over, swaps (symlink, FIFO), deletes or adds checkpoint files at random moments.
A second run then recovers. Invariants (SPEC §6.7): the last version of every file that
is gone (and was not removed by the mutator) is in an archive, value for value; nothing
outside the roots changed; no run hangs. `pytest --stress N` runs N trials per kind as
assertions (tests/test_adversarial_identity.py runs one each by default).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.helpers import (
    Row,
    archive_argv,
    archive_rows,
    clean_env,
    oracle_rows,
    random_tree,
    snapshot,
)
from workers.generate import Level, Metric, write_checkpoint

KINDS = ("rewrite", "truncate", "append", "rename-over", "symlink", "fifo", "delete", "new")
RUN_TIMEOUT = 120.0
CUTOFF = 2_000_000

#: A file's version: its bytes, or what else stands at its path (None: nothing).
Version = bytes | str | None


@dataclass
class TrialResult:
    """What one trial found."""

    kind: str
    mutations: int
    values_lost: int = 0
    files_wrongly_deleted: int = 0
    outside_changed: int = 0
    hangs: int = 0
    notes: list[str] = field(default_factory=list)


def _current(path: Path) -> Version:
    if path.is_symlink():
        return "symlink"
    if not path.exists():
        return None
    if not path.is_file():
        return "special"
    return path.read_bytes()


def _other_bytes(data: bytes, rng: random.Random, binary: bool) -> bytes:
    """Same length, other values: binary float32 payloads or JSON decimal digits changed."""
    buf = np.frombuffer(data, np.uint8).copy()
    if binary:
        # Flip low mantissa bits of 4-byte-aligned words past the header: values change,
        # lengths and names stay (a name byte may change too: still a valid file).
        words = np.arange(24, len(buf) - 4, 4)
        pick = words[np.random.default_rng(rng.randrange(2**32)).random(len(words)) < 0.3]
        buf[pick] ^= 1
    else:
        dots = np.flatnonzero(buf[:-1] == ord("."))
        digits = dots[(buf[dots + 1] >= ord("0")) & (buf[dots + 1] <= ord("9"))] + 1
        buf[digits] = ord("0") + (buf[digits] - ord("0") + 1 + rng.randrange(8)) % 10
    return buf.tobytes()


class Mutator:
    """Applies mutations of one kind to random checkpoint files, recording every version."""

    def __init__(self, cp: Path, outside: Path, kind: str, rng: random.Random) -> None:
        self.cp, self.outside, self.kind, self.rng = cp, outside, kind, rng
        self.versions: dict[Path, list[Version]] = {}
        self.count = 0

    def targets(self) -> list[Path]:
        return sorted(p for p in self.cp.rglob("*") if p.suffix in (".json", ".bin"))

    def mutate_one(self) -> None:
        """One mutation of this kind on a random file (or host, for `new`)."""
        files = [p for p in self.targets() if p.is_file() and not p.is_symlink()]
        if not files:
            return
        path = self.rng.choice(files)
        try:
            self._apply(path)
        except OSError:
            return  # the file went away meanwhile (the run deleted it): nothing happened
        self.count += 1

    def _record(self, path: Path, version: Version) -> None:
        self.versions.setdefault(path, []).append(version)

    def _apply(self, path: Path) -> None:
        kind, rng = self.kind, self.rng
        if kind == "new":
            new = path.parent / f"{1_500_000 + rng.randrange(100_000)}.json"
            if new.exists():
                return
            lv = Level({"m": Metric(60, 1_500_000, np.round(np.arange(20.0) * 1.5, 1))})
            tmp = path.parent / ".new.tmp"
            write_checkpoint(tmp, lv, 1_500_000, 1_501_200)
            os.rename(tmp, new)
            self._record(new, new.read_bytes())
            return
        data = path.read_bytes()
        self._record(path, data)  # the version before, as it was read here
        if kind == "rewrite":
            new_data = _other_bytes(data, rng, path.suffix == ".bin")
            with open(path, "r+b") as f:
                f.write(new_data)
            self._record(path, new_data)
        elif kind == "truncate":
            os.truncate(path, len(data) // 2)
            self._record(path, data[: len(data) // 2])
        elif kind == "append":
            with open(path, "ab") as f:
                f.write(b"\n")
            self._record(path, data + b"\n")
        elif kind == "rename-over":
            new_data = _other_bytes(data, rng, path.suffix == ".bin")
            tmp = path.parent / ".swap.tmp"
            tmp.write_bytes(new_data)
            os.rename(tmp, path)
            self._record(path, new_data)
        elif kind == "symlink":
            target = self.outside / f"target{self.count}{path.suffix}"
            shutil.copyfile(path, target)
            tmp = path.parent / ".link.tmp"
            os.symlink(target, tmp)
            os.rename(tmp, path)
            self._record(path, "symlink")
        elif kind == "fifo":
            tmp = path.parent / ".fifo.tmp"
            os.mkfifo(tmp)
            os.rename(tmp, path)
            self._record(path, "special")
        elif kind == "delete":
            os.unlink(path)
            self._record(path, None)


def _rows_of(cluster: str, host: str, name: str, data: bytes) -> list[Row] | None:
    """Rows of one version (None when it is not a readable checkpoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_bytes(data)
        try:
            return oracle_rows(cluster, host, p)
        except Exception:
            return None


def _run(
    cp: Path, archive: Path, cutoff: int, workers: int, staging: Path
) -> subprocess.Popen[bytes]:
    env = clean_env()
    argv = [*archive_argv(cp, archive, cutoff, workers), "--staging", str(staging)]
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait(proc: subprocess.Popen[bytes]) -> bool:
    """Wait for a run; False (and the run killed) if it hangs."""
    try:
        proc.wait(timeout=RUN_TIMEOUT)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False


def _loaded_one(staging: Path, archive: Path) -> bool:
    """A host's rows are out of its files: a staged chunk, or an archive being written."""
    if any(staging.rglob("*.arrow")):
        return True
    return any(p.name.endswith(".partial") for p in archive.rglob("*"))


def run_trial(kind: str, seed: int, work: Path) -> TrialResult:
    """One run mutated at random moments, one recovery run, then the invariants."""
    rng = random.Random(seed)
    cp, archive, outside = work / "cp", work / "archive", work / "outside"
    outside.mkdir(parents=True)
    random_tree(cp, rng, max_values=rng.choice([50, 5_000, 40_000]), untouchable=True)
    originals = {p: p.read_bytes() for p in cp.rglob("*") if p.suffix in (".json", ".bin")}
    mutator = Mutator(cp, outside, kind, rng)
    result = TrialResult(kind, 0)
    workers = rng.choice([1, 2])
    staging = work / "staging"
    proc = _run(cp, archive, CUTOFF, workers, staging)
    started = time.monotonic()
    if rng.random() < 0.5:
        # Half the trials strike once a host is staged (or, with one worker, written into
        # the archive's temporary file): between its load and its deletion, the window a
        # random moment rarely hits on a small tree.
        while proc.poll() is None and not _loaded_one(staging, archive):
            if time.monotonic() - started > RUN_TIMEOUT:
                break
            time.sleep(0.001)
        started = time.monotonic()
        moments = sorted(rng.uniform(0.0, 0.05) for _ in range(rng.randint(1, 3)))
    else:
        moments = sorted(rng.uniform(0.0, 2.0) for _ in range(rng.randint(1, 3)))
    for moment in moments:
        time.sleep(max(0.0, moment - (time.monotonic() - started)))
        mutator.mutate_one()
    outside_before = snapshot(outside)
    result.hangs += not _wait(proc)
    result.hangs += not _wait(_run(cp, archive, CUTOFF + 60, workers, staging))
    result.mutations = mutator.count

    finals = [p for p in archive.rglob("*.parquet") if not p.name.startswith(".")]
    archived = Counter(r for p in finals for r in archive_rows(p))
    for path in sorted(set(originals) | set(mutator.versions)):
        if os.path.lexists(path):
            continue
        history = [originals.get(path), *mutator.versions.get(path, [])]
        last = history[-1]
        if last is None:
            continue  # the mutator removed it
        if not isinstance(last, bytes):
            result.files_wrongly_deleted += 1
            result.notes.append(f"{path}: a {last} was removed")
            continue
        rel = path.relative_to(cp)
        rows = _rows_of(rel.parts[0], rel.parts[1], path.name, last)
        missing = Counter(rows or []) - archived
        if rows is None or missing:
            result.files_wrongly_deleted += 1
            result.values_lost += sum(missing.values()) if rows is not None else 1
            result.notes.append(f"{rel}: deleted, {sum(missing.values())} values not archived")
    result.outside_changed = sum(
        1 for k, v in snapshot(outside).items() if outside_before.get(k) != v
    )
    return result


def main() -> None:
    """Run the trials and print the table (markdown)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    print(
        "| mutation | trials | mutations | values lost | files wrongly deleted | outside changed | hangs |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        results = []
        for t in range(args.trials):
            work = Path(tempfile.mkdtemp(prefix="ccarchive-mutate-"))
            try:
                results.append(run_trial(kind, args.seed * 1000 + t, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
        for r in results:
            for note in r.notes:
                print(f"<!-- {kind}: {note} -->", file=sys.stderr)
        row = [
            kind,
            len(results),
            sum(r.mutations for r in results),
            sum(r.values_lost for r in results),
            sum(r.files_wrongly_deleted for r in results),
            sum(r.outside_changed for r in results),
            sum(r.hangs for r in results),
        ]
        print("| " + " | ".join(str(v) for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Randomized crash trials for the embedded runner, counted rather than asserted.

    .venv/bin/python -m tests.stress_faults --trials 20

prints, per crash point, trials x rows lost x rows duplicated x files wrongly deleted.
`pytest --stress N` runs the same trials as assertions (tests/test_faults_embedded.py).
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import Row, archive_rows, random_tree, rows_per_file, snapshot
from workers.faults import POINTS
from workers.sink import footer_sources, read_footer


@dataclass
class TrialResult:
    """Damage found after a crash and one recovery run."""

    point: str
    crashed: bool
    rows_lost: int
    rows_duplicated: int
    files_wrongly_deleted: int


def damage(
    cp: Path, archive: Path, expected: dict[str, list[Row]], before: dict[str, bytes | None]
) -> tuple[int, int, int]:
    """(rows lost, rows duplicated, files wrongly deleted) of the current state."""
    now = snapshot(cp)
    gone = [name for name in expected if name not in now]
    finals = [p for p in archive.rglob("*.parquet") if not p.name.startswith(".")]
    archived = Counter(r for p in finals for r in archive_rows(p))
    wanted = Counter(r for name in gone for r in expected[name])
    listed = {
        f"{p.parent.name}/{host}/{f['name']}"
        for p in finals
        for host, entry in footer_sources(read_footer(str(p))).items()
        for f in entry["files"]
    }
    wrongly_deleted = sum(1 for name in gone if name not in listed)
    changed = sum(1 for name, content in now.items() if content != before.get(name))
    return (
        sum((wanted - archived).values()),
        sum((archived - wanted).values()),
        wrongly_deleted + changed,
    )


def run_trial(point: str, seed: int, work: Path) -> TrialResult:
    """Crash at `point` in a random setting, recover with the next run, measure the damage."""
    from tests.test_faults_embedded import ccarchive

    rng = random.Random(seed)
    cp, archive = work / "cp", work / "archive"
    random_tree(cp, rng, max_values=80, untouchable=False)
    expected = rows_per_file(cp)
    before = snapshot(cp)
    fault = work / "fault"
    fault.write_text(point)
    workers = rng.choice([1, 2])
    cutoff = 2_000_000
    ccarchive(cp, archive, cutoff, workers, fault)
    crashed = not fault.exists()
    fault.unlink(missing_ok=True)
    ccarchive(cp, archive, cutoff + rng.choice([0, 60, 3600]), workers)
    lost, duplicated, wrongly = damage(cp, archive, expected, before)
    return TrialResult(point, crashed, lost, duplicated, wrongly)


def main() -> None:
    """Run the trials and print the table (markdown)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print("| fault | trials | crashed | rows lost | rows duplicated | files wrongly deleted |")
    print("|---|---|---|---|---|---|")
    for point in POINTS:
        results = []
        for t in range(args.trials):
            work = Path(tempfile.mkdtemp(prefix="ccarchive-stress-"))
            try:
                results.append(run_trial(point, args.seed * 1000 + t, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
        row = [
            point,
            len(results),
            sum(r.crashed for r in results),
            sum(r.rows_lost for r in results),
            sum(r.rows_duplicated for r in results),
            sum(r.files_wrongly_deleted for r in results),
        ]
        print("| " + " | ".join(str(v) for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Randomized fault trials for the distributed pipeline, counted rather than asserted.

    .venv/bin/python -m tests.stress_distributed --trials 20 [--embedded] [--faults kill,redis]

Each trial builds a fresh installation (`distributed_harness.Deployment`: its own
redis-server, two real Celery workers, local or S3 storage through moto), writes a random
checkpoint tree, runs the archiver with one fault injected at a random place, lets the
system recover (replacement workers, the next run) and measures against the oracle. Faults:

- `kill:<point>`: SIGKILL of the worker process at a crash point; with the prefork pool
  the pool process dies (its parent requeues the task), with the solo pool the whole
  worker dies (its task comes back after the visibility timeout; a new worker starts);
- `redis-restart:aof` / `redis-restart:none`: Redis SIGKILLed and started again on the
  same port and data directory, at a random stall point or a random moment, down for a
  random while; with an append-only file (fsync always) or without persistence;
- `s3-outage`: the S3 endpoint unreachable for a random while from a random stage on
  (archive and, in half the trials, staging on S3; half the trials big enough that the
  outage hits between two upload parts);
- `concurrent-runs`: two or three runs for the same clusters at once (plans sent
  together with equal or different cutoffs, a manual CLI run next to a plan, two beat
  processes by mistake).

prints a table: fault x trials x faults that hit x rows lost x rows duplicated x files
wrongly deleted x files visible incomplete x selected files left after recovery.
`--embedded` adds the embedded runner's trials (tests/stress_faults.py) to the table.
`pytest --stress N` runs N trials per fault as assertions (tests/test_faults_distributed.py).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.distributed_harness import (
    CUTOFF,
    Damage,
    Deployment,
    big_tree,
    measure,
)
from tests.helpers import random_tree, rows_per_file, snapshot
from workers import storage
from workers.faults import POINTS

FAULTS = (
    *(f"kill:{p}" for p in POINTS),
    "redis-restart:aof",
    "redis-restart:none",
    "s3-outage",
    "concurrent-runs",
)

NEXT_CUTOFF = CUTOFF + 60


@dataclass
class TrialResult:
    """What one trial did and the damage found after recovery."""

    fault: str
    seed: int
    hit: bool  # the fault happened (a crash point was reached, Redis restarted mid-run...)
    damage: Damage
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """SPEC §6 held and the next run left no selected file behind."""
        return self.damage.ok and self.damage.files_left == 0


# --- the faults -----------------------------------------------------------------------------


def _wait_run(d: Deployment, run: Any, timeout: float, pool: str, notes: list[str]) -> None:
    """Wait for a background CLI run; replace any worker that died meanwhile."""
    deadline = time.monotonic() + timeout
    replaced = 0
    while run.poll() is None:
        for name, proc in list(d.workers.items()):
            if not proc.alive():
                d.workers.pop(name)
                replaced += 1
                d.start_worker(f"{name}r{replaced}", pool)
                notes.append(f"worker {name} died, replaced")
        if time.monotonic() > deadline:
            run.kill()
            notes.append("the run did not end in time")
            break
        time.sleep(0.1)
    run.communicate()
    if replaced:
        d.wait_workers(list(d.workers))


def _kill(point: str) -> Callable[[Deployment, random.Random, list[str]], bool]:
    def trial(d: Deployment, rng: random.Random, notes: list[str]) -> bool:
        pool = rng.choice(["prefork", "solo"])
        notes.append(f"pool {pool}")
        d.start_workers(("w1", "w2"), pool=pool)
        d.arm(point)
        run = d.cli_async("--cutoff", str(CUTOFF))
        _wait_run(d, run, 150, pool, notes)
        return not d.fault_file.exists()

    return trial


def _stall_or_wait(d: Deployment, rng: random.Random, points: list[str], notes: list[str]) -> bool:
    """Arm a random stall point, or none (the fault comes at a random moment); True if armed."""
    point = rng.choice([*points, None])
    notes.append(f"at {point or 'a random moment'}")
    if point is None:
        return False
    d.arm(f"stall {point}")
    return True


def _redis_restart(persistent: bool) -> Callable[[Deployment, random.Random, list[str]], bool]:
    def trial(d: Deployment, rng: random.Random, notes: list[str]) -> bool:
        d.start_workers()
        stall = _stall_or_wait(d, rng, list(POINTS), notes)
        run = d.cli_async("--cutoff", str(CUTOFF))
        hit = True
        if stall:
            try:
                d.wait_stalled(timeout=20)
            except BaseException:  # the point was not reached (nothing to delete, say)
                hit = False
                d.fault_file.unlink(missing_ok=True)
        else:
            time.sleep(rng.uniform(0.0, 0.8))  # small trees: a run lasts about a second
            hit = run.poll() is None
        d.redis.restart(down_seconds=rng.uniform(0.0, 1.5))
        d.release()
        _wait_run(d, run, 150, "prefork", notes)
        return hit

    return trial


def _s3_outage(
    bucket_of: Callable[[], Any],
) -> Callable[[Deployment, random.Random, list[str]], bool]:
    def trial(d: Deployment, rng: random.Random, notes: list[str]) -> bool:
        proxy = bucket_of()[1]
        d.start_workers()
        stall = _stall_or_wait(
            d,
            rng,
            ["load:staged", "finalize:writing", "finalize:committed", "delete:partial"],
            notes,
        )
        run = d.cli_async("--cutoff", str(CUTOFF))
        hit = True
        if stall:
            try:
                d.wait_stalled(timeout=30)
            except BaseException:
                hit = False
                d.fault_file.unlink(missing_ok=True)
        else:
            time.sleep(rng.uniform(0.0, 2.0))
            hit = run.poll() is None
        outage = rng.uniform(0.3, 8.0)
        notes.append(f"outage {outage:.1f}s")
        proxy.down()
        d.release()
        time.sleep(outage)
        proxy.up()
        _wait_run(d, run, 150, "prefork", notes)
        time.sleep(2.2)  # past the grace period: recovery may abort orphaned uploads
        return hit

    return trial


def _concurrent(d: Deployment, rng: random.Random, notes: list[str]) -> bool:
    d.start_workers()
    variant = rng.choice(["plans-same", "plans-later", "cli-and-plan", "three-plans", "two-beats"])
    notes.append(variant)
    if variant == "two-beats":
        beats = [d.start_beat(f"beat{i}", interval="1s") for i in (1, 2)]
        time.sleep(rng.uniform(2.0, 5.0))
        for b in beats:
            d.procs.stop(b)
    elif variant == "cli-and-plan":
        run = d.cli_async("--cutoff", str(CUTOFF))
        time.sleep(rng.uniform(0.0, 0.5))
        d.send_plan(CUTOFF + rng.choice([0, 30]))
        run.communicate(timeout=120)
    else:
        n = 3 if variant == "three-plans" else 2
        for i in range(n):
            d.send_plan(CUTOFF + (30 * i if variant != "plans-same" else 0))
            time.sleep(rng.uniform(0.0, 0.2))
    d.wait_quiet(timeout=120, locks=False)
    runs = {r["run_id"] for r in d.reports()}
    skipped = any(e.startswith("skipped") for r in d.reports() for e in r["errors"])
    notes.append(f"{len(runs)} runs, overlap: {skipped}")
    return len(runs) >= 2


# --- one trial --------------------------------------------------------------------------------


@dataclass
class _S3:
    """The moto server of a stress session, a bucket per trial, and the proxy to it."""

    moto: Any
    bucket: Any = None
    proxy: Any = None
    saved: dict[str, dict[str, Any]] | None = None  # this process's storage options before

    def new(self) -> tuple[Any, Any]:
        from tests.fixtures_s3 import KEY_ID, SECRET, S3Bucket, S3Proxy

        if self.proxy is not None:
            self.proxy.close()
        name = f"stress-{uuid.uuid4().hex[:12]}"
        self.bucket = S3Bucket(name, self.moto.endpoint_url, self.moto.client())
        self.bucket.client.create_bucket(Bucket=name)
        self.proxy = S3Proxy(int(self.moto.endpoint_url.rsplit(":", 1)[1]))
        if self.saved is None:
            self.saved = storage.current_options()
        storage.configure(
            {
                "s3": {
                    "endpoint_url": self.moto.endpoint_url,
                    "key": KEY_ID,
                    "secret": SECRET,
                    "client_kwargs": {"region_name": "us-east-1"},
                }
            }
        )
        return self.bucket, self.proxy

    def close(self) -> None:
        """Take the proxy down and give this process its storage options back."""
        if self.proxy is not None:
            self.proxy.close()
        if self.saved is not None:
            storage.configure(self.saved)


def _s3_env(proxy: Any) -> dict[str, str]:
    from tests.fixtures_s3 import KEY_ID, SECRET

    return {
        "CCARCHIVE_S3_ENDPOINT_URL": proxy.endpoint_url,
        "CCARCHIVE_S3_ACCESS_KEY_ID": KEY_ID,
        "CCARCHIVE_S3_SECRET_ACCESS_KEY": SECRET,
        "CCARCHIVE_S3_REGION": "us-east-1",
        "CCARCHIVE_S3_PART_SIZE_MIB": "5",
        "CCARCHIVE_ROW_GROUP_ROWS": "2000000",
        "CCARCHIVE_RECOVERY_GRACE": "2s",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def run_trial(fault: str, seed: int, work: Path, moto: Any = None) -> TrialResult:
    """One randomized trial of `fault` in `work` (moto: a running moto server, for S3)."""
    rng = random.Random(f"{fault}/{seed}")
    started = time.monotonic()
    notes: list[str] = []
    s3 = _S3(moto) if fault == "s3-outage" else None
    kwargs: dict[str, Any] = {}
    if fault.startswith("redis-restart"):
        kwargs["persistent"] = fault.endswith(":aof")
    if s3 is not None:
        if moto is None:
            raise ValueError("the s3-outage fault needs a moto server")
        bucket, proxy = s3.new()
        kwargs["archive"] = f"{bucket.url}/archive"
        if rng.random() < 0.5:
            kwargs["staging"] = f"{bucket.url}/staging"
            notes.append("staging on S3")
        kwargs["env"] = _s3_env(proxy)
    d = Deployment(work / "d", **kwargs)
    try:
        random_tree(d.checkpoints, rng)
        if s3 is not None and rng.random() < 0.5:
            big_tree(d.checkpoints)
            notes.append("big")
        expected, before = rows_per_file(d.checkpoints), snapshot(d.checkpoints)
        if fault.startswith("kill:"):
            trial = _kill(fault.split(":", 1)[1])
        elif fault.startswith("redis-restart"):
            trial = _redis_restart(kwargs["persistent"])
        elif fault == "s3-outage":
            trial = _s3_outage(lambda: (s3.bucket, s3.proxy))  # type: ignore[union-attr]
        elif fault == "concurrent-runs":
            trial = _concurrent
        else:
            raise ValueError(f"unknown fault {fault!r}")
        hit = trial(d, rng, notes)
        t_fault = time.monotonic()
        d.wait_quiet(timeout=150, locks=False)
        t_quiet = time.monotonic()
        if d.locks():
            # A run that can no longer finish still holds a lock: it expires (60 s here).
            notes.append(f"stale lock {d.locks()}")
            deadline = time.monotonic() + 90
            while d.locks() and time.monotonic() < deadline:
                time.sleep(1)
        nxt = d.cli("--cutoff", str(NEXT_CUTOFF), timeout=180)
        if nxt.returncode not in (0, 1):
            notes.append(f"next run exited {nxt.returncode}: {nxt.stderr[-300:]}")
        d.wait_quiet(timeout=150, locks=False)
        notes.append(
            f"fault {t_fault - started:.0f}s, quiet {t_quiet - t_fault:.0f}s, "
            f"recovery {time.monotonic() - t_quiet:.0f}s"
        )
        damage = measure(d.checkpoints, d.archive, expected, before, NEXT_CUTOFF)
    finally:
        d.close()
        if s3 is not None:
            s3.close()
    return TrialResult(fault, seed, hit, damage, time.monotonic() - started, notes)


# --- the table --------------------------------------------------------------------------------

HEADER = (
    "| fault | trials | fault hit | rows lost | rows duplicated | files wrongly deleted "
    "| visible incomplete | files left after recovery | s/trial |"
)


def row(fault: str, results: list[Any]) -> str:
    """One line of the table for a fault's results (distributed or embedded)."""

    def total(attr: str) -> int:
        return sum(_value(r, attr) for r in results)

    cells = [
        fault,
        len(results),
        sum(bool(getattr(r, "hit", getattr(r, "crashed", False))) for r in results),
        total("rows_lost"),
        total("rows_duplicated"),
        total("files_wrongly_deleted"),
        total("incomplete_visible"),
        # The embedded trials measure the damage only (tests/stress_faults.py).
        total("files_left") if all(hasattr(r, "damage") for r in results) else "-",
        f"{sum(getattr(r, 'seconds', 0.0) for r in results) / max(1, len(results)):.1f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _value(result: Any, attr: str) -> int:
    damage = getattr(result, "damage", None)
    if damage is not None:
        value = getattr(damage, attr)
        if attr == "files_wrongly_deleted":
            value += damage.files_changed
        return len(value) if isinstance(value, list) else int(value)
    value = getattr(result, attr, 0)  # tests.stress_faults.TrialResult
    return len(value) if isinstance(value, list) else int(value)


def main() -> None:
    """Run the trials and print the table (markdown), one line per fault as it completes."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--faults", default="", help="comma-separated prefixes of faults to run (default: all)"
    )
    parser.add_argument("--embedded", action="store_true", help="also the embedded runner's")
    parser.add_argument("--verbose", action="store_true", help="a line per trial on stderr")
    args = parser.parse_args()
    wanted = [f for f in FAULTS if not args.faults or f.startswith(tuple(args.faults.split(",")))]
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    if args.embedded:
        from tests.stress_faults import run_trial as embedded_trial

        for point in POINTS:
            embedded: list[Any] = []
            for t in range(args.trials):
                work = Path(tempfile.mkdtemp(prefix="ccarchive-stress-"))
                try:
                    t0 = time.monotonic()
                    found = embedded_trial(point, args.seed * 1000 + t, work)
                    found.seconds = time.monotonic() - t0  # type: ignore[attr-defined]
                    embedded.append(found)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            print(row(f"embedded {point}", embedded), flush=True)
    moto = None
    if any(f == "s3-outage" for f in wanted):
        from tests.fixtures_s3 import start_moto

        moto = start_moto(Path(tempfile.mkdtemp(prefix="ccarchive-moto-")))
    try:
        for fault in wanted:
            results: list[TrialResult] = []
            for t in range(args.trials):
                work = Path(tempfile.mkdtemp(prefix="ccarchive-stress-"))
                try:
                    r = run_trial(fault, args.seed * 1000 + t, work, moto)
                    results.append(r)
                    if args.verbose or not r.ok:
                        print(
                            f"{fault} #{t}: {'ok' if r.ok else 'DAMAGE'} hit={r.hit} "
                            f"{r.seconds:.1f}s {r.damage} {r.notes}",
                            file=sys.stderr,
                            flush=True,
                        )
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            print(row(fault, results), flush=True)
    finally:
        if moto is not None:
            moto.stop()


if __name__ == "__main__":
    main()

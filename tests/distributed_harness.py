"""A whole distributed installation per test or trial, and the invariant it must keep.

`Deployment` is one isolated archiver installation on this machine: its own redis-server
(which a test may kill and start again on the same port and data directory, with or
without persistence, a password or TLS), its own checkpoint, archive and staging roots and
its own `celery -A workers worker` subprocesses. Everything listens on 127.0.0.1 only and
every process is stopped by its pid (`Deployment.close`).

`measure` checks SPEC §6 after a fault and a recovery run, against the slow oracle of
tests/helpers:

- every value present exactly once across all archive files (Counters of rows);
- every checkpoint file still in place unchanged, or archived (listed, with its size, in
  a published archive's footer) and deleted;
- nothing under a final name that is not complete: every visible object in the archive
  opens as Parquet and its rows per host equal its footer's commit record.

Shared by tests/test_celery_pipeline.py (one module-wide deployment with routed queues),
tests/test_faults_distributed.py (assertions) and tests/stress_distributed.py (randomized
trials, counted). Registered in tests/conftest.py for its session `redis_server` fixture.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.fixtures_redis import (
    CCARCHIVE,
    CELERY,
    Proc,
    Processes,
    wait_for_workers,
    wait_until,
    worker_argv,
)
from tests.helpers import Row, archive_rows, clean_env, free_port, snapshot
from workers import storage
from workers.distributed import names
from workers.generate import Level, Metric, write_checkpoint
from workers.paths import checkpoint_timestamp
from workers.sink import META_PREFIX, footer_sources

#: The cutoff of every first run (helpers.NEVER: a timestamp no run selects).
CUTOFF = 2_000_000


# --- TLS material ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Generate a throwaway CA and a server certificate with the `cryptography` package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ccarchive test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


# --- a redis-server that can be restarted ---------------------------------------------------


class RedisInstance:
    """A redis-server on a fixed loopback port and data directory, restartable in place.

    `persistent`: append-only file with fsync on every write, so a SIGKILL loses nothing
    (queued and unacknowledged messages, locks, results survive a restart). Otherwise no
    persistence at all: a restart comes back empty.
    """

    def __init__(
        self,
        workdir: Path,
        procs: Processes,
        persistent: bool = False,
        password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.procs = procs
        self.persistent = persistent
        self.password = password
        self.tls = tls
        self.port = free_port()
        self.proc: Proc | None = None
        self.starts = 0
        workdir.mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        """The command line: loopback only, in the foreground, persistence as configured."""
        argv = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        argv += ["--daemonize", "no", "--save", ""]
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        if self.tls is not None:
            argv += ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            argv += ["--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        return argv

    def url(self, db: int = 0) -> str:
        """The broker URL (password included, when there is one)."""
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password is not None else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> Any:
        """A redis-py client (TLS verified against the test CA)."""
        import redis

        kwargs: dict[str, Any] = {"password": self.password, "socket_timeout": 5}
        if self.tls is not None:
            kwargs |= {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, **kwargs)

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.starts += 1
        proc = self.procs.start(f"redis-{self.starts}", self.argv(), clean_env(), self.workdir)
        self.proc = proc

        def up() -> bool:
            if not proc.alive():
                raise RuntimeError(f"redis-server exited:\n{proc.output()}")
            try:
                return bool(self.client().ping())
            except Exception:
                return False

        wait_until(up, 15, "redis-server to answer PING")

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is saved on the way out) and reap it."""
        if self.proc is not None:
            kill_proc(self.procs, self.proc)
            self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        """Kill the server, stay down a while, start it again on the same port and dir."""
        self.kill()
        time.sleep(down_seconds)
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisInstance]:
    """A real redis-server on a free loopback port, no persistence; stopped at the end."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (`make redis` installs Debian's)")
    workdir = tmp_path_factory.mktemp("redis")
    procs = Processes(workdir)
    try:
        server = RedisInstance(workdir, procs)
        server.start()
        yield server
    finally:
        procs.stop_all()


def kill_proc(procs: Processes, proc: Proc) -> None:
    """SIGKILL one process we started (by its pid) and reap it."""
    if proc.alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(10)
    if proc in procs.procs:
        procs.procs.remove(proc)


# --- one installation -----------------------------------------------------------------------


class Deployment:
    """Redis, roots and Celery workers of one isolated archiver installation."""

    def __init__(
        self,
        root: Path,
        persistent: bool = False,
        password: str | None = None,
        tls: bool = False,
        archive: str | None = None,
        staging: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.archive = archive or str(root / "archive")
        self.staging = staging or str(root / "staging")
        self.fault_file = root / "fault"
        self.procs = Processes(root / "logs")
        self.tls_files = make_tls_files(root / "tls") if tls else None
        self.redis = RedisInstance(root / "redis", self.procs, persistent, password, self.tls_files)
        try:
            self._setup(env)
        except BaseException:
            self.procs.stop_all()  # nobody gets this object to close: stop Redis here
            raise

    def _setup(self, env: dict[str, str] | None) -> None:
        self.redis.start()
        self.env = clean_env(
            CCARCHIVE_BROKER_URL=self.redis.url(),
            CCARCHIVE_CHECKPOINTS=str(self.checkpoints),
            CCARCHIVE_ARCHIVE=self.archive,
            CCARCHIVE_STAGING=self.staging,
            CCARCHIVE_TASK_RETRIES="2",
            CCARCHIVE_RETRY_DELAY="0.2",
            CCARCHIVE_FAULT_FILE=str(self.fault_file),
            CCARCHIVE_LOG_LEVEL="INFO",
            # Short enough that a lost message comes back within a test, longer than any
            # task of one (the tests release a stalled task within a second or two).
            CCARCHIVE_VISIBILITY_TIMEOUT="6s",
            CCARCHIVE_LOCK_TIMEOUT="60s",
        )
        self.env.update(env or {})
        if self.tls_files is not None:
            self.env["CCARCHIVE_REDIS_CA_CERT"] = str(self.tls_files.ca)
        self.workers: dict[str, Proc] = {}
        self.flower: Proc | None = None
        self._app: Any = None

    @property
    def archive_dir(self) -> Path:
        """The archive root as a local path (for a deployment that archives locally)."""
        return Path(self.archive)

    @property
    def staging_dir(self) -> Path:
        """The staging root as a local path (for a deployment that stages locally)."""
        return Path(self.staging)

    # workers ----------------------------------------------------------------------------

    def start_worker(
        self,
        name: str,
        pool: str = "prefork",
        concurrency: int = 1,
        queues: Sequence[str] = (),
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """Start `celery -A workers worker` named `name` (not waited for: see wait_workers);
        `prefix` goes before its argv (e.g. `drop_dac_prefix()`), `env` over the settings."""
        argv = [*prefix, *worker_argv(name, list(queues) or ["celery"], concurrency, pool)]
        proc = self.procs.start(
            f"{name}-{len(self.procs.procs)}", argv, {**self.env, **(env or {})}
        )
        self.workers[name] = proc
        return proc

    def start_workers(self, names: Sequence[str] = ("w1", "w2"), pool: str = "prefork") -> None:
        """Start workers and wait until each answers a ping."""
        for n in names:
            self.start_worker(n, pool)
        self.wait_workers(names)

    def wait_workers(self, names: Sequence[str], timeout: float = 40) -> None:
        """Wait until the named workers answer a ping (fail if one exited)."""
        wait_for_workers(self.app(), names, [self.workers[n] for n in names], timeout)

    def kill_worker(self, name: str) -> None:
        """SIGKILL a whole worker (its main process and its pool) by process group."""
        proc = self.workers.pop(name)
        if proc.alive():
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the pool dies with it
        proc.popen.wait(10)
        if proc in self.procs.procs:
            self.procs.procs.remove(proc)

    def app(self) -> Any:
        """A Celery client app on this deployment's Redis (the workers' settings)."""
        if self._app is None:
            from workers.config import load_settings
            from workers.distributed.app import make_app

            saved = dict(os.environ)
            try:
                os.environ.update({k: v for k, v in self.env.items() if k.startswith("CCARCHIVE")})
                self._app = make_app(load_settings())
            finally:
                os.environ.clear()
                os.environ.update(saved)
        return self._app

    # runs -------------------------------------------------------------------------------

    def cli(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`ccarchive archive --broker ...` with the deployment's settings; waits for it."""
        return subprocess.run(
            [CCARCHIVE, "archive", "--broker", self.redis.url(), *args],
            env={**self.env, "COLUMNS": "200", **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli_argv(self, broker: str) -> list[str]:
        """`ccarchive archive --broker <broker>` (for a test that sets the URL itself)."""
        return [CCARCHIVE, "archive", "--broker", broker]

    def cli_async(self, *args: str) -> subprocess.Popen[str]:
        """The same, started in the background (the caller waits for it)."""
        return subprocess.Popen(
            [CCARCHIVE, "archive", "--broker", self.redis.url(), *args],
            env={**self.env, "COLUMNS": "200"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def meta(self, task_id: str) -> dict[str, Any]:
        """A task's state and result as stored now (one GET; never a pub/sub subscription,
        which would outlive this deployment's Redis in a background thread)."""
        return dict(self.app().backend.get_task_meta(task_id, cache=False))

    def result(self, task_id: str, timeout: float = 30) -> Any:
        """A task's result once it is ready; for a failed task, its exception."""
        from celery import states

        def ready() -> dict[str, Any] | None:
            meta = self.meta(task_id)
            return meta if meta["status"] in states.READY_STATES else None

        return wait_until(ready, timeout, f"the result of task {task_id}")["result"]

    def send(self, name: str, *args: Any, **kwargs: Any) -> str:
        """Send a task by name (as a forged or hand-made message would be); its id."""
        return str(self.app().send_task(name, args=args, kwargs=kwargs).id)

    def send_plan(self, cutoff: int, **kwargs: Any) -> str:
        """Send the planning task (`names.PLAN`) like beat does (no client follows the run); its task id."""
        result = self.app().send_task(names.PLAN, kwargs={"cutoff": cutoff, **kwargs})
        return str(result.id)

    def start_beat(self, name: str, interval: str = "1s") -> Proc:
        """A `celery -A workers beat` process with its own schedule file."""
        schedule = self.root / f"{name}-schedule"
        return self.procs.start(
            name,
            [CELERY, "-A", "workers", "beat", "-s", str(schedule), "-l", "INFO"],
            {**self.env, "CCARCHIVE_RETENTION": "1h", "CCARCHIVE_INTERVAL": interval},
        )

    def reports(self) -> list[dict[str, Any]]:
        """The cluster reports in Redis, oldest first."""
        return [
            json.loads(r) for r in reversed(self.redis.client().lrange(names.REPORTS_KEY, 0, -1))
        ]

    def locks(self) -> list[bytes]:
        """Cluster lock keys held right now."""
        return list(self.redis.client().keys(names.LOCK_PREFIX + "*"))

    def busy(self) -> str | None:
        """What is still going on (a queued, unacknowledged or running task), or None."""
        try:
            return self._busy()
        except Exception as exc:  # Redis restarting: ask again with a new connection
            if self._app is not None:
                self._app.close()
                self._app = None
            return f"broker unreachable: {exc}"

    def _busy(self) -> str | None:
        client = self.redis.client()
        for queue in ("celery", *(f"celery\x06\x16{p}" for p in (3, 6, 9))):
            if client.llen(queue):
                return f"{client.llen(queue)} messages in queue {queue!r}"
        if client.hlen("unacked"):
            return f"{client.hlen('unacked')} unacknowledged messages"
        inspect = self.app().control.inspect(timeout=1.0, limit=len(self.workers))
        for what in ("active", "reserved", "scheduled"):
            replies = getattr(inspect, what)() or {}
            if len(replies) < len(self.workers):
                return f"only {len(replies)} of {len(self.workers)} workers answered"
            tasks = [t for ts in replies.values() for t in ts]
            if tasks:
                return f"{len(tasks)} {what} tasks"
        return None

    def wait_quiet(self, timeout: float = 90, locks: bool = True) -> None:
        """Wait until no task is queued, held or running (twice in a row), and, with
        `locks`, no cluster lock is held."""
        state = {"quiet": 0}

        def quiet() -> bool:
            why = self.busy() or (f"locks {self.locks()}" if locks and self.locks() else None)
            state["quiet"] = 0 if why else state["quiet"] + 1
            return state["quiet"] >= 2

        wait_until(quiet, timeout, "the deployment to go quiet", interval=0.3)

    def start_flower(self, auth: tuple[str, str] = ("tester", "flower-pw")) -> str:
        """Start Flower (basic auth) and wait until it sees task events; its base URL."""
        import requests

        port = free_port()
        flower = self.procs.start(
            "flower",
            [CELERY, "-A", "workers", "flower", "--address=127.0.0.1", f"--port={port}"],
            {**self.env, "FLOWER_BASIC_AUTH": ":".join(auth)},
        )
        base = f"http://127.0.0.1:{port}"
        self.flower = flower

        def up() -> bool:
            if not flower.alive():
                raise RuntimeError(f"flower exited:\n{flower.output()}")
            try:
                return requests.get(f"{base}/api/workers", auth=auth, timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_until(up, 30, "Flower to answer HTTP", interval=0.2)
        # Events are not stored: only a live receiver sees a run's tasks. Probe until it does.
        probes: list[str] = []

        def probed() -> bool:
            tasks = requests.get(f"{base}/api/tasks", auth=auth, timeout=5).json()
            if any(tasks.get(p, {}).get("state") == "SUCCESS" for p in probes):
                return True
            probes.append(str(self.app().send_task(names.DISCOVER, args=["probe"]).id))
            return False

        wait_until(probed, 30, "Flower to see task events", interval=0.3)
        return base

    def worker_logs(self) -> str:
        """Everything the workers and beat processes wrote so far."""
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.procs.logdir.glob("*.log"))
        )

    def close(self) -> None:
        """Stop every process of the deployment (by pid) and release the client app."""
        if self._app is not None:
            self._app.close()
            self._app = None
        self.procs.stop_all()

    # faults -----------------------------------------------------------------------------

    def arm(self, fault: str) -> None:
        """Arm a crash point (`load:read`) or a stall (`stall load:read`)."""
        self.fault_file.write_text(fault)

    @property
    def stall_marker(self) -> Path:
        """The file a stalled process waits on (see workers.faults)."""
        return Path(str(self.fault_file) + ".stalled")

    def wait_stalled(self, timeout: float = 60) -> int:
        """Wait until a process stalls at the armed point; its pid."""
        marker = self.stall_marker
        wait_until(lambda: marker.exists(), timeout, f"a process to stall ({marker})")
        return int(marker.read_text())

    def release(self) -> None:
        """Let the stalled process go on (if it is still alive)."""
        self.stall_marker.unlink(missing_ok=True)


# --- input ----------------------------------------------------------------------------------


def big_tree(root: Path, values: int = 1_600_000) -> None:
    """One cluster whose first host holds `values` random float32 values in one binary
    file (> 5 MiB of Parquet: an S3 upload part is stored before its row group ends), and
    two small hosts."""
    rng = np.random.default_rng(11)
    for host, n in (("b0", values), ("b1", 2000), ("b2", 50)):
        v = rng.uniform(0, 1000, n).astype(np.float32)
        lv = Level({"m": Metric(60, 1_000_000, v)})
        write_checkpoint(root / "big" / host / "1000000.bin", lv, 1_000_000, 1_003_000, "bin")


# --- the invariant --------------------------------------------------------------------------


@dataclass
class Damage:
    """What a fault and its recovery broke (all zero / empty: SPEC §6 held)."""

    rows_lost: int = 0
    rows_duplicated: int = 0
    files_wrongly_deleted: int = 0  # gone, but no published archive lists them (with rows)
    files_changed: int = 0  # still there, different bytes
    incomplete_visible: list[str] = field(default_factory=list)  # final names not complete
    files_left: int = 0  # selected files not archived yet (allowed; a later run takes them)

    @property
    def ok(self) -> bool:
        """No loss, no duplicate, no wrong deletion or change, nothing partial visible."""
        return not (
            self.rows_lost
            or self.rows_duplicated
            or self.files_wrongly_deleted
            or self.files_changed
            or self.incomplete_visible
        )

    def __str__(self) -> str:
        return (
            f"{self.rows_lost} rows lost, {self.rows_duplicated} duplicated, "
            f"{self.files_wrongly_deleted} files wrongly deleted, {self.files_changed} changed, "
            f"incomplete visible: {self.incomplete_visible or 'none'}, "
            f"{self.files_left} selected files left"
        )


def published(archive: str) -> dict[str, bytes]:
    """Every object visible under a final name below the archive root (local or S3): any
    name without a dot-prefixed component, whatever its extension."""
    fs, root = storage.filesystem(archive)
    if not fs.exists(root):
        return {}
    out: dict[str, bytes] = {}
    for path in fs.find(root):
        rel = path[len(root.rstrip("/")) :].lstrip("/")
        if not any(part.startswith(".") for part in rel.split("/")):
            out[rel] = bytes(fs.cat_file(path))
    return out


def measure(
    checkpoints: Path,
    archive: str,
    expected: dict[str, list[Row] | None],
    before: dict[str, bytes | None],
    cutoff: int = CUTOFF,
    cluster: str | None = None,
) -> Damage:
    """The damage in the current state, against the files and rows before the fault.

    `cluster`: look at that cluster only (its checkpoints and its archives), for trees
    that other tests share.
    """
    if cluster is not None:

        def mine(items: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in items.items() if k.startswith(f"{cluster}/")}

        expected, before = mine(expected), mine(before)
    else:

        def mine(items: dict[str, Any]) -> dict[str, Any]:
            return items

    damage = Damage()
    now = mine(snapshot(checkpoints))
    archived: Counter[Row] = Counter()
    listed: dict[str, int] = {}  # cluster/host/name -> size, from the footers
    for rel, data in mine(published(archive)).items():
        try:
            rows = archive_rows(cast(Any, io.BytesIO(data)))  # pyarrow reads file objects too
            footer = {
                k.decode(): v.decode()
                for k, v in (pq.ParquetFile(io.BytesIO(data)).metadata.metadata or {}).items()
            }
            sources = footer_sources(footer)
            name = footer[META_PREFIX + "cluster"]
        except Exception as exc:  # not Parquet, or no commit record: not complete
            damage.incomplete_visible.append(f"{rel}: {type(exc).__name__}: {exc}")
            continue
        per_host = Counter(r[1] for r in rows)
        recorded = {h: int(e["rows"]) for h, e in sources.items() if int(e["rows"])}
        if per_host != recorded or len(rows) != int(footer[META_PREFIX + "rows"]):
            damage.incomplete_visible.append(f"{rel}: rows per host differ from its footer")
        archived.update(rows)
        for host, entry in sources.items():
            for f in entry["files"]:
                listed[f"{name}/{host}/{f['name']}"] = int(f["size"])
    gone = [name for name in expected if name not in now]
    for name in gone:
        content = before[name]
        size = len(content) if content is not None else -1
        oracle = expected[name]
        if oracle is None or (oracle and listed.get(name) != size):
            damage.files_wrongly_deleted += 1
    for name, content in now.items():
        if content != before.get(name):
            damage.files_changed += 1
    for name in before:
        if name not in now and name not in expected:
            damage.files_wrongly_deleted += 1  # not a checkpoint at all, yet gone
    wanted: Counter[Row] = Counter(r for name in gone for r in expected[name] or [])
    damage.rows_lost = sum((wanted - archived).values())
    damage.rows_duplicated = sum((archived - wanted).values())
    for name, oracle in expected.items():
        ts = checkpoint_timestamp(Path(name).name)
        if oracle is not None and name in now and isinstance(ts, int) and ts <= cutoff:
            damage.files_left += 1
    return damage

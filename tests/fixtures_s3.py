"""A real S3 protocol for tests: moto's standalone server on a loopback port.

Like s3fs's own test suite, the server is a subprocess (`python -m moto.server`) started
once per session on a free port and stopped by its pid at the end; every test gets a fresh
bucket. `S3Proxy` sits between the archiver and the server when a test needs the network to
fail: it can reset every connection, open or new (an outage), while the server, and so
the state of its uploads, lives on.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.helpers import drop_settings_env, free_port
from workers import storage

KEY_ID, SECRET = "testing-key", "testing-secret"


@dataclass
class MotoServer:
    """A running `moto.server` subprocess."""

    endpoint_url: str
    pid: int
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        """A boto3 S3 client that talks to the server directly."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )

    def stop(self) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL) and reap it."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait()


def start_moto(log_dir: Path) -> MotoServer:
    """Start moto's standalone server on a free loopback port and wait until it answers."""
    port = free_port()
    log = open(log_dir / f"moto-{port}.log", "wb")  # noqa: SIM115 (the child owns it)
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
    )
    log.close()
    server = MotoServer(f"http://127.0.0.1:{port}", process.pid, process)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{server.endpoint_url}/moto-api/", timeout=1).close()
            return server
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"moto server did not start, see {log_dir}") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server for the whole session."""
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class S3Bucket:
    """A fresh bucket on the moto server, and the storage options that reach it."""

    name: str
    endpoint_url: str
    client: Any

    @property
    def url(self) -> str:
        """`s3://<bucket>`."""
        return f"s3://{self.name}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under a prefix."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def pending_uploads(self, prefix: str = "") -> list[str]:
        """Keys of unfinished multipart uploads (the invisible, billed parts)."""
        page = self.client.list_multipart_uploads(Bucket=self.name, Prefix=prefix)
        return sorted(u["Key"] for u in page.get("Uploads", []))

    def env(self) -> dict[str, str]:
        """Environment for a `ccarchive` subprocess: settings through CCARCHIVE_S3_*."""
        return {
            "CCARCHIVE_S3_ENDPOINT_URL": self.endpoint_url,
            "CCARCHIVE_S3_ACCESS_KEY_ID": KEY_ID,
            "CCARCHIVE_S3_SECRET_ACCESS_KEY": SECRET,
            "CCARCHIVE_S3_REGION": "us-east-1",
        }


@pytest.fixture
def s3_bucket(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A new bucket; the process's storage options point at the moto server meanwhile.

    The AWS variables and files of whoever runs the tests are masked, so nothing reaches a
    real account; settings come through CCARCHIVE_S3_* as a deployment would set them.
    """
    drop_settings_env(monkeypatch)
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = S3Bucket(
        f"test-{uuid.uuid4().hex[:12]}", moto_server.endpoint_url, moto_server.client()
    )
    bucket.client.create_bucket(Bucket=bucket.name)
    for key, value in bucket.env().items():
        monkeypatch.setenv(key, value)
    saved = storage.current_options()
    storage.configure(
        {
            "s3": {
                "endpoint_url": moto_server.endpoint_url,
                "key": KEY_ID,
                "secret": SECRET,
                "client_kwargs": {"region_name": "us-east-1"},
            }
        }
    )
    try:
        yield bucket
    finally:
        storage.configure(saved)


class S3Proxy:
    """A TCP relay to the S3 server that can go down and come back on the same port,
    while the server, and so the state of its uploads, lives on.

    During an outage it keeps its listening socket and resets every connection (the
    client sees "connection reset"): a freed port could be taken by any process's
    outgoing connection meanwhile, and the clients were told this port.
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._down = False
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        """The URL clients use instead of the server's."""
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        """An outage: reset every open connection, and every new one until `up`."""
        with self._lock:
            self._down = True
            conns, self._conns = self._conns, []
        for conn in conns:
            _reset(conn)

    def up(self) -> None:
        """Relay again."""
        with self._lock:
            self._down = False

    def close(self) -> None:
        """Down for good, and release the port."""
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                down = self._down
            if down:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            a.close()
            b.close()


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), like a dropped network path."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    except OSError:
        pass

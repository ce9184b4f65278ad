"""Names are literal (SPEC §6.8); a refused name is reported; a full archive disk leaves nothing.

Hosts and clusters carry every character a filesystem allows in a name that fsspec, s3fs or
a URL parser would read as something else: `::` (a chain of filesystems), `*`, `?`, `[x]`
(globs), `#`, `%41`, `?versionId=` (URL parts), `~`, a leading `-`, `file:` (a protocol),
quotes, spaces, non-ASCII. Every host of a cluster has the SAME row count but its own
values, so only a row-by-row comparison with the oracle can tell that every host's rows
are its own. Real files and real `ccarchive` processes throughout.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.fixtures_s3 import S3Bucket
from tests.helpers import (
    ROOT,
    Row,
    archive_argv,
    bin_file,
    bin_level,
    clean_env,
    level,
    metric,
    oracle_rows,
    snapshot,
    sort_key,
    write_json,
)
from workers import output, storage
from workers.manifest import ClusterReport

CUTOFF = 2_000_000
START = 1_000_000
SAMPLES = 5  # values per host: the same for every host

#: Host names that mean something to fsspec, s3fs, glob or URL parsing.
HOSTS = [
    "h",
    "h::x",
    "h::y",
    "*",
    "h*",
    "h?",
    "hx",
    "h[x]",
    "h#1",
    "hA",
    "h%41",
    "h?versionId=1",
    "h?versionId=2",
    "~",
    "~h",
    "-h",
    "file:h",
    "file:",
    "s3::h",
    "h x",
    " h",
    "h'\"",
    "é☃",
    "h\u00a0",
]
#: A few of them for the clusters beside the first one (and for S3, for speed).
FEW = ["h", "h::x", "h::y", "*", "h[x]", "hx", "h%41", "h?versionId=1", "h?versionId=2"]

CLUSTERS = {
    "cl": HOSTS,
    "cl::x": FEW,  # beside "cl": must neither block nor join it
    "x::y": FEW,  # must be the directory `x::y`, not a file `x`
    "c*": FEW,
    "c[l]": FEW,  # a glob matching "cl"
    "#c%41": FEW,
    "~c": FEW,
    "-c": FEW,
    "file:x": FEW,
    "c l'\"": FEW,
    "ünï☃": FEW,
}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    """Run `python -m workers.cli` from this worktree in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=clean_env(**(env or {})),
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
    )


class Tree(dict[tuple[str, str], Path]):
    """(cluster, host) -> the host's archivable file; `rows`: the oracle's rows of each,
    computed before a run deletes the files."""

    rows: dict[tuple[str, str], list[Row]]


def build(root: Path, clusters: dict[str, list[str]]) -> Tree:
    """Every host gets one checkpoint of SAMPLES values of its own (JSON or binary, in turn),
    a newer file and a `current.wal`, which must stay. Returns the archivable file per host."""
    files = Tree()
    k = 0
    for cluster, hosts in clusters.items():
        for host in hosts:
            k += 1
            values = [k * 100 + i + 0.5 for i in range(SAMPLES)]
            d = root / cluster / host
            if k % 2:
                files[cluster, host] = write_json(
                    d / "1500000.json", level({"load": metric(values, 60, START)})
                )
            else:
                d.mkdir(parents=True, exist_ok=True)
                body = bin_level({"load": (60, START, values)})
                (d / "1500000.bin").write_bytes(bin_file(body))
                files[cluster, host] = d / "1500000.bin"
            write_json(d / f"{CUTOFF + 1}.json", level({"load": metric([1.0], 60, CUTOFF + 1)}))
            (d / "current.wal").write_bytes(b"wal")
    files.rows = {(c, h): oracle_rows(c, h, p) for (c, h), p in files.items()}
    return files


def rows_of(data: bytes) -> list[Row]:
    """Rows of an archive's bytes (read from a buffer: no path parsing of any kind)."""
    table = pq.read_table(io.BytesIO(data))
    bits = table.column("value").to_numpy().view("uint32").tolist()
    cols = [
        table.column(c).to_pylist()
        for c in ("cluster", "hostname", "metric", "scope", "scope_id", "timestamp", "frequency")
    ]
    return [(*vals, b) for *vals, b in zip(*cols, bits, strict=True)]  # type: ignore[misc]


def check_archive(data: bytes, cluster: str, files: Tree, hosts: list[str]) -> None:
    """The archive holds exactly the oracle's rows of this cluster, host by host, in order."""
    rows = rows_of(data)
    expected = sorted((r for h in hosts for r in files.rows[cluster, h]), key=sort_key)
    assert len(expected) == SAMPLES * len(hosts)
    assert rows == expected  # row by row: values, host names, order
    for host in hosts:
        own = [r for r in rows if r[1] == host]
        assert own == sorted(files.rows[cluster, host], key=sort_key)


def files_under(root: Path) -> set[str]:
    """Every file below a directory, relative to it (os.walk: no pattern, no URL)."""
    return {os.path.relpath(os.path.join(d, f), root) for d, _dirs, fs in os.walk(root) for f in fs}


def check_checkpoints(
    before: dict[str, bytes | None], after: dict[str, bytes | None], files: dict[Any, Path]
) -> None:
    """Exactly the archived checkpoints are gone; every other entry is unchanged."""
    cp = next(iter(files.values())).parents[2]
    gone = {str(p.relative_to(cp)) for p in files.values()}
    assert set(before) - set(after) == gone
    assert {k: v for k, v in before.items() if k not in gone} == after


# --- local archive and staging ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_special_names_keep_their_own_rows_local(tmp_path: Path, workers: int) -> None:
    cp, archive, stage = tmp_path / "cp", tmp_path / "arc", tmp_path / "stage"
    files = build(cp, CLUSTERS)
    stage.mkdir()
    before = snapshot(cp)

    proc = cli(*archive_argv(cp, archive, CUTOFF, workers), "--staging", str(stage))

    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    # Each cluster's archive is `<archive>/<cluster>/<T>.parquet` with the literal name.
    assert files_under(archive) == {f"{c}/{CUTOFF}.parquet" for c in CLUSTERS}
    for cluster, hosts in CLUSTERS.items():
        data = (archive / cluster / f"{CUTOFF}.parquet").read_bytes()
        check_archive(data, cluster, files, hosts)
        assert cluster in out  # in the summary as itself (not eaten as rich markup)
    check_checkpoints(before, snapshot(cp), files)
    # Every staged chunk and temporary file removed (staging is the archiver's own).
    assert {f for f in files_under(stage) if f.endswith((".arrow", ".partial"))} == set()


@pytest.mark.slow
def test_file_url_root_with_special_names(tmp_path: Path) -> None:
    """A `file://` root is accepted; the names below it are still never parsed."""
    clusters = {"cl": FEW, "cl::x": FEW}
    cp, archive = tmp_path / "cp", tmp_path / "arc"
    files = build(cp, clusters)
    before = snapshot(cp)

    proc = cli(*archive_argv(cp, f"file://{archive}", CUTOFF, 1))

    assert proc.returncode == 0, proc.stderr.decode()
    assert files_under(archive) == {f"{c}/{CUTOFF}.parquet" for c in clusters}
    for cluster, hosts in clusters.items():
        check_archive((archive / cluster / f"{CUTOFF}.parquet").read_bytes(), cluster, files, hosts)
    check_checkpoints(before, snapshot(cp), files)


def test_storage_takes_local_names_literally(tmp_path: Path) -> None:
    """The storage layer itself: no chaining, globbing, `~` or `file:` below a root."""
    root = str(tmp_path)
    for name in ["a::b", "a*", "a?", "a[b]", "~", "file:a", "a#b", "a%41", "-a"]:
        fs, path = storage.filesystem(storage.join(root, "d", name))
        assert path == os.path.join(root, "d", name)
    (tmp_path / "d").mkdir()
    for name in ["ab", "a[b]", "a*", "keep"]:
        (tmp_path / "d" / name).write_bytes(name.encode())
    for name in ["a[b]", "a*"]:
        url = storage.join(root, "d", name)
        fs, path = storage.filesystem(url)
        assert fs.exists(path) and fs.ls(path) == [path]
        fs.rm(path, recursive=True)  # a glob would take "ab", "a[b]" and "keep" with it
        assert not os.path.lexists(path)
    assert sorted(os.listdir(tmp_path / "d")) == ["ab", "keep"]
    (tmp_path / "t*").mkdir()
    (tmp_path / "t*" / "x").write_bytes(b"x")
    (tmp_path / "tt").mkdir()
    (tmp_path / "tt" / "y").write_bytes(b"y")
    storage.remove_tree(storage.join(root, "t*"))
    assert not (tmp_path / "t*").exists() and (tmp_path / "tt" / "y").read_bytes() == b"y"
    # A chunk URL in a manifest is a plain string: it round-trips literally.
    url = storage.join(f"file://{root}", "run", "c::l", "h*?#%41.arrow")
    assert storage.filesystem(url)[1] == os.path.join(root, "run", "c::l", "h*?#%41.arrow")
    assert storage.join("s3://b/p", "c::l", "h?versionId=1") == "s3://b/p/c::l/h?versionId=1"


# --- S3 archive and staging --------------------------------------------------------------------


S3_CLUSTERS = {
    "cl": FEW,
    "cl::x": ["h", "h*"],
    "c[l]": ["h", "h#1"],
    "~c": ["-h", "file:h"],
    "ünï☃": ["é☃", "h'\"", "h x"],
}


@pytest.mark.s3
def test_special_names_keep_their_own_rows_s3(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    cp = tmp_path / "cp"
    files = build(cp, S3_CLUSTERS)
    before = snapshot(cp)
    archive, staging = f"{s3_bucket.url}/archive", f"{s3_bucket.url}/staging"

    proc = cli(*archive_argv(cp, archive, CUTOFF, 2), "--staging", staging, env=s3_bucket.env())

    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    assert s3_bucket.keys() == sorted(f"archive/{c}/{CUTOFF}.parquet" for c in S3_CLUSTERS)
    assert s3_bucket.pending_uploads() == []
    for cluster, hosts in S3_CLUSTERS.items():
        body = s3_bucket.client.get_object(
            Bucket=s3_bucket.name, Key=f"archive/{cluster}/{CUTOFF}.parquet"
        )["Body"].read()
        check_archive(body, cluster, files, hosts)
    check_checkpoints(before, snapshot(cp), files)


@pytest.mark.s3
def test_s3_keys_are_literal(s3_bucket: S3Bucket) -> None:
    """No glob on rm/find/exists, no `?versionId=` cut, on keys holding such characters."""
    names = ["a", "a*", "a?", "a[a]", "a?versionId=1", "a?versionId=2", "a::b", "b"]
    for name in names:
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"p/{name}/x", Body=name.encode())
    for name in ["a?versionId=1", "a*", "a[a]"]:
        url = storage.join(s3_bucket.url, "p", name)
        fs, path = storage.filesystem(url)
        assert fs.exists(path)
        assert fs.find(path) == [f"{path}/x"]
        with storage.open_input(storage.join(url, "x")) as f:
            assert f.read() == name.encode()
        storage.remove_tree(url)
        names.remove(name)
        assert s3_bucket.keys("p/") == sorted(f"p/{n}/x" for n in names)
    fs, path = storage.filesystem(storage.join(s3_bucket.url, "p", "a?"))
    fs.rm(f"{path}/x")
    assert s3_bucket.keys("p/") == sorted(f"p/{n}/x" for n in ["a", "a::b", "a?versionId=2", "b"])


# --- refused cluster directories -------------------------------------------------------------

REFUSED = [b"bad\tname", b"bad\nname", b"bad\xffname"]


def make_refused(cp: Path) -> list[bytes]:
    """Cluster directories with names the archiver refuses, each with a host and a checkpoint."""
    made = []
    for raw in REFUSED:
        cluster = os.fsencode(cp) + b"/" + raw
        os.mkdir(cluster)
        os.mkdir(cluster + b"/h1")
        with open(cluster + b"/h1/1500000.json", "wb") as f:
            f.write(b'{"metrics": {"m": {"frequency": 60, "start": 1000000, "data": [1.0]}}}')
        made.append(cluster + b"/h1/1500000.json")
    return made


@pytest.mark.slow
def test_refused_cluster_directories_are_reported(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "arc"
    files = build(cp, {"good": FEW})
    refused_files = make_refused(cp)
    before = snapshot(cp)

    proc = cli(*archive_argv(cp, archive, CUTOFF, 1))

    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1, out + err
    assert "Traceback" not in out + err
    for shown in ["'bad\\tname'", "'bad\\nname'", "'bad\\xffname'"]:
        assert shown in out  # a row of the summary
        assert f"kept: {cp}/{shown}: refused cluster directory" in err  # with its path
    assert "bad\tname" not in out + err and "bad\nname" not in out + err  # escaped, never raw
    for path in refused_files:
        assert os.path.exists(path)  # untouched
    assert files_under(archive) == {f"good/{CUTOFF}.parquet"}  # the others are archived
    check_archive((archive / "good" / f"{CUTOFF}.parquet").read_bytes(), "good", files, FEW)
    after = snapshot(cp)
    assert {k for k in set(before) - set(after)} == {str(p.relative_to(cp)) for p in files.values()}


@pytest.mark.distributed
def test_refused_cluster_directories_in_the_distributed_plan(
    tmp_path: Path, redis_server: Any, clean_settings: pytest.MonkeyPatch
) -> None:
    """Celery path: discover reports them, launch makes each a cluster report with the
    reason (no task, no lock), and the client shows them like any report (exit 1)."""
    from workers.distributed import remote, tasks

    cp = tmp_path / "cp"
    cp.mkdir()
    make_refused(cp)
    before = snapshot(cp)
    clean_settings.setenv("CCARCHIVE_CHECKPOINTS", str(cp))
    clean_settings.setenv("CCARCHIVE_ARCHIVE", str(tmp_path / "arc"))
    clean_settings.setenv("CCARCHIVE_BROKER_URL", redis_server.url(3))
    for cached in (tasks.settings, tasks.router, tasks._redis):
        cached.cache_clear()
    try:
        found = tasks.discover.run("celery")
        assert sorted(c["cluster"] for c in found["clusters"]) == [
            "'bad\\nname'",
            "'bad\\tname'",
            "'bad\\xffname'",
        ]
        launched = tasks.launch.run([found], CUTOFF, "archive", "r1", None, time.time())
    finally:
        for cached in (tasks.settings, tasks.router, tasks._redis):
            cached.cache_clear()
    assert launched["errors"] == []
    run = remote.RemoteRun("r1", CUTOFF, "archive")
    reports = remote._follow(None, run, launched["clusters"], lambda *a: None, 0.1, None)  # type: ignore[arg-type]
    assert sorted(reports) == ["'bad\\nname'", "'bad\\tname'", "'bad\\xffname'"]
    for report in reports.values():
        assert isinstance(report, ClusterReport) and not report.ok
        assert report.bad[0].reason.startswith("refused cluster directory")
        assert report.bad[0].path == f"{cp}/{report.cluster}"
    assert snapshot(cp) == before
    assert not (tmp_path / "arc").exists()


# --- a full archive disk -----------------------------------------------------------------------


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[str]:
    """A tmpfs of `size` at `path` (root only); yields "tmpfs", or "rlimit" when mounting is
    not allowed: then the caller limits the file size instead (EFBIG for ENOSPC)."""
    path.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield "tmpfs" if mounted else "rlimit"
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """The fault hook when no tmpfs can be mounted: writes past `nbytes` fail (EFBIG)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def test_full_disk_leaves_no_partial_file(tmp_path: Path) -> None:
    """The abort removes the temporary file whether a write or the final flush fails, and
    the error that reaches the caller is the disk's."""
    disk = tmp_path / "disk"
    with small_disk(disk, "64k") as kind:
        limit = file_size_limit(64 * 1024) if kind == "rlimit" else _nothing()
        with limit:
            # 1: the disk fills while writing.
            with (
                pytest.raises(OSError) as failed,
                output.create(str(disk / "a" / "big.parquet")) as out,
            ):
                for _ in range(64):
                    out.write(b"x" * 4096)
            assert failed.value.errno in (errno.ENOSPC, errno.EFBIG)
            assert files_under(disk) == set()
            # 2: the last bytes are still buffered; the flush in close() fails.
            head = 0
            if kind == "tmpfs":
                with suppress(OSError), open(disk / "filler", "wb") as f:
                    while True:
                        f.write(b"f" * 4096)
                        f.flush()
            else:
                head = 64 * 1024 - 100  # written straight through; 4096 more do not fit
            with (
                pytest.raises(OSError) as failed,
                output.create(str(disk / "a" / "small.parquet")) as out,
            ):
                if head:
                    out.write(b"y" * head)
                out.write(b"y" * 4096)  # less than the buffer: nothing reaches the disk yet
                out.close()
                out.commit()
            assert failed.value.errno in (errno.ENOSPC, errno.EFBIG)
            assert files_under(disk) <= {"filler"}


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@pytest.mark.slow
def test_full_archive_disk_exits_1_and_keeps_everything(tmp_path: Path) -> None:
    cp, archive, stage = tmp_path / "cp", tmp_path / "arc", tmp_path / "stage"
    files = build(cp, {"cl": ["h1"]})
    big = [float(i % 9973) + 0.25 * (i % 7) for i in range(200_000)]  # ~0.5 MB of Parquet
    write_json(cp / "cl" / "h2" / "1500000.json", level({"m": metric(big, 1, START)}))
    stage.mkdir()
    before = snapshot(cp)
    with small_disk(archive, "64k") as kind:
        if kind == "rlimit":  # a file size limit would stop the staged chunks as well
            pytest.skip(
                "cannot mount a tmpfs here; test_full_disk_leaves_no_partial_file covers it"
            )
        proc = cli(*archive_argv(cp, archive, CUTOFF, 1), "--staging", str(stage))
        left = files_under(archive)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 1, out
    assert "No space left on device" in out and "all files kept" in out
    assert "Traceback" not in out
    assert left == set()  # no .partial, no archive
    assert snapshot(cp) == before  # no checkpoint deleted
    assert files_under(stage) == set()
    assert len(files) == 1


@pytest.mark.s3
@pytest.mark.parametrize("workers", [1, 2])
def test_names_s3_cannot_list_are_refused_for_s3(
    tmp_path: Path, s3_bucket: S3Bucket, workers: int
) -> None:
    """U+FFFE/U+FFFF are fine in a directory name but not in S3's XML listings: a cluster so
    named (its archive's key) is refused and reported, files kept; so is a host so named
    when its rows are staged on S3 (two workers). With one worker nothing is staged and
    the host's name is only a value in the archive: it is archived like any other."""
    cp = tmp_path / "cp"
    files = build(cp, {"cl": ["h", "h\uffff"], "c\ufffe": ["h"]})
    before = snapshot(cp)
    archive, staging = f"{s3_bucket.url}/archive", f"{s3_bucket.url}/staging"

    argv = archive_argv(cp, archive, CUTOFF, workers)
    proc = cli(*argv, "--staging", staging, env=s3_bucket.env())

    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert "cannot be stored in S3" in out
    assert s3_bucket.keys() == [f"archive/cl/{CUTOFF}.parquet"]
    assert s3_bucket.pending_uploads() == []
    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"archive/cl/{CUTOFF}.parquet")
    archived = ["h", "h\uffff"] if workers == 1 else ["h"]
    check_archive(body["Body"].read(), "cl", files, archived)
    after = snapshot(cp)
    assert set(before) - set(after) == {f"cl/{h}/{files['cl', h].name}" for h in archived}

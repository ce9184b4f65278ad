"""Archive and staging on S3, over the real protocol (moto's server, see fixtures_s3).

End to end through the CLI and the runner: rows equal the expected rows exactly, staging is
cleaned, readers (pyarrow datasets, DuckDB) find the archives; and the failure cases: an
upload failing mid-file, an outage, a worker killed mid-upload, an existing archive. None
may leave an object, a pending upload or a deleted checkpoint behind, and the next run
must succeed.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3fs

from tests import helpers
from tests.fixtures_s3 import KEY_ID, SECRET, MotoServer, S3Bucket, S3Proxy
from tests.helpers import (
    Row,
    archive_argv,
    bin_file,
    bin_level,
    full_key,
    snapshot,
    sort_key,
    table_rows,
)
from tests.test_archive import CLUSTER, CUTOFF, build_tree
from workers import output, runner, sink, storage
from workers.cli import main
from workers.config import Settings

pytestmark = [pytest.mark.s3]

MiB = 1 << 20
START, FREQ = 1_000_000, 60


def s3_rows(bucket: S3Bucket, key: str) -> list[Row]:
    """Rows of an archive on S3 (values as float32 bit patterns), checked to be in SPEC
    order, then fully sorted."""
    body = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    rows = table_rows(pq.read_table(io.BytesIO(body)))
    assert rows == sorted(rows, key=sort_key)
    return sorted(rows, key=full_key)


def expected_rows(good: list[tuple[str, str, Path]], cluster: str) -> list[Row]:
    """The oracle's rows of the archivable files of one cluster, fully sorted."""
    return helpers.expected_rows((p for c, _, p in good if c == cluster), key=full_key)


def ccarchive(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the console script in a child process, as an operator would."""
    script = Path(sys.executable).with_name("ccarchive")
    return subprocess.run(
        [str(script), *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


# --- a tree big enough for several 5 MiB upload parts ----------------------------------------

BIG_HOSTS = {"h0": 1_600_000, "h1": 500_000, "h2": 500_000, "h3": 500_000}


def build_big_tree(root: Path) -> dict[str, np.ndarray]:
    """One binary checkpoint per host with random float32 values (Parquet cannot squeeze
    them: ~4 bytes a row, ~12 MiB in all); returns the values per host."""
    rng = np.random.default_rng(7)
    values: dict[str, np.ndarray] = {}
    for host, n in BIG_HOSTS.items():
        v = rng.uniform(0, 1000, n).astype(np.float32)
        path = root / CLUSTER / host / f"{START}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bin_file(bin_level({"m": (FREQ, START, v.tolist())})))
        values[host] = v
    return values


def check_big_archive(table: pa.Table, values: dict[str, np.ndarray]) -> None:
    """The archive holds exactly the generated values, in host then time order."""
    assert table.num_rows == sum(len(v) for v in values.values())
    hosts = sorted(values)
    assert table.column("hostname").to_pylist() == [h for h in hosts for _ in values[h]]
    assert set(table.column("metric").to_pylist()) == {"m"}
    ts = np.concatenate([START + FREQ * np.arange(len(values[h]), dtype=np.int64) for h in hosts])
    assert np.array_equal(table.column("timestamp").to_numpy(), ts)
    got = table.column("value").to_numpy().view(np.uint32)
    assert np.array_equal(got, np.concatenate([values[h] for h in hosts]).view(np.uint32))


def read_s3_table(bucket: S3Bucket, key: str) -> pa.Table:
    """An archive on S3 as a table."""
    body = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    return pq.read_table(io.BytesIO(body))


def small_parts(bucket: S3Bucket, **extra: Any) -> None:
    """Point this process at the bucket with the smallest legal upload parts (5 MiB)."""
    storage.configure(
        {
            "s3": {
                "endpoint_url": bucket.endpoint_url,
                "key": KEY_ID,
                "secret": SECRET,
                "default_block_size": 5 * MiB,
                **extra,
            }
        }
    )


def run_embedded(cp: Path, archive: str, staging: str | None) -> list[Any]:
    """One run of the embedded runner, inline (fault hooks in this process apply)."""
    options = runner.RunOptions(
        checkpoints=str(cp),
        cutoff=CUTOFF,
        archive=archive,
        staging=staging,
        workers=1,
        parquet=sink.ParquetOptions(row_group_rows=2_000_000),
    )
    return runner.run(options)


def fail_upload_part(
    monkeypatch: pytest.MonkeyPatch, after: int, action: Callable[[], None] | None = None
) -> dict[str, int]:
    """Fault hook on the S3 client: UploadPart calls for archive keys after the first
    `after` fail (or, with `action`, `action` runs once `after` parts are stored)."""
    real = s3fs.S3FileSystem.call_s3
    seen = {"upload_part": 0}

    def call_s3(self: s3fs.S3FileSystem, method: str, *args: Any, **kwargs: Any) -> Any:
        archive_part = method == "upload_part" and kwargs["Key"].startswith("archive/")
        if archive_part:
            seen["upload_part"] += 1
            if seen["upload_part"] > after and action is None:
                raise OSError(errno.EIO, "injected: S3 answered 500 InternalError to UploadPart")
        out = real(self, method, *args, **kwargs)
        if archive_part and seen["upload_part"] == after and action is not None:
            action()
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", call_s3)
    return seen


# --- end to end -------------------------------------------------------------------------------


def test_archive_and_staging_on_s3_rows_exact(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    cp = tmp_path / "checkpoints"
    good, kept = build_tree(cp)
    expected = expected_rows(good, CLUSTER)
    before = snapshot(cp)
    archive, staging = f"{s3_bucket.url}/archive", f"{s3_bucket.url}/staging"

    code = main([*archive_argv(cp, archive, CUTOFF, 1), "--staging", staging])

    assert code == 1  # the tree's bad files are reported
    assert s3_bucket.keys() == [f"archive/{CLUSTER}/{CUTOFF}.parquet"]  # staging cleaned
    assert s3_bucket.pending_uploads() == []
    assert s3_rows(s3_bucket, f"archive/{CLUSTER}/{CUTOFF}.parquet") == expected
    after = snapshot(cp)
    gone = {str(p.relative_to(cp)) for _c, _h, p in good}
    assert set(before) - set(after) == gone
    assert all(path.exists() for path in kept)


@pytest.mark.parametrize("staging", ["local", "s3"])
def test_console_script_with_worker_pool(
    tmp_path: Path,
    s3_bucket: S3Bucket,
    moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    staging: str,
) -> None:
    """Settings reach the pool's spawned processes: through CCARCHIVE_S3_* (local staging)
    and through the standard AWS variables only (S3 staging)."""
    cp = tmp_path / "checkpoints"
    good, _kept = build_tree(cp)
    expected = expected_rows(good, CLUSTER)
    args = archive_argv(cp, f"{s3_bucket.url}/a")
    args += ["--cutoff", str(CUTOFF), "--workers", "3"]
    if staging == "local":
        args += ["--staging", str(tmp_path / "staging")]
        env = s3_bucket.env()
    else:
        args += ["--staging", f"{s3_bucket.url}/staging"]
        env = {
            "AWS_ENDPOINT_URL": moto_server.endpoint_url,
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        for name in s3_bucket.env():
            monkeypatch.delenv(name)

    done = ccarchive(*args, env=env)

    assert done.returncode == 1, done.stderr
    assert s3_bucket.keys() == [f"a/{CLUSTER}/{CUTOFF}.parquet"]
    assert s3_rows(s3_bucket, f"a/{CLUSTER}/{CUTOFF}.parquet") == expected
    assert s3_bucket.pending_uploads() == []
    if staging == "local":
        assert list((tmp_path / "staging").rglob("*.arrow")) == []


def test_archives_readable_by_pyarrow_dataset_and_duckdb(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    cp = tmp_path / "checkpoints"
    good, _kept = build_tree(cp)
    (cp / "alex" / "n2").mkdir(parents=True)
    (cp / "alex" / "n2" / f"{CUTOFF}.bin").write_bytes(
        bin_file(bin_level({"m": (FREQ, START, [1.0, 2.0])}))
    )
    good.append(("alex", "n2", cp / "alex" / "n2" / f"{CUTOFF}.bin"))
    archive = f"{s3_bucket.url}/archive"
    fritz_rows = len(expected_rows(good, CLUSTER))
    total = fritz_rows + len(expected_rows(good, "alex"))
    main(archive_argv(cp, archive, CUTOFF))

    # pyarrow's dataset API with its own S3 client (docs/s3.md).
    s3 = pafs.S3FileSystem(
        endpoint_override=s3_bucket.endpoint_url,
        access_key=KEY_ID,
        secret_key=SECRET,
        region="us-east-1",
    )
    dataset = ds.dataset(f"{s3_bucket.name}/archive", filesystem=s3, format="parquet")
    assert dataset.count_rows() == total
    fritz = dataset.to_table(filter=ds.field("cluster") == CLUSTER)
    assert fritz.num_rows == fritz_rows
    assert dataset.schema.field("value").type == pa.float32()

    # DuckDB through an fsspec filesystem (no httpfs extension download needed).
    con = duckdb.connect()
    con.register_filesystem(storage.filesystem(archive)[0])
    result = con.execute(
        f"SELECT count(*), count(DISTINCT cluster) FROM read_parquet('{archive}/*/*.parquet')"
    ).fetchall()
    assert result == [(total, 2)]


# --- failures ---------------------------------------------------------------------------------


def test_upload_failing_mid_file_leaves_nothing_then_next_run_succeeds(
    tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = tmp_path / "checkpoints"
    values = build_big_tree(cp)
    before = snapshot(cp)
    small_parts(s3_bucket)
    archive, staging = f"{s3_bucket.url}/archive", f"{s3_bucket.url}/staging"
    seen = fail_upload_part(monkeypatch, after=1)  # part 1 stored, part 2 fails

    [report] = run_embedded(cp, archive, staging)

    assert seen["upload_part"] >= 2  # the failure was in the middle of the upload
    assert not report.ok and "archive not written" in report.errors[0]
    assert s3_bucket.keys("archive/") == []  # no object
    assert s3_bucket.pending_uploads() == []  # no parts: the upload was aborted
    assert snapshot(cp) == before  # every checkpoint kept
    assert s3_bucket.keys("staging/") == []  # staging cleaned even so

    monkeypatch.undo()
    small_parts(s3_bucket)
    [report] = run_embedded(cp, archive, staging)

    assert report.ok, report.errors
    check_big_archive(read_s3_table(s3_bucket, f"archive/{CLUSTER}/{CUTOFF}.parquet"), values)
    assert s3_bucket.keys() == [f"archive/{CLUSTER}/{CUTOFF}.parquet"]
    assert s3_bucket.pending_uploads() == []
    assert all(not (cp / CLUSTER / h / f"{START}.bin").exists() for h in values)


def test_outage_mid_upload_then_next_run_aborts_the_orphaned_upload(
    tmp_path: Path, s3_bucket: S3Bucket, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network goes down after the first part: the upload cannot even be aborted. No
    object is visible; the next run cleans the parts up and archives."""
    cp = tmp_path / "checkpoints"
    values = build_big_tree(cp)
    before = snapshot(cp)
    proxy = S3Proxy(int(moto_server.endpoint_url.rsplit(":", 1)[1]))
    direct = S3Bucket(s3_bucket.name, proxy.endpoint_url, s3_bucket.client)
    # One attempt per request: an outage should fail fast in a test.
    small_parts(direct, config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}})
    fail_upload_part(monkeypatch, after=1, action=proxy.down)

    [report] = run_embedded(cp, f"{s3_bucket.url}/archive", str(tmp_path / "staging"))

    assert not report.ok
    assert s3_bucket.keys() == []
    assert s3_bucket.pending_uploads() == [f"archive/{CLUSTER}/{CUTOFF}.parquet"]  # orphaned
    assert snapshot(cp) == before

    monkeypatch.undo()
    proxy.up()
    [report] = run_embedded(cp, f"{s3_bucket.url}/archive", str(tmp_path / "staging"))

    assert report.ok, report.errors
    assert s3_bucket.pending_uploads() == []
    check_big_archive(read_s3_table(s3_bucket, f"archive/{CLUSTER}/{CUTOFF}.parquet"), values)
    proxy.close()


def test_worker_killed_mid_upload_then_next_run_succeeds(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    """SIGKILL while the Parquet file is half uploaded (crash point finalize:writing, after
    the first row group: one 5 MiB part stored)."""
    cp = tmp_path / "checkpoints"
    values = build_big_tree(cp)
    before = snapshot(cp)
    fault = tmp_path / "fault"
    fault.write_text("finalize:writing")
    env = {
        **s3_bucket.env(),
        "CCARCHIVE_S3_PART_SIZE_MIB": "5",
        "CCARCHIVE_ROW_GROUP_ROWS": "2000000",
    }
    args = archive_argv(cp, f"{s3_bucket.url}/archive")
    args += ["--staging", f"{s3_bucket.url}/staging", "--cutoff", str(CUTOFF), "--workers", "1"]

    killed = ccarchive(*args, env={**env, "CCARCHIVE_FAULT_FILE": str(fault)})

    assert killed.returncode == -9, killed.stderr
    assert s3_bucket.keys("archive/") == []
    assert s3_bucket.pending_uploads("archive/") == [f"archive/{CLUSTER}/{CUTOFF}.parquet"]
    assert snapshot(cp) == before

    done = ccarchive(*args, env=env)

    assert done.returncode == 0, done.stderr
    assert s3_bucket.pending_uploads() == []
    check_big_archive(read_s3_table(s3_bucket, f"archive/{CLUSTER}/{CUTOFF}.parquet"), values)
    # With one worker each host goes straight from its files into the upload: neither run
    # staged anything (with more workers a killed run's chunks stay until the grace period).
    assert s3_bucket.keys("staging/") == [] and s3_bucket.pending_uploads("staging/") == []


def test_existing_archive_is_never_overwritten(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    cp = tmp_path / "cp"
    host = cp / "c" / "h"
    host.mkdir(parents=True)
    (host / "100.bin").write_bytes(bin_file(bin_level({"m": (FREQ, 100, [1.0])})))
    args = archive_argv(cp, f"{s3_bucket.url}/a")
    args += ["--cutoff", "200", "--workers", "1"]
    assert main(args) == 0
    key = "a/c/200.parquet"
    first = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=key)
    (host / "150.bin").write_bytes(bin_file(bin_level({"m": (FREQ, 150, [2.0])})))

    assert main(args) == 1  # same cutoff, other content: a conflict

    now = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=key)
    assert now["ETag"] == first["ETag"] and now["Body"].read() == first["Body"].read()
    assert (host / "150.bin").exists()
    assert s3_bucket.keys() == [key]
    assert s3_bucket.pending_uploads() == []


# --- the S3 output on its own -----------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 12 * MiB])
def test_exclusive_commit_loses_to_an_object_created_meanwhile(
    s3_bucket: S3Bucket, size: int
) -> None:
    """If-None-Match: * on completion (or on the single PUT): the racer's object stays."""
    small_parts(s3_bucket)
    out = output.create(f"{s3_bucket.url}/k")
    with out:
        out.write(b"x" * size)
        out.close()
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="k", Body=b"racer")
        assert out.commit() is False
    assert s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="k")["Body"].read() == b"racer"
    assert s3_bucket.pending_uploads() == []


def test_failure_while_writing_aborts_the_upload(s3_bucket: S3Bucket) -> None:
    small_parts(s3_bucket)
    with pytest.raises(RuntimeError), output.create(f"{s3_bucket.url}/k") as out:
        out.write(b"x" * 11 * MiB)  # two parts uploaded
        assert s3_bucket.pending_uploads() == ["k"]
        raise RuntimeError("the writer failed")
    assert s3_bucket.keys() == []
    assert s3_bucket.pending_uploads() == []


def test_nothing_visible_before_commit(s3_bucket: S3Bucket) -> None:
    small_parts(s3_bucket)
    with output.create(f"{s3_bucket.url}/k") as out:
        out.write(b"x" * 6 * MiB)
        out.close()
        assert s3_bucket.keys() == []
        assert out.commit() is True
    assert s3_bucket.keys() == ["k"]
    assert s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="k")["ContentLength"] == 6 * MiB


@pytest.mark.parametrize("spool_memory", [output.SPOOL_MEMORY_BYTES, 1024])
def test_footer_is_read_back_from_the_kept_tail_only(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, spool_memory: int
) -> None:
    """Before completion only the tail is readable, and it is enough for the footer (held
    in memory, or spooled to a temporary file when larger than `spool_memory`)."""
    monkeypatch.setattr(output, "SPOOL_MEMORY_BYTES", spool_memory)
    small_parts(s3_bucket)
    table = pa.table({"v": np.random.default_rng(1).random(3_000_000)})  # ~23 MiB
    with output.create(f"{s3_bucket.url}/t.parquet") as out:
        writer = pq.ParquetWriter(out, table.schema)  # type: ignore[arg-type]
        writer.write_table(table, row_group_size=500_000)
        out.mark_tail()
        writer.close()
        out.close()
        with out.readback() as f:
            assert pq.ParquetFile(f).metadata.num_rows == 3_000_000
            f.seek(0)
            with pytest.raises(OSError, match="not kept"):
                f.read(4)
        assert out.commit()
    assert sink.read_metadata(f"{s3_bucket.url}/t.parquet").num_row_groups == 6


def test_remove_tree_aborts_pending_uploads_below_the_prefix(s3_bucket: S3Bucket) -> None:
    small_parts(s3_bucket)
    out = output.create(f"{s3_bucket.url}/run/c/h.arrow", exclusive=False)
    out.write(b"x" * 6 * MiB)  # a part stored; then the writer "dies" (never aborts)
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="run/c/other.arrow", Body=b"1")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="keep", Body=b"1")

    storage.remove_tree(f"{s3_bucket.url}/run")

    assert s3_bucket.pending_uploads() == []
    assert s3_bucket.keys() == ["keep"]


# --- configuration ----------------------------------------------------------------------------


def test_settings_to_storage_options(clean_settings: pytest.MonkeyPatch) -> None:
    monkeypatch = clean_settings
    monkeypatch.setenv("CCARCHIVE_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("CCARCHIVE_S3_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("CCARCHIVE_S3_SECRET_ACCESS_KEY", "hush")
    monkeypatch.setenv("CCARCHIVE_S3_ADDRESSING_STYLE", "path")
    settings = Settings()
    assert "hush" not in repr(settings) and "hush" not in str(settings.model_dump())
    assert settings.storage_options() == {
        "s3": {
            "default_block_size": 16 * MiB,
            "endpoint_url": "http://minio:9000",
            "key": "AKIA",
            "secret": "hush",
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }
    }
    # Nothing configured: boto's own chain (AWS_* variables, ~/.aws, roles) decides.
    assert Settings(
        s3_endpoint_url=None,
        s3_access_key_id=None,
        s3_secret_access_key=None,
        s3_addressing_style="auto",
        s3_part_size_mib=8,
    ).storage_options() == {"s3": {"default_block_size": 8 * MiB}}
    with pytest.raises(ValueError, match="together"):
        Settings(s3_secret_access_key=None)


def test_upload_parts_grow_before_the_part_limit(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part sizes double every S3_PARTS_PER_SIZE parts (here 2 instead of 1,000)."""
    small_parts(s3_bucket)
    monkeypatch.setattr(output, "S3_PARTS_PER_SIZE", 2)
    with output.create(f"{s3_bucket.url}/big") as out:
        for _ in range(40):
            out.write(b"x" * MiB)
        out.close()
        upload = s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name)["Uploads"][0]
        parts = s3_bucket.client.list_parts(
            Bucket=s3_bucket.name, Key="big", UploadId=upload["UploadId"]
        )["Parts"]
        assert [p["Size"] // MiB for p in parts] == [5, 5, 10, 10, 10]
        assert out.commit()
    assert (
        s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="big")["ContentLength"] == 40 * MiB
    )


def test_chunk_streams_back_from_s3_in_bounded_reads(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staged chunk is read with ranged GETs of at most a batch plus the read-ahead."""
    from workers import chunks
    from workers.rows import CHUNK_SCHEMA

    n = 3_000_000
    rng = np.random.default_rng(3)
    table = pa.table(
        {
            "metric": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), ["m"]),
            "scope": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), ["node"]),
            "scope_id": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), [""]),
            "timestamp": pa.array(np.arange(n, dtype=np.int64)),
            "frequency": pa.array(np.full(n, 60, np.int64)),
            "value": pa.array(rng.random(n, dtype=np.float32)),
        },
        schema=CHUNK_SCHEMA,
    )
    url = f"{s3_bucket.url}/staging/run/c/h.arrow"
    size = chunks.write_chunk(table, url)
    assert size > 2 * storage.S3_READ_AHEAD_BYTES  # several read-aheads' worth
    fetched: list[int] = []
    real = s3fs.core.S3File._fetch_range

    def fetch_range(self: Any, start: int, end: int) -> bytes:
        fetched.append(end - start)
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", fetch_range)
    batches = list(chunks.read_chunk(url))

    assert pa.Table.from_batches(batches).equals(table)
    assert len(batches) == -(-n // chunks.BATCH_ROWS)
    assert max(fetched) <= storage.S3_READ_AHEAD_BYTES + 2 * MiB  # never the whole chunk
    assert sum(fetched) < 1.5 * size  # and each byte about once

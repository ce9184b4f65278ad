"""Hardening without a running pipeline: names, secrets, TLS options, orphan sweeps.

The end-to-end versions (real workers, hostile task messages, password and TLS Redis,
Flower) are in tests/test_faults_distributed.py; these pin the pieces down one by one.
"""

from __future__ import annotations

import ssl
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import s3fs

from tests.fixtures_s3 import S3Bucket
from workers import output, paths, recovery, runlog, sourcefiles, staging, steps, storage
from workers.config import Settings, mask_url
from workers.distributed.app import _transport_options, celery_config
from workers.distributed.connection import redis_client
from workers.manifest import ClusterReport, SourceFile

MiB = 1 << 20


# --- secrets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@redis:6379/0", "redis://:**@redis:6379/0"),
        (
            "rediss://user:hunter2@redis:6380/1?ssl_cert_reqs=required",
            "rediss://user:**@redis:6380/1?ssl_cert_reqs=required",
        ),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("s3://bucket/archive", "s3://bucket/archive"),
        ("/srv/archive", "/srv/archive"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_settings_never_show_the_redis_password() -> None:
    s = Settings(
        broker_url="redis://:hunter2@redis:6379/0", result_backend="redis://:hunter3@r2:6379/1"
    )
    for text in (repr(s), str(s)):
        assert "hunter2" not in text and "hunter3" not in text
        assert "redis://:**@redis:6379/0" in text
    assert s.broker_url == "redis://:hunter2@redis:6379/0"  # the value itself is intact


# --- TLS ----------------------------------------------------------------------------------------


def test_rediss_urls_verify_the_server_certificate() -> None:
    s = Settings(
        broker_url="rediss://:pw@redis:6380/0",
        redis_ca_cert="/etc/ccarchive/ca.pem",
        redis_client_cert="/etc/ccarchive/client.pem",
        redis_client_key="/etc/ccarchive/client.key",
    )
    config = celery_config(s)
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/etc/ccarchive/ca.pem",
        "ssl_certfile": "/etc/ccarchive/client.pem",
        "ssl_keyfile": "/etc/ccarchive/client.key",
    }
    assert config["broker_use_ssl"] == expected
    assert config["redis_backend_use_ssl"] == expected  # results default to the broker
    # Without a CA bundle: still CERT_REQUIRED, against the system's CAs.
    plain = celery_config(Settings(broker_url="rediss://redis:6380/0"))
    assert plain["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_plain_redis_urls_get_no_tls_options() -> None:
    config = celery_config(Settings(broker_url="redis://redis:6379/0", redis_ca_cert="/ca.pem"))
    assert "broker_use_ssl" not in config and "redis_backend_use_ssl" not in config


@pytest.mark.parametrize("reqs", ["CERT_REQUIRED", "required", "CERT_NONE", "none"])
def test_redis_client_takes_celery_and_redis_py_spellings(reqs: str) -> None:
    s = Settings(redis_ca_cert="/from/settings.pem")
    client = redis_client(f"rediss://:pw@127.0.0.1:1/2?ssl_cert_reqs={reqs}&ssl_ca_certs=/u.pem", s)
    kwargs = client.connection_pool.connection_kwargs
    wanted = ssl.CERT_NONE if reqs.lower().endswith("none") else ssl.CERT_REQUIRED
    assert kwargs["ssl_cert_reqs"] == wanted
    assert kwargs["ssl_ca_certs"] == "/u.pem"  # the URL wins over the settings
    assert (kwargs["password"], kwargs["db"]) == ("pw", 2)


def test_redis_client_rejects_an_unknown_cert_reqs() -> None:
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        redis_client("rediss://127.0.0.1:1/0?ssl_cert_reqs=maybe", Settings())


def test_tls_file_settings_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "ccarchive.toml").write_text('redis_ca_cert = "tls/ca.pem"\n')
    s = Settings(config=str(tmp_path / "ccarchive.toml"))
    assert s.redis_ca_cert == str(tmp_path / "tls" / "ca.pem")


# --- how soon lost messages come back ---------------------------------------------------------


def test_lost_messages_return_after_about_the_visibility_timeout() -> None:
    default = _transport_options(Settings())  # 2 h: kombu's own sweep (100 s), mutex 300 s
    assert default == {
        "socket_connect_timeout": 5.0,  # CCARCHIVE_CONNECT_TIMEOUT
        "visibility_timeout": 7200.0,
        "unacked_restore_interval": 10.0,
        "unacked_restore_throttle": 10,
        "unacked_mutex_expire": 300,
    }
    for timeout in ("6s", "1m", "10m", "2h"):
        o = _transport_options(Settings(visibility_timeout=timeout))
        sweep = o["unacked_restore_interval"] * o["unacked_restore_throttle"]
        assert sweep <= max(1.0, o["visibility_timeout"] / 4)
        assert o["unacked_mutex_expire"] <= max(5, o["visibility_timeout"])


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\\b", "a\x00b", "a\nb", "a\x7fb"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(steps.UnsafeName):
        steps.check_name(name)


@pytest.mark.parametrize("cutoff", ["1", "../x", 1.5, True, None])
def test_cutoffs_must_be_integers(cutoff: object) -> None:
    with pytest.raises(steps.UnsafeName):
        steps.check_cutoff(cutoff)


def test_cleanup_staging_refuses_names_that_leave_the_staging_root(tmp_path: Path) -> None:
    staging, archive = tmp_path / "staging", tmp_path / "archive"
    staging.mkdir()
    archive.mkdir()
    (archive / "keep").write_text("x")
    for run_id, cluster in [("..", "archive"), ("x", ".."), ("../..", "tmp")]:
        with pytest.raises(steps.UnsafeName):
            steps.cleanup_staging(str(staging), run_id, cluster)
    assert (archive / "keep").exists() and staging.exists()


def test_recovery_refuses_an_unsafe_cluster_even_without_hosts(tmp_path: Path) -> None:
    with pytest.raises(steps.UnsafeName):
        recovery.recover_cluster(str(tmp_path), str(tmp_path / "archive"), "..", [])
    with pytest.raises(steps.UnsafeName):
        paths.archive_files(str(tmp_path / "archive"), "../x", 0)


def test_load_host_refuses_a_run_id_that_leaves_staging(tmp_path: Path) -> None:
    (tmp_path / "cp" / "c" / "h").mkdir(parents=True)
    with pytest.raises(steps.UnsafeName, match="run id"):
        steps.load_host(str(tmp_path / "cp"), "c", "h", 10, str(tmp_path / "st"), "../../x")


def test_delete_files_keeps_going_past_a_hostile_file_name(tmp_path: Path) -> None:
    host = tmp_path / "cp" / "c" / "h"
    host.mkdir(parents=True)
    (host / "100.json").write_text("{}")
    outside = tmp_path / "100.json"
    outside.write_text("{}")
    files = [
        SourceFile("../../../100.json", 2),
        sourcefiles.listed_identity(host / "100.json"),
    ]
    result = steps.delete_files(str(tmp_path / "cp"), "c", "h", files)
    assert result.deleted == ["100.json"]
    assert outside.exists() and "invalid file name" in result.kept[0].reason


def test_run_records_refuse_unsafe_names(tmp_path: Path) -> None:
    for cluster, run_id in [("..", "r"), ("c", "../../x")]:
        report = ClusterReport(cluster, 1, run_id)
        assert runlog.record_run(str(tmp_path / "runs"), report, "archive") is None
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x.json").exists()


# --- orphaned S3 uploads --------------------------------------------------------------------


def real_initiated(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto reports every upload as initiated in 2010; report when it really started."""
    real = s3fs.S3FileSystem.call_s3
    started: dict[str, datetime] = {}

    def call_s3(self: s3fs.S3FileSystem, method: str, *args: Any, **kwargs: Any) -> Any:
        out = real(self, method, *args, **kwargs)
        if method == "list_multipart_uploads":
            for upload in out.get("Uploads", []):
                upload["Initiated"] = started.setdefault(upload["UploadId"], datetime.now(UTC))
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", call_s3)


def dead_upload(bucket: S3Bucket, key: str) -> None:
    """An unfinished multipart upload with one part stored: a writer that died."""
    out = output.create(f"{bucket.url}/{key}", exclusive=False)
    out.write(b"x" * 6 * MiB)  # the first part goes up; nobody ever completes or aborts


@pytest.mark.s3
def test_sweep_staging_on_s3_removes_old_runs_and_aborts_orphaned_uploads(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.configure({"s3": {**storage.current_options()["s3"], "default_block_size": 5 * MiB}})
    real_initiated(monkeypatch)
    url = f"{s3_bucket.url}/staging"
    old, parts, live = (staging.new_run_id(1) for _ in range(3))
    for run in (old, parts, live):
        staging.mark_run(url, run)
    # Run `old`: a chunk (an object) and an upload its worker died in; run `parts`: only its
    # marker and an upload; run `live`: the current run. `foreign`: the same shapes, but not
    # made by the archiver (no marker): never touched, however old.
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"staging/{old}/c/h1.arrow", Body=b"1")
    dead_upload(s3_bucket, f"staging/{old}/c/h2.arrow")
    dead_upload(s3_bucket, f"staging/{parts}/c/h.arrow")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"staging/{live}/c/h.arrow", Body=b"1")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="staging/foreign/c/h.arrow", Body=b"1")
    dead_upload(s3_bucket, "staging/foreign/c/h2.arrow")

    # Young: nothing is touched.
    assert recovery.sweep_staging(url, live, grace_seconds=3600) == []
    assert len(s3_bucket.pending_uploads()) == 3

    later = time.time() + 7200  # two hours on: everything above is older than the grace
    monkeypatch.setattr(recovery.time, "time", lambda: later)
    removed = recovery.sweep_staging(url, live, grace_seconds=3600)

    assert sorted(r.rsplit("/", 1)[-1] for r in removed if not r.endswith(".arrow")) == sorted(
        [old, parts]
    )
    assert s3_bucket.pending_uploads() == ["staging/foreign/c/h2.arrow"]
    assert s3_bucket.keys() == sorted(  # the live run and what is not ours are never swept
        [
            "staging/foreign/c/h.arrow",
            f"staging/{live}/.ccarchive-staging",
            f"staging/{live}/c/h.arrow",
        ]
    )


@pytest.mark.s3
def test_recovery_aborts_an_old_upload_of_an_archive_no_run_writes_again(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.configure({"s3": {**storage.current_options()["s3"], "default_block_size": 5 * MiB}})
    real_initiated(monkeypatch)
    archive = f"{s3_bucket.url}/archive"
    dead_upload(s3_bucket, "archive/c/1000.parquet")
    dead_upload(s3_bucket, "archive/other/1000.parquet")  # another cluster: not this one's
    (tmp_path / "c" / "h").mkdir(parents=True)

    found = recovery.recover_cluster(str(tmp_path), archive, "c", ["h"], grace_seconds=3600)
    assert found.orphans_removed == [] and len(s3_bucket.pending_uploads()) == 2

    later = time.time() + 7200
    monkeypatch.setattr(recovery.time, "time", lambda: later)
    found = recovery.recover_cluster(str(tmp_path), archive, "c", ["h"], grace_seconds=3600)
    assert found.orphans_removed == ["archive/c/1000.parquet"]
    assert s3_bucket.pending_uploads() == ["archive/other/1000.parquet"]

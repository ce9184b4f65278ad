"""Configuration: flags > CCARCHIVE_* env > TOML file > cc-backend config.json > defaults.

Real files in tmp_path, the real environment (monkeypatched), and the real CLI: a run
configured only by a cc-backend config must behave like cc-backend's own cleanup.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.helpers import clean_env, level, metric, write_json
from workers.cli import main
from workers.config import ConfigError, Settings, load_settings

pytestmark = pytest.mark.usefixtures("clean_settings")


def cc_backend_config(path: Path, section: dict[str, Any] | None = None) -> Path:
    """A cc-backend config.json with other sections around the metric-store one."""
    doc: dict[str, Any] = {
        "main": {"addr": "127.0.0.1:8080", "short-running-jobs-duration": 300},
        "archive": {"kind": "file", "path": "./var/job-archive"},
        "metric-store": section
        if section is not None
        else {
            "checkpoints": {"file-format": "json", "directory": "./var/checkpoints"},
            "memory-cap": 100,
            "retention-in-memory": "48h",
            "num-workers": 4,
            "cleanup": {"mode": "archive", "directory": "./var/archive"},
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path


def test_each_layer_wins_over_the_ones_below(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ccb = cc_backend_config(tmp_path / "ccb" / "config.json")
    toml = tmp_path / "etc" / "ccarchive.toml"
    toml.parent.mkdir()
    toml.write_text(
        f'cc-backend-config = "{ccb}"\n'
        "workers = 6\n"
        'retention = "24h"\n'
        'archive = "toml-archive"\n'
        "row_group_rows = 5000\n"
        "page_rows = 4096\n"
    )
    monkeypatch.setenv("CCARCHIVE_CONFIG", str(toml))
    monkeypatch.setenv("CCARCHIVE_WORKERS", "7")
    monkeypatch.setenv("CCARCHIVE_RETENTION", "12h")

    s = load_settings({"workers": 8, "staging": None})  # None: the flag was not given

    assert s.workers == 8  # flag > env 7 > TOML 6 > cc-backend 4
    assert s.retention == "12h"  # env > TOML 24h > cc-backend 48h
    assert s.archive == str(toml.parent / "toml-archive")  # TOML > cleanup.directory
    assert s.row_group_rows == 5000  # TOML > default
    assert s.page_rows == 4096
    assert s.checkpoints == str(ccb.parent / "var" / "checkpoints")  # only cc-backend sets it
    assert s.mode == "archive"
    assert s.staging is None  # nobody sets it: the default
    assert s.zstd_level == Settings.model_fields["zstd_level"].default

    # Without the upper layers, the lower ones show through.
    monkeypatch.delenv("CCARCHIVE_WORKERS")
    monkeypatch.delenv("CCARCHIVE_RETENTION")
    s = load_settings()
    assert (s.workers, s.retention) == (6, "24h")
    monkeypatch.delenv("CCARCHIVE_CONFIG")
    s = load_settings({"cc_backend_config": str(ccb)})
    assert (s.workers, s.retention, s.archive) == (4, "48h", str(ccb.parent / "var" / "archive"))
    assert load_settings().checkpoints is None  # no file at all: defaults


def test_config_flag_beats_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "env.toml").write_text("workers = 2\n")
    (tmp_path / "flag.toml").write_text("workers = 3\n")
    monkeypatch.setenv("CCARCHIVE_CONFIG", str(tmp_path / "env.toml"))
    assert load_settings().workers == 2
    assert load_settings({"config": str(tmp_path / "flag.toml")}).workers == 3


def test_cc_backend_mapping(tmp_path: Path) -> None:
    path = cc_backend_config(
        tmp_path / "config.json",
        {
            "checkpoints": {"directory": "/srv/cc/checkpoints"},
            "retention-in-memory": "1h30m",
            "num-workers": 0,  # upstream: automatic
            # "0s" switches cc-backend's own cleanup off; it is not our interval.
            "cleanup": {"mode": "delete", "interval": "0s"},
        },
    )
    s = load_settings({"cc_backend_config": str(path)})
    assert s.checkpoints == "/srv/cc/checkpoints"  # absolute paths stay as they are
    assert s.mode == "delete"
    assert s.retention == "1h30m" and s.retention_seconds == 5400
    assert s.interval is None
    assert s.workers == Settings().workers  # 0 = auto: our default
    assert s.archive is None


def test_cc_backend_without_cleanup_mode_never_means_delete(tmp_path: Path) -> None:
    # Upstream treats a missing mode as "delete"; deleting data must be asked for here.
    path = cc_backend_config(
        tmp_path / "config.json", {"checkpoints": {"directory": "cp"}, "cleanup": {}}
    )
    assert load_settings({"cc_backend_config": str(path)}).mode == "archive"


def test_toml_tables_and_urls(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'archive = "s3://bucket/prefix"\n'
        'staging = "file:///scratch/staging"\n'
        'log-level = "info"\n'
        "[routes]\n"
        '"fritz" = "storage-a"\n'
    )
    s = load_settings({"config": str(path)})
    assert s.archive == "s3://bucket/prefix"  # URLs are not resolved as paths
    assert s.staging == "file:///scratch/staging"
    assert s.log_level == "INFO"
    assert s.routes == {"fritz": "storage-a"}


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        ("env", "invalid workers (from CCARCHIVE_WORKERS): "),
        ("toml", "invalid workers (from workers in {toml}): "),
        ("ccb", "invalid workers (from metric-store.num-workers in {ccb}): "),
        ("flag", "invalid workers (from the command line): "),
    ],
)
def test_invalid_value_names_key_and_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layer: str, expected: str
) -> None:
    toml, ccb = tmp_path / "c.toml", tmp_path / "config.json"
    toml.write_text("workers = -1\n" if layer == "toml" else "")
    cc_backend_config(ccb, {"num-workers": -3 if layer == "ccb" else 2})
    if layer == "env":
        monkeypatch.setenv("CCARCHIVE_WORKERS", "many")
    flags: dict[str, Any] = {"config": str(toml), "cc_backend_config": str(ccb)}
    if layer == "flag":
        flags["workers"] = 0
    with pytest.raises(ConfigError) as err:
        load_settings(flags)
    message = str(err.value)
    assert message.startswith(expected.format(toml=toml, ccb=ccb)), message
    assert "\n" not in message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"c.toml": "wrkers = 3\n"}, "unknown key 'wrkers' in config file"),
        ({"c.toml": "workers = \n"}, "is not valid TOML"),
        ({"c.toml": 'mode = "purge"\n'}, "invalid mode (from mode in"),
        ({"c.toml": 'retention = "2 days"\n'}, "invalid retention (from retention in"),
        ({"c.toml": "page_rows = 0\n"}, "invalid page_rows (from page_rows in"),
        ({"config.json": "{"}, "is not valid JSON"),
        ({"config.json": '{"main": {}}'}, 'has no "metric-store" object'),
        ({"config.json": '{"metric-store": {"cleanup": "archive"}}'}, "metric-store.cleanup in"),
        (
            {"config.json": '{"metric-store": {"cleanup": {"mode": "purge"}}}'},
            "invalid mode (from metric-store.cleanup.mode in",
        ),
        (
            {"config.json": '{"metric-store": {"retention-in-memory": "forever"}}'},
            "invalid retention (from metric-store.retention-in-memory in",
        ),
        ({}, "does not exist"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    flag = "--cc-backend-config" if "config.json" in files else "--config"
    target = tmp_path / (next(iter(files)) if files else "missing.toml")
    env = clean_env()
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "archive", flag, str(target), "--cutoff", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccarchive: error: "), proc.stderr
    assert expected in lines[0]


@pytest.mark.slow
def test_archive_configured_only_by_cc_backend_config(tmp_path: Path) -> None:
    """Same behaviour as cc-backend's cleanup: files older than now - retention-in-memory
    go into <cleanup.directory>/<cluster>/<T>.parquet and are deleted; newer ones stay."""
    base = tmp_path / "cc-backend"
    ccb = cc_backend_config(base / "config.json")  # ./var/checkpoints, ./var/archive, 48h
    cp = base / "var" / "checkpoints"
    now = int(time.time())
    old = write_json(cp / "fritz" / "f01" / f"{now - 3 * 86400}.json", level({"m": metric([1.0])}))
    new = write_json(cp / "fritz" / "f01" / f"{now - 3600}.json", level({"m": metric([2.0])}))

    assert main(["archive", "--cc-backend-config", str(ccb)]) == 0

    assert not old.exists() and new.exists()
    (archive,) = (base / "var" / "archive" / "fritz").glob("*.parquet")
    cutoff = int(archive.stem)
    assert now - 48 * 3600 - 5 <= cutoff <= int(time.time()) - 48 * 3600
    assert pq.read_table(archive).column("value").to_pylist() == [1.0]


def test_flags_override_cc_backend_config_in_the_cli(tmp_path: Path) -> None:
    base = tmp_path / "cc-backend"
    ccb = cc_backend_config(base / "config.json")
    cp = base / "var" / "checkpoints"
    write_json(cp / "fritz" / "f01" / "1000.json", level({"m": metric([1.0])}))
    other = tmp_path / "elsewhere"

    assert main(["archive", "--cc-backend-config", str(ccb), "--archive", str(other)]) == 0

    assert len(list((other / "fritz").glob("*.parquet"))) == 1
    assert not (base / "var" / "archive").exists()

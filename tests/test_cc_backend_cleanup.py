"""A cc-backend config whose own cleanup still runs is named in one warning line.

Migration step 2 (docs/operations.md) depends on cc-backend's cleanup being off
(`metric-store.cleanup.interval: "0s"`); real `ccarchive` processes read real files.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import clean_env, run_cli
from workers.config import cleanup_warning


def ccarchive(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(args, clean_env(XDG_STATE_HOME=str(tmp / "state")))


def write_config(tmp: Path, cleanup: dict[str, Any] | None) -> Path:
    (tmp / "checkpoints").mkdir(exist_ok=True)
    (tmp / "archive").mkdir(exist_ok=True)
    section: dict[str, Any] = {
        "checkpoints": {"directory": "./checkpoints"},
        "retention-in-memory": "48h",
    }
    if cleanup is not None:
        section["cleanup"] = {"directory": "./archive", **cleanup}
    path = tmp / "config.json"
    path.write_text(json.dumps({"metric-store": section}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cleanup", "why"),
    [
        ({"mode": "archive", "interval": "1h"}, 'metric-store.cleanup.interval is "1h"'),
        ({"mode": "archive"}, "metric-store.cleanup has no interval"),
        (None, "metric-store has no cleanup section"),
    ],
)
def test_cleanup_still_on_is_one_warning(
    tmp_path: Path, cleanup: dict[str, Any] | None, why: str
) -> None:
    config = write_config(tmp_path, cleanup)
    args = ["--cc-backend-config", str(config), "--checkpoints", str(tmp_path / "checkpoints")]
    proc = ccarchive(tmp_path, "status", "--archive", str(tmp_path / "archive"), *args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # settings are read more than once: still one line
    assert "cc-backend's own cleanup is still enabled" in lines[0]
    assert str(config) in lines[0] and why in lines[0] and '"interval": "0s"' in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("interval", ["0s", "0", "0h0m"])
def test_cleanup_switched_off_is_silent(tmp_path: Path, interval: str) -> None:
    config = write_config(tmp_path, {"mode": "archive", "interval": interval})
    proc = ccarchive(
        tmp_path,
        "status",
        "--cc-backend-config",
        str(config),
        "--archive",
        str(tmp_path / "archive"),
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.slow
def test_an_invalid_config_is_one_error_line_not_a_warning_too(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"mode": "purge"})  # also: no interval
    proc = ccarchive(tmp_path, "status", "--cc-backend-config", str(config))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "invalid mode" in proc.stderr, proc.stderr


def test_the_rule() -> None:
    assert cleanup_warning({"cleanup": {"interval": "0s"}}, "f") is None
    assert cleanup_warning({"cleanup": {"interval": "0ms"}}, "f") is None
    assert cleanup_warning({"cleanup": {"interval": "soon"}}, "f") is not None
    assert cleanup_warning({"cleanup": {"interval": "30m"}}, "f") is not None

"""The shipped files: systemd units, the example config and the alert rules' home.

`systemd-analyze verify` checks the units where it is installed (with ExecStart pointed
at this environment's `ccarchive`, since /opt/ccarchive does not exist here); the units
are always parsed, their ExecStart checked against the project's console script, and the
example TOML loaded with the project's own config loader.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT
from workers.config import Settings, load_settings, read_toml_config

SYSTEMD = ROOT / "contrib" / "systemd"
TOML = ROOT / "contrib" / "ccarchive.toml"


def unit(name: str) -> configparser.ConfigParser:
    """A unit file as sections and keys (systemd's syntax is close enough to INI)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def test_the_service_runs_the_console_script_as_a_oneshot_with_a_state_directory() -> None:
    service = unit("ccarchive.service")["Service"]
    program, *args = service["ExecStart"].split()
    assert Path(program).name == "ccarchive" and args == ["archive"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["ccarchive"] == "workers.cli:main"
    assert service["Type"] == "oneshot" and service["SuccessExitStatus"] == "1"
    assert service["StateDirectory"] == "ccarchive"  # $STATE_DIRECTORY: the run records
    assert service["User"] and service["User"] != "root"
    assert service["IOSchedulingClass"] == "idle"
    assert int(service["Nice"]) > 0 and re.fullmatch(r"\d+%", service["CPUQuota"])
    assert service["Environment"] == "CCARCHIVE_CONFIG=/etc/ccarchive.toml"
    # The example config keeps the records where the unit's StateDirectory= puts them.
    assert load_settings({"config": str(TOML)}).run_log == "/var/lib/ccarchive/runs"
    timer = unit("ccarchive.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"


def test_the_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    ccarchive = Path(sys.executable).parent / "ccarchive"
    if not ccarchive.exists():
        pytest.skip(f"no console script {ccarchive} (not an installed environment)")
    for name in ("ccarchive.service", "ccarchive.timer"):
        text = (SYSTEMD / name).read_text()
        text = text.replace("/opt/ccarchive/bin/ccarchive", str(ccarchive))
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        [analyze, "verify", str(tmp_path / "ccarchive.service"), str(tmp_path / "ccarchive.timer")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Only the lines about our files: a container's own units may draw warnings too.
    ours = [line for line in proc.stderr.splitlines() if "ccarchive" in line]
    assert proc.returncode == 0 and not ours, proc.stderr


def test_the_example_config_loads_and_names_every_setting() -> None:
    values, _ = read_toml_config(str(TOML))
    assert values["mode"] == "archive" and values["retention"] == "48h"
    settings = load_settings({"config": str(TOML)})
    assert settings.checkpoints == "/var/lib/cc-backend/var/checkpoints"
    text = TOML.read_text()
    # Every setting appears, set or as a commented-out example, and nothing else does.
    named = set(re.findall(r"^#? ?(\w+) = ", text, re.M))
    assert named <= set(Settings.model_fields)
    assert set(Settings.model_fields) - named == {"config"}  # the file itself
    # The commented-out examples are valid TOML for their key, too.
    examples = "\n".join(line[2:] for line in text.splitlines() if re.match(r"^# (\w+) = ", line))
    parsed = tomllib.loads(examples)
    assert set(parsed) == named - set(values)

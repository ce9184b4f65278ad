"""`make demo` installs only the runtime; `make test` adds the test toolchain, once.

Checked with `make -n` (what make would run) on a copy of the Makefile and pyproject.toml
in a temporary directory, with stamps touched the way the real recipes leave them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def plan(tmp: Path, target: str) -> list[str]:
    """The pip install lines `make -n target` would run."""
    out = subprocess.run(
        ["make", "-n", target], cwd=tmp, capture_output=True, text=True, check=True
    ).stdout
    return [ln for ln in out.splitlines() if "pip install" in ln and "--upgrade pip" not in ln]


def test_demo_installs_runtime_only_and_test_adds_extras(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)

    demo = plan(tmp_path, "demo")
    assert len(demo) == 1 and demo[0].endswith("install --quiet -e .")  # no [test]

    (venv / ".installed-runtime").touch()  # what `make demo` leaves behind
    assert plan(tmp_path, "demo") == []  # idempotent
    test = plan(tmp_path, "test")
    assert len(test) == 1 and test[0].endswith("-e '.[test]'")  # the extras, not again .

    (venv / ".installed-test").touch()
    assert plan(tmp_path, "test") == [] and plan(tmp_path, "demo") == []

    later = time.time() + 5  # pyproject.toml changes: both levels re-install
    os.utime(tmp_path / "pyproject.toml", (later, later))
    assert len(plan(tmp_path, "demo")) == 1 and len(plan(tmp_path, "test")) == 2


def test_test_fast_leaves_out_servers_and_slow_tests(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / ".installed-runtime").touch()
    (tmp_path / ".venv" / ".installed-test").touch()
    # --no-print-directory: under `make test` this is a sub-make, which would otherwise
    # print "Entering directory" lines around the command.
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "test-fast"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == [
        '.venv/bin/python -m pytest tests -q -m "not distributed and not s3 and not slow"'
    ]
    full = subprocess.run(
        ["make", "-n", "test"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert ".venv/bin/python -m pytest tests\n" in full  # `make test`: every test, no -m

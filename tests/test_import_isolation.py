"""Celery at the edge: outside `workers/distributed/` nothing loads celery, kombu, redis or rich.

Each check runs in a fresh interpreter, so what the test process imported before cannot
hide an import. The terminal front ends (the CLI, and the demo that drives it) draw with
rich and are exempt; so are the modules that are the Celery app by definition.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import clean_env

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("celery", "kombu", "redis", "rich")
#: Terminal front ends: rich is what they draw with, and `--broker` hands over to the edge.
FRONT_ENDS = {
    "workers.cli",
    "workers.demo",
    "workers.display",
    "workers.cmd_archive",
    "workers.cmd_ops",
}
#: The Celery app's one module outside the subpackage: where `celery -A workers` looks.
CELERY_ENTRIES = {"workers.celery"}
#: The parts of the subpackage the rest may import (beat uses the names, the settings
#: check routes with the routing rules): they must stay Celery-free too.
CELERY_FREE_EDGE = {
    "workers.distributed",
    "workers.distributed.names",
    "workers.distributed.routing",
}


def module_names(package: str) -> list[str]:
    """Every module of a package in this worktree, by dotted name."""
    names = []
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def core_modules() -> list[str]:
    """The modules that must import without Celery, Redis or rich."""
    every = module_names("workers") + module_names("beat")
    core = [
        m
        for m in every
        if m != "workers.distributed"
        and not m.startswith("workers.distributed.")
        and m not in FRONT_ENDS | CELERY_ENTRIES
    ]
    return core + sorted(CELERY_FREE_EDGE)


#: Imports each module in turn and reports which forbidden library each one pulled in first.
_PROBE = """
import importlib, json, sys
forbidden = {forbidden!r}
blamed = {{}}
for name in {modules!r}:
    before = {{m.split(".")[0] for m in sys.modules}}
    importlib.import_module(name)
    new = {{m.split(".")[0] for m in sys.modules}} - before
    pulled = sorted(new & set(forbidden))
    if pulled:
        blamed[name] = pulled
print(json.dumps(blamed))
"""


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter on this worktree (no CCARCHIVE_* settings); stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_core_imports_no_celery_kombu_redis_or_rich() -> None:
    modules = core_modules()
    assert "workers.runner" in modules and "beat.schedule" in modules  # the walk found them
    assert not any(m.startswith("workers.distributed.app") for m in modules)
    blamed = json.loads(run_python(_PROBE.format(forbidden=FORBIDDEN, modules=modules)))
    assert blamed == {}, f"modules outside workers/distributed/ that load {FORBIDDEN}: {blamed}"


def test_the_probe_would_notice_a_forbidden_import() -> None:
    """The probe itself: the CLI loads rich, the app loads celery, kombu and redis."""
    probe = _PROBE.format(forbidden=FORBIDDEN, modules=["workers.cli", "workers.celery"])
    blamed = json.loads(run_python(probe))
    assert "rich" in blamed["workers.cli"]
    assert {"celery", "kombu", "redis"} <= set(blamed["workers.celery"])


def test_celery_finds_the_app_and_the_tasks_use_the_shared_names() -> None:
    """`celery -A workers` resolves to the subpackage's app, whose tasks are exactly the
    names in `workers.distributed.names`, and the tasks' Redis keys are the shared ones."""
    code = """
import json
from celery.app.utils import find_app
from workers.distributed import app, names
found = find_app("workers")
import workers.distributed.tasks as tasks
print(json.dumps({
    "same_app": found is app.app,
    "registered": sorted(n for n in found.tasks if n.startswith("ccarchive.")),
    "names": sorted(names.TASKS),
    "reports_key": tasks.REPORTS_KEY == names.REPORTS_KEY,
    "attempts": tasks.ATTEMPTS_PREFIX == names.ATTEMPTS_PREFIX,
    "scheduler": found.conf.beat_scheduler,
}))
"""
    seen = json.loads(run_python(code))
    assert seen["same_app"]
    assert seen["registered"] == seen["names"]
    assert seen["reports_key"] and seen["attempts"]
    module, _, cls = seen["scheduler"].partition(":")
    assert (module, cls) == ("workers.distributed.scheduler", "ArchiveScheduler")

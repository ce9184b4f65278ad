"""docker-compose.yml: valid against the Compose Specification, and its app services work.

There is no Docker engine on these machines, so the second test does what Compose would
do with the app services (worker, storage-node worker, beat, flower): interpolate the file
with a user's variables, take each service's command and environment, and start them as
local processes — Redis pointed at the test server, the volume mount points mapped to
temporary directories, Flower on a free loopback port.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import requests
import yaml

from tests.distributed_harness import RedisInstance
from tests.fixtures_redis import (
    CELERY,
    Processes,
    make_test_app,
    wait_for_workers,
    wait_until,
)
from tests.helpers import ROOT, clean_env, free_port
from workers.distributed import names
from workers.generate import Level, Metric, write_checkpoint

COMPOSE = ROOT / "docker-compose.yml"
# CI checks the repository out with ../shared beside it.
SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
DB = 2
APP_SERVICES = {"worker", "worker-storage-a", "beat", "flower"}


def load_compose() -> dict[str, Any]:
    """The compose file as YAML data (anchors and merge keys resolved, not interpolated)."""
    return dict(yaml.safe_load(COMPOSE.read_text()))


_VAR = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose-style interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}; defaults may hold one nested ${...}."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = variables.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-") and unset:
            return interpolate(arg, variables)
        if op in (":?", "?") and unset:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def test_interpolation_follows_compose() -> None:
    v = {"A": "1", "E": ""}
    assert interpolate("$A ${A} $$A ${B:-x} ${E:-y} ${E-z}", v) == "1 1 $A x y "
    assert interpolate("${B:-${A:-0}} ${B:-${C:-2}}", v) == "1 2"
    with pytest.raises(ValueError):
        interpolate("${B:?set B}", v)


def test_compose_file_matches_the_compose_spec() -> None:
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} not found (CI has ../shared beside the repository)")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    doc = load_compose()
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)

    services = doc["services"]
    assert {"redis", "minio", *APP_SERVICES} <= set(services)
    assert "127.0.0.1:5555:5555" in services["flower"]["ports"]
    # Scalable: no fixed container name or host port on the worker.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    mounts = {v.split(":")[-1] for v in services["worker"]["volumes"]}
    assert {"/data/checkpoints", "/data/archive"} <= mounts
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["CCARCHIVE_BROKER_URL"] == "redis://redis:6379/0", name
    storage = services["worker-storage-a"]["command"]
    assert storage[storage.index("-Q") + 1] == "storage-a"
    assert json.loads(services["worker"]["environment"]["CCARCHIVE_ROUTES"]) == {
        "fritz": "storage-a"
    }


def _host(checkpoints: Path, cluster: str, host: str, ts: int) -> Path:
    path = checkpoints / cluster / host / f"{ts}.json"
    values = np.arange(10, dtype=np.float64)
    write_checkpoint(path, Level({"cpu_load": Metric(60, ts, values)}), ts, ts + 600)
    return path


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_app_services_start_as_local_processes(
    redis_server: RedisInstance, processes: Processes, tmp_path: Path
) -> None:
    redis_server.client(DB).flushdb()
    # What a user would put in .env: a short interval so beat's first run comes soon.
    variables = {"CCARCHIVE_RETENTION": "1h", "CCARCHIVE_INTERVAL": "1s", "WORKER_CONCURRENCY": "1"}
    mounts = {
        "/data/checkpoints": tmp_path / "checkpoints",
        "/data/archive": tmp_path / "archive",
        "/data/staging": tmp_path / "staging",
        "/var/lib/ccarchive": tmp_path / "beat",
    }
    for d in mounts.values():
        d.mkdir()
    flower_port = free_port()

    def local(value: str) -> str:
        value = interpolate(str(value), variables)
        value = value.replace("redis://redis:6379/0", redis_server.url(DB))
        for target, local_dir in mounts.items():
            if value == target or value.startswith(target + "/"):
                value = str(local_dir) + value[len(target) :]
        return value

    old = int(time.time()) - 3 * 86400
    routed = _host(mounts["/data/checkpoints"], "fritz", "f0001", old)  # -> storage-a
    unrouted = _host(mounts["/data/checkpoints"], "alex", "a0001", old)  # -> celery

    doc = load_compose()
    started = {}
    for name in sorted(APP_SERVICES):
        service = doc["services"][name]
        assert "build" in service, f"{name} is not an app service"
        env = {k: local(v) for k, v in service["environment"].items()}
        if name == "flower":  # loopback only, on a free port
            env.update(FLOWER_ADDRESS="127.0.0.1", FLOWER_PORT=str(flower_port))
        argv = [local(a) for a in service["command"]]
        assert argv[0] == "celery"
        started[name] = processes.start(name, [CELERY, *argv[1:]], clean_env(**env), tmp_path)

    app = make_test_app(redis_server.url(DB))
    wait_for_workers(app, ["worker", "storage-a"], list(started.values()), timeout=60)
    app.close()

    beat = started["beat"]
    wait_until(lambda: "Sending due task ccarchive-run" in beat.output(), 30, "beat's first task")

    auth = interpolate(doc["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"], variables)
    user, password = auth.split(":", 1)

    def flower_up() -> bool:
        if not started["flower"].alive():
            pytest.fail(f"flower exited:\n{started['flower'].output()}")
        try:
            r = requests.get(
                f"http://127.0.0.1:{flower_port}/api/workers", auth=(user, password), timeout=2
            )
        except requests.ConnectionError:
            return False
        return r.status_code == 200

    wait_until(flower_up, 30, "Flower to answer HTTP", interval=0.2)

    # The wiring works end to end: beat's run archived both clusters, one host through the
    # storage-node queue, and deleted the archived checkpoints.
    archive = mounts["/data/archive"]
    wait_until(lambda: not routed.exists() and not unrouted.exists(), 30, "the beat run to finish")
    assert len(list((archive / "fritz").glob("*.parquet"))) == 1
    assert len(list((archive / "alex").glob("*.parquet"))) == 1
    storage_log = started["worker-storage-a"].output()
    assert names.LOAD_HOST in storage_log and "fritz" in storage_log
    # Beat fires every second, and on a loaded machine a run (queue check, recovery, load,
    # finalize and finish chords) takes longer than that: some run's staging directory is
    # always there while beat goes on. Once beat stops, every run removes its own.
    processes.stop(beat)
    wait_until(lambda: os.listdir(mounts["/data/staging"]) == [], 60, "staging to be removed")


def test_dockerfile_installs_dependencies_before_copying_the_code(tmp_path: Path) -> None:
    """The cached dependency layer the Dockerfile promises: the only file copied before
    the dependency install is pyproject.toml, and its one-line installer (as Docker joins
    the continued lines) names exactly the project's dependencies plus Flower."""
    import shutil
    import subprocess
    import sys
    import tomllib

    text = (ROOT / "Dockerfile").read_text().replace("\\\n", "")
    steps = [ln for ln in text.splitlines() if re.match(r"(COPY|RUN) ", ln)]
    deps_run = next(i for i, ln in enumerate(steps) if "tomllib" in ln)
    assert [ln for ln in steps[:deps_run] if ln.startswith("COPY")] == ["COPY pyproject.toml ./"]
    assert any(ln.startswith("COPY workers") for ln in steps[deps_run:])
    assert "RUN pip install --no-deps ." in steps[deps_run:]
    found = re.search(r'RUN python -c "(.*)"$', steps[deps_run])
    assert found is not None, steps[deps_run]
    code = found.group(1)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # The same code with pip replaced by printing its arguments.
    probe = code.replace("subprocess.check_call(", "print(")
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["flower"]]
    assert out.strip().endswith(repr(wanted)[1:]), out


def test_the_image_installs_every_package(tmp_path: Path) -> None:
    """`pip install .` in the image installs every package of workers/ and beat/
    (workers.distributed included): setuptools' package finder, configured as in
    pyproject.toml, over exactly what the Dockerfile copies finds all of them and nothing else."""
    import shutil
    import tomllib

    from setuptools import find_namespace_packages, find_packages

    text = (ROOT / "Dockerfile").read_text().replace("\\\n", "")
    copied = [ln.split()[1] for ln in text.splitlines() if ln.startswith("COPY ")]
    for source in copied:
        if (ROOT / source).is_dir():  # as Docker copies it, caches and all
            shutil.copytree(ROOT / source, tmp_path / source)
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    finder = find_namespace_packages if find["find"].get("namespaces", True) else find_packages
    found = set(finder(str(tmp_path), include=find["find"]["include"]))
    packages = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("workers", "beat")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert "workers.distributed" in packages
    assert found == packages

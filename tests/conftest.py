"""Shared pytest fixtures. Fixture modules per component are registered here."""

from __future__ import annotations

import pytest

from tests.helpers import drop_settings_env

pytest_plugins: list[str] = [
    "tests.fixtures_redis",
    "tests.distributed_harness",
    "tests.fixtures_s3",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stress",
        type=int,
        default=0,
        metavar="N",
        help="run N randomized fault trials per crash point (embedded) and per distributed fault",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "stress_trial" in metafunc.fixturenames:
        from workers.faults import POINTS

        trials = metafunc.config.getoption("stress") or 1
        params = [(point, 7919 * t + i) for i, point in enumerate(POINTS) for t in range(trials)]
        metafunc.parametrize("stress_trial", params, ids=[f"{p}-{s}" for p, s in params])
    if "mutation_trial" in metafunc.fixturenames:
        from tests.stress_mutations import KINDS

        trials = metafunc.config.getoption("stress") or 1
        mut = [(kind, 7919 * t + i) for i, kind in enumerate(KINDS) for t in range(trials)]
        metafunc.parametrize("mutation_trial", mut, ids=[f"{k}-{s}" for k, s in mut])
    if "distributed_trial" in metafunc.fixturenames:
        # Seconds each, with real Redis and workers: N per fault only with --stress N (the
        # deterministic tests of tests/test_faults_distributed.py cover every fault in CI).
        from tests.stress_distributed import FAULTS

        trials = metafunc.config.getoption("stress")
        dist = [(fault, 7919 * t + i) for i, fault in enumerate(FAULTS) for t in range(trials)]
        if not dist:  # CI: one seeded trial of the first fault, so the harness itself is run
            dist = [(FAULTS[0], 1)]
        metafunc.parametrize("distributed_trial", dist, ids=[f"{f}-{s}" for f, s in dist])


@pytest.fixture(autouse=True)
def _private_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run records and other local state go to a temporary $XDG_STATE_HOME, not ~/.local."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)  # systemd's wins over XDG's


@pytest.fixture
def clean_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process without any CCARCHIVE_*/FLOWER_* setting from outside (restored after
    the test); the monkeypatch, for the settings the test sets itself."""
    drop_settings_env(monkeypatch)
    return monkeypatch


#: Fixtures that start real infrastructure, and the marker a test using one must carry.
NEEDS_MARKER = {
    "redis_server": "distributed",
    "processes": "distributed",
    "celery_cluster": "distributed",
    "deployment": "distributed",
    "s3_deployment": "distributed",
    "moto_server": "s3",
    "s3_bucket": "s3",
    "s3_proxy": "s3",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that starts Redis, Celery or moto without the marker `make test-fast`
    deselects it by: it would make the fast run slow or need servers."""
    missing = []
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        fixtures = getattr(item, "fixturenames", ())
        wanted = {NEEDS_MARKER[f] for f in fixtures if f in NEEDS_MARKER} - marks
        if wanted:
            missing.append(f"{item.nodeid}: not marked {', '.join(sorted(wanted))}")
    if missing:
        raise pytest.UsageError("\n".join(["tests without their marker:", *missing]))

"""Storage-node routing: patterns -> queues, validation, and merging per-queue discoveries."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from workers.config import Settings
from workers.distributed.routing import Rule, check_queue, make_router, parse_routes, select_hosts

EXAMPLE = {"fritz": "storage-a", "alex/a0*": "storage-b", "*/gpu[0-9]*": "storage-c"}


def test_cluster_and_host_patterns_route_to_their_queue() -> None:
    r = make_router(EXAMPLE)
    assert r.queue_for("fritz", "f0001") == "storage-a"
    assert r.queue_for("fritz", "gpu1") == "storage-a"  # first match wins
    assert r.queue_for("alex", "a0123") == "storage-b"
    assert r.queue_for("alex", "a1123") == "celery"  # unmatched: default queue
    assert r.queue_for("woody", "gpu7") == "storage-c"
    assert r.queue_for("woody", "w0001") == "celery"


def test_globs_are_case_sensitive_and_anchored() -> None:
    r = make_router({"fritz": "a", "alex/a0*": "b"})
    assert r.queue_for("Fritz", "f1") == "celery"
    assert r.queue_for("fritz2", "f1") == "celery"
    assert r.queue_for("alex", "xa0") == "celery"


def test_rule_order_decides() -> None:
    specific_first = make_router({"alex/a0*": "b", "alex": "a"})
    general_first = make_router({"alex": "a", "alex/a0*": "b"})
    assert specific_first.queue_for("alex", "a01") == "b"
    assert general_first.queue_for("alex", "a01") == "a"


def test_queues_lists_default_first_without_duplicates() -> None:
    r = make_router({"a": "q1", "b": "q2", "c": "q1"}, default_queue="main")
    assert r.queues() == ["main", "q1", "q2"]
    assert r.finalize_queue == "main"
    assert make_router({}, "main", "fin").finalize_queue == "fin"


def test_parse_routes_keeps_order() -> None:
    assert parse_routes({"b/x*": "q1", "a": "q2"}) == [Rule("b", "x*", "q1"), Rule("a", "*", "q2")]


@pytest.mark.parametrize("pattern", ["", " ", "a/b/c", "/h", "c/", "a//b"])
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="route pattern"):
        parse_routes({pattern: "q"})


@pytest.mark.parametrize("queue", ["", "with space", "-lead", "a/b", "x" * 101, 7])
def test_bad_queue_names_are_refused(queue: Any) -> None:
    with pytest.raises(ValueError, match="queue name"):
        check_queue(queue)


def test_routes_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCARCHIVE_ROUTES", '{"fritz": "storage-a", "alex/a0*": "storage-b"}')
    monkeypatch.setenv("CCARCHIVE_FINALIZE_QUEUE", "finalize")
    s = Settings()
    assert list(s.routes.items()) == [("fritz", "storage-a"), ("alex/a0*", "storage-b")]
    r = make_router(s.routes, s.default_queue, s.finalize_queue)
    assert (r.queue_for("alex", "a01"), r.finalize_queue) == ("storage-b", "finalize")


@pytest.mark.parametrize(
    "value", ['{"a/b/c": "q"}', '{"a": "bad queue"}', '["a", "q"]', "not json"]
)
def test_invalid_routes_fail_at_startup(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CCARCHIVE_ROUTES", value)
    with pytest.raises((ValidationError, ValueError)):
        Settings()


def _disc(queue: str, clusters: dict[str, list[str]], bad: Any = ()) -> dict[str, Any]:
    return {
        "queue": queue,
        "clusters": [{"cluster": c, "hosts": h, "bad": list(bad)} for c, h in clusters.items()],
    }


def test_select_hosts_takes_each_host_from_its_own_queue() -> None:
    r = make_router({"alex": "storage-b"})
    # A shared file system: every queue sees everything; each host is taken once.
    shared = {"alex": ["a2", "a1"], "fritz": ["f1"]}
    got = select_hosts([_disc("celery", shared), _disc("storage-b", shared)], r)
    assert [(c.cluster, c.hosts) for c in got] == [
        ("alex", {"a1": "storage-b", "a2": "storage-b"}),
        ("fritz", {"f1": "celery"}),
    ]


def test_select_hosts_ignores_hosts_seen_by_the_wrong_node() -> None:
    r = make_router({"alex/a0*": "storage-b"})
    # Storage node B holds a0*; the default worker sees a1* and a stale copy of a01.
    got = select_hosts(
        [_disc("celery", {"alex": ["a01", "a11"]}), _disc("storage-b", {"alex": ["a02"]})], r
    )
    assert got[0].hosts == {"a02": "storage-b", "a11": "celery"}


def test_select_hosts_reports_bad_entries_once_and_keeps_empty_clusters() -> None:
    r = make_router({})
    bad = [{"path": "/cp/x/\x01", "reason": "control character"}]
    got = select_hosts([_disc("celery", {"x": []}, bad), _disc("other", {"x": []}, bad)], r)
    assert [(c.cluster, c.hosts, c.bad) for c in got] == [("x", {}, bad)]


def test_host_order_is_utf8_byte_order() -> None:
    r = make_router({})
    got = select_hosts([_disc("celery", {"c": ["é1", "z1", "Z1", "a1"]})], r)
    assert list(got[0].hosts) == ["Z1", "a1", "z1", "é1"]

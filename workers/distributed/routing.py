"""Storage-node routing: which Celery queue runs the per-host tasks (load, delete) of a host.

Configuration (`CCARCHIVE_ROUTES`, a JSON object) maps patterns to queue names:

    {"fritz": "storage-a", "alex/a0*": "storage-b", "*/gpu*": "storage-c"}

- `CLUSTER` matches every host of the clusters the glob `CLUSTER` matches;
- `CLUSTER/HOST` matches the hosts the glob `HOST` matches in the clusters `CLUSTER` matches.

Globs are `fnmatch` patterns (`*`, `?`, `[...]`), case-sensitive. Rules are tried in the
order written and the first match wins, so put specific patterns before general ones.
Hosts that match nothing go to the default queue.

Discovery follows the same routes: every queue lists the checkpoint tree it can see, and a
host is taken only from the listing of the queue it is routed to (see `select_hosts`).
That way a storage node that holds some hosts' files, and a shared file system that every
worker sees, are handled alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

#: Queue names become Redis keys and `-Q` arguments: keep them boring.
_QUEUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")


def check_queue(name: str) -> str:
    """Return `name` if it is a usable queue name, else raise ValueError."""
    if not isinstance(name, str) or not _QUEUE_RE.fullmatch(name):
        raise ValueError(
            f"invalid queue name {name!r}: use letters, digits, '.', '_', ':' and '-' "
            "(at most 100 characters, starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Rule:
    """One route: hosts matching (cluster glob, host glob) go to `queue`."""

    cluster: str
    host: str  # "*" for a cluster-only pattern
    queue: str

    def matches(self, cluster: str, host: str) -> bool:
        """True if this rule routes `cluster`/`host`."""
        return fnmatchcase(cluster, self.cluster) and fnmatchcase(host, self.host)


def parse_routes(routes: Mapping[str, str]) -> list[Rule]:
    """Validate a pattern -> queue mapping and return its rules in order; ValueError if bad."""
    if not isinstance(routes, Mapping):
        raise ValueError("routes must be a JSON object mapping patterns to queue names")
    rules: list[Rule] = []
    for pattern, queue in routes.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"invalid route pattern {pattern!r}")
        parts = pattern.split("/")
        if len(parts) > 2 or any(not p for p in parts):
            raise ValueError(
                f"invalid route pattern {pattern!r}: use CLUSTER or CLUSTER/HOST (globs allowed)"
            )
        rules.append(Rule(parts[0], parts[1] if len(parts) == 2 else "*", check_queue(queue)))
    return rules


@dataclass(frozen=True)
class Router:
    """Routes hosts to queues; built once per process from the settings."""

    rules: tuple[Rule, ...] = ()
    default_queue: str = "celery"
    finalize_queue: str = "celery"

    def queue_for(self, cluster: str, host: str) -> str:
        """The queue that runs this host's load and delete tasks."""
        for rule in self.rules:
            if rule.matches(cluster, host):
                return rule.queue
        return self.default_queue

    def queues(self) -> list[str]:
        """Every queue that can receive per-host tasks: the default one first, then the routes'."""
        out = [self.default_queue]
        for rule in self.rules:
            if rule.queue not in out:
                out.append(rule.queue)
        return out


def make_router(
    routes: Mapping[str, str] | None = None,
    default_queue: str = "celery",
    finalize_queue: str | None = None,
) -> Router:
    """A Router from the configuration values (finalize defaults to the default queue)."""
    return Router(
        tuple(parse_routes(routes or {})),
        check_queue(default_queue),
        check_queue(finalize_queue or default_queue),
    )


@dataclass
class ClusterHosts:
    """A cluster's hosts as taken from the discoveries, with the queue of each host."""

    cluster: str
    hosts: dict[str, str] = field(default_factory=dict)  # host -> queue, in host order
    bad: list[dict[str, str]] = field(default_factory=list)  # BadFile dicts


def select_hosts(discoveries: Iterable[Mapping[str, Any]], router: Router) -> list[ClusterHosts]:
    """Merge per-queue discoveries: a host counts only if its own queue's listing has it.

    Each discovery is `{"queue": q, "clusters": [{"cluster", "hosts", "bad"}]}`. A cluster
    seen by any queue is reported (even with no hosts); bad entries are reported once.
    """
    clusters: dict[str, ClusterHosts] = {}
    seen_bad: set[tuple[str, str]] = set()
    for disc in discoveries:
        queue = disc["queue"]
        for entry in disc.get("clusters", []):
            name = entry["cluster"]
            ch = clusters.setdefault(name, ClusterHosts(name))
            for host in entry.get("hosts", []):
                if router.queue_for(name, host) == queue:
                    ch.hosts[host] = queue
            for bad in entry.get("bad", []):
                key = (bad["path"], bad["reason"])
                if key not in seen_bad:
                    seen_bad.add(key)
                    ch.bad.append({"path": bad["path"], "reason": bad["reason"]})
    out = []
    for name in sorted(clusters):
        ch = clusters[name]
        # Code point order = UTF-8 byte order: the archive's host order.
        ch.hosts = {h: ch.hosts[h] for h in sorted(ch.hosts)}
        out.append(ch)
    return out


__all__ = [
    "ClusterHosts",
    "Router",
    "Rule",
    "check_queue",
    "make_router",
    "parse_routes",
    "select_hosts",
]

"""The layout's rules, checked on the source: imports point down the layers, never in a
circle, and no module reaches for another module's private (`_name`) parts.

Layers, lowest first (a module may import its own layer and the ones below):

  records   manifest, faults, alloc, logs, reporting
  names     storage (URLs), paths (every name and path rule)
  formats   checkpoint, rows, output, chunks, staging, sink, sourcefiles, roots, locks,
            config, routing (also as distributed.routing)
  steps     steps, recovery, runlog, status, inspection, query, dryrun, generate, metrics
  shown     usage, display (what the CLI and the `--broker` client both show)
  drivers   runner, tasks, pipeline, celery, remote, distributed/ (the rest of it)
  cli       cli, cli_parser, cmd_archive, cmd_ops, cmd_generate, demo

Deferred (function-level) imports count like any other; imports under `TYPE_CHECKING` do
not (they never run). A module missing from the table fails the test: place it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "workers"

LAYERS: list[tuple[str, set[str]]] = [
    ("records", {"__init__", "manifest", "faults", "alloc", "logs", "reporting"}),
    ("names", {"storage", "paths"}),
    (
        "formats",
        {
            "checkpoint",
            "rows",
            "output",
            "chunks",
            "staging",
            "sink",
            "sourcefiles",
            "roots",
            "locks",
            "config",
            "routing",
            "distributed.routing",  # pure parsing; config reads it (once moved there)
        },
    ),
    (
        "steps",
        {
            "steps",
            "recovery",
            "runlog",
            "status",
            "inspection",
            "query",
            "dryrun",
            "generate",
            "metrics",
        },
    ),
    ("shown", {"usage", "display"}),
    ("drivers", {"runner", "tasks", "pipeline", "celery", "remote", "distributed"}),
    ("cli", {"cli", "cli_parser", "cmd_archive", "cmd_ops", "cmd_generate", "demo"}),
]
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


@dataclass(frozen=True)
class Edge:
    """One import of a workers module by another: where it is and what it takes."""

    source: str  # module key (`steps`, `distributed` for anything in workers/distributed/)
    target: str
    line: int
    names: tuple[str, ...]  # the names taken by `from X import a, b`; () for `import X`


def _key(parts: list[str]) -> str:
    """The table's key of a module inside workers: `steps`, `distributed.app`, `__init__`."""
    return ".".join(parts) if parts else "__init__"


def rank(key: str) -> int | None:
    """The layer of a module: its own entry, else its subpackage's (`distributed`)."""
    return RANK.get(key, RANK.get(key.split(".")[0]))


def _module_parts(path: Path) -> list[str]:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that can run: anywhere in the module, but not under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    walk(sub)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            walk(child)

    walk(tree)
    return found


def _resolve(base: list[str], names: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """What `from workers.<base> import names` reaches: the module base, or (base being a
    package) the submodules among names and the package itself for the other names."""
    directory = PACKAGE.joinpath(*base)
    if base and not directory.is_dir():
        return [(_key(base), names)]
    modules = [n for n in names if (directory / f"{n}.py").exists() or (directory / n).is_dir()]
    rest = tuple(n for n in names if n not in modules)
    found = [(_key([*base, m]), ()) for m in modules]
    return found + ([(_key(base), rest)] if rest else [])


def _targets(node: ast.Import | ast.ImportFrom, here: list[str]) -> list[tuple[str, tuple]]:
    """(workers module key, names taken) for each workers module this import reaches;
    `here` is the importing module's path inside workers (`["distributed", "app"]`)."""
    if isinstance(node, ast.Import):
        return [
            (_key(a.name.split(".")[1:]), ())
            for a in node.names
            if a.name.split(".")[0] == "workers"
        ]
    names = tuple(a.name for a in node.names)
    if node.level == 0:
        parts = (node.module or "").split(".")
        return _resolve(parts[1:], names) if parts[0] == "workers" else []
    # `from . import x` inside workers/a/b.py: level 1 is workers/a, level 2 is workers.
    package = here[:-1]
    base = package[: len(package) - (node.level - 1)]
    return _resolve(base + (node.module.split(".") if node.module else []), names)


def _graph() -> list[Edge]:
    edges: list[Edge] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_parts(path)
        init = path.name == "__init__.py"  # its relative imports start at its own package
        source = _key(here)
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree):
            for target, names in _targets(node, [*here, "__init__"] if init else here):
                if target != source:
                    edges.append(Edge(source, target, node.lineno, names))
    return edges


EDGES = _graph()


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in the table, so its imports are checked too."""
    modules = {_key(_module_parts(p)) for p in PACKAGE.rglob("*.py")}
    assert sorted(m for m in modules if rank(m) is None) == []


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{e.source} ({LAYERS[rank(e.source) or 0][0]}) imports {e.target} "
        f"({LAYERS[rank(e.target) or 0][0]}) at line {e.line}"
        for e in EDGES
        if (rank(e.target) or 0) > (rank(e.source) or 0)
    ]
    assert upward == []


def test_no_private_names_across_modules() -> None:
    taken = [
        f"{e.source} imports {name} from {e.target} (line {e.line})"
        for e in EDGES
        for name in e.names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]
    assert taken == []


def test_no_private_attributes_of_other_modules() -> None:
    """`module._name` on an imported workers module is a private import by another road."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        bound = {
            (a.asname or a.name)
            for node in _imports(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None
            for a in node.names
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        graph.setdefault(e.source, set()).add(e.target)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from .cli import _cutoff\n", "private"),
        ("from . import cli\n", "upward"),
    ],
)
def test_the_checks_catch_what_they_are_for(source: str, bad: str) -> None:
    """A private import and an upward import in a low module are found (the checks can fail)."""
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ImportFrom)
    (target, names), *_ = _targets(node, ["paths"])
    assert target == "cli"
    if bad == "private":
        assert any(n.startswith("_") for n in names)
    else:
        assert (rank(target) or 0) > (rank("paths") or 0)


def test_relative_imports_resolve_inside_subpackages() -> None:
    """`from ..config import X` in workers/distributed/app.py is workers.config."""
    node = ast.parse("from ..config import Settings\n").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _targets(node, ["distributed", "app"]) == [("config", ("Settings",))]

"""The package's import graph, read from the source with ``ast``: no cycles (function-level imports included),
library code never imports the package face ``cnnapps``, and the engine never imports a task."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "cnnapps"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (module level or inside functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # an imported name inside a module means the module
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 50  # the walk saw the package
    assert cycles(graph) == []


def test_library_code_never_imports_the_package_face():
    face = [name for name, deps in import_graph().items() if "cnnapps" in deps and name != "cnnapps"]
    assert face == []


def test_the_engine_knows_no_task():
    graph = import_graph()
    engine = {name: deps for name, deps in graph.items() if name.startswith("cnnapps.engine")}
    leaks = {name: sorted(d for d in deps if d.startswith("cnnapps.tasks")) for name, deps in engine.items()}
    assert {k: v for k, v in leaks.items() if v} == {}


@pytest.mark.parametrize("room", ["cnnapps.bench", "cnnapps.understand"])
def test_bench_and_understand_reach_tasks_only_through_the_registry(room):
    """Task-specific measurements and explanations come through Task hooks, so a third-party task is benchmarked
    and explained the same way: these packages import the registry (cnnapps.tasks), never a task's module."""
    graph = import_graph()
    leaks = {name: sorted(d for d in deps if d.startswith("cnnapps.tasks."))
             for name, deps in graph.items() if name.startswith(room)}
    assert {k: v for k, v in leaks.items() if v} == {}

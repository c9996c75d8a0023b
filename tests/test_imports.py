"""Imports flow one way, as the data does; the serving path never reaches torch.

Read from the source (every ``import``, also inside functions), so a lazy import cannot hide a
cycle that a later refactor turns into a real one.
"""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "src" / "extendserve"
HEAVY = {"torch"}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules and heavy third-party packages it imports."""
    graph: dict[str, set[str]] = {}
    files = {p.stem: p for p in PACKAGE.glob("*.py")} | {"service": ROOT / "service" / "service.py",
                                                         "edge": ROOT / "service" / "edge.py",
                                                         "schema": ROOT / "service" / "schema.py"}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith("extendserve."):
                    deps.add(node.module.split(".")[1])
                elif node.module and node.module.split(".")[0] in HEAVY:
                    deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                for a in node.names:
                    top = a.name.split(".")[0]
                    if top in HEAVY:
                        deps.add(top)
                    elif a.name.startswith("extendserve."):
                        deps.add(a.name.split(".")[1])
        graph[name] = {d for d in deps if d in files or d in HEAVY} - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_serving_path_never_reaches_torch() -> None:
    graph = import_graph()
    for module in ("runtime", "preprocess", "served", "settings", "batching", "evaluate", "registry", "service", "edge",
                   "schema"):
        assert "torch" not in reachable(graph, module), (module, sorted(reachable(graph, module)))


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

"""Imports flow one way, as the data does; the serving path never reaches torch.

Read from the source (every ``import``, also inside functions), so a lazy import cannot hide a
cycle that a later refactor turns into a real one.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "extendserve"
HEAVY = {"torch"}
# The stages, in the order the data flows: a module imports its own stage or earlier ones, never later.
STAGES = ["<utilities>", "photos", "bases", "heads", "training", "building", "serving", "evaluation", "cli", "api",
          "service"]


def stage(module: str) -> int:
    if module.startswith("service."):
        return STAGES.index("service")
    if "." in module:
        return STAGES.index(module.split(".")[0])
    return STAGES.index("api") if module == "api" else 0


def _modules() -> dict[str, Path]:
    files = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")
             if p.name not in ("__init__.py", "__main__.py")}
    return files | {f"service.{p.stem}": p for p in (ROOT / "service").glob("*.py") if p.name != "__init__.py"}


def _resolve(here: str, level: int, module: str | None, names: list[str], files: dict[str, Path]) -> set[str]:
    """The package modules an import statement in ``here`` names."""
    if here.startswith("service."):
        base_parts = ["service"]
    else:
        base_parts = here.split(".")[:-1]
    if level:
        base_parts = base_parts[: len(base_parts) - (level - 1)] if level > 1 else base_parts
        prefix = ".".join([*base_parts, *(module.split(".") if module else [])])
    else:
        prefix = module.removeprefix("extendserve.") if module and module.startswith("extendserve.") else None
    if prefix is None:
        return set()
    out = {prefix} if prefix in files else set()
    out |= {f"{prefix}.{n}".lstrip(".") for n in names if f"{prefix}.{n}".lstrip(".") in files}
    return out


def import_graph() -> dict[str, set[str]]:
    """module (dotted, under extendserve; service.* for the service) -> the package modules and
    heavy third-party packages it imports."""
    files = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.module and node.module.split(".")[0] in HEAVY:
                    deps.add(node.module.split(".")[0])
                else:
                    deps |= _resolve(name, node.level, node.module, [a.name for a in node.names], files)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in HEAVY:
                        deps.add(a.name.split(".")[0])
                    else:
                        deps |= _resolve(name, 0, a.name, [], files)
        graph[name] = deps - {name}
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
    serving = [m for m in graph if m.split(".")[0] in ("serving", "evaluation", "photos", "service")]
    assert len(serving) >= 10
    for module in [*serving, "bases.registry", "sessions", "engines"]:
        assert "torch" not in reachable(graph, module), (module, sorted(reachable(graph, module)))


def test_imports_flow_one_way_by_stage() -> None:
    """photos -> bases -> heads -> training -> building -> serving -> evaluation -> cli -> api -> service:
    no module imports a later stage than its own."""
    graph = import_graph()
    climbs = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if d not in HEAVY and stage(d) > stage(m))
    assert climbs == []
    assert len({m.split(".")[0] for m in graph if "." in m and not m.startswith("service.")}) >= 4
    top = [p for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, sorted(p.name for p in top)


def test_the_graph_sees_relative_and_absolute_imports() -> None:
    graph = import_graph()
    assert "heads.head" in graph["training.train"] and "torch" in graph["training.train"]
    assert "serving.runtime" in graph["service.service"] and "errors" in graph["heads.head"]


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

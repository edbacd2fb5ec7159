"""The package's imports run one way (data -> model -> train -> evaluate -> track -> serve):
no module imports, directly or through others, a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wpcrack"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (function-level imports too)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(f"{t}.")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"wpcrack.deploy.predict", "wpcrack.deploy.serving", "wpcrack.deploy.detection"} <= set(graph)
    assert cycles(graph) == []
    assert not graph["wpcrack.deploy.detection"] & {"wpcrack.deploy.predict", "wpcrack.deploy.serving", "wpcrack.tracking.runs"}


def test_inference_is_a_layer_that_evaluate_and_deploy_use_from_above():
    """Tiled inference sits below evaluate and deploy: deploy never climbs into evaluate, and the
    inference layer knows neither of them."""
    graph = import_graph(PACKAGE)
    inference = {m for m in graph if m.startswith("wpcrack.inference")}
    assert {"wpcrack.inference.loading", "wpcrack.inference.tiles"} <= inference
    for module in inference:
        assert not {t for t in graph[module] if t.startswith(("wpcrack.evaluate", "wpcrack.deploy"))}, module
    for module in (m for m in graph if m.startswith("wpcrack.deploy")):
        assert not {t for t in graph[module] if t.startswith("wpcrack.evaluate")}, module
    assert "wpcrack.inference.tiles" in graph["wpcrack.deploy.detection"]
    assert "wpcrack.inference.tiles" in graph["wpcrack.evaluate.protocol"]

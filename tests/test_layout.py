"""The package's shape: no import cycles, small modules, dependencies pointing one way.

Imports are read from the source (every ``import`` statement, inside functions and
``TYPE_CHECKING`` blocks too), so a cycle hidden behind a lazy import fails here as well.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"moco_compile": ROOT / "moco_compile", "moco_compile.passes": ROOT / "passes",
                "moco_compile.runtime": ROOT / "runtime"}
MAX_MODULE_LINES = 600
PLANNER = ("moco_compile.passes.planning.planner", "moco_compile.passes.planning.design",
           "moco_compile.passes.planning.certify", "moco_compile.passes.planning.candidates",
           "moco_compile.passes.planning.pipeline")


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "moco_compile" and parts and parts[0] in ("passes", "runtime"):
                continue  # the installed names of passes/ and runtime/ (gpu_check.sh links them there)
            modules[".".join((package, *parts))] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The moco modules ``name`` imports anywhere in its source (``from a import b``: ``a.b``
    when ``b`` is a module, else ``a``)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_module_scan_sees_the_pipeline():
    assert {"moco_compile.api", "moco_compile.passes.graph.rewrite", "moco_compile.runtime.session"} <= set(GRAPH)
    assert "moco_compile.passes.graph.rewrite" in GRAPH["moco_compile.api"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_the_line_limit(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines; split it by job"


def test_passes_import_neither_runtime_nor_front_end():
    for name, targets in GRAPH.items():
        if name.startswith("moco_compile.passes"):
            outside = {t for t in targets if not t.startswith("moco_compile.passes")}
            assert outside <= {"moco_compile.errors", "moco_compile.constants", "moco_compile.frame",
                               "moco_compile.outputs", "moco_compile.moe.frame"}, (name, outside)


def test_runtime_never_imports_a_pass():
    for name, targets in GRAPH.items():
        if name.startswith("moco_compile.runtime"):
            assert not any(t.startswith("moco_compile.passes") for t in targets), name


def test_the_rewrite_does_not_pull_in_the_planner():
    reached = _reachable("moco_compile.passes.graph.rewrite")
    assert not reached & set(PLANNER), sorted(reached & set(PLANNER))

"""The package's import graph: no circles, and nothing below the CLI imports the root facade.

Every ``import`` counts, also the ones deferred into a function body (a lazy import
hides a circle from the interpreter, not from a reader); only imports under
``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
#: May import ``gradmedic`` itself: what sits above the facade and uses it as a user would
#: (the command line, the entry point, the lab's experiments).
TOP = ("gradmedic.cli", "gradmedic.__main__", "gradmedic.lab.experiments")


def module_names() -> dict[str, Path]:
    names = {}
    for path in (SRC / "gradmedic").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every name an ``import`` statement of ``module`` may bind, resolved to absolute form."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    names = module_names()
    graph = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = imported(tree, name, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in names and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_relative_imports_resolve_to_absolute_names() -> None:
    tree = ast.parse("from . import x\nfrom ..probes import base\nimport torch\n")
    assert imported(tree, "gradmedic.diagnose.gain", False) == {
        "gradmedic.diagnose",
        "gradmedic.diagnose.x",
        "gradmedic.probes",
        "gradmedic.probes.base",
        "torch",
    }


def test_imports_under_type_checking_do_not_count() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gradmedic.monitor\n"
    tree = ast.parse(source)
    assert "gradmedic.monitor" not in imported(tree, "gradmedic.findings", False)


def test_no_import_cycle_in_gradmedic() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_only_the_top_imports_the_facade(module: str) -> None:
    if module == "gradmedic" or module.startswith(TOP):
        return
    assert "gradmedic" not in import_graph()[module], (
        f"{module} imports the root package; import the module that defines the name instead"
    )

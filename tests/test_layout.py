"""The package's shape: lower layers import nothing from higher ones (no import cycle, counting
imports inside functions), the I/O module is a leaf, and test modules share helpers through
conftest.py and helpers.py only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fmnist"


def imported_modules(path: Path, package: str = "fmnist") -> set[str]:
    """The fmnist modules a file imports anywhere in it (function bodies included)."""
    modules = {f"fmnist.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {n for n in names if n in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    return {f"fmnist.{p.stem}": imported_modules(p) - {f"fmnist.{p.stem}"}
            for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    assert find_cycle(import_graph()) is None


def test_the_io_module_is_a_leaf():
    assert import_graph()["fmnist.io"] == set()


def test_test_modules_do_not_import_each_other():
    tests = Path(__file__).parent
    own = {p.stem for p in tests.glob("*.py")} - {"helpers"}
    for path in tests.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in own, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & own, f"{path.name} imports a test module"

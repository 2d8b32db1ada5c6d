"""The package's shape: each module sits in a layer and imports only from its own layer or lower
ones (imports inside functions counted), there is no import cycle, the I/O module is a leaf,
the service loads no plotting stack, no module is over 500 lines, and test modules share helpers
through conftest.py and helpers.py only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fmnist"

# Lowest first. A module belongs to the last entry its name starts with; it may import modules of
# its own layer or of layers above it in this list, never of those below.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("fmnist", "fmnist.io", "fmnist.presets", "fmnist.config", "fmnist.device", "fmnist.distributed")),
    ("data", ("fmnist.data",)),
    ("models", ("fmnist.models",)),
    ("run folder", ("fmnist.run",)),
    ("inference", ("fmnist.inference",)),
    ("evaluation and pictures", ("fmnist.evaluate", "fmnist.plots", "fmnist.export", "fmnist.explain")),
    ("training", ("fmnist.training",)),
    ("the ladder", ("fmnist.report",)),
    ("entry points", ("fmnist.serve", "fmnist.cli", "fmnist.__main__", "fmnist.predict", "fmnist.train")),
)
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index in LAYERS of the layer a module belongs to."""
    found = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or (prefix != "fmnist" and module.startswith(prefix + "."))]
    assert found, f"{module} is in no layer of tests/test_layout.py's LAYERS: add it to one"
    return max(found)[1]


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The fmnist modules a file imports anywhere in it (function bodies included); `from
    fmnist.data import load_split` counts as fmnist.data, `from fmnist.data import splits` as
    fmnist.data.splits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(path, set(found)) - {name} for name, path in found.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'fmnist.data.splits (data) imports fmnist.run (run folder)' for each import of a higher layer."""
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
            for m, targets in sorted(graph.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
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


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_layer_imports_a_higher_one():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_upward_import(tmp_path):
    """The check itself: a data module importing the training loop is reported."""
    bad = tmp_path / "splits.py"
    bad.write_text("def f():\n    from fmnist.training.loop import train\n")
    graph = import_graph()
    graph["fmnist.data.splits"] = imported_modules(bad, set(modules()))
    assert upward_imports(graph) == ["fmnist.data.splits (data) imports fmnist.training.loop (training)"]


def test_the_io_module_is_a_leaf():
    assert import_graph()["fmnist.io"] <= {"fmnist"}  # FmnistError only


def test_nothing_inside_the_package_imports_the_compatibility_modules():
    """fmnist.predict and fmnist.train only keep the documented names working."""
    graph = import_graph()
    assert [m for m, targets in graph.items() if targets & {"fmnist.predict", "fmnist.train"}] == []


def test_no_module_is_over_the_line_limit():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_service_loads_no_plotting_stack():
    pytest.importorskip("fastapi")
    code = "import sys, fmnist.serve; print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_documented_names_still_import():
    from fmnist.data import CLASS_NAMES, load_split, one_hot  # noqa: F401
    from fmnist.evaluate import evaluate_run  # noqa: F401
    from fmnist.explain import attribute  # noqa: F401
    from fmnist.predict import load_model
    from fmnist.run import RunDir  # noqa: F401
    from fmnist.train import train
    from fmnist.training import train as training_train

    assert train is training_train and load_model.__module__ == "fmnist.inference.predictor"


def test_test_modules_do_not_import_each_other():
    tests = Path(__file__).parent
    own = {p.stem for p in tests.glob("*.py")} - {"helpers"}
    for path in tests.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in own, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & own, f"{path.name} imports a test module"

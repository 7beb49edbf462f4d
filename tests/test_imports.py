"""The package's import graph has no cycles, and every module imports.

Every ``import`` counts, at the top of a module, inside a function or under ``TYPE_CHECKING``:
each is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "dualign"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a.b import c`` depends on a.b.c if that is a
    module, else on a.b)."""
    def owner(name: str) -> str:
        while name not in MODULES:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in MODULES.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {owner(n) for n in names if n.split(".")[0] == "dualign"}
        graph[module] = deps - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (each as the path that closes it)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycles_outside_the_world():
    assert [c for c in _cycles(_graph()) if not all(m.startswith("dualign.world") for m in c)] == []


def test_world_import_graph_has_no_cycles():
    assert [c for c in _cycles(_graph()) if all(m.startswith("dualign.world") for m in c)] == []


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"dualign.__main__"}))  # that one runs the CLI
def test_every_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_opens_with_a_docstring_saying_what_it_holds(module):
    doc = ast.get_docstring(ast.parse(MODULES[module].read_text()))
    assert doc and len(doc.split()) >= 5, module


# The floors, lowest first: a module may import its own floor and those below, never one above.
# The stages sit at the package root (the dual stage in dual/stage.py); everything they share is
# below them, whatever runs them above.
FLOORS = [
    ("infrastructure", {"dualign._infra"}),
    ("data formats and models", {"dualign.data", "dualign.modeling"}),
    ("the dual's math and the built-in world", {"dualign.dual", "dualign.world"}),
    ("losses and pairs", {"dualign.methods"}),
    ("the stages", {"dualign.sample", "dualign.score", "dualign.dual.stage", "dualign.dual.__init__", "dualign.train",
                    "dualign.evaluate", "dualign.recalibrate", "dualign.plan", "dualign.prealign",
                    "dualign.pilot"}),
    ("the baselines", {"dualign.baselines"}),
    ("the comparison and the pipeline", {"dualign.compare", "dualign.pipeline"}),
    ("the command line and the public API", {"dualign.cli", "dualign.__main__", "dualign.__init__"}),
]


def floor_of(module: str) -> int:
    """The floor of a module: the most specific FLOORS entry naming it or a package above it
    (a package's ``__init__`` by ``NAME.__init__``)."""
    path = MODULES[module].relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(path)
    best = None
    for i, (_, members) in enumerate(FLOORS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and (best is None or len(m) > len(best[1])):
                best = (i, m)
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({FLOORS[floor_of(m)][0]}) imports {d} ({FLOORS[floor_of(d)][0]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if floor_of(d) > floor_of(m)]


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor_of(module)


def test_imports_flow_down_the_floors_never_up():
    assert upward_imports(_graph()) == []


def test_an_upward_import_is_caught():
    graph = {m: set() for m in MODULES}
    graph["dualign.methods.mocan"] = {"dualign.train"}  # the losses importing the loop
    graph["dualign._infra.io"] = {"dualign.modeling.models"}
    assert upward_imports(graph) == [
        "dualign._infra.io (infrastructure) imports dualign.modeling.models (data formats and models)",
        "dualign.methods.mocan (losses and pairs) imports dualign.train (the stages)"]


def test_the_package_root_holds_only_the_stages_the_pipeline_and_the_cli():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == {"__init__", "__main__", "cli", "pipeline", "sample", "score", "train", "evaluate",
                    "recalibrate", "plan", "prealign", "pilot"}


def test_the_evaluate_stage_imports_no_other_stage():
    assert not _graph()["dualign.evaluate"] & {"dualign.sample", "dualign.score", "dualign.train"}

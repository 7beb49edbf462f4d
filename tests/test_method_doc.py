"""docs/method.md puts each equation beside its function and test: every `dualign.x.y` it names
resolves to an object, and every `tests/test_x.py::test_name` to a test function."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "method.md").read_text()


def _resolve(dotted: str) -> object:
    """The object at ``dualign.a.b.c``: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_function_named_in_method_md_exists():
    names = set(re.findall(r"`(dualign(?:\.\w+)+)`", DOC))
    assert len(names) >= 30
    for dotted in sorted(names):
        assert callable(_resolve(dotted)), dotted


def test_every_test_named_in_method_md_exists():
    refs = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", DOC))
    assert len(refs) >= 30
    for path, name in sorted(refs):
        tree = ast.parse((ROOT / path).read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert name in defined, f"{path}::{name}"


def test_every_equation_row_names_a_function_and_a_test():
    rows = [line for line in DOC.splitlines() if line.startswith("| ") and not line.startswith("| equation")]
    rows = [r for r in rows if not set(r) <= set("|- ")]
    assert rows and all(re.search(r"`dualign\.", r) and re.search(r"`tests/test_\w+\.py::", r) for r in rows)

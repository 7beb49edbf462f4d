"""A stage's config dataclass read from its module's source, for the command line's flags.

``dualign sample --help`` needs :class:`~dualign.sample.SampleConfig`'s fields (name, type, help
text), not what ``dualign/sample.py`` imports to run the stage. Each stage's config stays beside
the code that runs it (as TRL keeps a trainer's config beside the trainer), and those modules
import torch, pandas and the Hub client at the top: importing one to read its config makes a
help or a mistyped flag wait for torch, many times the parser's own work (``bench/cli_help.py``
times every command's help). So the parser reads the config's field declarations with :mod:`ast`
instead of importing the module:

    num_samples: int = field(default=4, metadata={"help": "K: responses per prompt"})

becomes a field ``num_samples: int`` with that help, on a stand-in dataclass of the same name and
fields (its defaults and ``__post_init__`` checks are not needed for flags, and the stage command
validates with the real class). Base classes and nested config types are read the same way, from
the module that defines or imports them. A declaration this reader cannot evaluate (a type or a
help text that is not a literal) makes it import the module instead: the same flags, slower.
``tests/test_cli_help.py`` holds both ways equal for every command.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import importlib
import typing
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # src/, above the dualign package


class _Unreadable(Exception):
    """A declaration that is not plain enough to read without running the module."""


def config_class(module: str, name: str) -> type:
    """``module.name`` (a dataclass) as read from the source; imported when the source is not plain."""
    try:
        return _read_class(module, name)
    except _Unreadable:
        return getattr(importlib.import_module(module), name)


def source_constant(module: str, name: str) -> Any:
    """The literal value of a module-level constant (``STAGES = ("sample", ...)``); imported when
    it is not a literal."""
    for node in _tree(module).body:
        target = node.target if isinstance(node, ast.AnnAssign) else \
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id == name and node.value is not None:
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                break
    return getattr(importlib.import_module(module), name)


def config_classes(module: str, name: str) -> dict[str, type]:
    """A module-level dict of names to config classes (``CONFIGS = {"dual-ascent": DualAscentConfig,
    ...}``), each read as :func:`config_class` does; imported when it is not that plain."""
    for node in _tree(module).body:
        target = node.target if isinstance(node, ast.AnnAssign) else \
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Dict):
            try:
                return {ast.literal_eval(k): config_class(module, v.id)
                        for k, v in zip(node.value.keys, node.value.values, strict=True)}
            except (ValueError, AttributeError):
                break
    return getattr(importlib.import_module(module), name)


@functools.cache
def _tree(module: str) -> ast.Module:
    if module.split(".")[0] != "dualign":
        raise _Unreadable(module)
    path = PACKAGE_ROOT.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if not path.is_file():
        raise _Unreadable(module)
    return ast.parse(path.read_text(encoding="utf-8"))


@functools.cache
def _read_class(module: str, name: str) -> type:
    tree = _tree(module)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None:
        owner = _importer(tree, name)
        if owner is None:
            raise _Unreadable(f"{module}.{name}")
        return _read_class(owner, name)
    bases = tuple(_resolve(module, tree, b) for b in node.bases)
    fields = []
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        tp = _evaluate_type(module, tree, stmt.annotation)
        if typing.get_origin(tp) is typing.ClassVar:
            continue
        fields.append((stmt.target.id, tp, dataclasses.field(default=None, metadata=_metadata(stmt.value))))
    cls = dataclasses.make_dataclass(name, fields, bases=bases)
    cls.__module__ = module
    return cls


def _importer(tree: ast.Module, name: str) -> str | None:
    """The module a ``from dualign.x import name`` at the top of ``tree`` takes ``name`` from."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and any((a.asname or a.name) == name for a in node.names):
            return node.module
    return None


def _metadata(value: ast.expr | None) -> dict[str, Any]:
    """The ``metadata={...}`` of ``field(...)``, as a literal."""
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
        for kw in value.keywords:
            if kw.arg == "metadata":
                try:
                    return ast.literal_eval(kw.value)
                except ValueError:
                    raise _Unreadable(ast.unparse(kw.value)) from None
    return {}


def _resolve(module: str, tree: ast.Module, node: ast.expr) -> type:
    """A base class or a type named in an annotation: a builtin, a typing name, or a dataclass
    defined or imported by ``module`` (read the same way)."""
    if not isinstance(node, ast.Name):
        raise _Unreadable(ast.unparse(node))
    if hasattr(builtins, node.id):
        return getattr(builtins, node.id)
    if _importer(tree, node.id) == "typing":
        return getattr(typing, node.id)
    return _read_class(module, node.id)


def _evaluate_type(module: str, tree: ast.Module, node: ast.expr) -> Any:
    """An annotation (``str | None``, ``Literal["a", "b"]``, ``list[str]``, ``SampleConfig``) as a
    type, built from its syntax tree (nothing is evaluated)."""
    if isinstance(node, ast.Name):
        return _resolve(module, tree, node)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _evaluate_type(module, tree, node.left) | _evaluate_type(module, tree, node.right)
    if isinstance(node, ast.Subscript):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        items = tuple(_evaluate_type(module, tree, a) for a in args)
        return _evaluate_type(module, tree, node.value)[items if len(items) > 1 else items[0]]
    raise _Unreadable(ast.unparse(node))

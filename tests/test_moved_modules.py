"""Every module that moved when the package was grouped into floors still imports under its old
name for one release: the same module object, with a DeprecationWarning naming where it went."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from dualign._infra.moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_name_gives_the_moved_module_with_a_warning(old):
    code = (f"import warnings, importlib\nwarnings.simplefilter('error')\n"
            f"try:\n    importlib.import_module({old!r})\nexcept DeprecationWarning as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"{old} moved to {MOVED[old]}"), out


def test_the_old_name_is_the_same_module_object_and_keeps_its_own_spec():
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("dualign.records")
    new = importlib.import_module("dualign.data.records")
    assert old is new and new.__spec__.name == "dualign.data.records"
    from dualign.records import DualRecord  # cached now: warned once, above

    assert DualRecord is new.DualRecord


def test_the_old_compare_module_names_resolve_through_the_package():
    from dualign.compare import comparison

    name = next(n for n in vars(comparison) if not n.startswith("_") and callable(getattr(comparison, n)))
    with pytest.warns(DeprecationWarning, match="moved to dualign.compare.comparison"):
        import dualign.compare as package
        assert getattr(package, name) is getattr(comparison, name)
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018


def test_every_moved_target_exists():
    for new in MOVED.values():
        importlib.import_module(new)

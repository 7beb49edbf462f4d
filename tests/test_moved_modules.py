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


@pytest.mark.parametrize("method", ["mocan", "pecan", "dpo", "safedpo"])
def test_a_method_s_old_pair_loss_entry_still_computes_the_loop_s_loss(method):
    import torch

    from dualign.train import LOSSES

    module = importlib.import_module(f"dualign.methods.{method}")
    with pytest.warns(DeprecationWarning, match="pair_loss is deprecated"):
        old = module.pair_loss
    g = torch.Generator().manual_seed(0)
    logps = tuple(torch.tensor([-3.0, -5.0, -2.5]) + i for i in range(4))
    batch = {"target_margin": torch.tensor([1.0, -2.0, 0.5]), "unsafe_a": torch.tensor([0.0, 1.0, 0.0]),
             "unsafe_b": torch.tensor([1.0, 0.0, 0.0]), "safety_margin": 2.0}
    loss_fn, takes = LOSSES[method]
    inputs = {**batch, "beta": 0.3, "label": "soft", "generator": g}
    want, _ = loss_fn(*logps, *(inputs.get(n) for n in takes))
    got, _ = old(logps, batch, 0.3, "soft", torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want)

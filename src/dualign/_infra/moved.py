"""The modules that moved when the package was grouped into floors, and the import hook that keeps
their old names working for one release: ``import dualign.records`` still gives
:mod:`dualign.data.records` (the same module object), with a :class:`DeprecationWarning` that says
where it moved. (``dualign.compare``, now a package, forwards its old names itself.)"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "dualign.errors": "dualign._infra.errors",
    "dualign.io": "dualign._infra.io",
    "dualign.lock": "dualign._infra.lock",
    "dualign.progress": "dualign._infra.progress",
    "dualign.quiet": "dualign._infra.quiet",
    "dualign.timing": "dualign._infra.timing",
    "dualign.provenance": "dualign._infra.provenance",
    "dualign.text_table": "dualign._infra.text_table",
    "dualign.config_source": "dualign._infra.config_source",
    "dualign.config": "dualign._infra.config",
    "dualign.distributed": "dualign._infra.distributed",
    "dualign.segments": "dualign._infra.segments",
    "dualign.records": "dualign.data.records",
    "dualign.constraints": "dualign.data.constraints",
    "dualign.data.scores": "dualign.data.score_table",
    "dualign.report_view": "dualign.data.report_view",
    "dualign.models": "dualign.modeling.models",
    "dualign.batches": "dualign.modeling.batches",
    "dualign.checkpoint": "dualign.modeling.checkpoint",
    "dualign.templates": "dualign.modeling.templates",
    "dualign.scorers": "dualign.modeling.scorers",
    "dualign.refprobs": "dualign.modeling.refprobs",
    "dualign.vllm_sampler": "dualign.modeling.vllm_sampler",
    "dualign.tiny": "dualign.modeling.tiny",
    "dualign.flops": "dualign.modeling.flops",
    "dualign.checks": "dualign.modeling.checks",
    "dualign.losses": "dualign.methods.losses",
    "dualign.pairs": "dualign.methods.pairs",
    "dualign.methods.dispatch": "dualign.baselines.dispatch",
    "dualign.methods.dual_ascent": "dualign.baselines.dual_ascent",
    "dualign.methods.fixed_lambda": "dualign.baselines.fixed_lambda",
    "dualign.methods.grpo_lagrangian": "dualign.baselines.grpo_lagrangian",
    "dualign.methods.ppo_lagrangian": "dualign.baselines.ppo_lagrangian",
    "dualign.methods.preference_dpo": "dualign.baselines.preference_dpo",
    "dualign.methods.pecan_prealign": "dualign.prealign",
    "dualign.compare_report": "dualign.compare.tables",
    "dualign.compare_plots": "dualign.compare.plots",
    "dualign.compute_plan": "dualign.compare.compute_cost",
    "dualign.fit": "dualign.compare.in_sample_fit",
    "dualign.world.scorers": "dualign.world.reward_models",
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as the module at its new name."""

    def __init__(self) -> None:
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the import system has just set __spec__ to the old name's; the module keeps its own
        module.__spec__ = self._specs.pop(module.__spec__.name)


def install() -> None:
    """Put the hook on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedModule) for f in sys.meta_path):
        sys.meta_path.append(_MovedModule())


def old_loss_entry(module: str, loss, takes: tuple[str, ...]):
    """A module ``__getattr__`` that keeps a method module's old ``pair_loss(logps, batch, beta,
    label, generator)`` entry for one release, with a :class:`DeprecationWarning`: it calls ``loss``
    on the four log-probs and the inputs in ``takes`` (the loop now calls each loss through
    ``dualign.train.LOSSES`` with only what it uses)."""

    def pair_loss(logps, batch, beta, label, generator):
        inputs = {**batch, "beta": beta, "label": label, "generator": generator}
        return loss(*logps, *(inputs.get(name) for name in takes))

    def __getattr__(name: str):
        if name != "pair_loss":
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.pair_loss is deprecated: the loop calls each loss through "
                      "dualign.train.LOSSES", DeprecationWarning, stacklevel=2)
        return pair_loss

    return __getattr__

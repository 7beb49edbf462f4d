"""dualign: one-shot safety alignment of LLMs by optimal dualization (MoCAN / PeCAN).

The Python API, objects in and objects out (docs/python_api.md):

- :func:`make_plan` — λ* for constraints in the columns' own units (``"cost<=ref-4"``) on a
  DataFrame or ``datasets.Dataset`` of scored samples → a :class:`Plan` (dual.json's record, with
  ``save`` and ``load``);
- :class:`MoCANTrainer` with :class:`MoCANConfig` — train a ``PreTrainedModel`` (or a path) on the
  scored samples at the plan's λ*, as TRL's trainers do;
- :func:`evaluate_policy` — the trained policy against π_ref on held-out prompts, scored by
  callables, HF models or scorer specs → an :class:`EvalReport`, the one ``dualign evaluate`` writes;
- :func:`solve_dual` and :class:`DualResult` — the dual's solver on arrays.

Every name is imported on first use, so that ``import dualign`` and the CLI's start stay cheap
(numpy, torch and transformers load only when needed).
"""

from dualign._infra import moved as _moved
from dualign._infra.errors import DualignError, InfeasibleConstraintError, InputError

_moved.install()

__version__ = "0.1.0"

# public name -> (module, attribute), imported on first use
_LAZY = {
    "solve_dual": ("dualign.dual", "solve_dual"),
    "DualResult": ("dualign.dual", "DualResult"),
    "make_plan": ("dualign.dual.stage", "make_plan"),
    "Plan": ("dualign.data.records", "DualRecord"),
    "EvalReport": ("dualign.data.records", "EvalReport"),
    "MoCANTrainer": ("dualign.train", "MoCANTrainer"),
    "MoCANConfig": ("dualign.train", "MoCANConfig"),
    "TrainOutput": ("dualign.train", "TrainOutput"),
    "evaluate_policy": ("dualign.evaluate", "evaluate_policy"),
}

__all__ = ["DualignError", "InfeasibleConstraintError", "InputError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dualign' has no attribute {name!r}")

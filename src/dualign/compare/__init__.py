"""``dualign compare`` and its accounting: the comparison runner (:mod:`~dualign.compare.comparison`),
its tables (:mod:`~dualign.compare.tables`) and plots (:mod:`~dualign.compare.plots`), what a run
will cost before it starts (:mod:`~dualign.compare.compute_cost`, ``dualign compute``), and the
in-sample fit diagnostic of a trained policy (:mod:`~dualign.compare.in_sample_fit`).

Until this package existed, ``dualign.compare`` was the module now at
:mod:`dualign.compare.comparison`; its names still resolve here, with a :class:`DeprecationWarning`.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib
    import warnings

    comparison = importlib.import_module("dualign.compare.comparison")
    if not hasattr(comparison, name):
        raise AttributeError(f"module 'dualign.compare' has no attribute {name!r}")
    warnings.warn(f"dualign.compare.{name} moved to dualign.compare.comparison.{name}",
                  DeprecationWarning, stacklevel=2)
    return getattr(comparison, name)

"""The closed-form dual of one-shot safety alignment (MoCAN / PeCAN, arXiv 2405.19544), in three
layers a reader can take one at a time:

- :mod:`~dualign.dual.formulas`: D(λ), ∇D, ∇²D, the tilted weights, the predictions and the KL,
  each a few lines over per-prompt segments (the naive, readable versions).
- :mod:`~dualign.dual.solver`: λ* by projected Newton, infeasibility (per constraint and jointly,
  an LP), the warm start and the prompt bootstrap; :mod:`~dualign.dual.tilt` evaluates the
  formulas fast on the solver's flat problem.
- :mod:`~dualign.dual.stage`: constraint strings on a scores table → ``dual.json`` (the pipeline's
  dual stage, ``dualign dual``); with ``tilt: reachable`` the scores are first replaced by their
  prediction from π_ref's own features (:mod:`~dualign.dual.reachable`, beyond the paper).
"""

from dualign.dual.formulas import (
    dual_gradient,
    dual_hessian,
    dual_value,
    extrapolated_kl,
    grouped_logsumexp,
    half_sample_kl,
    kl,
    predictions,
    reference_means,
    tilted_means,
    tilted_weights,
)
from dualign.dual.solver import DualResult, solve_dual, solve_dual_long
from dualign.dual.stage import (
    DualConfig,
    format_report,
    require_converged,
    run_dual,
    solve_constraints,
)

__all__ = ["DualConfig", "DualResult", "dual_gradient", "dual_hessian", "dual_value", "format_report",
           "extrapolated_kl", "grouped_logsumexp", "half_sample_kl", "kl", "predictions", "reference_means", "require_converged",
           "run_dual", "solve_constraints", "solve_dual", "solve_dual_long", "tilted_means", "tilted_weights"]

"""The λ updates of the recalibrate stage, as pure functions (the stage itself: recalibrate.py).

One-shot dualization predicts, for every λ, the change Δp_j(λ) of each constraint column that
π_λ makes over π_ref; a fine-tune towards π_λ achieves some Δa_j(λ), measured on held-out
calibration prompts. When Δa_j(λ*) misses the requested change t_j, the next λ comes from the
measured (λ, Δa) pairs:

- first correction (one measured point): assume the fine-tune achieves a fixed share of what the
  dual predicts, Δa_j(λ) ≈ ρ_j·Δp_j(λ) with ρ_j = Δa_j(λ_0)/Δp_j(λ_0), and ask the dual for the λ
  whose predicted change is t_j/ρ_j (:func:`rescaled_targets`; the dual is re-solved by the stage);
- later corrections: a secant step per constraint on the last two measured points,
  λ_j ← λ_j − (Δa_j − t_j)·(λ_j − λ'_j)/(Δa_j − Δa'_j) (:func:`secant_step`), projected on λ ≥ 0;
- where the secant is undefined (equal λ or equal Δa, or a slope of the wrong sign: more weight on
  a constraint made it worse), a projected dual step as in CAID (arXiv 2505.19387),
  λ ← max(0, λ − η·(Δa − t)) in g units, with η = 1/∇²D(λ), the dual's own curvature
  (:func:`dual_step`).

All in g units (utilities, E[g] ≥ b): a cost c enters as g = −c, so "more λ" always means "more of g".
"""

from __future__ import annotations

import numpy as np


def shortfall(achieved_change: np.ndarray, target_change: np.ndarray) -> np.ndarray:
    """s_j = Δa_j − t_j in g units: ≥ 0 where the constraint is met by the point estimate."""
    return np.asarray(achieved_change, float) - np.asarray(target_change, float)


def rescaled_targets(achieved_change: np.ndarray, predicted_change: np.ndarray,
                     target_change: np.ndarray, max_factor: float = 4.0) -> np.ndarray:
    """t_j/ρ_j with ρ_j = Δa_j/Δp_j: the predicted change to ask the dual for so that a fine-tune
    achieving the same share ρ_j of it lands on t_j. ρ_j is clipped to [1/max_factor, max_factor]
    (a share near zero or negative says nothing about the scale)."""
    achieved, predicted = np.asarray(achieved_change, float), np.asarray(predicted_change, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(predicted != 0, achieved / predicted, 1.0)
    share = np.clip(np.nan_to_num(share, nan=1.0), 1.0 / max_factor, max_factor)
    return np.asarray(target_change, float) / share


def secant_step(lambdas: np.ndarray, achieved: np.ndarray, previous_lambdas: np.ndarray,
                previous_achieved: np.ndarray, target_change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(λ_next, defined): per constraint, the root of the line through the last two (λ, Δa) points,
    λ − (Δa − t)·(λ − λ')/(Δa − Δa'), projected on λ ≥ 0; ``defined`` is False where that line is
    flat or falls (Δa must rise with λ in g units), and λ_next is then λ itself."""
    lam, prev_lam = np.asarray(lambdas, float), np.asarray(previous_lambdas, float)
    a, prev_a = np.asarray(achieved, float), np.asarray(previous_achieved, float)
    d_lam, d_a = lam - prev_lam, a - prev_a
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = d_a / d_lam
    defined = (d_lam != 0) & np.isfinite(slope) & (slope > 0)
    step = np.where(defined, -shortfall(a, target_change) / np.where(defined, slope, 1.0), 0.0)
    return np.maximum(lam + step, 0.0), defined


def dual_step(lambdas: np.ndarray, achieved: np.ndarray, target_change: np.ndarray,
              curvature: np.ndarray) -> np.ndarray:
    """λ ← max(0, λ − H⁻¹·(Δa − t)): a projected dual (sub)gradient step whose step size is the
    inverse of the dual's Hessian H = ∇²D(λ) = Cov_{π_λ}(g)/β, i.e. the change of the predicted
    E[g] per unit of λ (a Newton step on the dual's model, taken with the measured slack)."""
    h = np.atleast_2d(np.asarray(curvature, float))
    s = shortfall(achieved, target_change)
    step = np.linalg.lstsq(h + 1e-12 * np.trace(h) * np.eye(len(h)), s, rcond=None)[0]
    return np.maximum(np.asarray(lambdas, float) - step, 0.0)

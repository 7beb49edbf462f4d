"""The dual's solver: λ* = argmin_{λ≥0} D(λ) by projected Newton, with feasibility checks, a warm
start on large problems and a prompt bootstrap for confidence intervals.

Primal, per prompt x with K samples y_k ~ π_ref and weights w_k (normalised per prompt):

    maximize  E_π[r] − β·KL(π‖π_ref)   subject to  E_π[g_j] ≥ b_j,  j = 1..m.

Its sampled dual D(λ) = β·mean_x log Σ_k w_k exp((r_k + λᵀg_k)/β) − λᵀb is convex, with
∇D = mean_x E_{p_λ}[g] − b and ∇²D = mean_x Cov_{p_λ}(g)/β (:mod:`dualign.dual.formulas`). The
solver evaluates them on the flat problem of :mod:`dualign.dual.tilt`. When no finite λ* exists
it raises :class:`~dualign._infra.errors.InfeasibleConstraintError` naming the constraint and the limit.

scipy's linalg, optimize and sparse are imported where they are used (the bounded Newton step
for m > 1, the joint-feasibility LP): they cost half a second that every module importing
:mod:`dualign.dual` (and ``dualign train --help``) would pay otherwise.

Newton, the feasibility certificate, the warm start and the bootstrap all act on
the same flat problem (:mod:`dualign.dual.tilt`) and share its caches; the formulas they evaluate
are in :mod:`dualign.dual.formulas`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from dualign._infra.errors import InfeasibleConstraintError, InputError
from dualign._infra.progress import Progress
from dualign._infra.segments import Segments
from dualign.dual.tilt import SAFE_EXPONENT, Point, Samples, Tilt, flat_samples


@dataclass
class DualResult:
    """λ* and what π_λ* is predicted to reach on the samples (utilities in g units: E[g_j] ≥ b_j)."""

    lambdas: np.ndarray  # [m] λ*
    dual_value: float  # D(λ*)
    predicted_reward: float  # mean_x E_{p_λ*}[r]
    predicted_utilities: np.ndarray  # [m] mean_x E_{p_λ*}[g_j]
    kl: float  # mean_x KL(p_λ*‖w)
    reference_reward: float  # mean_x E_w[r] (π_ref)
    reference_utilities: np.ndarray  # [m] mean_x E_w[g_j]
    thresholds: np.ndarray  # [m] b
    beta: float
    names: list[str]
    iterations: int  # Newton steps on the full data
    converged: bool
    kkt_residual: float  # max_j |projected ∇_j D| / scale_j (the solver stops at ≤ tol)
    num_prompts: int
    num_samples: int
    ci: dict[str, np.ndarray] | None = None  # bootstrap percentile CIs, each [..., 2]
    ci_level: float | None = None
    bootstrap: int = 0
    bootstrap_failed: int = 0  # resamples that were infeasible or did not converge
    confidence: float | None = None  # planned with a margin (see solve_dual's ``confidence``)
    confidence_margin: np.ndarray | None = None  # [m] added to b (g units) so the bound holds
    plain: DualResult | None = None  # the solution without the margin, to show what it costs
    # (s_dual [m], s_eval [m] or None, s_delivery [m] or None, bias [m]): its parts (bias: :func:`slack_bias`)
    confidence_parts: tuple | None = None
    confidence_delivery: float | None = None  # δ, the fine-tune's spread the margin covers (a fraction)
    confidence_evaluation: tuple[int, int] | None = None  # (prompts, responses per prompt) planned for
    confidence_bound: float | None = None  # the one-sided level of the evaluation's bound the margin covers
    # [m] a relative constraint binding on the samples and on every resample: its predicted change
    # equals its margin by construction, so its bootstrap interval is zero-width and is not reported
    change_fixed: np.ndarray | None = None
    # ``target``: the tilt of other values at λ* (what a fine-tune trains towards when the dual
    # planned on fitted scores): {"reward", "utilities" [m], "kl", "reward_change", "utility_changes" [m]}
    target: dict | None = None
    # [2 + m] the refit bootstrap's bias of the planned tilt at λ*, [reward change, utility changes, KL]
    # (:func:`fit_bias`; only where the values are refitted on each resample, the reachable tilt)
    fit_bias: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Projected Newton
# ---------------------------------------------------------------------------------------------


def kkt_residual(lambdas: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """|projected gradient|: |∇_j D| where λ_j > 0, max(−∇_j D, 0) where λ_j = 0."""
    return np.where(lambdas > 0, np.abs(grad), np.maximum(-grad, 0.0))


def _newton_target(lambdas: np.ndarray, grad: np.ndarray, hess: np.ndarray,
                   floor: float) -> np.ndarray:
    """argmin_{y ≥ 0} gᵀ(y − λ) + ½(y − λ)ᵀH(y − λ): the bound-constrained Newton model's minimiser.

    With H + δI = UᵀU it is the non-negative least squares problem min_{y≥0} |U y + U⁻ᵀc|,
    c = g − Hλ. δ (tiny) keeps a singular H (collinear or constant utilities) solvable.
    """
    from scipy.linalg import cholesky, solve_triangular
    from scipy.optimize import nnls

    m = len(lambdas)
    delta = 1e-12 * max(float(np.max(np.diag(hess))), floor)
    h = hess + delta * np.eye(m)
    c = grad - h @ lambdas
    if m == 1:
        return np.maximum(-c / h[0], 0.0)
    u = cholesky(h, lower=False)
    y, _ = nnls(u, -solve_triangular(u, c, trans="T"), maxiter=50 * m)
    return y


@dataclass
class _Solve:
    lambdas: np.ndarray
    point: Point
    grad: np.ndarray
    hess: np.ndarray
    iterations: int
    converged: bool
    below_bound: bool  # D fell below a lower bound that holds whenever the primal is feasible
    residual: float


def _newton(tilt: Tilt, lambdas: np.ndarray, tol: float, max_iter: int) -> _Solve:
    """Projected Newton with an Armijo line search on the segment [λ, y], y ≥ 0 the model's minimiser.

    Tests hold it equal to projected_gradient_descent (the official code's method) and to an
    exact primal solve. Stops when max_j |projected ∇_j D| / scale_j ≤ tol.
    """
    s = tilt.s
    scale = s.scale(tilt.b + s.centre)
    # Weak duality: if some p is feasible, D(λ) ≥ E_p[r] − β·KL(p‖w) ≥ min r + β·min log w.
    log_w_min = -np.log(s.seg.counts.max()) if s.log_weights is None else s.log_weights.min()
    lower_bound = float(s.rewards.min() + tilt.beta * log_w_min)
    floor = float(np.max(tilt.gabs) ** 2 / tilt.beta) or 1.0 / tilt.beta
    pt = tilt.evaluate(lambdas)
    grad, hess = tilt.derivatives(pt)
    it = 0
    while True:
        residual = float(np.max(kkt_residual(lambdas, grad) / scale))
        if residual <= tol or it >= max_iter:
            return _Solve(lambdas, pt, grad, hess, it, residual <= tol, False, residual)
        direction = _newton_target(lambdas, grad, hess, floor) - lambdas
        slope = float(grad @ direction)
        if not slope < 0:  # rounding: the model sees no descent left
            return _Solve(lambdas, pt, grad, hess, it, False, False, residual)
        alpha = 1.0
        while True:
            trial = np.maximum(lambdas + alpha * direction, 0.0)
            tp = tilt.evaluate(trial, keep=pt)
            noise = 64 * np.finfo(float).eps * (pt.value_scale + tp.value_scale)
            if tp.value <= pt.value + 1e-4 * alpha * slope + noise:
                break
            alpha *= 0.5
            if alpha < 1e-12:
                return _Solve(lambdas, pt, grad, hess, it, False, False, residual)
        it += 1
        lambdas, pt = trial, tp
        if pt.value < lower_bound or not np.all(np.isfinite(lambdas)):
            return _Solve(lambdas, pt, grad, hess, it, False, True, np.inf)
        grad, hess = tilt.derivatives(pt)


def projected_gradient_descent(tilt: Tilt, lambdas: np.ndarray, step: float, tol: float,
                                max_iter: int, max_seconds: float = np.inf) -> tuple[np.ndarray, int, bool]:
    """λ ← max(0, λ − η·∇D(λ)) with a fixed step η, as the official code solves the dual.

    Returns (λ, iterations, reached tol). Used as the reference in tests and the baseline in bench.
    """
    start = time.perf_counter()
    scale = tilt.s.scale(tilt.b + tilt.s.centre)
    for it in range(max_iter):
        grad, _ = tilt.derivatives(tilt.evaluate(lambdas))
        if np.max(kkt_residual(lambdas, grad) / scale) <= tol:
            return lambdas, it, True
        if time.perf_counter() - start > max_seconds:
            return lambdas, it, False
        lambdas = np.maximum(lambdas - step * grad, 0.0)
    return lambdas, max_iter, False


# ---------------------------------------------------------------------------------------------
# Feasibility
# ---------------------------------------------------------------------------------------------


def _infeasible(names: Sequence[str], thresholds: np.ndarray, reachable: np.ndarray,
                which: list[int], joint: bool, detail: str = "") -> InfeasibleConstraintError:
    if joint:
        parts = ", ".join(f"{names[j]} ≥ {thresholds[j]:.6g} (alone reachable up to {reachable[j]:.6g})"
                          for j in which)
        msg = (f"constraints are jointly infeasible: no reweighting of the samples reaches {parts} "
               f"at once{detail}; no finite λ* exists")
    else:
        j = which[0]
        msg = (f"constraint {names[j]!r} is infeasible: threshold {thresholds[j]:.6g} is not below "
               f"{reachable[j]:.6g}, the largest value reachable by reweighting the samples "
               f"(mean over prompts of the per-prompt maximum); no finite λ* exists")
    err = InfeasibleConstraintError(msg)
    err.which, err.joint = list(which), joint
    err.thresholds, err.reachable, err.names = np.array(thresholds), np.array(reachable), list(names)
    return err


def _check_each(samples: Samples, thresholds: np.ndarray, names: Sequence[str],
                below_reachable: np.ndarray | None = None) -> None:
    """Raise when some b_j ≥ mean_x max_k g_jk (unless g_j is constant per prompt and b_j ≤ E_w g_j).

    Within 1e-12·scale of the limit counts as at it: λ* would be astronomically large. When a
    lower bound on mean_x max_k g_jk (``below_reachable``) already clears every b_j, the pass over
    the samples that computes it exactly is skipped.
    """
    slack = 1e-12 * samples.scale(thresholds)
    if below_reachable is not None and np.all(thresholds < below_reachable - slack):
        return
    reachable = samples.reachable()
    for j in np.flatnonzero(thresholds >= reachable - slack):
        _, ref = samples.reference()
        if thresholds[j] > ref[j] + slack[j]:
            raise _infeasible(names, thresholds, reachable, [int(j)], joint=False)


def joint_margin(samples: Samples, thresholds: np.ndarray) -> float:
    """max t s.t. Σ_x q_x Σ_k p_xk g_jk ≥ b_j + t·scale_j ∀j, p_x in the simplex, t ≤ 1 (an LP).

    t > 0 iff some reweighting satisfies every constraint strictly, i.e. iff a finite λ* exists.
    """
    import scipy.sparse as sp
    from scipy.optimize import linprog

    seg, n = samples.seg, samples.size
    scale = samples.scale(thresholds)
    qs = seg.expand(samples.prompt_weights)
    a_ub = sp.hstack([sp.csr_matrix(-(samples.centred * qs)), sp.csr_matrix(scale[:, None])])
    b_ub = -(thresholds - samples.centre)
    rows = np.repeat(np.arange(seg.num), seg.counts)
    a_eq = sp.csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(seg.num, n + 1))
    cost = np.zeros(n + 1)
    cost[-1] = -1.0
    bounds = [(0, None)] * n + [(None, 1.0)]
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.ones(seg.num), bounds=bounds,
                  method="highs")
    return -float(res.fun) if res.status == 0 else -np.inf


# ---------------------------------------------------------------------------------------------
# Solving
# ---------------------------------------------------------------------------------------------

# A problem of more than 4 × _WARM_START_SAMPLES samples starts Newton from λ* of random prompts
# holding about _WARM_START_SAMPLES samples (at least _WARM_START_PROMPTS prompts).
_WARM_START_SAMPLES = 2**15
_WARM_START_PROMPTS = 256


def _solve(samples: Samples, thresholds: np.ndarray, beta: float, names: Sequence[str],
           lambdas0: np.ndarray | None, tol: float, max_iter: int,
           check_joint: bool = True) -> tuple[_Solve, Tilt]:
    """Newton, then feasibility checks only where Newton's outcome leaves room for doubt.

    A KKT point only meets a tolerance, and one is met at a finite λ even when b_j equals the
    reachable limit (λ*_j = ∞), so active constraints (λ_j > 0) are always compared with
    mean_x max_k g_jk. Where Newton failed (no convergence, D below the weak-duality bound) or λ is
    so large that the tilt has nearly collapsed, every constraint is, and for m > 1 the joint LP
    decides. ``check_joint=False`` (warm starts, bootstrap) skips the LP.
    """
    # a threshold past every sample's value is refused before Newton, whose steps toward an unbounded
    # λ overflow when b is near the float range's edge
    if np.any(thresholds - samples.centre > samples.centred.max(axis=1)):
        _check_each(samples, thresholds, names)
    if lambdas0 is None:
        lambdas0 = _warm_start(samples, thresholds, beta, names, tol, max_iter)
    tilt = Tilt(samples, thresholds, beta)
    sol = _newton(tilt, np.maximum(np.asarray(lambdas0, dtype=np.float64), 0.0), tol, max_iter)
    huge = np.max(sol.lambdas * tilt.gabs) / beta > SAFE_EXPONENT
    if sol.converged and not huge:
        if np.any(sol.lambdas > 0):
            # E_p[g] + half the Hessian's bound on its distance to the limit (half: rounding room)
            bound = sol.point.expected + samples.centre + tilt.reachable_gap(sol.hess) / 2
            _check_each(samples, thresholds, names, below_reachable=bound)
        return sol, tilt
    _check_each(samples, thresholds, names)
    if samples.m > 1 and check_joint:
        margin = -np.inf if sol.below_bound else joint_margin(samples, thresholds)
        if margin <= 1e-7:
            detail = "" if sol.below_bound else f" (best joint margin {margin:.3g} × scale)"
            raise _infeasible(names, thresholds, samples.reachable(), list(range(samples.m)),
                              joint=True, detail=detail)
    return sol, tilt


def _warm_start(samples: Samples, thresholds: np.ndarray, beta: float, names: Sequence[str],
                tol: float, max_iter: int) -> np.ndarray:
    """λ* of random prompts holding about _WARM_START_SAMPLES samples, else 0.

    Its λ* is within sampling error of the full one, so Newton on all the data needs only the few
    steps of its quadratic phase.
    """
    num = samples.seg.num
    zero = np.zeros(samples.m)
    size = max(_WARM_START_PROMPTS, round(num * _WARM_START_SAMPLES / samples.size))
    if samples.size <= 4 * _WARM_START_SAMPLES or 4 * size > num:
        return zero
    rng = np.random.default_rng(num)
    prompts = np.sort(rng.choice(num, size=size, replace=False))
    sub = samples.take(prompts, samples.prompt_weights[prompts])
    try:
        sol, _ = _solve(sub, thresholds, beta, names, None, tol, max_iter, check_joint=False)
    except InfeasibleConstraintError:
        return zero
    return sol.lambdas if np.all(np.isfinite(sol.lambdas)) and not sol.below_bound else zero


def _result(samples: Samples, thresholds: np.ndarray, beta: float, names: list[str],
            lambdas0, tol: float, max_iter: int) -> DualResult:
    sol, tilt = _solve(samples, thresholds, beta, names, lambdas0, tol, max_iter)
    reward, utilities, kl_value = tilt.outcomes(sol.point)
    ref_reward, ref_utilities = samples.reference()
    return DualResult(
        lambdas=sol.lambdas, dual_value=sol.point.value, predicted_reward=reward,
        predicted_utilities=utilities, kl=kl_value, reference_reward=ref_reward,
        reference_utilities=ref_utilities, thresholds=thresholds, beta=beta, names=names,
        iterations=sol.iterations, converged=sol.converged, kkt_residual=sol.residual,
        num_prompts=samples.seg.num, num_samples=samples.size)


def _resample_thresholds(sub: Samples, thresholds: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """b on a resample: a relative threshold (margin not NaN) is the resample's own π_ref mean of
    g_j plus its margin; an absolute one stays."""
    relative = ~np.isnan(margins)
    if not relative.any():
        return thresholds
    return np.where(relative, sub.reference()[1] + np.nan_to_num(margins), thresholds)


# refit(counts [N]) → (rewards [n], utilities [n, m]) on every grouped row: the values re-estimated
# on a resample that draws prompt x counts[x] times (the reachable tilt's ridge, refitted)
Refit = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _draw(samples: Samples, counts: np.ndarray, refit: Refit | None = None,
          keep: np.ndarray | None = None) -> Samples:
    """The resample that draws prompt x counts[x] times; with ``refit``, its values re-estimated
    on it (``keep``: the rows flat_samples kept, those of positive weight)."""
    prompts = np.flatnonzero(counts)
    weights = counts[prompts].astype(np.float64)
    if refit is None:
        return samples.take(prompts, weights)
    rewards, utilities = refit(counts)
    if keep is not None:
        rewards, utilities = rewards[keep], utilities[keep]
    return samples.with_values(rewards, utilities).take(prompts, weights)


def _resample_counts(num: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """``resamples`` prompt resamples [num] (multinomial counts, each prompt drawn with probability
    1/num), seeded: every caller with one seed draws the same ones (the margin's rounds, the fit's
    bias and the bootstrap share them, and so a memoizing refit)."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.multinomial(num, np.full(num, 1.0 / num))


def _target_outcomes(target: Samples, lambdas: np.ndarray, beta: float) -> np.ndarray:
    """[reward, utilities (m), kl, reward change, utility changes (m)] of the tilt of ``target``'s
    values at λ (its changes against π_ref's mean on the same samples)."""
    tilt = Tilt(target, np.zeros(target.m), beta)
    reward, utilities, kl_value = tilt.outcomes(tilt.evaluate(lambdas))
    ref_reward, ref_utilities = target.reference()
    return np.concatenate([[reward], utilities, [kl_value], [reward - ref_reward], utilities - ref_utilities])


def _target_dict(values: np.ndarray, m: int) -> dict:
    return {"reward": values[0], "utilities": values[1:m + 1], "kl": values[m + 1],
            "reward_change": values[m + 2], "utility_changes": values[m + 3:]}


def _bootstrap(samples: Samples, result: DualResult, bootstrap: int, seed: int, tol: float,
               max_iter: int, level: float, margins: np.ndarray, refit: Refit | None = None,
               keep: np.ndarray | None = None, target: Samples | None = None) -> None:
    """Percentile CIs over prompts: resample prompts with replacement (multinomial prompt weights),
    re-estimate every relative threshold from the resample's π_ref mean, and solve again.

    Each interval is widened to contain its own point estimate (the full-data value): a percentile
    interval need not, and a zero-width one misses its point by a rounding error. A relative
    constraint binding (λ_j > 0) on the samples and on every resample has its predicted change
    fixed at its margin by construction: ``result.change_fixed`` marks it, and its interval says
    nothing about uncertainty.

    Naive equivalent: a loop that draws prompt indices, rebuilds the scores table from them and
    calls :func:`solve_dual_long` with the thresholds recomputed (tests/test_dual.py). With
    ``refit`` the values themselves are re-estimated on each resample (the fit's own error enters
    the CIs); with ``target`` the CIs also cover the tilt of its values at each resample's λ."""
    num = samples.seg.num
    draws = []
    for counts in Progress(_resample_counts(num, bootstrap, seed), desc="bootstrap", unit="resamples",
                           total=bootstrap):
        sub = _draw(samples, counts, refit, keep)
        b = _resample_thresholds(sub, result.thresholds, margins)
        try:
            sol, tilt = _solve(sub, b, result.beta, result.names, result.lambdas, tol, max_iter,
                               check_joint=False)
        except InfeasibleConstraintError:
            continue
        if not sol.converged:
            continue
        reward, utilities, kl_value = tilt.outcomes(sol.point)
        ref_reward, ref_utilities = sub.reference()
        extra = [] if target is None else [_target_outcomes(
            target.take(np.flatnonzero(counts), counts[np.flatnonzero(counts)].astype(np.float64)),
            sol.lambdas, result.beta)]
        draws.append(np.concatenate([sol.lambdas, [reward], utilities, [kl_value],
                                     [reward - ref_reward], utilities - ref_utilities, *extra]))
    result.bootstrap, result.bootstrap_failed, result.ci_level = bootstrap, bootstrap - len(draws), level
    if not draws:
        return
    draws = np.array(draws)
    point = np.concatenate([result.lambdas, [result.predicted_reward], result.predicted_utilities, [result.kl],
                            [result.predicted_reward - result.reference_reward],
                            result.predicted_utilities - result.reference_utilities,
                            *([] if target is None else [_target_outcomes(target, result.lambdas, result.beta)])])
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)], axis=0)
    bounds = np.stack([np.minimum(lo, point), np.maximum(hi, point)], axis=-1)
    m = samples.m
    result.change_fixed = ~np.isnan(margins) & (result.lambdas > 0) & (draws[:, :m] > 0).all(axis=0)
    result.ci = {"lambdas": bounds[:m], "predicted_reward": bounds[m],
                 "predicted_utilities": bounds[m + 1:2 * m + 1], "kl": bounds[2 * m + 1],
                 "predicted_reward_change": bounds[2 * m + 2], "predicted_utility_changes": bounds[2 * m + 3:3 * m + 3]}
    if target is not None:
        result.ci["target"] = _target_dict(bounds[3 * m + 3:], m)


def _slack_draws(samples: Samples, lambdas: np.ndarray, thresholds: np.ndarray, margins: np.ndarray,
                 beta: float, resamples: int, seed: int, refit: Refit | None = None,
                 keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(slack_j [m], slack*_j [resamples, m]) at fixed λ: slack_j = E_{p_λ}[g_j] − b_j on the samples,
    slack*_j the same on prompt resamples (relative thresholds re-estimated; with ``refit``, the
    values re-estimated too). Seeded, so every caller with one seed sees the same resamples."""
    def slack(sub: Samples, b: np.ndarray) -> np.ndarray:
        tilt = Tilt(sub, b, beta)
        return tilt.outcomes(tilt.evaluate(lambdas))[1] - b

    draws = []
    for counts in _resample_counts(samples.seg.num, resamples, seed):
        sub = _draw(samples, counts, refit, keep)
        draws.append(slack(sub, _resample_thresholds(sub, thresholds, margins)))
    return slack(samples, thresholds), np.array(draws)


def spread_of(draws: np.ndarray, level: float) -> np.ndarray:
    """s_j = mean(slack*_j) − q_{1−level}(slack*_j): how far the one-sided ``level`` bound of the
    resamples lies below their centre → [m] (≥ 0). Measured from the resamples' own mean, not from
    the samples' slack: where the resamples are biased (:func:`slack_bias`) the distance from the
    samples' value would take the bias for spread."""
    return np.maximum(draws.mean(axis=0) - np.quantile(draws, 1 - level, axis=0), 0.0)


def slack_bias(point: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """B_j = mean(slack*_j) − slack_j, the bootstrap's estimate of how far the samples' own slack
    overstates the truth → [m].

    A plain prompt bootstrap of a mean has B ≈ 0. On the reachable tilt every resample refits the
    ridge, and the fit's estimation noise adds spread to the fitted scores s̃ that the tilt turns
    into change (E_{p_λ}[s̃] − E_ref[s̃] grows with Var(s̃) at fixed λ): a resample's refit carries
    that noise once more than the samples' fit does, so B > 0 there, and the samples' prediction is
    optimistic by about B (measured on the default demo: B ≈ 0.19 of its cost change, about the
    mean shortfall of its fine-tunes over fifteen world builds)."""
    return draws.mean(axis=0) - point


def slack_spread(samples: Samples, lambdas: np.ndarray, thresholds: np.ndarray, margins: np.ndarray,
                 beta: float, level: float, resamples: int, seed: int, refit: Refit | None = None,
                 keep: np.ndarray | None = None) -> np.ndarray:
    """s_j = mean(slack*_j) − q_{1−level}(slack*_j) at fixed λ (:func:`spread_of` of
    :func:`_slack_draws`): how far the point prediction must clear b_j, past any bias of the
    resamples (:func:`slack_bias`), for the one-sided ``level`` bound to clear it → [m]."""
    return spread_of(_slack_draws(samples, lambdas, thresholds, margins, beta, resamples, seed, refit, keep)[1],
                     level)


def fit_bias(samples: Samples, lambdas: np.ndarray, beta: float, resamples: int, seed: int,
             refit: Refit, keep: np.ndarray | None = None) -> np.ndarray:
    """B = mean_r o*_r − o → [2 + m]: o = [Δreward, Δg (m), KL], the tilt of the samples' fitted
    values at fixed λ against π_ref's means, o*_r the same on prompt resample r with the values
    refitted (``refit``). The bootstrap's bias estimate (see :func:`slack_bias`): o − B predicts
    what the plan's tilt reaches past its own fit's noise. Seeded as the margin's resamples, so a
    memoizing ``refit`` fits each resample once."""
    m = samples.m
    pick = np.r_[m + 2, m + 3:2 * m + 3, m + 1]  # _target_outcomes' reward change, utility changes, KL

    def changes(sub: Samples) -> np.ndarray:
        return _target_outcomes(sub, lambdas, beta)[pick]

    draws = [changes(_draw(samples, counts, refit, keep))
             for counts in _resample_counts(samples.seg.num, resamples, seed)]
    return np.mean(draws, axis=0) - changes(samples)


def evaluation_se(samples: Samples, lambdas: np.ndarray, beta: float, relative: np.ndarray,
                  prompts: int, per_prompt: int, residual_variance: np.ndarray | None = None) -> np.ndarray:
    """The standard error of an evaluation's estimate of each E[g_j] at π_λ, predicted from the
    samples: the evaluation draws ``prompts`` new prompts × ``per_prompt`` responses of π_λ and, for a
    relative threshold (``relative[j]``), as many of π_ref on the same prompts, and compares their
    difference of means with the margin (paired by prompt) → [m]. With μ_λ(x) = E_{p_λ}[g | x],
    σ²_λ(x) = Var_{p_λ}(g | x) and the same under w (π_ref), q_x the prompt weights:

        relative: SE² = Var_q(μ_λ(x) − μ_ref(x)) / n_e + E_q[σ²_λ(x) + σ²_ref(x)] / (n_e·k_e)
        absolute: SE² = Var_q(μ_λ(x)) / n_e + E_q[σ²_λ(x)] / (n_e·k_e)

    Each term is estimated without the bias of plugging in K samples per prompt. The plug-in
    variance under weights v (Σ_k v_k = 1) is low by the factor 1 − Σ_k v_k², so σ²(x) is divided
    by it ((K−1)/K under π_ref's uniform weights). The plug-in Var_q of μ̂(x) is high by the mean
    variance of μ̂(x) itself, so that is subtracted: its delta-method estimate
    K/(K−1)·Σ_k (p_k(g_k − μ̂_λ) − w_k(g_k − μ̂_ref))² (relative; the w term dropped when absolute).
    A paired threshold at a mild tilt has μ̂_λ − μ̂_ref nearly noise-free, so the first bias is
    the one left there: it made the SE narrow. ``residual_variance`` [m] (ε², the variance of what
    the samples' g leaves out, e.g. the residual of the reachable tilt) is noise every fresh
    response carries: it adds ε² to σ²_λ(x), and to σ²_ref(x) for a relative threshold."""
    tilt = Tilt(samples, np.zeros(samples.m), beta)
    pt = tilt.evaluate(np.asarray(lambdas, dtype=np.float64))
    seg, g, q = samples.seg, samples.centred, samples.prompt_weights
    p = seg.scale(pt.e, 1.0 / pt.z_sum)  # p_λ(k | x)
    w = (seg.expand(1.0 / seg.counts) if samples.log_weights is None else np.exp(samples.log_weights))

    def moments(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """μ̂(x) [m, N], unbiased σ̂²(x) [m, N] and each row's g − μ̂(x) [m, n]."""
        mean = seg.sum(weights * g)
        dev = g - seg.expand(mean)
        keep = np.maximum(1.0 - seg.sum(weights * weights), 0.0)  # 1 − Σ v_k²
        plug = seg.sum(weights * dev * dev)
        return mean, np.divide(plug, keep, out=np.zeros_like(plug), where=keep > 1e-12), dev

    mu_l, var_l, dev_l = moments(p)
    mu_r, var_r, dev_r = moments(w)
    paired = np.asarray(relative, bool)[:, None]
    diff = np.where(paired, mu_l - mu_r, mu_l)
    within = np.where(paired, var_l + var_r, var_l)
    influence = p * dev_l - np.where(paired, w * dev_r, 0.0)
    k = seg.counts.astype(np.float64)
    noise = seg.sum(influence**2) * np.divide(k, k - 1, out=np.zeros_like(k), where=k > 1)
    if residual_variance is not None:
        within = within + np.where(paired[:, 0], 2.0, 1.0)[:, None] * np.asarray(residual_variance)[:, None]
    between = np.maximum(q @ ((diff - (diff @ q)[:, None]) ** 2).T - noise @ q, 0.0)
    return np.sqrt(between / prompts + (within @ q) / (prompts * per_prompt))


def delivery_margin(thresholds: np.ndarray, reference: np.ndarray, delivery: float, level: float) -> np.ndarray:
    """The margin's part for the fine-tune's own spread: z·δ·|b_j − E_ref[g_j]| with z = Φ⁻¹(level).

    Fine-tunes towards one plan do not all land on it: their achieved change of E[g_j] from π_ref
    scatters around the planned change b_j − E_ref[g_j] with a standard deviation of about δ times
    its size (δ: ``delivery``, a fraction measured by repeating the fine-tune; nothing in π_ref's
    samples shows it). → [m]."""
    from scipy.stats import norm

    return norm.ppf(level) * delivery * np.abs(np.asarray(thresholds, np.float64) - np.asarray(reference, np.float64))


def _with_confidence(samples: Samples, plain: DualResult, margins: np.ndarray, level: float,
                     resamples: int, seed: int, tol: float, max_iter: int,
                     evaluation: tuple[int, int] | None = None, rounds: int = 6,
                     residual_variance: np.ndarray | None = None, refit: Refit | None = None,
                     keep: np.ndarray | None = None, bound: float | None = None,
                     delivery: float | None = None, shift_bias: bool = True) -> DualResult:
    """λ for which every constraint holds at its one-sided ``level`` bound: the fixed point of
    b'_j = b_j + s_j(λ(b')), solved again until s stops moving (a few rounds).

    s_j is the dual's own spread under prompt resampling (:func:`slack_spread`, s_dual); with an
    ``evaluation`` (n_e prompts, k_e responses per prompt) it is sqrt(s_dual² + (z·SE_eval)²),
    z = Φ⁻¹(level), SE_eval from :func:`evaluation_se`: then the evaluation's point estimate clears
    b_j with probability ≈ ``level`` if the fine-tune lands on π_λ. With ``bound`` (the one-sided
    level of the evaluation's verdict, 0.95 for the report's "met confidently") z is
    Φ⁻¹(level) + Φ⁻¹(bound): then that bound, not only the point, clears b_j with probability
    ≈ ``level``. With ``delivery`` (δ, a fraction) a third part covers the fine-tune's own spread
    around the plan, :func:`delivery_margin`; the parts are added in quadrature, so with all three
    the evaluation's verdict holds with probability ≈ ``level`` where the fine-tune lands anywhere
    in that spread. The resamples' bias B (:func:`slack_bias`; > 0 where ``refit`` refits the
    values, ≈ 0 otherwise) is added outside the quadrature, since it is a shift, not a spread:
    b'_j = b_j + max(B_j + sqrt(s_dual² + …), 0). ``shift_bias=False`` leaves B out (a pilot's measured
    share of the plan, :mod:`dualign.pilot`, already holds the plan's optimism)."""
    from scipy.stats import norm

    b = plain.thresholds
    relative = ~np.isnan(margins)
    result, spread, eval_part, delivery_part = plain, np.zeros_like(b), None, None
    for _ in range(rounds):
        point, draws = _slack_draws(samples, result.lambdas, b, margins, plain.beta, resamples, seed, refit, keep)
        dual_part, bias_part = spread_of(draws, level), slack_bias(point, draws)
        if not shift_bias:
            bias_part = np.zeros_like(bias_part)
        if evaluation is not None:
            z = norm.ppf(level) + (norm.ppf(bound) if bound is not None else 0.0)
            eval_part = z * evaluation_se(samples, result.lambdas, plain.beta, relative,
                                                        *evaluation, residual_variance=residual_variance)
        noise = dual_part if eval_part is None else np.hypot(dual_part, eval_part)
        if delivery:
            delivery_part = delivery_margin(b + spread, plain.reference_utilities, delivery, level)
            noise = np.hypot(noise, delivery_part)
        new = np.maximum(bias_part + noise, 0.0)
        done = np.all(np.abs(new - spread) <= 1e-3 * samples.scale(b))
        spread = new
        result = _result(samples, b + spread, plain.beta, plain.names, result.lambdas, tol, max_iter)
        if done:
            break
    result.confidence, result.confidence_margin, result.plain = level, spread, plain
    result.confidence_parts = (dual_part, eval_part, delivery_part, bias_part)
    result.confidence_delivery = delivery
    result.confidence_evaluation = evaluation
    result.confidence_bound = bound
    return result


def _check_inputs(rewards: np.ndarray, utilities: np.ndarray, sample_weights, thresholds, beta,
                  names, rows: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[str]]:
    if not (isinstance(beta, int | float | np.floating | np.integer) and np.isfinite(beta) and beta > 0):
        raise InputError(f"beta must be a positive finite number, got {beta!r}")
    if utilities.shape[:-1] != rewards.shape:
        raise InputError(f"utilities have shape {utilities.shape[:-1]} (+ m) but rewards have "
                         f"shape {rewards.shape}; expected matching {rows}")
    m = utilities.shape[-1]
    if m == 0:
        raise InputError("at least one constraint (utility) is needed")
    for label, a in (("rewards", rewards), ("utilities", utilities)):
        # a finite sum means finite entries (NaN and ±inf propagate); only an overflow looks twice
        if not np.isfinite(a.sum()) and not np.all(np.isfinite(a)):
            raise InputError(f"{label} contain NaN or infinite values")
    weights = None
    if sample_weights is not None:
        weights = np.asarray(sample_weights, dtype=np.float64)
        if weights.shape != rewards.shape:
            raise InputError(f"sample_weights have shape {weights.shape}, expected {rewards.shape}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise InputError("sample_weights must be finite and ≥ 0")
    b = np.asarray(thresholds, dtype=np.float64)
    b = np.full(m, float(b)) if b.ndim == 0 else b
    if b.shape != (m,) or not np.all(np.isfinite(b)):
        raise InputError(f"thresholds must be a finite scalar or {m} values, got {thresholds!r}")
    names = [f"g{j + 1}" for j in range(m)] if names is None else [str(x) for x in names]
    if len(names) != m:
        raise InputError(f"{len(names)} names given for {m} constraints")
    return b, weights, np.asarray(utilities), names


def solve_dual(rewards, utilities, thresholds, beta: float, sample_weights=None, *,
               bootstrap: int = 0, seed: int = 0, tol: float = 1e-9, max_iter: int = 100,
               names: Sequence[str] | None = None, lambdas0=None, ci_level: float = 0.95,
               relative: Sequence[bool] | None = None, confidence: float | None = None,
               evaluation: tuple[int, int] | None = None, residual_variance=None,
               evaluation_bound: float | None = None, delivery: float | None = None) -> DualResult:
    """λ* = argmin_{λ≥0} D(λ) for rewards [N, K], utilities [N, K, m] (or [N, K]), thresholds b.

    The constraints read mean_x E_π[g_j] ≥ b_j. ``sample_weights`` [N, K] ≥ 0 are normalised per
    prompt (uniform by default; zero-weight samples are ignored). ``bootstrap`` > 0 adds percentile
    CIs over prompts (seeded by ``seed``). ``relative[j]``: b_j was set as π_ref's mean of g_j on
    these samples plus a margin, so the bootstrap re-estimates that mean on each resample.
    ``confidence`` (e.g. 0.95): plan with a margin, the λ for which each constraint holds at its
    one-sided ``confidence`` bound under prompt resampling (``result.plain`` is the solution
    without it); with ``evaluation`` = (prompts, responses per prompt) the margin also covers the
    noise of an evaluation of that size, so that its point estimate clears b_j with probability
    ≈ ``confidence`` if the fine-tune lands on π_λ; ``residual_variance`` [m] adds noise the
    utilities leave out to that evaluation (:func:`evaluation_se`); ``evaluation_bound`` (e.g. 0.95)
    makes the margin cover that one-sided bound of the evaluation too, so that the evaluation
    reports the constraint met at that bound with probability ≈ ``confidence``; ``delivery`` (δ, e.g.
    0.05) makes it cover the fine-tune's own spread around the plan too (:func:`delivery_margin`).
    Raises InfeasibleConstraintError when no finite λ* exists.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise InputError(f"rewards must be a non-empty [N, K] array, got shape {rewards.shape}")
    utilities = np.asarray(utilities, dtype=np.float64)
    utilities = utilities[..., None] if utilities.ndim == 2 else utilities
    b, weights, utilities, names = _check_inputs(rewards, utilities, sample_weights, thresholds,
                                                 beta, names, "[N, K]")
    n_prompts, k = rewards.shape
    seg = Segments.rectangular(n_prompts, k)
    flat_w = None if weights is None else weights.ravel()
    samples = flat_samples(seg, rewards.ravel(), utilities.reshape(-1, len(b)), flat_w, np.arange(n_prompts))
    return _finish(samples, b, float(beta), names, lambdas0, tol, max_iter, bootstrap, seed, ci_level,
                   relative, confidence, evaluation, residual_variance, evaluation_bound=evaluation_bound,
                   delivery=delivery)


def solve_dual_long(prompt_ids, rewards, utilities, thresholds, beta: float, sample_weights=None, *,
                    bootstrap: int = 0, seed: int = 0, tol: float = 1e-9, max_iter: int = 100,
                    names: Sequence[str] | None = None, lambdas0=None, ci_level: float = 0.95,
                    relative: Sequence[bool] | None = None, confidence: float | None = None,
                    evaluation: tuple[int, int] | None = None, residual_variance=None,
                    target: tuple[np.ndarray, np.ndarray] | None = None,
                    refit: Refit | None = None, evaluation_bound: float | None = None,
                    delivery: float | None = None, shift_bias: bool = True) -> DualResult:
    """:func:`solve_dual` on long-format rows: prompt_ids [n], rewards [n], utilities [n, m] or [n].

    Prompts may have different numbers of samples; rows of a prompt need not be adjacent. Grouping
    is one sort (none when the rows are already grouped); all per-prompt work is segment sums.

    When the rewards and utilities are estimates fitted from other values (the reachable tilt),
    ``target`` = (rewards [n], utilities [n, m]) holds those other values: ``result.target`` is
    their tilt at λ*, and the bootstrap adds its CIs (``result.ci["target"]``); ``refit`` re-estimates
    the fitted values on each resample (grouped rows; see :data:`Refit`), in the bootstrap and
    the confidence margin, so the fit's own error is in both.
    """
    prompt_ids = np.asarray(prompt_ids)
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or rewards.size == 0 or prompt_ids.shape != rewards.shape:
        raise InputError(f"prompt_ids {prompt_ids.shape} and rewards {rewards.shape} must be "
                         "non-empty and of the same length n")
    utilities = np.asarray(utilities, dtype=np.float64)
    utilities = utilities[:, None] if utilities.ndim == 1 else utilities
    b, weights, utilities, names = _check_inputs(rewards, utilities, sample_weights, thresholds,
                                                 beta, names, "[n]")
    seg = Segments.of(prompt_ids)
    weights = None if weights is None else seg.group(weights)
    samples = flat_samples(seg, seg.group(rewards), seg.group(utilities), weights, seg.labels)
    keep = None if weights is None or np.all(weights > 0) else weights > 0
    target_samples = None
    if target is not None:
        t_rewards = seg.group(np.asarray(target[0], dtype=np.float64))
        t_utilities = seg.group(np.asarray(target[1], dtype=np.float64).reshape(len(t_rewards), -1))
        if t_utilities.shape != (samples.size if keep is None else len(keep), len(b)):
            raise InputError(f"target must be (rewards [n], utilities [n, {len(b)}]) like the rows")
        if keep is not None:
            t_rewards, t_utilities = t_rewards[keep], t_utilities[keep]
        target_samples = samples.with_values(t_rewards, t_utilities)
    return _finish(samples, b, float(beta), names, lambdas0, tol, max_iter, bootstrap, seed, ci_level,
                   relative, confidence, evaluation, residual_variance, target_samples, refit, keep,
                   evaluation_bound, delivery, shift_bias)


def _finish(samples, b, beta, names, lambdas0, tol, max_iter, bootstrap, seed, ci_level,
            relative=None, confidence=None, evaluation=None, residual_variance=None,
            target: Samples | None = None, refit: Refit | None = None,
            keep: np.ndarray | None = None, evaluation_bound: float | None = None,
            delivery: float | None = None, shift_bias: bool = True) -> DualResult:
    if lambdas0 is not None and np.shape(lambdas0) != b.shape:
        raise InputError(f"lambdas0 must have {b.size} values, got {np.shape(lambdas0)}")
    if relative is not None and len(relative) != b.size:
        raise InputError(f"relative must have {b.size} values, got {len(relative)}")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise InputError(f"confidence must lie in [0.5, 1), got {confidence!r}")
    if evaluation is not None and (len(evaluation) != 2 or min(evaluation) < 1):
        raise InputError(f"evaluation must be (prompts ≥ 1, responses per prompt ≥ 1), got {evaluation!r}")
    if evaluation_bound is not None and (evaluation is None or confidence is None or not 0.5 <= evaluation_bound < 1):
        raise InputError(f"evaluation_bound needs confidence and evaluation and must lie in [0.5, 1), "
                         f"got {evaluation_bound!r}")
    if delivery is not None and (confidence is None or not (np.isfinite(delivery) and 0 <= delivery < 1)):
        raise InputError(f"delivery needs confidence and must lie in [0, 1), got {delivery!r}")
    result = _result(samples, b, beta, names, lambdas0, tol, max_iter)
    ref = result.reference_utilities
    margins = np.where(np.asarray(relative if relative is not None else [False] * b.size, bool), b - ref, np.nan)
    if confidence is not None:
        result = _with_confidence(samples, result, margins, confidence, max(int(bootstrap), 200), seed, tol,
                                  max_iter, None if evaluation is None else tuple(int(v) for v in evaluation),
                                  residual_variance=None if residual_variance is None
                                  else np.asarray(residual_variance, dtype=np.float64), refit=refit, keep=keep,
                                  bound=evaluation_bound, delivery=delivery, shift_bias=shift_bias)
        margins = margins + result.confidence_margin
    if target is not None:
        result.target = _target_dict(_target_outcomes(target, result.lambdas, beta), b.size)
    if refit is not None and (bootstrap or confidence is not None):
        result.fit_bias = fit_bias(samples, result.lambdas, beta, max(int(bootstrap), 200), seed, refit, keep)
    if bootstrap:
        _bootstrap(samples, result, int(bootstrap), seed, tol, max_iter, ci_level, margins, refit, keep, target)
    return result

"""The closed-form dual of one-shot safety alignment (MoCAN / PeCAN, arXiv 2405.19544).

Primal, per prompt x with K samples y_k ~ π_ref and weights w_k (normalised per prompt):

    maximize  E_π[r] − β·KL(π‖π_ref)   subject to  E_π[g_j] ≥ b_j,  j = 1..m.

For λ ≥ 0 the Lagrangian's maximiser is π_λ ∝ π_ref·exp((r + λᵀg)/β); on the samples it is the tilt
p_λ,k = w_k exp((r_k + λᵀg_k)/β) / Σ_i w_i exp((r_i + λᵀg_i)/β). The sampled dual

    D(λ) = β·mean_x log Σ_k w_k exp((r_k + λᵀg_k)/β) − λᵀb

is convex, ∇D = mean_x E_{p_λ}[g] − b, ∇²D = mean_x Cov_{p_λ}(g)/β, and λ* = argmin_{λ≥0} D(λ).

The first section states each formula as a small function on rectangular ``[N, K]`` arrays. The
solver evaluates the same formulas on a flat layout, prompt after prompt (ragged prompts, zero
weights dropped), with segment sums; tests/test_dual.py holds the two equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import logsumexp

from dualign.errors import InfeasibleConstraintError, InputError
from dualign.segments import Segments

if TYPE_CHECKING:
    from dualign.constraints import Constraint
    from dualign.data.scores import Scores

# ---------------------------------------------------------------------------------------------
# The formulas, on rectangular arrays: rewards [N, K], utilities [N, K, m] (or [N, K] when m = 1).
# ---------------------------------------------------------------------------------------------


def _as_3d(utilities: np.ndarray) -> np.ndarray:
    u = np.asarray(utilities, dtype=np.float64)
    return u[..., None] if u.ndim == 2 else u


def _normalised(rewards: np.ndarray, sample_weights: np.ndarray | None) -> np.ndarray:
    if sample_weights is None:
        return np.full(np.shape(rewards), 1.0 / np.shape(rewards)[1])
    w = np.asarray(sample_weights, dtype=np.float64)
    return w / w.sum(axis=1, keepdims=True)


def _tilt_scores(rewards, utilities, lambdas, beta) -> np.ndarray:
    """s_k = (r_k + λᵀg_k)/β → [N, K]."""
    return (np.asarray(rewards, dtype=np.float64) + _as_3d(utilities) @ np.atleast_1d(lambdas)) / beta


def log_partition(rewards, utilities, lambdas, beta: float, sample_weights=None) -> np.ndarray:
    """log Z_x(λ) = log Σ_k w_k exp((r_k + λᵀg_k)/β) per prompt (w normalised per prompt) → [N]."""
    return logsumexp(_tilt_scores(rewards, utilities, lambdas, beta),
                     b=_normalised(rewards, sample_weights), axis=1)


def dual_value(rewards, utilities, lambdas, thresholds, beta: float, sample_weights=None) -> float:
    """D(λ) = β·mean_x log Σ_k w_k exp((r_k + λᵀg_k)/β) − λᵀb."""
    lambdas = np.atleast_1d(lambdas)
    log_z = log_partition(rewards, utilities, lambdas, beta, sample_weights)
    return float(beta * log_z.mean() - lambdas @ np.broadcast_to(thresholds, lambdas.shape))


def tilted_weights(rewards, utilities, lambdas, beta: float, sample_weights=None) -> np.ndarray:
    """p_λ,k = w_k exp((r_k + λᵀg_k)/β) / Σ_i w_i exp((r_i + λᵀg_i)/β) per prompt → [N, K]."""
    w = _normalised(rewards, sample_weights)
    with np.errstate(divide="ignore"):
        logits = _tilt_scores(rewards, utilities, lambdas, beta) + np.log(w)
    return np.exp(logits - logsumexp(logits, axis=1, keepdims=True))


def dual_gradient(rewards, utilities, lambdas, thresholds, beta: float,
                  sample_weights=None) -> np.ndarray:
    """∇D(λ) = mean_x E_{p_λ}[g] − b → [m]."""
    p = tilted_weights(rewards, utilities, lambdas, beta, sample_weights)
    expected = np.einsum("nk,nkm->m", p, _as_3d(utilities)) / p.shape[0]
    return expected - np.broadcast_to(thresholds, expected.shape)


def dual_hessian(rewards, utilities, lambdas, beta: float, sample_weights=None) -> np.ndarray:
    """∇²D(λ) = mean_x Cov_{p_λ}(g)/β = mean_x E_p[(g − E_p g)(g − E_p g)ᵀ]/β → [m, m]."""
    g = _as_3d(utilities)
    p = tilted_weights(rewards, utilities, lambdas, beta, sample_weights)
    centred = g - np.einsum("nk,nkm->nm", p, g)[:, None, :]
    return np.einsum("nk,nki,nkj->ij", p, centred, centred) / (p.shape[0] * beta)


def predictions(rewards, utilities, lambdas, beta: float,
                sample_weights=None) -> tuple[float, np.ndarray]:
    """(mean_x E_{p_λ}[r], mean_x E_{p_λ}[g]): the reward and utilities π_λ is predicted to reach."""
    p = tilted_weights(rewards, utilities, lambdas, beta, sample_weights)
    n = p.shape[0]
    return (float(np.sum(p * rewards) / n), np.einsum("nk,nkm->m", p, _as_3d(utilities)) / n)


def kl(rewards, utilities, lambdas, beta: float, sample_weights=None) -> float:
    """mean_x KL(p_λ‖w) = mean_x Σ_k p_k log(p_k/w_k) = mean_x (E_p[(r + λᵀg)/β] − log Z_x(λ))."""
    p = tilted_weights(rewards, utilities, lambdas, beta, sample_weights)
    s = _tilt_scores(rewards, utilities, lambdas, beta)
    log_z = log_partition(rewards, utilities, lambdas, beta, sample_weights)
    return float(np.mean(np.sum(p * s, axis=1) - log_z))


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Flat layout: samples stored prompt after prompt, reductions per prompt by segment sums.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Samples:
    """One dual problem's data: g is stored centred (g − centre) so that exp and Cov stay accurate."""

    seg: Segments
    rewards: np.ndarray  # [n]
    centred: np.ndarray  # [m, n] g − centre
    centre: np.ndarray  # [m]
    log_weights: np.ndarray | None  # [n] log w (normalised per prompt, w > 0); None: uniform 1/K_x
    prompt_weights: np.ndarray  # [N] sum to 1 (uniform, or bootstrap counts / N)
    prompt_labels: np.ndarray  # [N] for messages
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def m(self) -> int:
        return self.centred.shape[0]

    def prompt_max(self) -> np.ndarray:
        """max_k g_jk per prompt → [m, N] (centred)."""
        if "prompt_max" not in self._cache:
            self._cache["prompt_max"] = self.seg.max(self.centred)
        return self._cache["prompt_max"]

    def reachable(self) -> np.ndarray:
        """mean_x max_k g_jk: the largest E[g_j] any reweighting of the samples reaches → [m]."""
        return self.prompt_max() @ self.prompt_weights + self.centre

    @property
    def size(self) -> int:
        return self.rewards.size

    def log_weights_or_uniform(self) -> np.ndarray:
        """log w per sample [n], or per prompt [N] (−log K_x) when the weights are uniform."""
        if self.log_weights is None:
            return -np.log(self.seg.counts.astype(np.float64))
        return self.log_weights

    def scaled_log_weights(self, x: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
        """x·scale + log w, per sample."""
        if self.log_weights is None:
            return self.seg.scale(x, scale, shift=self.log_weights_or_uniform(), out=out)
        out = np.multiply(x, scale, out=out)
        out += self.log_weights
        return out

    def weighted_log_weights(self, pq: np.ndarray) -> float:
        """Σ_k pq_k log w_k for per-sample weights pq summing to q_x within prompt x."""
        if self.log_weights is None:
            return float(self.prompt_weights @ self.log_weights_or_uniform())
        return float(pq @ self.log_weights)

    def reference(self) -> tuple[float, np.ndarray]:
        """(Σ_x q_x E_w[r], Σ_x q_x E_w[g]) under π_ref (q: prompt weights, uniform = mean_x)."""
        w = np.ones(self.size) if self.log_weights is None else np.exp(self.log_weights)
        wq = self.seg.scale(w, self.prompt_weights / self.seg.sum(w))
        return float(wq @ self.rewards), self.centred @ wq + self.centre

    def gabs(self) -> np.ndarray:
        """max_k |g_jk − centre_j| over all samples → [m]."""
        if "gabs" not in self._cache:
            self._cache["gabs"] = np.maximum(self.centred.max(axis=1), -self.centred.min(axis=1))
        return self._cache["gabs"]

    def scale(self, thresholds: np.ndarray) -> np.ndarray:
        """Magnitude of each utility's values: the KKT tolerance is relative to it."""
        return np.maximum.reduce([np.abs(thresholds), np.abs(self.centre), self.gabs(),
                                  np.full(self.m, np.finfo(float).tiny)])

    def take(self, prompts: np.ndarray, prompt_weights: np.ndarray) -> _Samples:
        """The sub-problem on ``prompts`` (sorted indices) with the given prompt weights."""
        seg, idx = self.seg.take(prompts)
        out = _Samples(seg, self.rewards[idx], self.centred[:, idx], self.centre,
                       None if self.log_weights is None else self.log_weights[idx],
                       prompt_weights / prompt_weights.sum(),
                       self.prompt_labels[prompts])
        if "prompt_max" in self._cache:
            out._cache["prompt_max"] = self._cache["prompt_max"][:, prompts]
        if "gabs" in self._cache:
            out._cache["gabs"] = self._cache["gabs"]
        return out


def _samples(seg: Segments, rewards: np.ndarray, utilities: np.ndarray,
             sample_weights: np.ndarray | None, labels: np.ndarray) -> _Samples:
    """Build the flat problem from grouped [n] rewards, [m, n] utilities, [n] weights (≥ 0).

    ``utilities`` is centred in place: pass an array the caller no longer needs.
    """
    if sample_weights is not None and not np.all(sample_weights > 0):
        keep = sample_weights > 0
        counts = seg.sum(keep.astype(np.float64)).round().astype(np.int64)
        if np.any(counts == 0):
            bad = labels[np.flatnonzero(counts == 0)[0]]
            raise InputError(f"prompt {bad!r}: all sample weights are zero")
        seg = Segments.from_counts(counts)
        rewards, utilities, sample_weights = rewards[keep], utilities[:, keep], sample_weights[keep]
    log_weights = None
    if sample_weights is not None:
        log_weights = np.log(sample_weights / seg.expand(seg.sum(sample_weights)))
    centre = utilities.mean(axis=1)
    utilities -= centre[:, None]
    return _Samples(seg, rewards, utilities, centre, log_weights,
                    np.full(seg.num, 1.0 / seg.num), labels)


# ---------------------------------------------------------------------------------------------
# Fast evaluation of D, ∇D, ∇²D (the naive equivalents: dual_value, dual_gradient, dual_hessian)
# ---------------------------------------------------------------------------------------------

# exp() of a shifted score stays within e^±_SAFE_EXPONENT: no overflow even times |g| up to 1e170.
_SAFE_EXPONENT = 200.0


@dataclass
class _Point:
    lambdas: np.ndarray
    value: float
    e: np.ndarray  # [n] exp(z), z = (r + λᵀg)/β + log w − c_x (a _Tilt buffer)
    z_sum: np.ndarray  # [N] Σ_k e_k
    value_scale: float  # magnitude of the terms summed into D (for rounding noise)
    shifted: np.ndarray  # [n] z at the shift point λ_s
    step: np.ndarray  # [m] (λ − λ_s)/β, so z = shifted + stepᵀg


class _Tilt:
    """D(λ), ∇D, ∇²D on _Samples; the naive equivalents are dual_value/dual_gradient/dual_hessian.

    The per-prompt log-sum-exp shift c_x = max_k (r_k + λ_sᵀg_k)/β + log w_k is computed at some
    λ_s and kept while Σ_j |λ_j − λ_s,j|·max|g_j|/β ≤ _SAFE_EXPONENT, so most evaluations skip the
    per-prompt max: exp(z) is then within e^±_SAFE_EXPONENT for the largest sample of every prompt.
    Evaluations write into two preallocated buffers (the current point's and a trial's): the hot
    loop allocates nothing of size n.
    """

    def __init__(self, samples: _Samples, thresholds: np.ndarray, beta: float):
        self.s, self.beta = samples, beta
        self.b = thresholds - samples.centre  # D is unchanged by centring g when b moves with it
        self.base = samples.scaled_log_weights(samples.rewards, 1.0 / beta)
        self.gabs = samples.gabs()
        self.shift_at: np.ndarray | None = None
        n = samples.rewards.size
        self._e = (np.empty(n), np.empty(n))
        self._pq = np.empty(n)
        self._pqg = np.empty_like(samples.centred)

    def _reshift(self, lambdas: np.ndarray) -> None:
        z = (lambdas / self.beta) @ self.s.centred
        z += self.base
        self.c = self.s.seg.max(z)
        self.shifted = self.s.seg.scale(z, 1.0, shift=-self.c, out=z)
        self.shift_at = lambdas.copy()

    def evaluate(self, lambdas: np.ndarray, keep: _Point | None = None) -> _Point:
        """D(λ) (the buffers of ``keep`` are left alone)."""
        if self.shift_at is None or (np.abs(lambdas - self.shift_at) @ self.gabs) / self.beta > _SAFE_EXPONENT:
            self._reshift(lambdas)
        e = self._e[1] if keep is not None and keep.e is self._e[0] else self._e[0]
        step = (lambdas - self.shift_at) / self.beta
        if np.any(step):
            np.dot(step, self.s.centred, out=e)
            e += self.shifted
        else:
            e[...] = self.shifted
        np.exp(e, out=e)
        z_sum = self.s.seg.sum(e)
        log_z = np.log(z_sum) + self.c
        q = self.s.prompt_weights
        value = self.beta * float(q @ log_z) - float(lambdas @ self.b)
        scale = self.beta * float(q @ np.abs(log_z)) + float(np.abs(lambdas) @ np.abs(self.b))
        return _Point(lambdas, value, e, z_sum, scale, self.shifted, step)

    def derivatives(self, pt: _Point) -> tuple[np.ndarray, np.ndarray]:
        """∇D = Σ_x q_x E_p[g] − b and ∇²D = Σ_x q_x Cov_p(g)/β at ``pt`` (q: prompt weights)."""
        s, q, g = self.s, self.s.prompt_weights, self.s.centred
        pq = s.seg.scale(pt.e, q / pt.z_sum, out=self._pq)  # q_x p_k
        pqg = np.multiply(pq, g, out=self._pqg)  # [m, n]
        per_prompt = s.seg.sum(pqg)  # [m, N] q_x E_p[g]
        grad = per_prompt.sum(axis=1) - self.b
        if s.m <= 3:  # m(m+1)/2 dot products beat one thin matrix product here
            second = np.empty((s.m, s.m))
            for i in range(s.m):
                for j in range(i, s.m):
                    second[i, j] = second[j, i] = pqg[i] @ g[j]
        else:
            second = pqg @ g.T  # Σ_x q_x E_p[g gᵀ]
        hess = (second - (per_prompt / q) @ per_prompt.T) / self.beta
        return grad, (hess + hess.T) / 2

    def outcomes(self, pt: _Point) -> tuple[float, np.ndarray, float]:
        """(Σ_x q_x E_p[r], Σ_x q_x E_p[g], Σ_x q_x KL(p‖w)); KL_x = Σ_k p_k (z_k − log w_k) − log Σ e."""
        s, q = self.s, self.s.prompt_weights
        pq = s.seg.scale(pt.e, q / pt.z_sum, out=self._pq)
        z = self._e[1] if pt.e is self._e[0] else self._e[0]
        np.dot(pt.step, s.centred, out=z)
        z += pt.shifted
        kl_value = float(pq @ z) - s.weighted_log_weights(pq) - float(q @ np.log(pt.z_sum))
        return float(pq @ s.rewards), s.centred @ pq + s.centre, max(kl_value, 0.0)


# ---------------------------------------------------------------------------------------------
# Projected Newton
# ---------------------------------------------------------------------------------------------


def _kkt_residual(lambdas: np.ndarray, grad: np.ndarray) -> np.ndarray:
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
    point: _Point
    grad: np.ndarray
    iterations: int
    converged: bool
    below_bound: bool  # D fell below a lower bound that holds whenever the primal is feasible
    residual: float


def _newton(tilt: _Tilt, lambdas: np.ndarray, tol: float, max_iter: int) -> _Solve:
    """Projected Newton with an Armijo line search on the segment [λ, y], y ≥ 0 the model's minimiser.

    Tests hold it equal to _projected_gradient_descent (the official code's method) and to an
    exact primal solve. Stops when max_j |projected ∇_j D| / scale_j ≤ tol.
    """
    s = tilt.s
    scale = s.scale(tilt.b + s.centre)
    # Weak duality: if some p is feasible, D(λ) ≥ E_p[r] − β·KL(p‖w) ≥ min r + β·min log w.
    lower_bound = float(s.rewards.min() + tilt.beta * s.log_weights_or_uniform().min())
    floor = float(np.max(tilt.gabs) ** 2 / tilt.beta) or 1.0 / tilt.beta
    pt = tilt.evaluate(lambdas)
    grad, hess = tilt.derivatives(pt)
    it = 0
    while True:
        residual = float(np.max(_kkt_residual(lambdas, grad) / scale))
        if residual <= tol or it >= max_iter:
            return _Solve(lambdas, pt, grad, it, residual <= tol, False, residual)
        direction = _newton_target(lambdas, grad, hess, floor) - lambdas
        slope = float(grad @ direction)
        if not slope < 0:  # rounding: the model sees no descent left
            return _Solve(lambdas, pt, grad, it, False, False, residual)
        alpha = 1.0
        while True:
            trial = np.maximum(lambdas + alpha * direction, 0.0)
            tp = tilt.evaluate(trial, keep=pt)
            noise = 64 * np.finfo(float).eps * (pt.value_scale + tp.value_scale)
            if tp.value <= pt.value + 1e-4 * alpha * slope + noise:
                break
            alpha *= 0.5
            if alpha < 1e-12:
                return _Solve(lambdas, pt, grad, it, False, False, residual)
        it += 1
        lambdas, pt = trial, tp
        if pt.value < lower_bound or not np.all(np.isfinite(lambdas)):
            return _Solve(lambdas, pt, grad, it, False, True, np.inf)
        grad, hess = tilt.derivatives(pt)


def _projected_gradient_descent(tilt: _Tilt, lambdas: np.ndarray, step: float, tol: float,
                                max_iter: int, max_seconds: float = np.inf) -> tuple[np.ndarray, int, bool]:
    """λ ← max(0, λ − η·∇D(λ)) with a fixed step η, as the official code solves the dual.

    Returns (λ, iterations, reached tol). Used as the reference in tests and the baseline in bench.
    """
    import time

    start = time.perf_counter()
    scale = tilt.s.scale(tilt.b + tilt.s.centre)
    for it in range(max_iter):
        grad, _ = tilt.derivatives(tilt.evaluate(lambdas))
        if np.max(_kkt_residual(lambdas, grad) / scale) <= tol:
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


def _check_each(samples: _Samples, thresholds: np.ndarray, names: Sequence[str]) -> None:
    """Raise when some b_j ≥ mean_x max_k g_jk (unless g_j is constant per prompt and b_j ≤ E_w g_j).

    Within 1e-12·scale of the limit counts as at it: λ* would be astronomically large.
    """
    reachable = samples.reachable()
    slack = 1e-12 * samples.scale(thresholds)
    for j in np.flatnonzero(thresholds >= reachable - slack):
        _, ref = samples.reference()
        if thresholds[j] > ref[j] + slack[j]:
            raise _infeasible(names, thresholds, reachable, [int(j)], joint=False)


def _joint_margin(samples: _Samples, thresholds: np.ndarray) -> float:
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

# Prompts in the first of the nested random subsets that warm-start Newton on large problems.
_WARM_START_PROMPTS = 4096


def _solve(samples: _Samples, thresholds: np.ndarray, beta: float, names: Sequence[str],
           lambdas0: np.ndarray | None, tol: float, max_iter: int,
           check_joint: bool = True) -> tuple[_Solve, _Tilt]:
    """Newton, then feasibility checks only where Newton's outcome leaves room for doubt.

    A KKT point only meets a tolerance, and one is met at a finite λ even when b_j equals the
    reachable limit (λ*_j = ∞), so active constraints (λ_j > 0) are always compared with
    mean_x max_k g_jk. Where Newton failed (no convergence, D below the weak-duality bound) or λ is
    so large that the tilt has nearly collapsed, every constraint is, and for m > 1 the joint LP
    decides. ``check_joint=False`` (warm starts, bootstrap) skips the LP.
    """
    if lambdas0 is None:
        lambdas0 = _warm_start(samples, thresholds, beta, names, tol, max_iter)
    tilt = _Tilt(samples, thresholds, beta)
    sol = _newton(tilt, np.maximum(np.asarray(lambdas0, dtype=np.float64), 0.0), tol, max_iter)
    huge = np.max(sol.lambdas * tilt.gabs) / beta > _SAFE_EXPONENT
    if sol.converged and not huge:
        if np.any(sol.lambdas > 0):
            _check_each(samples, thresholds, names)
        return sol, tilt
    _check_each(samples, thresholds, names)
    if samples.m > 1 and check_joint:
        margin = -np.inf if sol.below_bound else _joint_margin(samples, thresholds)
        if margin <= 1e-7:
            detail = "" if sol.below_bound else f" (best joint margin {margin:.3g} × scale)"
            raise _infeasible(names, thresholds, samples.reachable(), list(range(samples.m)),
                              joint=True, detail=detail)
    return sol, tilt


def _warm_start(samples: _Samples, thresholds: np.ndarray, beta: float, names: Sequence[str],
                tol: float, max_iter: int) -> np.ndarray:
    """λ* of a random eighth of the prompts (itself warm-started the same way), else 0.

    Its λ* is within sampling error of the full one, so Newton on all the data needs only the few
    steps of its quadratic phase.
    """
    num = samples.seg.num
    zero = np.zeros(samples.m)
    if num < 4 * _WARM_START_PROMPTS:
        return zero
    rng = np.random.default_rng(num)
    prompts = np.sort(rng.choice(num, size=_WARM_START_PROMPTS, replace=False))
    sub = samples.take(prompts, samples.prompt_weights[prompts])
    try:
        sol, _ = _solve(sub, thresholds, beta, names, None, tol, max_iter, check_joint=False)
    except InfeasibleConstraintError:
        return zero
    return sol.lambdas if np.all(np.isfinite(sol.lambdas)) and not sol.below_bound else zero


def _result(samples: _Samples, thresholds: np.ndarray, beta: float, names: list[str],
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


def _bootstrap(samples: _Samples, result: DualResult, bootstrap: int, seed: int, tol: float,
               max_iter: int, level: float) -> None:
    """Percentile CIs over prompts: resample prompts with replacement (multinomial prompt weights)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    num = samples.seg.num
    draws = []
    for _ in tqdm(range(bootstrap), desc="bootstrap", disable=None, leave=False):
        counts = rng.multinomial(num, np.full(num, 1.0 / num))
        prompts = np.flatnonzero(counts)
        sub = samples.take(prompts, counts[prompts].astype(np.float64))
        try:
            sol, tilt = _solve(sub, result.thresholds, result.beta, result.names, result.lambdas,
                               tol, max_iter, check_joint=False)
        except InfeasibleConstraintError:
            continue
        if not sol.converged:
            continue
        reward, utilities, kl_value = tilt.outcomes(sol.point)
        draws.append(np.concatenate([sol.lambdas, [reward], utilities, [kl_value]]))
    result.bootstrap, result.bootstrap_failed, result.ci_level = bootstrap, bootstrap - len(draws), level
    if not draws:
        return
    lo, hi = np.percentile(np.array(draws), [50 * (1 - level), 50 * (1 + level)], axis=0)
    bounds = np.stack([lo, hi], axis=-1)
    m = samples.m
    result.ci = {"lambdas": bounds[:m], "predicted_reward": bounds[m],
                 "predicted_utilities": bounds[m + 1:2 * m + 1], "kl": bounds[-1]}


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
        if not np.all(np.isfinite(a)):
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
               names: Sequence[str] | None = None, lambdas0=None,
               ci_level: float = 0.95) -> DualResult:
    """λ* = argmin_{λ≥0} D(λ) for rewards [N, K], utilities [N, K, m] (or [N, K]), thresholds b.

    The constraints read mean_x E_π[g_j] ≥ b_j. ``sample_weights`` [N, K] ≥ 0 are normalised per
    prompt (uniform by default; zero-weight samples are ignored). ``bootstrap`` > 0 adds percentile
    CIs over prompts (seeded by ``seed``). Raises InfeasibleConstraintError when no finite λ* exists.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise InputError(f"rewards must be a non-empty [N, K] array, got shape {rewards.shape}")
    utilities = _as_3d(utilities)
    b, weights, utilities, names = _check_inputs(rewards, utilities, sample_weights, thresholds,
                                                 beta, names, "[N, K]")
    n_prompts, k = rewards.shape
    seg = Segments.rectangular(n_prompts, k)
    flat_w = None if weights is None else weights.ravel()
    samples = _samples(seg, rewards.ravel(), utilities.reshape(-1, len(b)).T.copy(), flat_w,
                       np.arange(n_prompts))
    return _finish(samples, b, float(beta), names, lambdas0, tol, max_iter, bootstrap, seed, ci_level)


def solve_dual_long(prompt_ids, rewards, utilities, thresholds, beta: float, sample_weights=None, *,
                    bootstrap: int = 0, seed: int = 0, tol: float = 1e-9, max_iter: int = 100,
                    names: Sequence[str] | None = None, lambdas0=None,
                    ci_level: float = 0.95) -> DualResult:
    """:func:`solve_dual` on long-format rows: prompt_ids [n], rewards [n], utilities [n, m] or [n].

    Prompts may have different numbers of samples; rows of a prompt need not be adjacent. Grouping
    is one sort (none when the rows are already grouped); all per-prompt work is segment sums.
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
    samples = _samples(seg, seg.group(rewards), seg.group(utilities).T.copy(), weights, seg.labels)
    return _finish(samples, b, float(beta), names, lambdas0, tol, max_iter, bootstrap, seed, ci_level)


def _finish(samples, b, beta, names, lambdas0, tol, max_iter, bootstrap, seed,
            ci_level) -> DualResult:
    if lambdas0 is not None and np.shape(lambdas0) != b.shape:
        raise InputError(f"lambdas0 must have {b.size} values, got {np.shape(lambdas0)}")
    result = _result(samples, b, beta, names, lambdas0, tol, max_iter)
    if bootstrap:
        _bootstrap(samples, result, int(bootstrap), seed, tol, max_iter, ci_level)
    return result


def reference_means(prompt_ids, values, sample_weights=None) -> np.ndarray:
    """mean_x Σ_k w_k v_k (w normalised per prompt) for values [n] or [n, c] → scalar or [c]."""
    seg = Segments.of(prompt_ids)
    v = seg.group(np.asarray(values, dtype=np.float64))
    w = np.ones(len(v)) if sample_weights is None else seg.group(np.asarray(sample_weights, np.float64))
    w = w / seg.expand(seg.sum(w))
    return seg.sum(v.T * w).mean(axis=-1)


def grouped_logsumexp(values, prompt_ids) -> np.ndarray:
    """log Σ_{i: x_i = x_j} exp(v_i) for every row j: the per-prompt log-sum-exp of long-format
    values, broadcast back to the rows (stable: the prompt's max is taken out first) → [n]."""
    seg = Segments.of(prompt_ids)
    v = seg.group(np.asarray(values, dtype=np.float64))
    return seg.ungroup(seg.expand(seg.logsumexp(v)))


def tilted_means(prompt_ids: np.ndarray, logits: np.ndarray, values: np.ndarray,
                 sample_weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(mean_x Σ_k p_k·v_k [c], mean_x KL(p‖w)) for p_k ∝ w_k·exp(s_k) within each prompt.

    The long-format version of :func:`predictions` / :func:`kl` for any logits s (e.g. the
    baselines' (w_r·r + λᵀg)/β), weights w normalised per prompt; prompts may have different K.
    """
    seg = Segments.of(prompt_ids)
    w = np.ones(seg.size) if sample_weights is None else seg.group(np.asarray(sample_weights, float))
    w = w / seg.expand(seg.sum(w))
    with np.errstate(divide="ignore"):
        z = seg.group(np.asarray(logits, float)) + np.log(w)
    p = np.exp(z - seg.expand(seg.logsumexp(z)))
    v = seg.group(np.asarray(values, float).reshape(seg.size, -1))
    means = seg.sum(p * v.T).mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(w)), 0.0)
    return means, float(seg.sum(terms).mean())


def half_sample_kl(prompt_index, rewards, utilities, lambdas, beta: float,
                   sample_weights=None) -> tuple[float, float] | None:
    """(KL estimate on the first ⌊K_x/2⌋ samples of each prompt, on all K_x) at fixed λ, both
    mean_x Σ_k p_k log(p_k/w_k) over the prompts with K_x ≥ 2 (None when there are none).

    The K-sample estimate of KL(π_λ‖π_ref) is at most log K per prompt and biased low; it grows
    with K until the samples cover π_λ's mass. Half-K well below all-K says K was too small and
    π_λ's true KL (what a fine-tune towards it spends) is likely above the prediction.
    """
    seg = Segments.of(prompt_index)
    codes = np.repeat(np.arange(seg.num), seg.counts)  # prompt of each grouped row
    counts = seg.expand(seg.counts)
    keep, half = counts >= 2, np.arange(seg.size) - seg.expand(seg.starts) < counts // 2
    if not keep.any():
        return None
    g = np.asarray(utilities, np.float64).reshape(seg.size, -1)
    logits = seg.group((np.asarray(rewards, np.float64) + g @ np.atleast_1d(lambdas)) / beta)
    w = None if sample_weights is None else seg.group(np.asarray(sample_weights, np.float64))
    values = np.zeros(seg.size)

    def estimate(mask):
        return tilted_means(codes[mask], logits[mask], values[mask], None if w is None else w[mask])[1]

    return estimate(keep & half), estimate(keep)


# ---------------------------------------------------------------------------------------------
# Column-level: constraint strings, the dual.json report, the pipeline stage
# ---------------------------------------------------------------------------------------------


@dataclass
class DualConfig:
    """The dual stage: λ* for the constraints on <run_dir>/scores.parquet → <run_dir>/dual.json."""

    constraints: list[str] = field(metadata={
        "help": "COLUMN<=VALUE (cost) or COLUMN>=VALUE (utility); VALUE absolute or ref+X / ref-X"})
    scores: str | None = field(default=None, metadata={
        "help": "scores table (default: <run_dir>/scores.parquet)"})
    beta: float = field(default=0.1, metadata={"help": "KL coefficient β"})
    reward: str = field(default="reward", metadata={"help": "reward column"})
    bootstrap: int = field(default=0, metadata={
        "help": "bootstrap resamples over prompts for CIs (0: none)"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})


def _column_infeasible(err: InfeasibleConstraintError,
                       constraints: Sequence[Constraint]) -> InfeasibleConstraintError:
    """Restate a g-unit infeasibility in the columns' own units (a cost's reachable minimum)."""
    def bound(j: int) -> str:
        c = constraints[j]
        word = "lowest" if c.sign < 0 else "highest"
        return f"the {word} mean {c.column} reachable by reweighting the samples is {c.sign * err.reachable[j]:.6g}"

    if err.joint:
        parts = "; ".join(f"'{constraints[j].text}' asks {constraints[j].column} {constraints[j].op} "
                          f"{constraints[j].sign * err.thresholds[j]:.6g} ({bound(j)})" for j in err.which)
        msg = f"constraints jointly infeasible (no reweighting meets them all at once): {parts}"
    else:
        j = err.which[0]
        c = constraints[j]
        msg = (f"constraint '{c.text}' is infeasible: it asks mean {c.column} {c.op} "
               f"{c.sign * err.thresholds[j]:.6g} but {bound(j)}")
    new = InfeasibleConstraintError(msg)
    new.__dict__.update(err.__dict__)
    return new


def _refuse_absolute_implicit(constraints: Sequence[Constraint], source: str) -> None:
    """An implicit reward β·log(π/π_ref) is defined only up to a per-prompt constant, so only a
    threshold relative to π_ref means anything; ``score.meta.json`` beside the scores says which
    columns are implicit."""
    import json

    meta = Path(source).parent / "score.meta.json"
    if not Path(source).is_file() or not meta.exists():
        return
    scorers = json.loads(meta.read_text()).get("scorers", {})
    for c in constraints:
        if not c.relative and scorers.get(c.column, {}).get("kind") == "implicit":
            raise InputError(f"constraint {c.text!r}: '{c.column}' is an implicit reward (defined only up "
                             f"to a per-prompt constant), so its threshold must be relative to π_ref, "
                             f"e.g. '{c.column}{c.op}ref{'+' if c.op == '>=' else '-'}0.5'")


def solve_constraints(scores: Scores, beta: float, reward: str, constraints: Sequence[Constraint], *,
                      bootstrap: int = 0, seed: int = 0, lambdas0=None) -> dict[str, Any]:
    """Solve the dual for constraint strings on a scores table; return the dual.json dict."""
    from dualign.constraints import constraint_names, utilities_and_thresholds

    if not constraints:
        raise InputError("at least one --constraint is needed")
    _refuse_absolute_implicit(constraints, scores.source)
    columns = list(dict.fromkeys([reward] + [c.column for c in constraints]))
    refs = reference_means(scores.prompt_index, np.stack([scores.columns[c] for c in columns], axis=1),
                           scores.sample_weights)
    ref = dict(zip(columns, refs.tolist(), strict=True))
    g, b = utilities_and_thresholds(constraints, scores.columns, ref)
    names = constraint_names(constraints)
    try:
        res = solve_dual_long(scores.prompt_index, scores.columns[reward], g, b, beta,
                              scores.sample_weights, names=names, bootstrap=bootstrap, seed=seed,
                              lambdas0=lambdas0)
    except InfeasibleConstraintError as e:
        raise _column_infeasible(e, constraints) from None
    out = _report(res, reward, constraints, ref)
    halves = half_sample_kl(scores.prompt_index, scores.columns[reward], g, res.lambdas, beta,
                            scores.sample_weights)
    if halves is not None:
        out["kl_half_samples"] = {"half": halves[0], "all": halves[1]}
    return out


def _report(res: DualResult, reward: str, constraints: Sequence[Constraint],
            ref: dict[str, float]) -> dict[str, Any]:
    predicted, reference = {reward: res.predicted_reward}, {reward: res.reference_reward}
    for j, c in enumerate(constraints):
        predicted[c.column] = c.sign * float(res.predicted_utilities[j])
        reference[c.column] = ref[c.column]
    predicted["kl"], reference["kl"] = res.kl, 0.0
    out: dict[str, Any] = {
        "beta": res.beta, "reward": reward, "constraints": [c.text for c in constraints],
        "lambdas": dict(zip(res.names, res.lambdas.tolist(), strict=True)),
        "columns": {n: c.column for n, c in zip(res.names, constraints, strict=True)},
        "feasible": True, "converged": res.converged, "iterations": res.iterations,
        "dual_value": res.dual_value,
        "thresholds": {n: c.sign * float(b) for n, c, b in zip(res.names, constraints, res.thresholds, strict=True)},
        "predicted": predicted, "reference": reference,
        "kkt_residual": res.kkt_residual, "num_prompts": res.num_prompts,
        "num_samples": res.num_samples,
    }
    if res.ci is not None:
        pred_ci = {reward: res.ci["predicted_reward"].tolist()}
        for j, c in enumerate(constraints):
            pred_ci[c.column] = sorted((c.sign * res.ci["predicted_utilities"][j]).tolist())
        pred_ci["kl"] = res.ci["kl"].tolist()
        out["ci"] = {"level": res.ci_level, "bootstrap": res.bootstrap, "failed": res.bootstrap_failed,
                     "lambdas": {n: res.ci["lambdas"][j].tolist() for j, n in enumerate(res.names)},
                     "predicted": pred_ci}
    elif res.bootstrap:
        out["ci"] = None
    return out


def format_report(report: dict[str, Any]) -> str:
    """The human table printed by ``dualign dual``."""
    ci = report.get("ci") or {}
    status = "converged" if report["converged"] else "NOT converged"
    lines = [f"dual: beta={report['beta']:g}, {report['num_prompts']} prompts, "
             f"{report['num_samples']} samples; {status} in {report['iterations']} Newton steps "
             f"(KKT residual {report['kkt_residual']:.1e})"]
    head = f"{'':24s} {'lambda*':>12s} {'threshold':>12s} {'reference':>12s} {'predicted':>12s}"
    if ci:
        head += f"  {int(round(100 * ci['level']))}% CI (bootstrap {ci['bootstrap']})"
    lines.append(head)

    def ci_text(group: str, key: str) -> str:
        lo_hi = ci.get(group, {}).get(key) if ci else None
        return f"  [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else ""

    for text, (name, lam) in zip(report["constraints"], report["lambdas"].items(), strict=True):
        column = report["columns"][name]
        lines.append(f"{text:24s} {lam:12.6g} {report['thresholds'][name]:12.6g} "
                     f"{report['reference'][column]:12.6g} {report['predicted'][column]:12.6g}"
                     f"{ci_text('lambdas', name)}")
    for key in (report["reward"], "kl"):
        lines.append(f"{key:24s} {'':12s} {'':12s} {report['reference'][key]:12.6g} "
                     f"{report['predicted'][key]:12.6g}{ci_text('predicted', key)}")
    halves = report.get("kl_half_samples")
    if halves:
        lines.append(f"{'kl on K/2 samples':24s} {'':12s} {'':12s} {'':12s} {halves['half']:12.6g}  "
                     f"(on all K of the same prompts: {halves['all']:.6g}; an estimate still growing "
                     f"with K understates π_λ*'s KL)")
    return "\n".join(lines)


def run_dual(cfg: DualConfig, run_dir: str | Path) -> dict[str, Any]:
    """The pipeline's dual stage: read scores (cfg.scores or <run_dir>/scores.parquet), write dual.json."""
    from dualign.constraints import parse_constraint
    from dualign.data.scores import read_scores
    from dualign.io import write_json
    from dualign.provenance import record_stage

    run_dir = Path(run_dir)
    constraints = [parse_constraint(c) for c in cfg.constraints]
    path = Path(cfg.scores) if cfg.scores else run_dir / "scores.parquet"
    scores = read_scores(path, [cfg.reward] + [c.column for c in constraints])
    report = solve_constraints(scores, cfg.beta, cfg.reward, constraints, bootstrap=cfg.bootstrap,
                               seed=cfg.seed)
    write_json(report, run_dir / "dual.json")
    record_stage(run_dir, "dual", cfg, seed=cfg.seed)
    return report

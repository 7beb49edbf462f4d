"""The solver's flat problem and its fast evaluation of D, ∇D, ∇²D (naive versions: formulas.py).

:class:`Samples` holds one dual problem prompt after prompt (ragged prompts, zero weights dropped),
the utilities stored centred [m, n] so that exp and Cov stay accurate; :class:`Tilt` evaluates the
dual and its derivatives on it with segment sums and preallocated buffers. Each optimized routine
names its naive equivalent in :mod:`dualign.dual.formulas`; tests/test_dual.py holds them equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dualign.errors import InputError
from dualign.segments import Segments


@dataclass
class Samples:
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

    def take(self, prompts: np.ndarray, prompt_weights: np.ndarray) -> Samples:
        """The sub-problem on ``prompts`` (sorted indices) with the given prompt weights."""
        seg, idx = self.seg.take(prompts)
        out = Samples(seg, self.rewards[idx], self.centred[:, idx], self.centre,
                       None if self.log_weights is None else self.log_weights[idx],
                       prompt_weights / prompt_weights.sum(),
                       self.prompt_labels[prompts])
        if "prompt_max" in self._cache:
            out._cache["prompt_max"] = self._cache["prompt_max"][:, prompts]
        if "gabs" in self._cache:
            out._cache["gabs"] = self._cache["gabs"]
        return out


def flat_samples(seg: Segments, rewards: np.ndarray, utilities: np.ndarray,
             sample_weights: np.ndarray | None, labels: np.ndarray) -> Samples:
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
    return Samples(seg, rewards, utilities, centre, log_weights,
                    np.full(seg.num, 1.0 / seg.num), labels)


# ---------------------------------------------------------------------------------------------
# Fast evaluation of D, ∇D, ∇²D (the naive equivalents: dual_value, dual_gradient, dual_hessian)
# ---------------------------------------------------------------------------------------------

# exp() of a shifted score stays within e^±SAFE_EXPONENT: no overflow even times |g| up to 1e170.
SAFE_EXPONENT = 200.0


@dataclass
class Point:
    lambdas: np.ndarray
    value: float
    e: np.ndarray  # [n] exp(z), z = (r + λᵀg)/β + log w − c_x (a Tilt buffer)
    z_sum: np.ndarray  # [N] Σ_k e_k
    value_scale: float  # magnitude of the terms summed into D (for rounding noise)
    shifted: np.ndarray  # [n] z at the shift point λ_s
    step: np.ndarray  # [m] (λ − λ_s)/β, so z = shifted + stepᵀg


class Tilt:
    """D(λ), ∇D, ∇²D on Samples; the naive equivalents are dual_value/dual_gradient/dual_hessian.

    The per-prompt log-sum-exp shift c_x = max_k (r_k + λ_sᵀg_k)/β + log w_k is computed at some
    λ_s and kept while Σ_j |λ_j − λ_s,j|·max|g_j|/β ≤ SAFE_EXPONENT, so most evaluations skip the
    per-prompt max: exp(z) is then within e^±SAFE_EXPONENT for the largest sample of every prompt.
    Evaluations write into two preallocated buffers (the current point's and a trial's): the hot
    loop allocates nothing of size n.
    """

    def __init__(self, samples: Samples, thresholds: np.ndarray, beta: float):
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

    def evaluate(self, lambdas: np.ndarray, keep: Point | None = None) -> Point:
        """D(λ) (the buffers of ``keep`` are left alone)."""
        if self.shift_at is None or (np.abs(lambdas - self.shift_at) @ self.gabs) / self.beta > SAFE_EXPONENT:
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
        return Point(lambdas, value, e, z_sum, scale, self.shifted, step)

    def derivatives(self, pt: Point) -> tuple[np.ndarray, np.ndarray]:
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

    def outcomes(self, pt: Point) -> tuple[float, np.ndarray, float]:
        """(Σ_x q_x E_p[r], Σ_x q_x E_p[g], Σ_x q_x KL(p‖w)); KL_x = Σ_k p_k (z_k − log w_k) − log Σ e."""
        s, q = self.s, self.s.prompt_weights
        pq = s.seg.scale(pt.e, q / pt.z_sum, out=self._pq)
        z = self._e[1] if pt.e is self._e[0] else self._e[0]
        np.dot(pt.step, s.centred, out=z)
        z += pt.shifted
        kl_value = float(pq @ z) - s.weighted_log_weights(pq) - float(q @ np.log(pt.z_sum))
        return float(pq @ s.rewards), s.centred @ pq + s.centre, max(kl_value, 0.0)

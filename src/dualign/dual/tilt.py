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

from dualign._infra.errors import InputError
from dualign._infra.segments import Segments


@dataclass
class Samples:
    """One dual problem's data: g is stored centred (g − centre) so that exp and Cov stay accurate."""

    seg: Segments
    rewards: np.ndarray  # [n]
    centred: np.ndarray  # [m, n] g − centre
    centre: np.ndarray  # [m]
    log_weights: np.ndarray | None  # [n] log w (normalised per prompt, w > 0); None: uniform 1/K_x
    prompt_weights: np.ndarray  # [N] q_x, sum to 1 (uniform, or bootstrap counts / N)
    prompt_labels: np.ndarray  # [N] for messages
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def m(self) -> int:
        return self.centred.shape[0]

    @property
    def size(self) -> int:
        return self.rewards.size

    def reachable(self) -> np.ndarray:
        """Σ_x q_x max_k g_jk: the largest E[g_j] any reweighting of the samples reaches → [m]."""
        if "prompt_max" not in self._cache:
            self._cache["prompt_max"] = self.seg.max(self.centred)  # [m, N]
        return self._cache["prompt_max"] @ self.prompt_weights + self.centre

    def base(self, beta: float) -> np.ndarray:
        """r_k/β + log w_k per sample → [n]."""
        if self.log_weights is None and self.seg.width is not None:  # K rows per prompt: log w = −log K
            out = self.rewards / beta
            out -= np.log(self.seg.width)
            return out
        if self.log_weights is None:
            return self.seg.scale(self.rewards, 1.0 / beta, shift=-np.log(self.seg.counts.astype(np.float64)))
        out = self.rewards / beta
        out += self.log_weights
        return out

    def reference(self) -> tuple[float, np.ndarray]:
        """(Σ_x q_x E_w[r], Σ_x q_x E_w[g]) under π_ref; naive equivalent: formulas.reference_means."""
        if self.log_weights is None:  # uniform: Σ_x q_x·(1/K_x)·Σ_k v_k, one dot product per row
            wq = self.seg.expand(self.prompt_weights / self.seg.counts)
            return float(self.rewards @ wq), self.centred @ wq + self.centre
        wq = self.seg.scale(np.exp(self.log_weights), self.prompt_weights)
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
                      prompt_weights / prompt_weights.sum(), self.prompt_labels[prompts])
        if "prompt_max" in self._cache:
            out._cache["prompt_max"] = self._cache["prompt_max"][:, prompts]
        if "gabs" in self._cache:
            out._cache["gabs"] = self._cache["gabs"]
        return out


    def with_values(self, rewards: np.ndarray, utilities: np.ndarray) -> Samples:
        """The same prompts, weights and rows with other rewards [n] and utilities [n, m]."""
        centre = np.ones(len(rewards)) @ utilities / len(rewards)
        return Samples(self.seg, np.asarray(rewards, dtype=np.float64), (utilities - centre).T.copy(), centre,
                       self.log_weights, self.prompt_weights, self.prompt_labels)


def flat_samples(seg: Segments, rewards: np.ndarray, utilities: np.ndarray,
                 sample_weights: np.ndarray | None, labels: np.ndarray) -> Samples:
    """The flat problem from grouped rewards [n], utilities [n, m] and weights [n] (≥ 0)."""
    if sample_weights is not None and not np.all(sample_weights > 0):
        keep = sample_weights > 0
        counts = seg.sum(keep.astype(np.float64)).round().astype(np.int64)
        if np.any(counts == 0):
            bad = labels[np.flatnonzero(counts == 0)[0]]
            raise InputError(f"prompt {bad!r}: all sample weights are zero")
        seg = Segments.from_counts(counts)
        rewards, utilities, sample_weights = rewards[keep], utilities[keep], sample_weights[keep]
    log_weights = None
    if sample_weights is not None:
        log_weights = np.log(sample_weights / seg.expand(seg.sum(sample_weights)))
    centre = np.ones(len(rewards)) @ utilities / len(rewards)  # a mean over axis 0, as one BLAS pass
    centred = np.subtract(utilities.T, centre[:, None], out=np.empty((len(centre), len(rewards))))
    return Samples(seg, rewards, centred, centre, log_weights, np.full(seg.num, 1.0 / seg.num), labels)


# From this many values on, exp goes through torch (imported then): below it numpy's exp is cheap
# next to importing torch, which would dominate a `dualign dual` call (bench/dual.py times the solver).
TORCH_EXP_MIN = 1 << 16


def exp_inplace(x: np.ndarray) -> np.ndarray:
    """x ← exp(x) for a contiguous float64 array. From ``TORCH_EXP_MIN`` values on, through torch's
    vectorised exp (within 2 ulp of np.exp, and faster on AVX2 CPUs, where numpy's float64 exp is
    scalar): the solver's hot loop is this exponential. The torch tensor is a view of ``x``; nothing
    is copied. The choice depends on the size alone, so every process solves a problem alike."""
    if x.size >= TORCH_EXP_MIN and x.flags.c_contiguous and x.dtype == np.float64:
        import torch

        t = torch.from_numpy(x)
        torch.exp(t, out=t)
        return x
    return np.exp(x, out=x)


# exp() of a shifted score stays within e^±SAFE_EXPONENT: no overflow even times |g| up to 1e170.
SAFE_EXPONENT = 200.0


@dataclass
class Point:
    """D at one λ, and the exponentials its derivatives and outcomes reuse (g_c: centred g)."""

    lambdas: np.ndarray
    value: float
    e: np.ndarray  # [n] exp(z), z = (r + λᵀg_c)/β + log w − c_x (a Tilt buffer)
    z_sum: np.ndarray  # [N] Σ_k e_k
    log_z: np.ndarray  # [N] log Z_x = log Σ_k w_k exp((r_k + λᵀg_c,k)/β) = log z_sum + c_x
    value_scale: float  # magnitude of the terms summed into D (for rounding noise)
    expected: np.ndarray | None = None  # [m] Σ_x q_x E_p[g_c], once derivatives ran


class Tilt:
    """D(λ), ∇D, ∇²D and the predictions on Samples, one exponential per sample and λ.

    Naive equivalents (tests/test_dual.py holds them equal): ``evaluate`` is formulas.dual_value,
    ``derivatives`` formulas.dual_gradient and formulas.dual_hessian, ``outcomes``
    formulas.predictions and formulas.kl. A Newton step costs one pass: the trial's exponentials
    give D for the line search and, once accepted, ∇D and ∇²D without a second exp.

    The per-prompt log-sum-exp shift c_x = max_k (r_k + λ_sᵀg_k)/β + log w_k is computed at some
    λ_s and kept while Σ_j |λ_j − λ_s,j|·max|g_j|/β ≤ SAFE_EXPONENT (a bound, so most evaluations
    skip the per-prompt max): exp(z) is then within e^±SAFE_EXPONENT for the largest sample of
    every prompt. Evaluations write into two preallocated buffers (the current point's and a
    trial's): the hot loop allocates nothing of size n.
    """

    def __init__(self, samples: Samples, thresholds: np.ndarray, beta: float):
        self.s, self.beta = samples, beta
        self.b = thresholds - samples.centre  # D is unchanged by centring g when b moves with it
        self.base = samples.base(beta)
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
        """D(λ) (the buffers of ``keep`` are left alone); naive equivalent: formulas.dual_value."""
        if self.shift_at is None or (np.abs(lambdas - self.shift_at) @ self.gabs) / self.beta > SAFE_EXPONENT:
            self._reshift(lambdas)
        e = self._e[1] if keep is not None and keep.e is self._e[0] else self._e[0]
        step = (lambdas - self.shift_at) / self.beta
        if np.any(step):
            np.dot(step, self.s.centred, out=e)
            e += self.shifted
        else:
            e[...] = self.shifted
        exp_inplace(e)
        z_sum = self.s.seg.sum(e)
        log_z = np.log(z_sum) + self.c
        q = self.s.prompt_weights
        value = self.beta * float(q @ log_z) - float(lambdas @ self.b)
        scale = self.beta * float(q @ np.abs(log_z)) + float(np.abs(lambdas) @ np.abs(self.b))
        return Point(lambdas, value, e, z_sum, log_z, scale)

    def derivatives(self, pt: Point) -> tuple[np.ndarray, np.ndarray]:
        """∇D = Σ_x q_x E_p[g] − b and ∇²D = Σ_x q_x Cov_p(g)/β at ``pt`` (q: prompt weights), from
        ``pt``'s exponentials; naive equivalents: formulas.dual_gradient, formulas.dual_hessian."""
        s, q, g = self.s, self.s.prompt_weights, self.s.centred
        pq = s.seg.scale(pt.e, q / pt.z_sum, out=self._pq)  # q_x p_k
        pqg = np.multiply(pq, g, out=self._pqg)  # [m, n]
        per_prompt = s.seg.sum(pqg)  # [m, N] q_x E_p[g]
        pt.expected = per_prompt.sum(axis=1)
        if s.m <= 3:  # m(m+1)/2 dot products beat one thin matrix product here
            second = np.empty((s.m, s.m))
            for i in range(s.m):
                for j in range(i, s.m):
                    second[i, j] = second[j, i] = pqg[i] @ g[j]
        else:
            second = pqg @ g.T  # Σ_x q_x E_p[g gᵀ]
        hess = (second - (per_prompt / q) @ per_prompt.T) / self.beta
        return pt.expected - self.b, (hess + hess.T) / 2

    def outcomes(self, pt: Point) -> tuple[float, np.ndarray, float]:
        """(Σ_x q_x E_p[r], Σ_x q_x E_p[g], Σ_x q_x KL(p‖w)) with KL_x = E_p[(r + λᵀg_c)/β] − log Z_x
        (the log w terms of Σ_k p_k log(p_k/w_k) cancel); E_p[g] is reused from ``derivatives``.
        Naive equivalents: formulas.predictions, formulas.kl."""
        s, q = self.s, self.s.prompt_weights
        pq = s.seg.scale(pt.e, q / pt.z_sum, out=self._pq)
        reward = float(pq @ s.rewards)
        expected = s.centred @ pq if pt.expected is None else pt.expected
        kl_value = (reward + float(pt.lambdas @ expected)) / self.beta - float(q @ pt.log_z)
        return reward, expected + s.centre, max(kl_value, 0.0)

    def reachable_gap(self, hess: np.ndarray) -> np.ndarray:
        """A lower bound on Σ_x q_x max_k g_jk − Σ_x q_x E_p[g_j] from ∇²D alone, no pass over the
        samples (the exact value: Samples.reachable). With M_x = max_k g_jk, G_j = max|g_j − centre_j|:
        Var_p(g_j) ≤ E_p[(M_x − g_j)²] ≤ 2·G_j·E_p[M_x − g_j], so the gap is ≥ β·∇²D_jj / (2·G_j)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.gabs > 0, self.beta * np.maximum(np.diag(hess), 0.0) / (2 * self.gabs), 0.0)

"""The dual's formulas, each a few lines over per-prompt segments (arXiv 2405.19544, Section 4).

Samples y_k ~ π_ref are long-format rows grouped prompt after prompt (:class:`~dualign._infra.segments.
Segments`): ``rewards`` [n] r_k, ``utilities`` [n, m] (or [n] when m = 1) g_k, optional
``sample_weights`` [n] w_k ≥ 0 normalised within each prompt (uniform 1/K_x by default). For
λ ≥ 0 the Lagrangian's maximiser π_λ ∝ π_ref·exp((r + λᵀg)/β) is, on the samples, the tilt

    p_k = w_k exp(s_k) / Z_x,   s_k = (r_k + λᵀg_k)/β,   Z_x = Σ_k w_k exp(s_k)   (k in prompt x)

and the sampled dual is D(λ) = β·mean_x log Z_x(λ) − λᵀb. These are the naive, readable versions;
the solver (:mod:`dualign.dual.solver`) evaluates the same quantities in one fused pass, and
tests/test_dual.py holds the two equal.
"""

from __future__ import annotations

import numpy as np

from dualign._infra.segments import Segments


def _utilities_2d(utilities) -> np.ndarray:
    g = np.asarray(utilities, dtype=np.float64)
    return g[:, None] if g.ndim == 1 else g


def tilt_logits(rewards, utilities, lambdas, beta: float) -> np.ndarray:
    """s_k = (r_k + λᵀg_k)/β → [n]."""
    return (np.asarray(rewards, dtype=np.float64) + _utilities_2d(utilities) @ np.atleast_1d(lambdas)) / beta


def normalised_weights(seg: Segments, sample_weights=None) -> np.ndarray:
    """w_k / Σ_{k' in prompt x} w_k' (uniform 1/K_x by default) → [n]."""
    if sample_weights is None:
        return seg.expand(1.0 / seg.counts)
    w = np.asarray(sample_weights, dtype=np.float64)
    return w / seg.expand(seg.sum(w))


def log_weights(seg: Segments, sample_weights=None) -> np.ndarray:
    """log w_k, w normalised within each prompt → [n] (a zero weight: −inf, so p_k = 0)."""
    with np.errstate(divide="ignore"):
        return np.log(normalised_weights(seg, sample_weights))


def log_partition(seg: Segments, logits: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """log Z_x = log Σ_k w_k exp(s_k) per prompt → [N]."""
    return seg.logsumexp(logits + log_w)


def tilted_weights(seg: Segments, logits: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """p_k = w_k exp(s_k) / Z_x → [n]: the tilt of the samples towards π_λ."""
    return np.exp(logits + log_w - seg.expand(log_partition(seg, logits, log_w)))


def dual_value(seg: Segments, rewards, utilities, lambdas, thresholds, beta: float,
               sample_weights=None) -> float:
    """D(λ) = β·mean_x log Σ_k w_k exp((r_k + λᵀg_k)/β) − λᵀb."""
    lambdas = np.atleast_1d(lambdas)
    log_z = log_partition(seg, tilt_logits(rewards, utilities, lambdas, beta), log_weights(seg, sample_weights))
    return float(beta * log_z.mean() - lambdas @ np.broadcast_to(thresholds, lambdas.shape))


def dual_gradient(seg: Segments, rewards, utilities, lambdas, thresholds, beta: float,
                  sample_weights=None) -> np.ndarray:
    """∇D(λ) = mean_x E_{p_λ}[g] − b → [m]."""
    _, expected = predictions(seg, rewards, utilities, lambdas, beta, sample_weights)
    return expected - np.broadcast_to(thresholds, expected.shape)


def dual_hessian(seg: Segments, rewards, utilities, lambdas, beta: float,
                 sample_weights=None) -> np.ndarray:
    """∇²D(λ) = mean_x Cov_{p_λ}(g)/β = mean_x E_p[(g − E_p g)(g − E_p g)ᵀ]/β → [m, m]."""
    g = _utilities_2d(utilities).T  # [m, n]
    p = tilted_weights(seg, tilt_logits(rewards, utilities, lambdas, beta), log_weights(seg, sample_weights))
    centred = g - seg.expand(seg.sum(p * g))
    return (p * centred) @ centred.T / (seg.num * beta)


def predictions(seg: Segments, rewards, utilities, lambdas, beta: float,
                sample_weights=None) -> tuple[float, np.ndarray]:
    """(mean_x E_{p_λ}[r], mean_x E_{p_λ}[g]): the reward and utilities π_λ is predicted to reach."""
    p = tilted_weights(seg, tilt_logits(rewards, utilities, lambdas, beta), log_weights(seg, sample_weights))
    reward = seg.sum(p * np.asarray(rewards, dtype=np.float64)).mean()
    return float(reward), seg.sum(p * _utilities_2d(utilities).T).mean(axis=-1)


def kl(seg: Segments, rewards, utilities, lambdas, beta: float, sample_weights=None) -> float:
    """mean_x KL(p_λ‖w) = mean_x Σ_k p_k log(p_k/w_k) = mean_x (E_p[(r + λᵀg)/β] − log Z_x(λ))."""
    return _kl(seg, tilt_logits(rewards, utilities, lambdas, beta), log_weights(seg, sample_weights))


def _kl(seg: Segments, logits: np.ndarray, log_w: np.ndarray) -> float:
    log_z = log_partition(seg, logits, log_w)
    p = np.exp(logits + log_w - seg.expand(log_z))
    return float((seg.sum(p * logits) - log_z).mean())


# -------------------------------------------------- long format: rows in any order, ids per row


def reference_means(prompt_ids, values, sample_weights=None) -> np.ndarray:
    """mean_x Σ_k w_k v_k under π_ref (w normalised per prompt) for values [n] or [n, c] → scalar or [c]."""
    seg = Segments.of(prompt_ids)
    w = normalised_weights(seg, None if sample_weights is None else seg.group(sample_weights))
    return seg.sum(seg.group(np.asarray(values, dtype=np.float64)).T * w).mean(axis=-1)


def grouped_logsumexp(values, prompt_ids) -> np.ndarray:
    """log Σ_{i: x_i = x_j} exp(v_i) for every row j: the per-prompt log-sum-exp of long-format
    values, broadcast back to the rows (stable: the prompt's max is taken out first) → [n]."""
    seg = Segments.of(prompt_ids)
    return seg.ungroup(seg.expand(seg.logsumexp(seg.group(np.asarray(values, dtype=np.float64)))))


def tilted_means(prompt_ids, logits, values, sample_weights=None) -> tuple[np.ndarray, float]:
    """(mean_x Σ_k p_k·v_k [c], mean_x KL(p‖w)) for p_k ∝ w_k·exp(s_k) within each prompt.

    :func:`predictions` and :func:`kl` for any logits s (e.g. the baselines' (w_r·r + λᵀg)/β) on
    long-format rows; weights w normalised per prompt; prompts may have different K.
    """
    seg = Segments.of(prompt_ids)
    s = seg.group(np.asarray(logits, dtype=np.float64))
    log_w = log_weights(seg, None if sample_weights is None else seg.group(sample_weights))
    v = seg.group(np.asarray(values, dtype=np.float64).reshape(seg.size, -1))
    means = seg.sum(tilted_weights(seg, s, log_w) * v.T).mean(axis=-1)
    return means, _kl(seg, s, log_w)


def group_changes(prompt_ids, logits, values, groups, sample_weights=None) -> dict[str, np.ndarray]:
    """{group: mean over the group's prompts x of Σ_k (p_k − w_k)·v_k} → [c] per group, with
    p ∝ w_k·exp(s_k) within each prompt and w π_ref's weights normalised per prompt (1/K_x by
    default; ``logits`` s [n], ``values`` [n] or [n, c], ``groups`` [n], one label per prompt; rows
    in any order): the tilt's change of each column within each group of prompts. Weighted by the
    groups' shares of the prompts, they sum to the change over all prompts."""
    seg = Segments.of(prompt_ids)
    per_prompt = prompt_changes(prompt_ids, logits, values, sample_weights)  # [c, N]
    labels = np.asarray(seg.group(np.asarray(groups, dtype=object))[seg.starts]).astype(str)
    return {str(g): per_prompt[:, labels == g].mean(axis=1) for g in dict.fromkeys(labels)}


def _kl_on_rows(prompt_ids, rewards, utilities, lambdas, beta: float, sample_weights=None):
    """(estimate, first, keep): ``estimate(rows)`` is mean_x Σ_k p_k log(p_k/w_k) at fixed λ on the
    grouped rows selected; ``first`` marks each prompt's first ⌊K_x/2⌋ rows, ``keep`` the prompts
    with K_x ≥ 2 (None when there are none)."""
    seg = Segments.of(prompt_ids)
    counts = seg.expand(seg.counts)
    keep, first = counts >= 2, np.arange(seg.size) - seg.expand(seg.starts) < counts // 2
    if not keep.any():
        return None
    codes = np.repeat(np.arange(seg.num), seg.counts)  # the prompt of each grouped row
    logits = seg.group(tilt_logits(rewards, utilities, lambdas, beta))
    w = np.ones(seg.size) if sample_weights is None else seg.group(np.asarray(sample_weights, np.float64))

    def estimate(rows: np.ndarray) -> float:
        sub = Segments.of(codes[rows])
        return _kl(sub, logits[rows], log_weights(sub, w[rows]))

    return estimate, first, keep


def half_sample_kl(prompt_ids, rewards, utilities, lambdas, beta: float,
                   sample_weights=None) -> tuple[float, float] | None:
    """(KL estimate on the first ⌊K_x/2⌋ samples of each prompt, on all K_x) at fixed λ, both
    mean_x Σ_k p_k log(p_k/w_k) over the prompts with K_x ≥ 2 (None when there are none).

    The K-sample estimate of KL(π_λ‖π_ref) is at most log K per prompt and biased low; it grows
    with K until the samples cover π_λ's mass. Half-K well below all-K says K was too small and
    π_λ's true KL (what a fine-tune towards it spends) is likely above the prediction.
    """
    rows = _kl_on_rows(prompt_ids, rewards, utilities, lambdas, beta, sample_weights)
    if rows is None:
        return None
    estimate, first, keep = rows
    return estimate(keep & first), estimate(keep)


def extrapolated_kl(prompt_ids, rewards, utilities, lambdas, beta: float,
                    sample_weights=None) -> tuple[float, float, float] | None:
    """(KL_K, KL_{K/2}, 2·KL_K − KL_{K/2}) of π_λ at fixed λ over the prompts with K_x ≥ 2: the
    K-sample estimate mean_x Σ_k p_k log(p_k/w_k), the mean of the same on each half of every
    prompt's samples (the first ⌊K_x/2⌋ and the rest), and their Richardson extrapolation.

    The K-sample estimate is biased low, by about c/K (a tilt seen through K samples cannot put more
    than log K nats on any one); 2·KL_K − KL_{K/2} removes that leading term, an estimate of the KL
    of π_ref·exp((r + λᵀg)/β) itself, the distribution a fine-tune generalises towards on responses
    it was not trained on (None when no prompt has two samples)."""
    rows = _kl_on_rows(prompt_ids, rewards, utilities, lambdas, beta, sample_weights)
    if rows is None:
        return None
    estimate, first, keep = rows
    full = estimate(keep)
    half = 0.5 * (estimate(keep & first) + estimate(keep & ~first))
    return full, half, 2.0 * full - half


# -------------------------------------------------- what a trained policy delivers, seen on π_ref's samples

def importance_changes(prompt_ids, logratios, values, sample_weights=None) -> tuple[np.ndarray, float]:
    """(mean_x Σ_k (q_k − w_k)·v_k [c], mean_x KL(q‖w)) with q_k = w_k·exp(ℓ_k) / Σ_k' w_k'·exp(ℓ_k')
    and ℓ_k = log π(y_k|x) − log π_ref(y_k|x): a trained policy π's change of each column over π_ref,
    estimated on π_ref's own samples by self-normalised importance weights (no sampling of π).

    The same estimator as the plan's (:func:`tilted_means` with logits ℓ in place of (r + λᵀg)/β):
    a policy that reached π_λ exactly would show the plan's change on the same samples, so the
    ratio of the two is the share of the plan a fine-tune delivers, on the footing of the plan."""
    v = np.asarray(values, dtype=np.float64)
    tilted, kl_q = tilted_means(prompt_ids, logratios, v, sample_weights)
    return tilted - reference_means(prompt_ids, v.reshape(len(v), -1), sample_weights), kl_q


def prompt_changes(prompt_ids, logits, values, sample_weights=None) -> np.ndarray:
    """Σ_k (p_k − w_k)·v_k for every prompt x → [c, N] (prompts in order of first appearance), with
    p ∝ w·exp(s) within each prompt: the per-prompt terms whose mean over prompts is the change of
    :func:`tilted_means` / :func:`importance_changes` (so a prompt bootstrap can resample them)."""
    seg = Segments.of(prompt_ids)
    s = seg.group(np.asarray(logits, dtype=np.float64))
    v = seg.group(np.asarray(values, dtype=np.float64).reshape(len(s), -1))
    w = None if sample_weights is None else seg.group(np.asarray(sample_weights, dtype=np.float64))
    p = tilted_weights(seg, s, log_weights(seg, w))
    return seg.sum((p - normalised_weights(seg, w)) * v.T)


def delivered_shares(achieved, planned, bounds: tuple[float, float] = (0.5, 2.0)) -> np.ndarray:
    """ρ_j = Δa_j / Δp_j, the share of each planned change Δp_j that a fine-tune delivered (Δa_j),
    clipped to ``bounds``; a planned change of 0, or a share of the wrong sign, says nothing about
    the scale and gives 1."""
    a, p = np.asarray(achieved, dtype=np.float64), np.asarray(planned, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(p != 0, a / np.where(p != 0, p, 1.0), 1.0)
    share = np.where(np.isfinite(share) & (share > 0), share, 1.0)
    return np.clip(share, *bounds)

"""MoCAN, model-based constrained alignment (arXiv 2405.19544): what the one loop trains on.

1. The dual stage (:mod:`dualign.dual`) solves λ* on π_ref's samples and writes dual.json.
2. :func:`lagrangian_reward` scores every sample with r_λ = r + Σ_j λ_j·g_j (g_j = sign_j·column_j).
3. :func:`pairs_from_scores` pairs the samples of each prompt: target_margin = r_λ(a) − r_λ(b),
   and each response's own target log-ratio t = r_λ − β·log Ẑ(x) (:func:`target_logratios`).
4. :func:`dualign.methods.losses.mocan_loss` fits h = β·[(log π − log π_ref)(a) − (log π − log π_ref)(b)]
   to the margin (soft, bernoulli, regression or absolute labels); the one loop
   (:func:`dualign.train.train`, ``method: mocan``) minimises its mean. At the optimum
   π ∝ π_ref·exp(r_λ*/β), the policy whose reward, constraint values and KL the dual predicted.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from dualign._infra import moved
from dualign._infra.errors import InputError
from dualign._infra.segments import Segments
from dualign.data.records import DualRecord
from dualign.data.score_table import WEIGHT_COLUMN, truncated_flags, validate_scores
from dualign.methods.losses import mocan_loss
from dualign.methods.pairs import require_columns, validate_pairs


def lagrangian_reward(table: pd.DataFrame, dual: DualRecord, suffix: str = "",
                      source: str = "table") -> np.ndarray:
    """r_λ = r + Σ_j λ_j·g_j with g_j = sign_j·column_j, read from columns ``<column><suffix>``."""
    def column(name: str) -> np.ndarray:
        col = f"{name}{suffix}"
        if col not in table.columns:
            raise InputError(f"{source}: missing score column '{col}'")
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise InputError(f"{source}: row {bad[0]}: column '{col}' is not a finite number")
        return values

    r = column(dual.reward)
    for c, name in zip(dual.parsed, dual.names, strict=True):
        r = r + dual.lambdas[name] * c.sign * column(c.column)
    return r


def target_logratios(r_lambda: np.ndarray, prompt_ids: np.ndarray, beta: float,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """β·log(π_λ/π_ref)(y) on π_ref's samples, in reward units: r_λ(y) − β·log Ẑ(x), with
    Ẑ(x) = Σ_k w̄_k·exp(r_λ(y_k)/β) over the K samples of y's prompt (the dual's own estimate of
    the partition function; w̄_k = 1/K, or the normalised ``weights``), so that the targets of a
    prompt satisfy Σ_k w̄_k·exp(t_k/β) = 1."""
    seg = Segments.of(prompt_ids)
    r_lambda = seg.group(np.asarray(r_lambda, dtype=np.float64))
    if weights is None:
        log_z = seg.logsumexp(r_lambda / beta) - np.log(seg.counts)
    else:
        with np.errstate(divide="ignore"):  # a zero weight: log 0 = −inf, no mass
            log_z = seg.logsumexp(r_lambda / beta + np.log(seg.group(weights)))
    return seg.ungroup(r_lambda - beta * seg.expand(log_z))


def normalised_weights(scores: pd.DataFrame, source: str) -> np.ndarray | None:
    """w̄ = ``sample_weight`` normalised within each prompt (π_ref's weights in the dual), or None
    when the table has no such column."""
    if WEIGHT_COLUMN not in scores.columns:
        return None
    validate_scores(scores, [], source)  # finite, ≥ 0, not all zero within a prompt
    seg = Segments.of(scores["prompt_id"].to_numpy())
    w = seg.group(scores[WEIGHT_COLUMN].to_numpy(dtype=np.float64))
    return seg.ungroup(w / seg.expand(seg.sum(w)))


def pairs_from_scores(scores: pd.DataFrame, dual: DualRecord, pairs_per_prompt: int | None = None,
                      seed: int = 0, source: str = "scores") -> pd.DataFrame:
    """Within-prompt pairs (i < j in sample order) with target_margin = r_λ(y_i) − r_λ(y_j), and
    ``target_a`` / ``target_b``: the absolute targets of :func:`target_logratios` (label ``absolute``).

    ``pairs_per_prompt=None`` (or ≥ K(K−1)/2) takes every pair; otherwise that many distinct pairs
    per prompt, drawn with ``numpy.random.default_rng(seed)``, prompts in order of appearance.
    With ``sample_weight`` (π_ref's samples weighted, as in the dual) each pair weighs
    ``weight`` = w̄_i·w̄_j (w̄ normalised per prompt: a pair drawn from the weighted samples) and
    Ẑ is weighted too; ``truncated`` travels as ``truncated_a`` / ``truncated_b``.
    """
    require_columns(scores, ("prompt_id", "prompt", "response"), source)
    r_lambda = lagrangian_reward(scores, dual, source=source)
    ref = (scores["ref_logprob"].to_numpy(dtype=float) if "ref_logprob" in scores.columns
           else np.full(len(scores), np.nan))
    weights = normalised_weights(scores, source)
    cut = truncated_flags(scores, source)
    targets = target_logratios(r_lambda, scores["prompt_id"].to_numpy(), dual.beta, weights)
    rng = np.random.default_rng(seed)
    seg = Segments.of(scores["prompt_id"].to_numpy())
    rows = []
    for x, pid in enumerate(seg.labels):
        idx = seg.rows(x)
        if len(idx) < 2:
            raise InputError(f"{source}: prompt_id {pid!r} has fewer than 2 responses")
        pairs = list(combinations(idx, 2))
        if pairs_per_prompt is not None and pairs_per_prompt < len(pairs):
            pick = rng.choice(len(pairs), size=pairs_per_prompt, replace=False)
            pairs = [pairs[k] for k in sorted(pick)]
        rows.extend((pid, i, j) for i, j in pairs)
    pid, i, j = (np.array(x) for x in zip(*rows, strict=True))
    pairs = pd.DataFrame({
        "prompt_id": pid,
        "prompt": scores["prompt"].to_numpy()[i],
        "response_a": scores["response"].to_numpy()[i],
        "response_b": scores["response"].to_numpy()[j],
        "ref_logprob_a": ref[i],
        "ref_logprob_b": ref[j],
        "target_margin": r_lambda[i] - r_lambda[j],
        "target_a": targets[i],
        "target_b": targets[j],
    })
    if weights is not None:
        pairs["weight"] = weights[i] * weights[j]
    if cut is not None:
        pairs["truncated_a"], pairs["truncated_b"] = np.array(cut)[i], np.array(cut)[j]
    return validate_pairs(pairs, source)


__getattr__ = moved.old_loss_entry(__name__, mocan_loss, ("target_margin", "beta", "label", "generator", "target_a", "target_b"))

"""Training pairs: two responses to one prompt and how much the first should be preferred.

Every method trains on one table (format in docs/formats.md, "Pairs table"):
``prompt_id, prompt, response_a, response_b, ref_logprob_a, ref_logprob_b, target_margin``, where
``target_margin`` = r_λ(a) − r_λ(b) in reward units, +inf for a hard "a preferred" label. Extra
numeric columns travel to the loss function unchanged, so a new method brings its own columns.

Sources here: within-prompt pairs of a scores table (MoCAN), and a preference file, either TRL's
``prompt/chosen/rejected`` (hard labels) or ``prompt/response_0/response_1`` scored with
``<column>_0`` / ``<column>_1`` (MoCAN on a preference data set; PeCAN when those columns are
implicit rewards, ``pecan_pairs``).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from dualign.errors import InputError
from dualign.records import DualRecord
from dualign.segments import Segments

PAIR_COLUMNS = ("prompt_id", "prompt", "response_a", "response_b", "ref_logprob_a",
                "ref_logprob_b", "target_margin")


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


def _require(table: pd.DataFrame, columns: tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{source}: missing column '{missing[0]}' (has: {', '.join(map(str, table.columns))})")


def target_logratios(r_lambda: np.ndarray, prompt_ids: np.ndarray, beta: float) -> np.ndarray:
    """β·log(π_λ/π_ref)(y) on π_ref's samples, in reward units: r_λ(y) − β·log Ẑ(x), with
    Ẑ(x) = (1/K)·Σ_k exp(r_λ(y_k)/β) over the K samples of y's prompt (the dual's own estimate of
    the partition function), so that the targets of a prompt satisfy (1/K)·Σ_k exp(t_k/β) = 1."""
    seg = Segments.of(prompt_ids)
    r_lambda = seg.group(np.asarray(r_lambda, dtype=np.float64))
    log_z = seg.logsumexp(r_lambda / beta) - np.log(seg.counts)
    return seg.ungroup(r_lambda - beta * seg.expand(log_z))


def pairs_from_scores(scores: pd.DataFrame, dual: DualRecord, pairs_per_prompt: int | None = None,
                      seed: int = 0, source: str = "scores") -> pd.DataFrame:
    """Within-prompt pairs (i < j in sample order) with target_margin = r_λ(y_i) − r_λ(y_j), and
    ``target_a`` / ``target_b``: the absolute targets of :func:`target_logratios` (label ``absolute``).

    ``pairs_per_prompt=None`` (or ≥ K(K−1)/2) takes every pair; otherwise that many distinct pairs
    per prompt, drawn with ``numpy.random.default_rng(seed)``, prompts in order of appearance.
    """
    _require(scores, ("prompt_id", "prompt", "response"), source)
    r_lambda = lagrangian_reward(scores, dual, source=source)
    ref = (scores["ref_logprob"].to_numpy(dtype=float) if "ref_logprob" in scores.columns
           else np.full(len(scores), np.nan))
    targets = target_logratios(r_lambda, scores["prompt_id"].to_numpy(), dual.beta)
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
    return validate_pairs(pd.DataFrame({
        "prompt_id": pid,
        "prompt": scores["prompt"].to_numpy()[i],
        "response_a": scores["response"].to_numpy()[i],
        "response_b": scores["response"].to_numpy()[j],
        "ref_logprob_a": ref[i],
        "ref_logprob_b": ref[j],
        "target_margin": r_lambda[i] - r_lambda[j],
        "target_a": targets[i],
        "target_b": targets[j],
    }), source)


def pairs_from_preferences(prefs: pd.DataFrame, dual: DualRecord | None = None,
                           source: str = "preferences") -> pd.DataFrame:
    """Pairs from a preference file.

    - ``prompt, chosen, rejected`` (TRL): a = chosen, b = rejected, target_margin = +inf.
    - ``prompt, response_0, response_1`` + score columns ``<name>_0``, ``<name>_1`` (needs
      ``dual``): a = response_0, b = response_1, target_margin = r_λ(response_0) − r_λ(response_1).
    Optional: ``prompt_id`` (default: the row number), ``ref_logprob_0`` / ``ref_logprob_1``
    (or ``ref_logprob_chosen`` / ``ref_logprob_rejected``).
    """
    if {"chosen", "rejected"} <= set(prefs.columns):
        a, b, margin = "chosen", "rejected", np.full(len(prefs), np.inf)
    elif {"response_0", "response_1"} <= set(prefs.columns):
        if dual is None:
            raise InputError(f"{source}: response_0/response_1 pairs need a dual.json for their target margins")
        a, b = "response_0", "response_1"
        margin = (lagrangian_reward(prefs, dual, "_0", source)
                  - lagrangian_reward(prefs, dual, "_1", source))
    else:
        raise InputError(f"{source}: expected columns prompt/chosen/rejected or prompt/response_0/response_1")
    _require(prefs, ("prompt", a, b), source)
    suffix_a, suffix_b = ("_chosen", "_rejected") if a == "chosen" else ("_0", "_1")

    def ref(suffix: str) -> np.ndarray:
        col = f"ref_logprob{suffix}"
        return prefs[col].to_numpy(dtype=float) if col in prefs.columns else np.full(len(prefs), np.nan)

    pairs = pd.DataFrame({
        "prompt_id": prefs["prompt_id"].to_numpy() if "prompt_id" in prefs.columns else np.arange(len(prefs)),
        "prompt": prefs["prompt"].to_numpy(),
        "response_a": prefs[a].to_numpy(),
        "response_b": prefs[b].to_numpy(),
        "ref_logprob_a": ref(suffix_a),
        "ref_logprob_b": ref(suffix_b),
        "target_margin": margin,
    })
    return validate_pairs(pairs, source)


def pecan_pairs(prefs: pd.DataFrame, dual: DualRecord | None, source: str = "preferences") -> pd.DataFrame:
    """PeCAN pairs: ``response_0``/``response_1`` with implicit-reward columns ``<column>_0``/``_1``
    (the score stage's ``preference_scores.parquet``) and target_margin = r̂_λ(response_0) − r̂_λ(response_1)."""
    if not {"response_0", "response_1"} <= set(prefs.columns):
        raise InputError(f"{source}: pecan needs prompt/response_0/response_1 pairs with implicit-reward "
                         "columns (the score stage's preference_scores.parquet), not chosen/rejected")
    if dual is None:
        raise InputError(f"{source}: pecan needs dual.json (λ* on the implicit rewards)")
    return pairs_from_preferences(prefs, dual, source)


def validate_pairs(pairs: pd.DataFrame, source: str = "pairs") -> pd.DataFrame:
    """Check the pairs-table contract; fill absent ``ref_logprob_*`` columns with NaN."""
    _require(pairs, ("prompt_id", "prompt", "response_a", "response_b", "target_margin"), source)
    if len(pairs) == 0:
        raise InputError(f"{source}: no pairs")
    pairs = pairs.reset_index(drop=True).copy()
    for col in ("prompt", "response_a", "response_b"):
        bad = np.flatnonzero(~pairs[col].map(lambda v: isinstance(v, str)).to_numpy())
        if len(bad):
            raise InputError(f"{source}: row {bad[0]}: column '{col}' is not a string")
    for col in ("ref_logprob_a", "ref_logprob_b"):
        if col not in pairs.columns:
            pairs[col] = np.nan
    for col in ("target_margin", "ref_logprob_a", "ref_logprob_b"):
        values = pd.to_numeric(pairs[col], errors="coerce")
        bad = np.flatnonzero(values.isna() & (pairs[col].notna() | (col == "target_margin")))
        if len(bad):
            raise InputError(f"{source}: row {bad[0]}: column '{col}' is not a number")
        pairs[col] = values.astype(float)
    return pairs

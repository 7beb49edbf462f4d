"""SafeDPO (Kim et al., ICLR 2026, arXiv 2505.20065): safety as a hard constraint, from preference
pairs with safety labels alone (no reward or cost model, no sampling).

The problem: max E_π[r] − β·KL(π‖π_ref) subject to c(x, y) ≤ 0 for every y, i.e. the reward
r_c = r where the response is safe and −∞ where it is not. Its optimum π ∝ π_ref·exp(r_c/β) puts
no mass on unsafe responses. The paper shows that DPO on a transformed data set reaches it:

1. :func:`safedpo_transform` (the paper's T, §3): start from the helpfulness preference
   (y_w = ``response_<better_response_id>``), with h = 1 for an unsafe response
   (``is_response_<i>_safe`` false). Keep the pair when y_w is safe; swap it when y_w is unsafe and
   y_l safe; drop it when both are unsafe. After T the winner is always safe.
2. :func:`dualign.methods.losses.safedpo_loss` trains it, −log σ(β·h_θ − (h_l − h_w)·Δ), in the
   one loop (``method: safedpo`` on a ready pairs table with ``unsafe_a``, ``unsafe_b`` and
   ``safety_margin`` columns).

:mod:`dualign.baselines.preference_dpo` builds that table from a PKU-style file and runs it
(``dualign train --method safedpo --preferences FILE``). ``safer_response_id`` is not used.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dualign._infra import moved
from dualign.data.preferences import preference_views, response_safety
from dualign.methods.dpo import pairs_from_preferences
from dualign.methods.losses import safedpo_loss


def safedpo_transform(table: pd.DataFrame, source: str = "preferences") -> tuple[pd.DataFrame, dict[str, int]]:
    """T(D) of a PKU-style table: TRL-style rows (``prompt_id, prompt, chosen, rejected``, the
    ``ref_logprob_chosen/_rejected`` when the table has ``ref_logprob_0/_1``) plus ``chosen_unsafe``
    (always 0 after T) and ``rejected_unsafe`` ∈ {0, 1}; and the counts kept, swapped, dropped.

    y_w safe → (y_w, y_l); y_w unsafe, y_l safe → (y_l, y_w); both unsafe → dropped.
    """
    helpful = preference_views(table, source)["helpful"]  # chosen = response_<better_response_id> = y_w
    w = table["better_response_id"].to_numpy().astype(int)
    safe = response_safety(table, source)
    rows = np.arange(len(table))
    unsafe_w, unsafe_l = ~safe[rows, w], ~safe[rows, 1 - w]
    swap = unsafe_w & ~unsafe_l
    drop = unsafe_w & unsafe_l
    out = helpful.copy()
    for chosen, rejected in (("chosen", "rejected"), ("ref_logprob_chosen", "ref_logprob_rejected")):
        if chosen in out:
            out[chosen], out[rejected] = (np.where(swap, helpful[rejected], helpful[chosen]),
                                          np.where(swap, helpful[chosen], helpful[rejected]))
    out["chosen_unsafe"] = np.where(swap, unsafe_l, unsafe_w).astype(float)
    out["rejected_unsafe"] = np.where(swap, unsafe_w, unsafe_l).astype(float)
    counts = {"kept": int((~swap & ~drop).sum()), "swapped": int(swap.sum()), "dropped": int(drop.sum())}
    return out[~drop].reset_index(drop=True), counts


def safedpo_pairs(table: pd.DataFrame, delta: float, source: str = "preferences") -> tuple[pd.DataFrame, dict[str, int]]:
    """The pairs table of T(D) (a = ỹ_w, b = ỹ_l) with ``unsafe_a``, ``unsafe_b`` and
    ``safety_margin`` = Δ for the loss; and the transform's counts."""
    transformed, counts = safedpo_transform(table, source)
    pairs = pairs_from_preferences(transformed, source=source)
    pairs["unsafe_a"] = transformed["chosen_unsafe"].to_numpy()
    pairs["unsafe_b"] = transformed["rejected_unsafe"].to_numpy()
    pairs["safety_margin"] = float(delta)
    return pairs, counts


__getattr__ = moved.old_loss_entry(__name__, safedpo_loss, ("beta", "unsafe_a", "unsafe_b", "safety_margin"))

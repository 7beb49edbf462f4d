"""DPO (Rafailov et al., 2023) in the one loop: preference pairs with hard labels, the DPO loss.

:func:`pairs_from_preferences` reads a preference file: TRL's ``prompt, chosen, rejected`` gives
hard labels (target_margin = +inf); ``prompt, response_0, response_1`` with score columns gives
r_λ margins (MoCAN on a preference set, PeCAN on implicit rewards). :func:`oriented_dpo_loss`
trains DPO towards each pair's preferred side, −log σ(β·[(log π − log π_ref)(w) − (log π − log π_ref)(l)]).
PeCAN's pre-alignment (:mod:`dualign.prealign`) trains π_r and π_g this way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dualign._infra import moved
from dualign._infra.errors import InputError
from dualign.data.records import DualRecord
from dualign.methods.losses import Diagnostics, dpo_loss
from dualign.methods.mocan import lagrangian_reward
from dualign.methods.pairs import require_columns, validate_pairs


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
    require_columns(prefs, ("prompt", a, b), source)
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


def oriented_dpo_loss(policy_logps_a: torch.Tensor, policy_logps_b: torch.Tensor, ref_logps_a: torch.Tensor,
                      ref_logps_b: torch.Tensor, target_margin: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, Diagnostics]:
    """:func:`dualign.methods.losses.dpo_loss` with ``a`` preferred where ``target_margin`` ≥ 0, else ``b``
    (the loop's ``method: dpo``)."""
    keep = target_margin >= 0
    pa, pb, ra, rb = policy_logps_a, policy_logps_b, ref_logps_a, ref_logps_b
    return dpo_loss(torch.where(keep, pa, pb), torch.where(keep, pb, pa),
                    torch.where(keep, ra, rb), torch.where(keep, rb, ra), beta)


__getattr__ = moved.old_loss_entry(__name__, oriented_dpo_loss, ("target_margin", "beta"))

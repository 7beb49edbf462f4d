"""PeCAN, preference-based constrained alignment (arXiv 2405.19544), from preference pairs alone.

1. Pre-alignment (:mod:`dualign.prealign`): DPO on the helpfulness view gives π_r,
   on the safety view π_g (kept in its own module: it runs the one loop, which imports this one).
2. The score stage adds implicit rewards h_r = β_r·log(π_r/π_ref), h_g = β_g·log(π_g/π_ref)
   (``implicit:`` scorers, :mod:`dualign.score`) to π_ref's samples and to the preference pairs.
3. The dual stage solves λ* for a relative constraint on h_g (``h_g>=ref+X``).
4. :func:`pecan_pairs` scores the preference pairs with r̂_λ = h_r + λ*·h_g (or, with
   ``pairs_from: scores``, MoCAN's pairs of π_ref's samples); the MoCAN loss on those margins
   (:func:`dualign.methods.losses.pecan_loss`) is minimised by the one loop (``method: pecan``).
   At the optimum π ∝ π_ref·exp((r̂ + λ*·ĝ)/β).
"""

from __future__ import annotations

import pandas as pd

from dualign._infra import moved
from dualign._infra.errors import InputError
from dualign.data.records import DualRecord
from dualign.methods.dpo import pairs_from_preferences
from dualign.methods.losses import pecan_loss


def pecan_pairs(prefs: pd.DataFrame, dual: DualRecord | None, source: str = "preferences") -> pd.DataFrame:
    """PeCAN pairs: ``response_0``/``response_1`` with implicit-reward columns ``<column>_0``/``_1``
    (the score stage's ``preference_scores.parquet``) and target_margin = r̂_λ(response_0) − r̂_λ(response_1)."""
    if not {"response_0", "response_1"} <= set(prefs.columns):
        raise InputError(f"{source}: pecan needs prompt/response_0/response_1 pairs with implicit-reward "
                         "columns (the score stage's preference_scores.parquet), not chosen/rejected")
    if dual is None:
        raise InputError(f"{source}: pecan needs dual.json (λ* on the implicit rewards)")
    return pairs_from_preferences(prefs, dual, source)


__getattr__ = moved.old_loss_entry(__name__, pecan_loss, ("target_margin", "beta", "label", "generator", "target_a", "target_b"))

"""The pairs table every method trains on: two responses to one prompt and how much the first
should be preferred (docs/formats.md, "Pairs table").

``prompt_id, prompt, response_a, response_b, ref_logprob_a, ref_logprob_b, target_margin``, where
``target_margin`` = r_λ(a) − r_λ(b) in reward units, +inf for a hard "a preferred" label; optional
``weight`` (the pair's weight in the mean loss, default 1) and ``truncated_a`` / ``truncated_b``
(a response cut by ``max_new_tokens``: tokenized without eos). Extra numeric columns travel to
the loss function unchanged, so a new method brings its own columns.
The methods build it (:mod:`dualign.methods.mocan` from a scores table,
:mod:`dualign.methods.dpo` and :mod:`dualign.methods.pecan` from preference files); here is its
contract.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dualign._infra.errors import InputError
from dualign.data.score_table import TRUNCATED_COLUMN, truncated_flags


def require_columns(table: pd.DataFrame, columns: tuple[str, ...], source: str) -> None:
    """One error naming ``source`` and the first missing column."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{source}: missing column '{missing[0]}' (has: {', '.join(map(str, table.columns))})")


def validate_pairs(pairs: pd.DataFrame, source: str = "pairs") -> pd.DataFrame:
    """Check the pairs-table contract; fill absent ``ref_logprob_*`` columns with NaN."""
    require_columns(pairs, ("prompt_id", "prompt", "response_a", "response_b", "target_margin"), source)
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
    for col in ("truncated_a", "truncated_b"):
        if col in pairs.columns:
            pairs[col] = truncated_flags(pairs.rename(columns={col: TRUNCATED_COLUMN}), source)
    if "weight" in pairs.columns:
        weight = pd.to_numeric(pairs["weight"], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~(np.isfinite(weight) & (weight >= 0)))
        if len(bad):
            raise InputError(f"{source}: row {bad[0]}: column 'weight' is {pairs['weight'].iloc[bad[0]]!r:.40}, "
                             "not a finite number ≥ 0")
        if not weight.sum() > 0:
            raise InputError(f"{source}: every pair's weight is zero")
        pairs["weight"] = weight
    return pairs

"""Reader of the long-format scores table (docs/formats.md) for the dual.

One row per response: ``prompt_id``, score columns, optionally ``sample_weight`` (and, read by the
stages that tokenize responses, ``truncated``: cut by ``max_new_tokens``, no eos). Every problem
raises one :class:`InputError` naming the file and the row (rows are numbered from 1, header
excluded) or the prompt: a missing column, a non-numeric, missing or infinite score, a negative or
non-finite weight, a prompt with a single sample, a prompt whose weights are all zero or sum
past the largest float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dualign._infra.errors import InputError
from dualign._infra.io import read_table
from dualign._infra.segments import Segments

WEIGHT_COLUMN = "sample_weight"
TRUNCATED_COLUMN = "truncated"


@dataclass
class Scores:
    """Validated score columns, rows grouped prompt after prompt (ready for ``solve_dual_long``)."""

    source: str
    prompt_index: np.ndarray  # [n] int, 0..N-1, non-decreasing
    prompt_ids: np.ndarray  # [N] the prompts' ids, in order of first appearance
    columns: dict[str, np.ndarray]  # column -> [n] float64
    sample_weights: np.ndarray | None  # [n] ≥ 0, or None (uniform)
    rows: np.ndarray  # [n] the file's row number (from 1) of each sample

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_samples(self) -> int:
        return len(self.prompt_index)


def as_frame(table: Any, name: str) -> pd.DataFrame:
    """A pandas DataFrame or a ``datasets.Dataset`` (its ``to_pandas()``) as a DataFrame; anything
    else is an :class:`InputError` naming the argument ``name``."""
    if isinstance(table, pd.DataFrame):
        return table
    if type(table).__name__ == "Dataset" and callable(getattr(table, "to_pandas", None)):
        return table.to_pandas()
    raise InputError(f"{name}: expected a pandas DataFrame or a datasets.Dataset, got {type(table).__name__}")


def read_scores(path: str | Path, columns: Sequence[str]) -> Scores:
    """Read and validate a scores table (Parquet / JSONL / CSV) for the given score columns."""
    return validate_scores(read_table(path), columns, source=str(path))


def _numeric(df: pd.DataFrame, column: str, source: str) -> np.ndarray:
    values = df[column]
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        out = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        coerced = pd.to_numeric(values, errors="coerce")
        bad = np.flatnonzero(coerced.isna().to_numpy() & values.notna().to_numpy())
        if bad.size:
            raise InputError(f"{source}: row {bad[0] + 1}: column {column!r} is not numeric "
                             f"({values.iloc[bad[0]]!r})")
        out = coerced.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        what = "missing (NaN)" if np.isnan(out[bad[0]]) else f"infinite ({out[bad[0]]})"
        raise InputError(f"{source}: row {bad[0] + 1}: column {column!r} is {what}")
    return out


def validate_scores(df: pd.DataFrame, columns: Sequence[str], source: str = "scores") -> Scores:
    """Check the rules of docs/formats.md for ``columns``; group rows by prompt (stable)."""
    if len(df) == 0:
        raise InputError(f"{source}: the table has no rows")
    for column in ["prompt_id", *columns]:
        if column not in df.columns:
            raise InputError(f"{source}: missing column {column!r} (columns: {', '.join(map(str, df.columns))})")
    ids = df["prompt_id"]
    bad = np.flatnonzero(ids.isna().to_numpy())
    if bad.size:
        raise InputError(f"{source}: row {bad[0] + 1}: prompt_id is missing")
    bad = np.flatnonzero(~ids.map(lambda v: isinstance(v, str | int | float | np.number)).to_numpy())
    if bad.size:
        raise InputError(f"{source}: row {bad[0] + 1}: prompt_id {ids.iloc[bad[0]]!r:.40} is not a string or a number")
    values = {c: _numeric(df, c, source) for c in dict.fromkeys(columns)}
    weights = None
    if WEIGHT_COLUMN in df.columns:
        weights = _numeric(df, WEIGHT_COLUMN, source)
        bad = np.flatnonzero(weights < 0)
        if bad.size:
            raise InputError(f"{source}: row {bad[0] + 1}: {WEIGHT_COLUMN} {weights[bad[0]]:g} is negative")
    seg = Segments.of(ids.to_numpy())
    first_row = seg.starts if seg.order is None else seg.order[seg.starts]
    single = np.flatnonzero(seg.counts < 2)
    if single.size:
        x = single[0]
        raise InputError(f"{source}: prompt_id {seg.labels[x]!r} (row {first_row[x] + 1}) has only one "
                         "sample; every prompt needs at least 2")
    if weights is not None:
        with np.errstate(over="ignore"):
            totals = seg.sum(seg.group(weights))
        huge = np.flatnonzero(~np.isfinite(totals))
        if huge.size:
            x = huge[0]
            raise InputError(f"{source}: prompt_id {seg.labels[x]!r} (first row {first_row[x] + 1}): its "
                             f"{WEIGHT_COLUMN} values sum past the largest float (overflow); rescale them")
        zero = np.flatnonzero(totals <= 0)
        if zero.size:
            x = zero[0]
            raise InputError(f"{source}: prompt_id {seg.labels[x]!r} (first row {first_row[x] + 1}): "
                             f"all {seg.counts[x]} sample weights are zero")
    order = np.arange(len(ids)) if seg.order is None else seg.order
    return Scores(source=source, prompt_index=np.repeat(np.arange(seg.num), seg.counts),
                  prompt_ids=seg.labels, columns={c: v[order] for c, v in values.items()},
                  sample_weights=None if weights is None else weights[order], rows=order + 1)


def truncated_flags(df: pd.DataFrame, where: str) -> list[bool] | None:
    """The samples' ``truncated`` column (cut by max_new_tokens: no eos) as booleans, or None when absent."""
    if TRUNCATED_COLUMN not in df.columns:
        return None
    values = df[TRUNCATED_COLUMN]
    ok = values.map(lambda v: isinstance(v, bool | np.bool_) or (isinstance(v, int | np.integer) and v in (0, 1)))
    bad = np.flatnonzero(~ok.to_numpy(dtype=bool))
    if bad.size:
        raise InputError(f"{where}: row {bad[0]}: column 'truncated' is {values.iloc[bad[0]]!r:.40}, not true/false")
    return [bool(v) for v in values]

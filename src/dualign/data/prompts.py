"""Prompt reader: a validated ``[prompt_id, prompt]`` table from a file, a saved dataset or the Hub
(the sources of :mod:`dualign.data.sources`).

Rows are numbered from 1 in error messages.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dualign._infra.errors import InputError
from dualign.data.sources import read_source


def load_prompts(source: str | Path | pd.DataFrame, prompt_column: str = "prompt", id_column: str | None = None,
                 split: str = "train", revision: str | None = None,
                 max_prompts: int | None = None) -> pd.DataFrame:
    """Read prompts (a file, a dataset, or a DataFrame already in memory) into a DataFrame with
    columns ``prompt_id`` and ``prompt``.

    ``id_column=None`` uses a ``prompt_id`` column when the source has one, else the row number
    (0-based, counted before ``max_prompts`` so ids are stable). Every row is validated; then the
    first ``max_prompts`` rows are kept.
    """
    in_memory = isinstance(source, pd.DataFrame)
    table = source if in_memory else read_source(source, split, revision, what="prompt")
    name = "prompts" if in_memory else str(source)
    if len(table) == 0:
        raise InputError(f"{name}: no prompts (the prompt file is empty)")
    _require_column(table, prompt_column, name, "prompt")
    if id_column is not None:
        _require_column(table, id_column, name, "id")
    id_column = id_column or ("prompt_id" if "prompt_id" in table.columns else None)

    prompts = table[prompt_column].tolist()
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            kind = "missing" if p is None or (isinstance(p, float) and p != p) else type(p).__name__
            raise InputError(f"{name}: row {i + 1}: prompt column '{prompt_column}' is {kind}, expected text")
        if not p.strip():
            raise InputError(f"{name}: row {i + 1}: prompt column '{prompt_column}' is empty")

    ids = _prompt_ids(table[id_column] if id_column else None, len(table), name)
    out = pd.DataFrame({"prompt_id": ids, "prompt": prompts})
    if max_prompts is not None:
        if max_prompts < 1:
            raise InputError(f"max_prompts must be ≥ 1, got {max_prompts}")
        out = out.iloc[:max_prompts].reset_index(drop=True)
    return out


def _require_column(table: pd.DataFrame, column: str, name: str, what: str) -> None:
    if column not in table.columns:
        present = ", ".join(map(str, table.columns))
        raise InputError(f"{name}: no {what} column '{column}' (columns present: {present})")


def _prompt_ids(column: pd.Series | None, n: int, name: str) -> list:
    """Ids as ints when they all are, else as strings; missing or duplicate ids are errors."""
    if column is None:
        return list(range(n))
    values = column.tolist()
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v):
            raise InputError(f"{name}: row {i + 1}: prompt id is missing")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        ids = [int(v) for v in values]
    else:
        ids = [str(v) for v in values]
    first_row: dict = {}
    for i, v in enumerate(ids):
        if v in first_row:
            raise InputError(f"{name}: duplicate prompt id {v!r} (rows {first_row[v] + 1} and {i + 1})")
        first_row[v] = i
    return ids

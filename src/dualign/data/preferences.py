"""Preference data: PKU-SafeRLHF's two-label schema and TRL's ``prompt/chosen/rejected``.

Sources: a JSONL / Parquet / CSV file, a ``datasets`` ``save_to_disk`` directory, or a Hub dataset id
(pin ``revision``; offline, the Hub path fails in one line).

PKU-SafeRLHF schema (one row per pair; sign conventions):

- ``prompt``, ``response_0``, ``response_1``: text;
- ``better_response_id`` ∈ {0, 1}: the index of the MORE HELPFUL response;
- ``safer_response_id`` ∈ {0, 1}: the index of the SAFER (less harmful) response;
- ``is_response_0_safe``, ``is_response_1_safe``: true = the response is SAFE (harmless);
- optional, newer releases: ``response_<i>_severity_level`` (0 = harmless, higher = more severe),
  ``response_<i>_harm_category`` (a mapping category → bool, true = that harm is present).

Views (TRL-format pairs for ``dualign train --method dpo --preferences``): ``helpful`` has
chosen = ``response_<better_response_id>``, ``safe`` has chosen = ``response_<safer_response_id>``.
``prompt_id`` groups rows with the same prompt text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dualign._infra.errors import InputError
from dualign._infra.io import write_table
from dualign._infra.segments import Segments
from dualign.data.sources import read_source

PKU_COLUMNS = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
               "is_response_0_safe", "is_response_1_safe")
TRL_COLUMNS = ("prompt", "chosen", "rejected")
VIEWS = {"helpful": "better_response_id", "safe": "safer_response_id"}

# Issue kinds found by check_preferences, with the sentence ``dualign data check`` prints.
ISSUES = {
    "invalid_label": "a label is not 0/1 (ids) or true/false (is_response_i_safe)",
    "empty_text": "the prompt or a response is empty",
    "identical_responses": "both responses are the same text (the labels say nothing)",
    "duplicate": "same prompt and response pair (either order) as an earlier row, same labels",
    "conflicting_duplicate": "same prompt and response pair as another row, different labels (all such rows)",
    "safer_flagged_unsafe": "the safer response is flagged unsafe while the other is flagged safe",
    "safer_more_severe": "the safer response has a higher severity_level than the other",
    "safe_with_harm": "a response flagged safe has a harm category marked true",
}


def read_preferences(source: str | Path, split: str = "train", revision: str | None = None) -> pd.DataFrame:
    """The preference table as is (no rows dropped), after checking it has one schema's columns.

    Raises one line naming the source when neither the PKU-SafeRLHF nor the TRL columns are present.
    """
    table = read_source(source, split, revision, what="preference")
    preference_schema(table, str(source))
    if len(table) == 0:
        raise InputError(f"{source}: no preference rows")
    return table


def preference_schema(table: pd.DataFrame, source: str = "preferences") -> str:
    """``"pku"`` or ``"trl"``; otherwise one line naming the first missing column."""
    if set(TRL_COLUMNS) <= set(table.columns):
        return "trl"
    if {"response_0", "response_1"} & set(table.columns) or "chosen" not in table.columns:
        missing = [c for c in PKU_COLUMNS if c not in table.columns]
        if not missing:
            return "pku"
        raise InputError(f"{source}: missing column '{missing[0]}' for the PKU-SafeRLHF schema "
                         f"(columns present: {', '.join(map(str, table.columns))})")
    missing = [c for c in TRL_COLUMNS if c not in table.columns]
    raise InputError(f"{source}: missing column '{missing[0]}' for the TRL prompt/chosen/rejected schema "
                     f"(columns present: {', '.join(map(str, table.columns))})")


def _label_ids(values: pd.Series) -> np.ndarray:
    """0/1 as int; anything else (2, NaN, "a", True) as -1."""
    def one(v) -> int:
        if isinstance(v, bool | np.bool_) or v is None:
            return -1
        if isinstance(v, int | np.integer | float | np.floating) and v in (0, 1):
            return int(v)
        return -1
    return np.array([one(v) for v in values], dtype=np.int64)


def _flags(values: pd.Series) -> np.ndarray:
    """true/false (bool, 0/1, or the strings "true"/"false") as 1/0; anything else as -1."""
    def one(v) -> int:
        if isinstance(v, bool | np.bool_):
            return int(v)
        if isinstance(v, int | np.integer) and v in (0, 1):
            return int(v)
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return int(v.strip().lower() == "true")
        return -1
    return np.array([one(v) for v in values], dtype=np.int64)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _texts_empty(table: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    empty = np.zeros(len(table), dtype=bool)
    for col in columns:
        empty |= ~table[col].map(lambda v: isinstance(v, str) and bool(v.strip())).to_numpy()
    return empty


def _harm_present(value) -> bool:
    if isinstance(value, Mapping):
        return any(bool(v) for v in value.values() if v is not None)
    return False


@dataclass
class Issue:
    row: int  # 0-based row of the table
    kind: str  # a key of ISSUES
    detail: str


def check_preferences(table: pd.DataFrame) -> list[Issue]:
    """Every problem of every row, in row order (rows are 0-based; a row may have several issues)."""
    schema = preference_schema(table)
    issues: list[Issue] = []
    if schema == "pku":
        a_col, b_col = "response_0", "response_1"
        better, safer = _label_ids(table["better_response_id"]), _label_ids(table["safer_response_id"])
        safe = np.stack([_flags(table["is_response_0_safe"]), _flags(table["is_response_1_safe"])], axis=1)
        labels = np.stack([better, safer, safe[:, 0], safe[:, 1]], axis=1)
    else:
        a_col, b_col = "chosen", "rejected"
        labels = np.zeros((len(table), 0), dtype=np.int64)
    empty = _texts_empty(table, ("prompt", a_col, b_col))
    a, b = table[a_col].astype(str).to_numpy(), table[b_col].astype(str).to_numpy()
    for i in range(len(table)):
        if empty[i]:
            issues.append(Issue(i, "empty_text", "prompt or response is empty"))
        elif a[i].strip() == b[i].strip():
            issues.append(Issue(i, "identical_responses", f"{a_col} == {b_col}"))
    if schema == "pku":
        issues += _pku_label_issues(table, labels)
    issues += _duplicate_issues(table, a, b, labels, schema)
    return sorted(issues, key=lambda x: (x.row, list(ISSUES).index(x.kind)))


def _pku_label_issues(table: pd.DataFrame, labels: np.ndarray) -> list[Issue]:
    issues = []
    names = ("better_response_id", "safer_response_id", "is_response_0_safe", "is_response_1_safe")
    severity = [f"response_{i}_severity_level" for i in (0, 1)]
    harm = [f"response_{i}_harm_category" for i in (0, 1)]
    for i, (better, safer, safe0, safe1) in enumerate(labels):
        bad = [n for n, v in zip(names, (better, safer, safe0, safe1), strict=True) if v < 0]
        if bad:
            issues.append(Issue(i, "invalid_label", f"{bad[0]}={_plain(table[bad[0]].iloc[i])!r}"))
            continue
        safe = (safe0, safe1)
        if not safe[safer] and safe[1 - safer]:
            issues.append(Issue(i, "safer_flagged_unsafe",
                                f"safer_response_id={safer} but is_response_{safer}_safe=false, "
                                f"is_response_{1 - safer}_safe=true"))
        if all(c in table.columns for c in severity):
            levels = [pd.to_numeric(table[c].iloc[i], errors="coerce") for c in severity]
            if all(pd.notna(x) for x in levels) and levels[safer] > levels[1 - safer]:
                issues.append(Issue(i, "safer_more_severe",
                                    f"severity_level {levels[safer]:g} (safer, response_{safer}) > "
                                    f"{levels[1 - safer]:g} (response_{1 - safer})"))
        for k in (0, 1):
            if harm[k] in table.columns and safe[k] and _harm_present(table[harm[k]].iloc[i]):
                issues.append(Issue(i, "safe_with_harm", f"is_response_{k}_safe=true but {harm[k]} "
                                    "has a category marked true"))
    return issues


def _duplicate_issues(table: pd.DataFrame, a: np.ndarray, b: np.ndarray, labels: np.ndarray,
                      schema: str) -> list[Issue]:
    """Rows with the same prompt and unordered response pair; labels compared in a common orientation."""
    groups: dict[tuple, list[int]] = {}
    prompts = table["prompt"].astype(str).to_numpy()
    for i in range(len(table)):
        groups.setdefault((prompts[i], *sorted((a[i], b[i]))), []).append(i)
    issues = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        canon = {_canonical_labels(a[i], b[i], labels[i], schema) for i in rows}
        if len(canon) > 1:
            issues += [Issue(i, "conflicting_duplicate", f"rows {', '.join(map(str, rows))}") for i in rows]
        else:
            issues += [Issue(i, "duplicate", f"same as row {rows[0]}") for i in rows[1:]]
    return issues


def _canonical_labels(a: str, b: str, labels: np.ndarray, schema: str) -> tuple:
    """The labels as if the responses were ordered (min, max), so a swapped duplicate compares equal."""
    if schema == "trl":
        return (a <= b,)  # chosen first or second in the sorted pair
    better, safer, safe0, safe1 = labels.tolist()
    if a <= b:
        return better, safer, safe0, safe1
    return (1 - better if better >= 0 else better), (1 - safer if safer >= 0 else safer), safe1, safe0


def fix_preferences(table: pd.DataFrame, issues: list[Issue] | None = None) -> pd.DataFrame:
    """The rows with no issue (a duplicate's first occurrence is kept), index reset."""
    issues = check_preferences(table) if issues is None else issues
    drop = sorted({x.row for x in issues})
    return table.drop(index=table.index[drop]).reset_index(drop=True)


def format_check(table: pd.DataFrame, issues: list[Issue], source: str, examples: int = 3) -> str:
    """The report ``dualign data check`` prints: sign conventions, one line per issue kind, examples."""
    schema = preference_schema(table, source)
    lines = [f"{source}: {len(table)} rows, schema {schema}"]
    if schema == "pku":
        lines.append("conventions: better_response_id = index of the MORE HELPFUL response; "
                     "safer_response_id = index of the SAFER response; is_response_i_safe true = SAFE; "
                     "severity_level higher = MORE harmful")
    else:
        lines.append("conventions: chosen = the preferred response, rejected = the other")
    flagged = {x.row for x in issues}
    lines.append(f"{len(flagged)} rows with issues, {len(table) - len(flagged)} clean")
    for kind, text in ISSUES.items():
        hits = [x for x in issues if x.kind == kind]
        if not hits:
            continue
        lines.append(f"  {kind:22s} {len(hits):6d}  {text}")
        lines += [f"      row {x.row}: {x.detail}" for x in hits[:examples]]
    return "\n".join(lines)


def preference_views(table: pd.DataFrame, source: str = "preferences",
                     skip_invalid: bool = False) -> dict[str, pd.DataFrame]:
    """``{"helpful": pairs, "safe": pairs}`` in TRL format (``prompt_id, prompt, chosen, rejected``).

    helpful: chosen = response_<better_response_id>; safe: chosen = response_<safer_response_id>.
    A table with ``ref_logprob_0``/``ref_logprob_1`` gives ``ref_logprob_chosen``/``ref_logprob_rejected``.
    A row whose id is not 0/1 is an error (``skip_invalid``: dropped from that view instead), as are
    empty texts; other issues are left to ``dualign data check``.
    """
    if preference_schema(table, source) != "pku":
        raise InputError(f"{source}: views need the PKU-SafeRLHF schema (two labels per pair); "
                         "a TRL prompt/chosen/rejected file is already one view")
    empty = np.flatnonzero(_texts_empty(table, ("prompt", "response_0", "response_1")))
    if empty.size:
        raise InputError(f"{source}: row {empty[0]}: the prompt or a response is empty "
                         "(dualign data check --fix drops such rows)")
    prompt_id = Segments.of(table["prompt"].to_numpy()).codes()
    views = {}
    for view, column in VIEWS.items():
        ids = _label_ids(table[column])
        bad = np.flatnonzero(ids < 0)
        if bad.size and not skip_invalid:
            raise InputError(f"{source}: row {bad[0]}: {column} is {_plain(table[column].iloc[bad[0]])!r}, expected 0 or 1")
        keep = ids >= 0
        chosen, rejected = _oriented(table, "response", ids, keep)
        views[view] = pd.DataFrame({"prompt_id": prompt_id[keep], "prompt": table["prompt"].to_numpy()[keep],
                                    "chosen": chosen, "rejected": rejected})
        if {"ref_logprob_0", "ref_logprob_1"} <= set(table.columns):
            views[view]["ref_logprob_chosen"], views[view]["ref_logprob_rejected"] = _oriented(
                table, "ref_logprob", ids, keep)
    return views


def _oriented(table: pd.DataFrame, stem: str, ids: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``<stem>_<id>``, ``<stem>_<1 − id>``) of the kept rows."""
    v0, v1 = table[f"{stem}_0"].to_numpy()[keep], table[f"{stem}_1"].to_numpy()[keep]
    first = ids[keep] == 0
    return np.where(first, v0, v1), np.where(first, v1, v0)


def response_safety(table: pd.DataFrame, source: str = "preferences") -> np.ndarray:
    """[n, 2] bool: ``is_response_0_safe``, ``is_response_1_safe`` (true = SAFE); one line naming the
    first row whose flag is not true/false."""
    flags = np.stack([_flags(table[f"is_response_{k}_safe"]) for k in (0, 1)], axis=1)
    bad = np.argwhere(flags < 0)
    if bad.size:
        row, k = bad[0]
        raise InputError(f"{source}: row {row}: is_response_{k}_safe is "
                         f"{_plain(table[f'is_response_{k}_safe'].iloc[row])!r}, expected true or false")
    return flags.astype(bool)


def write_views(source: str | Path, out_dir: str | Path, split: str = "train",
                revision: str | None = None) -> dict[str, Path]:
    """Read a PKU-SafeRLHF source and write ``<out_dir>/helpful.jsonl`` and ``<out_dir>/safe.jsonl``."""
    views = preference_views(read_preferences(source, split, revision), str(source))
    paths = {}
    for name, view in views.items():
        paths[name] = Path(out_dir) / f"{name}.jsonl"
        write_table(view, paths[name])
    return paths


def long_responses(table: pd.DataFrame) -> pd.DataFrame:
    """PKU pairs as the long samples layout: rows 0..n-1 are response_0, rows n..2n-1 response_1.

    Columns ``prompt_id``, ``prompt``, ``response`` and, when the pair table has
    ``ref_logprob_0`` / ``ref_logprob_1``, ``ref_logprob``.
    """
    if "prompt_id" in table.columns:
        pid = table["prompt_id"].to_numpy()
    else:
        pid = Segments.of(table["prompt"].to_numpy()).codes()
    out = pd.DataFrame({
        "prompt_id": np.concatenate([pid, pid]),
        "prompt": np.concatenate([table["prompt"].to_numpy()] * 2),
        "response": np.concatenate([table["response_0"].to_numpy(), table["response_1"].to_numpy()]),
    })
    if {"ref_logprob_0", "ref_logprob_1"} <= set(table.columns):
        out["ref_logprob"] = np.concatenate([table["ref_logprob_0"].to_numpy(float),
                                             table["ref_logprob_1"].to_numpy(float)])
    return out

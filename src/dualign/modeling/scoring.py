"""Scoring a table of responses: one column per scorer spec (:mod:`dualign.modeling.scorers` parses
and loads them), scorers of one architecture sharing their encoder, log π_ref added where an
implicit scorer needs it. The ``score`` stage and the ``evaluate`` stage both score through
:func:`score_table` / :func:`score_specs`."""

from __future__ import annotations

import gc
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from dualign._infra.distributed import Ranks
from dualign._infra.errors import ConfigError, InputError
from dualign.data.score_table import truncated_flags
from dualign.modeling.scorers import (
    LogProbScorer,
    ScorerSpec,
    SharedEncoderScorers,
    implicit_beta,
    implicit_reward,
    load_scorer,
    parse_scorer,
    same_architecture,
    score_column,
    score_columns,
    share_encoders,
)


def _check_table(df: pd.DataFrame, specs: list[ScorerSpec], where: str) -> None:
    for col in ("prompt", "response"):
        if col not in df.columns:
            raise InputError(f"{where}: no '{col}' column (columns present: {', '.join(map(str, df.columns))})")
    seen = set()
    for s in specs:
        if s.name in df.columns:
            raise InputError(f"{where}: scorer name '{s.name}' is already a column of the table")
        if s.name in seen:
            raise ConfigError(f"scorer name '{s.name}' is given twice")
        seen.add(s.name)


def score_table(df: pd.DataFrame, scorers: Sequence[str | ScorerSpec], *, batch_size: int = 16,
                device: str = "auto", dtype: str = "auto", max_length: int = 1024, hf_input: str = "pair",
                template: str = "auto", append_eos: bool = True, progress: bool = True,
                ref_model: str | None = None, ref_revision: str | None = None,
                trust_remote_code: bool = False, dp: Ranks | None = None) -> pd.DataFrame:
    """A copy of ``df`` (with ``prompt`` and ``response`` columns) plus one column per scorer.

    Implicit scorers read log π_ref from ``df['ref_logprob']``; when it is absent it is computed
    with ``ref_model`` (and added to the copy). ``dp``: launched processes share the batches and
    every one returns the whole table (:func:`score_specs`).
    """
    specs = [s if isinstance(s, ScorerSpec) else parse_scorer(s) for s in scorers]
    _check_table(df, specs, "table")
    load = {"device": device, "dtype": dtype, "max_length": max_length, "hf_input": hf_input,
            "template": template, "append_eos": append_eos, "trust_remote_code": trust_remote_code}
    out = _with_ref_logprob(df, specs, ref_model, ref_revision, batch_size, progress, "table", **load)
    for name, values in score_specs(specs, out, batch_size, progress, {s.name: load for s in specs}, dp=dp).items():
        out[name] = values
    return out


def score_specs(specs: list[ScorerSpec], df: pd.DataFrame, batch_size: int, progress: bool,
                loads: dict[str, dict], done=None, dp: Ranks | None = None) -> dict[str, np.ndarray]:
    """Every scorer's column on ``df`` (``loads``: name → load kwargs). ``hf`` classifiers of one
    architecture are loaded together and, where they share an encoder, run it once per batch
    (:func:`dualign.modeling.scorers.share_encoders`); every other scorer is loaded, run and freed alone.
    ``done(name, column)`` is called as each column is finished (the stage's resume cache); ``dp``
    splits the batches among launched processes (:func:`dualign.modeling.scorers.score_columns`)."""
    out: dict[str, np.ndarray] = {}

    def finish(name: str, values: np.ndarray) -> None:
        out[name] = values
        if done is not None:
            done(name, values)

    for cluster in _clusters(specs, loads):
        if len(cluster) == 1:
            finish(cluster[0].name, _run_scorer(cluster[0], df, batch_size, progress, dp, **loads[cluster[0].name]))
            continue
        units = share_encoders([load_scorer(spec, **loads[spec.name]) for spec in cluster])
        names = iter(spec.name for spec in cluster)
        try:
            for unit in units:
                members = [next(names) for _ in getattr(unit, "scorers", [unit])]
                fn = unit if isinstance(unit, SharedEncoderScorers) else (lambda p, r, f=unit: [f(p, r)])
                for name, values in score_columns(fn, members, df["prompt"].tolist(), df["response"].tolist(),
                                                  batch_size, progress, dp=dp).items():
                    finish(name, values)
        finally:
            units.clear()
            _free(units)
    return out


def _clusters(specs: list[ScorerSpec], loads: dict[str, dict]) -> list[list[ScorerSpec]]:
    """``hf`` specs of the same architecture and load settings together (candidates for a shared
    encoder), every other spec alone; in the order of each cluster's first member."""
    clusters: list[list[ScorerSpec]] = []
    for spec in specs:
        home = next((c for c in clusters if spec.kind == c[0].kind == "hf" and loads[spec.name] == loads[c[0].name]
                     and same_architecture(c[0].target, spec.target)), None)
        if home is None:
            clusters.append([spec])
        else:
            home.append(spec)
    return clusters


def _with_ref_logprob(df: pd.DataFrame, specs: list[ScorerSpec], ref_model: str | None,
                      ref_revision: str | None, batch_size: int, progress: bool, where: str,
                      dp: Ranks | None = None, **load) -> pd.DataFrame:
    """``df`` itself, or a copy with ``ref_logprob`` = log π_ref(response | templated prompt) added."""
    implicit = [s.name for s in specs if s.kind == "implicit"]
    if not implicit or "ref_logprob" in df.columns:
        return df.copy()
    if ref_model is None:
        raise InputError(f"{where}: implicit scorer '{implicit[0]}' needs a 'ref_logprob' column "
                         "(log π_ref, as the sample stage writes it) or ref_model")
    fn = LogProbScorer(ref_model, load["device"], load["dtype"], load["template"], ref_revision,
                       load.get("trust_remote_code", False))
    try:
        ref = score_column(fn, "ref_logprob", df["prompt"].tolist(), df["response"].tolist(),
                           batch_size, progress, truncated_flags(df, where), dp)
    finally:
        _free(fn)
    return df.assign(ref_logprob=ref)


def _run_scorer(spec: ScorerSpec, df: pd.DataFrame, batch_size: int, progress: bool, dp: Ranks | None = None,
                **load) -> np.ndarray:
    if spec.kind == "implicit":
        if "ref_logprob" not in df.columns:
            raise InputError(f"implicit scorer '{spec.name}': the table has no 'ref_logprob' column")
        ref = pd.to_numeric(df["ref_logprob"], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(ref))
        if bad.size:
            raise InputError(f"implicit scorer '{spec.name}': ref_logprob at row {bad[0]} is not a "
                             "finite number")
    fn = load_scorer(spec, **load)
    try:
        values = score_column(fn, spec.name, df["prompt"].tolist(), df["response"].tolist(), batch_size, progress,
                              truncated_flags(df, "table"), dp)
    finally:
        _free(fn)
    return implicit_reward(values, ref, implicit_beta(spec)) if spec.kind == "implicit" else values


def _free(fn) -> None:
    del fn
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

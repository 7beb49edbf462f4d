"""The ``score`` stage: one numeric column per scorer on ``samples.parquet`` → ``scores.parquet``.

Scorers are ``NAME=KIND:TARGET[,higher_is_better|,lower_is_better]`` (:mod:`dualign.modeling.scorers`:
``hf``, ``beaver``, ``callable``, ``implicit``). For ``implicit`` scorers log π_ref is the table's
``ref_logprob`` column (computed with ``ref_model`` when absent).

``preferences`` (optional): a PKU-SafeRLHF pair file whose ``response_0``/``response_1`` get the same
scorers, written as ``<run_dir>/preference_scores.parquet`` with columns ``<name>_0``, ``<name>_1``
and ``ref_logprob_0``, ``ref_logprob_1`` (the input of ``train --method pecan`` or ``mocan``).

The raw score is stored as is; the declared direction (Beaver cost: lower is safer) is recorded in
``score.meta.json``. Undeclared, a Beaver model's direction follows its ``score_type`` and any other
scorer's is ``higher_is_better``. Each finished scorer's column is cached atomically in
``<run_dir>/scores.cache/`` so a killed run does not redo it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from dualign._infra.config import load_yaml
from dualign._infra.distributed import Ranks, ranks
from dualign._infra.errors import ConfigError, InputError
from dualign._infra.io import read_table, write_table
from dualign._infra.provenance import mark_done, record_stage, unmark
from dualign.data.preferences import long_responses, preference_schema, read_preferences
from dualign.modeling.scorers import (
    ScorerSpec,
    implicit_beta,
    parse_scorer,
)
from dualign.modeling.scoring import (  # score_table and score_specs: the stage's public names, kept here
    _check_table,
    _with_ref_logprob,
    score_specs,
    score_table,
)
from dualign.modeling.templates import check_template

__all__ = ["ScoreConfig", "score", "score_preferences", "score_specs", "score_table"]


@dataclass
class ScoreConfig:
    scorers: list[str] = field(metadata={
        "help": "scorer spec NAME=KIND:TARGET[,higher_is_better|,lower_is_better], KIND in hf, beaver, "
                "callable, implicit (implicit:PATH[,beta=B])"})
    run_dir: str | None = field(default=None, metadata={"help": "run directory (reads samples.parquet)"})
    batch_size: int = field(default=16, metadata={"help": "responses per forward pass"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, cuda:1, ... (auto: cuda if available)"})
    dtype: str = field(default="auto", metadata={"help": "float32, bfloat16, float16 (auto: bf16 on GPU, fp32 on CPU)"})
    max_length: int = field(default=1024, metadata={"help": "longest scorer input in tokens (longer is cut at the end)"})
    hf_input: Literal["pair", "template"] = field(default="pair", metadata={
        "help": "hf scorers: tokenizer(prompt, response) pairs, or templated prompt + response as one text"})
    template: str = field(default="auto", metadata={"help": "prompt template for hf_input=template"})
    append_eos: bool = field(default=True, metadata={
        "help": "beaver scorers: end the input with eos, as Safe-RLHF does in training"})
    preferences: str | None = field(default=None, metadata={
        "help": "PKU-SafeRLHF pair file to score too (-> <run_dir>/preference_scores.parquet)"})
    ref_model: str | None = field(default=None, metadata={
        "help": "π_ref for implicit scorers where ref_logprob is absent (default: the sample stage's model)"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run Python code shipped with a scorer model (its auto_map); off: such a model is refused"})

    def __post_init__(self) -> None:
        if not self.scorers:
            raise ValueError("at least one scorer is required (--scorer NAME=KIND:TARGET)")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for spec in self.scorers:
            parse_scorer(spec)
        check_template(self.template)


def _reference(cfg: ScoreConfig, run_dir: Path) -> tuple[str | None, str | None, str]:
    """(π_ref, its revision, template) for implicit scorers: the sample stage's unless ``ref_model`` is set."""
    path = run_dir / "sample.config.yaml"
    sample_cfg = load_yaml(path) if path.exists() else {}
    if cfg.ref_model:
        return cfg.ref_model, None, sample_cfg.get("template", cfg.template)
    return sample_cfg.get("model"), sample_cfg.get("revision"), sample_cfg.get("template", cfg.template)


def score(cfg: ScoreConfig, run_dir: str | Path | None = None) -> Path:
    """Run the score stage in ``run_dir`` (default ``cfg.run_dir``); return ``scores.parquet``'s path.

    With ``cfg.preferences``, ``preference_scores.parquet`` is written too; ``score.done`` last.
    """
    if not (run_dir or cfg.run_dir):
        raise ConfigError("missing required config value(s): run_dir")
    run_dir = Path(run_dir or cfg.run_dir)
    samples = read_table(run_dir / "samples.parquet")
    specs = [parse_scorer(s) for s in cfg.scorers]
    _check_table(samples, specs, str(run_dir / "samples.parquet"))
    ref_model, ref_revision, implicit_template = _reference(cfg, run_dir)
    dp = ranks()
    load = {"device": dp.device(cfg.device), "dtype": cfg.dtype, "max_length": cfg.max_length,
            "hf_input": cfg.hf_input, "template": cfg.template, "append_eos": cfg.append_eos,
            "trust_remote_code": cfg.trust_remote_code}

    def load_of(spec: ScorerSpec) -> dict:
        # implicit rewards must see the prompt exactly as π_ref did when ref_logprob was computed
        return {**load, "template": implicit_template} if spec.kind == "implicit" else load

    cache_dir = run_dir / "scores.cache"
    if dp.main:
        unmark(run_dir, "score")
    hashed = ["prompt", "response"] + [c for c in ("ref_logprob", "truncated") if c in samples.columns]
    samples_key = hashlib.sha256(pd.util.hash_pandas_object(samples[hashed]).to_numpy()
                                 .tobytes()).hexdigest()
    def cache_path(spec: ScorerSpec) -> Path:
        key = json.dumps([spec.kind, spec.target, {k: v for k, v in load_of(spec).items() if k != "device"},
                          samples_key] + ([implicit_beta(spec)] if spec.kind == "implicit" else []))
        return cache_dir / f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.parquet"

    paths = {spec.name: cache_path(spec) for spec in specs}
    columns = {spec.name: read_table(paths[spec.name])[spec.name].to_numpy() for spec in specs
               if paths[spec.name].exists()}
    dp.barrier()  # every process has seen the same cache before the main one adds to it

    def done(name: str, values: np.ndarray) -> None:
        if dp.main:
            write_table(pd.DataFrame({name: values}), paths[name])

    pending = [spec for spec in specs if spec.name not in columns]
    if pending:
        scored = _with_ref_logprob(samples, pending, ref_model, ref_revision, cfg.batch_size, True,
                                   str(run_dir / "samples.parquet"), dp,
                                   **next((load_of(s) for s in pending if s.kind == "implicit"), load))
        columns |= score_specs(pending, scored, cfg.batch_size, True, {s.name: load_of(s) for s in pending},
                               done=done, dp=dp)
    extra = {"scorers": {s.name: _describe(s) for s in specs}, "processes": dp.size}
    if cfg.preferences:
        prefs = score_preferences(cfg.preferences, specs, ref_model, ref_revision, cfg.batch_size,
                                  {s.name: load_of(s) for s in specs}, dp=dp)
        if dp.main:
            write_table(prefs, run_dir / "preference_scores.parquet")
        extra["preferences"] = {"source": cfg.preferences, "rows": len(prefs)}
    out = run_dir / "scores.parquet"
    if dp.main:
        write_table(samples.assign(**columns), out)
        record_stage(run_dir, "score", cfg, extra=extra)
        shutil.rmtree(cache_dir, ignore_errors=True)
        mark_done(run_dir, "score")
    dp.barrier()
    return out


def score_preferences(source: str | Path | pd.DataFrame, specs: Sequence[ScorerSpec], ref_model: str | None,
                      ref_revision: str | None, batch_size: int, loads: dict[str, dict],
                      progress: bool = True, dp: Ranks | None = None) -> pd.DataFrame:
    """A PKU-SafeRLHF pair table plus ``<name>_0``, ``<name>_1`` per scorer (``loads``: name → load
    kwargs) and, for implicit scorers, ``ref_logprob_0``, ``ref_logprob_1``; ``dp`` as for
    :func:`score_specs`."""
    prefs = source if isinstance(source, pd.DataFrame) else read_preferences(source)
    where = "preferences" if isinstance(source, pd.DataFrame) else str(source)
    if preference_schema(prefs, where) != "pku":
        raise InputError(f"{where}: scoring preferences needs response_0/response_1 pairs (PKU-SafeRLHF schema)")
    long = long_responses(prefs)
    n, out = len(prefs), prefs.copy()
    for spec in specs:
        long = _with_ref_logprob(long, [spec], ref_model, ref_revision, batch_size, progress, where, dp,
                                 **loads[spec.name])
    for name, values in score_specs(list(specs), long, batch_size, progress, loads, dp=dp).items():
        out[f"{name}_0"], out[f"{name}_1"] = values[:n], values[n:]
    if "ref_logprob" in long.columns:
        out["ref_logprob_0"] = long["ref_logprob"].to_numpy()[:n]
        out["ref_logprob_1"] = long["ref_logprob"].to_numpy()[n:]
    return out


def _describe(spec: ScorerSpec) -> dict:
    """What ``score.meta.json`` records of a scorer: kind, target and sign convention."""
    direction, declared = spec.direction, spec.direction is not None
    if direction is None and spec.kind == "beaver":
        config = Path(spec.target) / "config.json"
        score_type = json.loads(config.read_text()).get("score_type") if config.exists() else None
        direction = "lower_is_better" if score_type == "cost" else None
    out = {"kind": spec.kind, "target": spec.target, "direction": direction or "higher_is_better",
           "declared": declared}
    if spec.kind == "implicit":
        out["beta"] = implicit_beta(spec)
    return out

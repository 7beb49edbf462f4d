"""What the baselines share: the constrained objective they optimise (from dual.json or their own
constraints), the dual.json each writes for the λ it used, its pairs at a given λ, and the run
directory's settings they reuse (scores, sample and score configs).

The objective is the problem MoCAN solves in one shot,

    maximize  E_π[r] − β·KL(π‖π_ref)   subject to  E_π[g_j] ≥ b_j   (g_j = sign_j·column_j),

read from dual.json (reward, constraints, thresholds, β) unless a method is given ``constraints``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from dualign._infra.errors import ConfigError, InputError
from dualign._infra.io import read_json
from dualign.data.constraints import Constraint, constraint_names, parse_constraint
from dualign.data.records import DualRecord, read_dual, write_dual
from dualign.dual.formulas import reference_means, tilted_means
from dualign.methods.mocan import pairs_from_scores
from dualign.modeling.templates import format_prompt


@dataclass
class Objective:
    """What every baseline optimises: reward column, constraints E[g_j] ≥ b_j, β."""
    reward: str
    constraints: list[Constraint]
    thresholds: np.ndarray           # b_j, in g units (g = sign·column)
    beta: float

    @property
    def names(self) -> list[str]:
        return constraint_names(self.constraints)

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([self.reward] + [c.column for c in self.constraints]))

    def utilities(self, table: pd.DataFrame) -> np.ndarray:
        """g [n, m] = sign_j·column_j."""
        return np.stack([c.sign * table[c.column].to_numpy(float) for c in self.constraints], axis=1)


def load_objective(dual_path: Path, scores: pd.DataFrame | None = None,
                   constraints: list[str] | None = None, reward: str | None = None,
                   beta: float | None = None) -> Objective:
    """From ``constraints`` (thresholds from π_ref's means on ``scores``), else from dual.json."""
    dual = read_dual(dual_path, require=("lambdas", "thresholds")) if dual_path.exists() else None
    if not constraints and dual is None:
        raise InputError(f"{dual_path}: file not found (run the dual stage, or give constraints)")
    if constraints:
        if scores is None:
            raise InputError("constraints given without a scores table to take π_ref's means from")
        parsed = [parse_constraint(c) for c in constraints]
        reward = reward or (dual.reward if dual else "reward")
        columns = list(dict.fromkeys([reward] + [c.column for c in parsed]))
        missing = [c for c in columns if c not in scores.columns]
        if missing:
            raise InputError(f"scores table: missing score column '{missing[0]}'")
        means = reference_means(scores["prompt_id"].to_numpy(), scores[columns].to_numpy(float),
                                scores["sample_weight"].to_numpy(float) if "sample_weight" in scores else None)
        reference = dict(zip(columns, np.atleast_1d(means).tolist(), strict=True))
        b = np.array([c.sign * c.threshold(reference[c.column]) for c in parsed])
        return Objective(reward, parsed, b, beta or (dual.beta if dual else 0.1))
    b = np.array([c.sign * dual.thresholds[n] for c, n in zip(dual.parsed, dual.names, strict=True)])
    return Objective(reward or dual.reward, dual.parsed, b, beta or dual.beta)


def method_dual(objective: Objective, scores: pd.DataFrame, lambdas: np.ndarray, reward_weight: float,
                method: str) -> DualRecord:
    """A dual.json for λ set by a method: thresholds as the dual's, predictions of the tilt at that λ."""
    r = scores[objective.reward].to_numpy(float)
    g = objective.utilities(scores)
    ids = scores["prompt_id"].to_numpy()
    weights = scores["sample_weight"].to_numpy(float) if "sample_weight" in scores else None
    values = np.column_stack([r, g])
    means, kl = tilted_means(ids, (reward_weight * r + g @ lambdas) / objective.beta, values, weights)
    refs = reference_means(ids, values, weights)
    names = objective.names
    predicted = {objective.reward: float(means[0]), "kl": kl}
    reference = {objective.reward: float(refs[0]), "kl": 0.0}
    for j, (name, c) in enumerate(zip(names, objective.constraints, strict=True)):
        predicted[name] = c.sign * float(means[1 + j])
        reference[name] = c.sign * float(refs[1 + j])
    return DualRecord(
        method=method, beta=objective.beta, reward=objective.reward, reward_weight=reward_weight,
        constraints=[c.text for c in objective.constraints],
        lambdas=dict(zip(names, map(float, lambdas), strict=True)),
        columns={n: c.column for n, c in zip(names, objective.constraints, strict=True)},
        thresholds={n: c.sign * float(b) for n, c, b in zip(names, objective.constraints, objective.thresholds,
                                                            strict=True)},
        predicted=predicted, reference=reference)


def write_method_dual(run_dir: Path, dual: DualRecord) -> Path:
    """``<run_dir>/dual.json`` unless another method's (e.g. MoCAN's λ*) is there: then ``<method>.dual.json``."""
    path = run_dir / "dual.json"
    if path.exists() and read_json(path).get("method") != dual.method:
        path = run_dir / f"{dual.method}.dual.json"
    write_dual(dual, path)
    return path


def lagrangian_pairs(scores: pd.DataFrame, objective: Objective, lambdas: np.ndarray, reward_weight: float,
                     pairs_per_prompt: int | None, seed: int, source: str) -> pd.DataFrame:
    """MoCAN pairs whose target margin is Δ(w_r·r + λᵀg) (w_r = 0: the constraints alone)."""
    target = reward_weight * scores[objective.reward].to_numpy(float) + objective.utilities(scores) @ lambdas
    plain = DualRecord(beta=objective.beta, reward="_target", constraints=[], lambdas={})
    return pairs_from_scores(scores.assign(_target=target), plain, pairs_per_prompt, seed, source)


def iterative_summary(run_dir: Path, method: str, objective: Objective, scores: pd.DataFrame | None,
                       lambdas: np.ndarray, trajectory: list[list[float]], summary: dict) -> dict[str, Any]:
    """Write the method's dual.json (final λ, its trajectory); the summary with both added."""
    if scores is not None:
        dual = method_dual(objective, scores, lambdas, 1.0, method)
        dual.lambda_trajectory = trajectory
        write_method_dual(run_dir, dual)
    return {**summary, "lambdas": dict(zip(objective.names, lambdas.tolist(), strict=True)),
            "lambda_trajectory": [dict(zip(objective.names, lam, strict=True)) for lam in trajectory]}


def scores_file(run_dir: Path, scores: str | None) -> Path:
    """The scores table a method reads: ``scores``, else <run_dir>/scores.parquet."""
    return Path(scores) if scores else run_dir / "scores.parquet"


def dual_file(run_dir: Path, dual: str | None) -> Path:
    """The dual.json a method reads: ``dual``, else <run_dir>/dual.json."""
    return Path(dual) if dual else run_dir / "dual.json"


def link_sample_config(scores_path: Path, run_dir: Path) -> None:
    """Copy the sample stage's config and record beside the scores into ``run_dir``, so that
    ``train`` reuses the scores' log π_ref (it does when the record's model, revision, template and
    numerics are its own: :mod:`dualign.modeling.refprobs`)."""
    for name in ("sample.config.yaml", "sample.meta.json"):
        src, dst = scores_path.parent / name, run_dir / name
        if src.exists() and src.resolve() != dst.resolve():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def sample_settings(scores_path: Path) -> dict[str, Any]:
    """The sample stage's recorded config beside the scores (``sample.config.yaml``), or {}."""
    path = scores_path.parent / "sample.config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def scorer_specs(scorers: list[str] | None, scores_path: Path) -> list[str]:
    """The given scorer specs, else those the score stage used (``score.config.yaml`` beside the scores)."""
    if scorers:
        return scorers
    path = scores_path.parent / "score.config.yaml"
    recorded = (yaml.safe_load(path.read_text()) or {}).get("scorers") if path.exists() else None
    if not recorded:
        raise ConfigError(f"missing required config value(s): scorers (no {path} to take them from)")
    return recorded


def sequence_tokens(table: pd.DataFrame, tokenizer, template: str) -> int:
    """Tokens of every (templated prompt, response) row of a samples table: the prompt's tokens plus
    ``response_tokens`` (response + eos), as the sampler and the scorers process them."""
    lengths = {p: len(tokenizer(format_prompt(p, template, tokenizer), add_special_tokens=True)["input_ids"])
               for p in table["prompt"].unique()}
    return int(table["prompt"].map(lengths).sum() + table["response_tokens"].sum())

"""The thin baselines: MoCAN's loss at a λ set by hand instead of the dual's λ*.

- ``fixed-lambda``: target margins r_λ(a) − r_λ(b) at the given λ (one value: the same for all).
- ``reward-only-mocan``: the reward alone (λ = 0).
- ``cost-only-mocan``: the constraints alone (reward weight 0, λ = 1).

(Formerly ``helpful-dpo`` and ``safe-dpo``, renamed: they are MoCAN's loss on π_ref's
samples, not DPO on preference pairs, which is :mod:`dualign.baselines.preference_dpo`.)

Each reads the objective (:mod:`dualign.methods.objective`), writes its dual.json and pairs, and
trains through the one loop with ``method: mocan``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dualign._infra.errors import ConfigError
from dualign._infra.io import read_table, write_table
from dualign._infra.provenance import record_stage
from dualign.methods.objective import (
    Objective,
    dual_file,
    lagrangian_pairs,
    link_sample_config,
    load_objective,
    method_dual,
    scores_file,
    write_method_dual,
)
from dualign.train import TrainConfig, train


@dataclass
class FixedLambdaConfig:
    train: TrainConfig = field(metadata={
        "flat": True, "help": "the one loop's settings, their keys and flags beside this config's own"})
    method: str = field(default="fixed-lambda", metadata={
        "help": "fixed-lambda (λ by hand), reward-only-mocan (λ = 0) or cost-only-mocan (constraints only)"})
    lambdas: list[float] | None = field(default=None, metadata={
        "help": "fixed-lambda: λ per constraint in order (one value: the same for all)"})
    constraints: list[str] | None = field(default=None, metadata={
        "help": "constraints (default: dual.json's), thresholds relative to the scores' π_ref means"})
    reward: str | None = field(default=None, metadata={"help": "reward column (default: dual.json's)"})


def method_weights(method: str, objective: Objective,
                   lambdas: list[float] | None) -> tuple[float, np.ndarray]:
    """(reward weight, λ) of the thin methods: fixed-lambda (given λ), reward-only-mocan (1, 0),
    cost-only-mocan (0, 1)."""
    m = len(objective.constraints)
    if method == "reward-only-mocan":
        return 1.0, np.zeros(m)
    if method == "cost-only-mocan":
        return 0.0, np.ones(m)
    if lambdas is None:
        raise ConfigError("missing required config value(s): lambdas (fixed-lambda: one λ per constraint)")
    lam = np.array(lambdas * m if len(lambdas) == 1 else lambdas, dtype=float)
    if len(lam) != m or (lam < 0).any():
        raise ConfigError(f"config key 'lambdas': expected {m} non-negative value(s), got {lambdas}")
    return 1.0, lam


def train_fixed_lambda(cfg: FixedLambdaConfig) -> dict[str, Any]:
    """MoCAN on pairs with target margin Δ(w_r·r + λᵀg) for the method's (w_r, λ)."""
    settings = cfg.train
    run_dir = Path(settings.run_dir)
    scores_path = scores_file(run_dir, settings.scores)
    scores = read_table(scores_path)
    objective = load_objective(dual_file(run_dir, settings.dual), scores, cfg.constraints, cfg.reward, settings.beta)
    reward_weight, lambdas = method_weights(cfg.method, objective, cfg.lambdas)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_stage(run_dir, cfg.method, cfg, settings.seed)
    dual_path = write_method_dual(run_dir, method_dual(objective, scores, lambdas, reward_weight, cfg.method))
    pairs = lagrangian_pairs(scores, objective, lambdas, reward_weight, settings.pairs_per_prompt, settings.seed,
                             str(scores_path))
    write_table(pairs, run_dir / "pairs.parquet")
    link_sample_config(scores_path, run_dir)
    summary = train(dataclasses.replace(settings, method="mocan", pairs=str(run_dir / "pairs.parquet"),
                                        dual=str(dual_path), beta=objective.beta, preferences=None))
    return {"gradient_steps": summary["step"], "sampled_tokens": 0,
            "lambdas": dict(zip(objective.names, lambdas.tolist(), strict=True)),
            "output_dir": summary["output_dir"], "tokens": summary["tokens"]}

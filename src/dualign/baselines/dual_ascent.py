"""Dual ascent: MoCAN at λ_t, measure the policy, move λ, repeat (T rounds, each from π_ref).

Round t trains MoCAN at λ_t (``<run_dir>/rounds/<t>``), estimates E_{π_t}[g] by sampling π_t on
training prompts and scoring the responses, then takes a projected gradient step on the dual,

    λ_{t+1} = max(0, λ_t − η·(E_{π_t}[g] − b))     (∇D(λ) = E_{π_λ}[g] − b),

so λ rises while a constraint is violated. The last round's policy is the result; a finished
round (``rounds/<t>/estimate.json``) is not redone. With ``checkpoints`` (round counts), the policy
after n rounds is kept and ``budgets/<n>/compute.json`` records what it cost: rounds 0..n−1
trained, the estimates of rounds 0..n−2 (the ones its λ came from).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dualign._infra.config import config_to_dict
from dualign._infra.errors import ConfigError
from dualign._infra.io import read_json, read_table, write_json, write_table
from dualign._infra.provenance import record_stage
from dualign._infra.tracking import Tracker
from dualign.data.records import write_dual
from dualign.dual import reference_means
from dualign.methods.objective import (
    Objective,
    dual_file,
    iterative_summary,
    lagrangian_pairs,
    link_sample_config,
    load_objective,
    method_dual,
    sample_settings,
    scorer_specs,
    scores_file,
    sequence_tokens,
)
from dualign.modeling.flops import add_counts
from dualign.modeling.generation import generate_responses
from dualign.modeling.models import load_causal_lm, load_tokenizer
from dualign.modeling.scorers import parse_scorer
from dualign.modeling.scoring import score_table
from dualign.train import TrainConfig, train


@dataclass
class DualAscentConfig:
    train: TrainConfig = field(metadata={
        "flat": True, "help": "the one loop's settings, their keys and flags beside this config's own"})
    method: str = field(default="dual-ascent", metadata={"help": "dual-ascent"})
    rounds: int = field(default=3, metadata={"help": "dual-ascent: rounds (train at λ_t, estimate, update)"})
    lambda_lr: float = field(default=1.0, metadata={
        "help": "λ step size: dual-ascent and grpo-lagrangian η (λ per unit of violation); "
                "ppo-lagrangian: on log λ"})
    lambda_init: float = field(default=1.0, metadata={"help": "initial λ of every constraint"})
    constraints: list[str] | None = field(default=None, metadata={
        "help": "constraints (default: dual.json's), thresholds relative to the scores' π_ref means"})
    reward: str | None = field(default=None, metadata={"help": "reward column (default: dual.json's)"})
    scorers: list[str] | None = field(default=None, metadata={
        "help": "scorer specs for online scoring (default: the score stage's, score.config.yaml)"})
    estimate_prompts: int | None = field(default=64, metadata={
        "help": "dual-ascent: training prompts sampled to estimate E_π[g] each round (null: all)"})
    estimate_samples: int = field(default=2, metadata={"help": "dual-ascent: responses per prompt for the estimate"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "online sampling: longest response (default: the sample stage's, else 64)"})
    temperature: float = field(default=1.0, metadata={"help": "online sampling temperature"})
    sample_batch_size: int = field(default=32, metadata={"help": "online sampling/scoring batch size"})
    checkpoints: list[int] | None = field(default=None, metadata={
        "help": "dual-ascent: round counts whose policy is kept with its cost so far (<run_dir>/budgets/<n>)"})


def dual_ascent_step(lambdas: np.ndarray, utility_means: np.ndarray, thresholds: np.ndarray,
                     lr: float) -> np.ndarray:
    """Projected gradient step on the dual: λ ← max(0, λ − η·(E_π[g] − b)) (∇D(λ) = E_πλ[g] − b)."""
    step = np.asarray(utility_means, float) - np.asarray(thresholds, float)
    return np.maximum(0.0, np.asarray(lambdas, float) - lr * step)


def _estimate(policy_dir: str, prompts: pd.DataFrame, objective: Objective, scorers: list[str],
              cfg: DualAscentConfig, max_new_tokens: int, seed: int) -> tuple[np.ndarray, dict, int, dict]:
    """(mean_x mean_k g [m], column means, sampled tokens, token counts per stage) of the policy on
    ``prompts`` (generation, its own log-prob pass, each scorer once)."""
    tok = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir, device=cfg.train.device)
    df = generate_responses(model, tok, prompts["prompt"].tolist(), prompts["prompt_id"].tolist(),
                            cfg.estimate_samples, template=cfg.train.template, max_new_tokens=max_new_tokens,
                            temperature=cfg.temperature, batch_size=cfg.sample_batch_size, seed=seed)
    del model
    needed = [s for s in scorers if parse_scorer(s).name in objective.columns]
    df = score_table(df, needed, batch_size=cfg.sample_batch_size, device=cfg.train.device)
    means = dict(zip(objective.columns, np.atleast_1d(reference_means(
        df["prompt_id"].to_numpy(), df[objective.columns].to_numpy(float))).tolist(), strict=True))
    g = np.array([c.sign * means[c.column] for c in objective.constraints])
    n = sequence_tokens(df, tok, cfg.train.template)
    tokens = {"generation": n, "forward": n, "scored": n}
    return g, {k: float(v) for k, v in means.items()}, int(df["response_tokens"].sum()), tokens


def _round(t: int, rd: Path, lambdas: np.ndarray, objective: Objective, scores: pd.DataFrame,
           scores_path: Path, prompts: pd.DataFrame, scorers: list[str], max_new_tokens: int,
           cfg: DualAscentConfig) -> None:
    """Round t: MoCAN at λ_t into ``rd``, E_{π_t}[g] on sampled responses, the next λ → estimate.json."""
    write_dual(method_dual(objective, scores, lambdas, 1.0, cfg.method), rd / "dual.json")
    write_table(lagrangian_pairs(scores, objective, lambdas, 1.0, cfg.train.pairs_per_prompt, cfg.train.seed,
                                 str(scores_path)), rd / "pairs.parquet")
    link_sample_config(scores_path, rd)
    t0 = time.perf_counter()
    summary = train(dataclasses.replace(cfg.train, method="mocan", run_dir=str(rd), pairs=str(rd / "pairs.parquet"),
                                        dual=str(rd / "dual.json"), beta=objective.beta, preferences=None,
                                        output_dir=str(rd / "policy"), report_to=["none"]))
    t1 = time.perf_counter()
    g, means, n_tok, est_tokens = _estimate(str(rd / "policy"), prompts, objective, scorers, cfg, max_new_tokens,
                                            cfg.train.seed + 7919 * (t + 1))
    nxt = dual_ascent_step(lambdas, g, objective.thresholds, cfg.lambda_lr)
    write_json({"round": t, "lambdas": lambdas.tolist(), "achieved": means, "utilities": g.tolist(),
                "next_lambdas": nxt.tolist(), "gradient_steps": summary["step"], "sampled_tokens": n_tok,
                "train_wall_s": t1 - t0, "estimate_wall_s": time.perf_counter() - t1,
                "train_tokens": summary["tokens"], "estimate_tokens": est_tokens}, rd / "estimate.json")


def train_dual_ascent(cfg: DualAscentConfig) -> dict[str, Any]:
    """T rounds of: MoCAN at λ_t from π_ref (``<run_dir>/rounds/<t>``), estimate E_{π_t}[g] on
    sampled responses, λ_{t+1} = max(0, λ_t − η·(E_{π_t}[g] − b)). The last round's policy is the
    result. A finished round (``rounds/<t>/estimate.json``) is not redone."""
    if cfg.rounds < 1:
        raise ConfigError("config key 'rounds': must be ≥ 1")
    bad = [c for c in cfg.checkpoints or [] if not 1 <= c <= cfg.rounds]
    if bad:
        raise ConfigError(f"config key 'checkpoints': {bad[0]} is not a round count in 1..{cfg.rounds}")
    settings = cfg.train
    run_dir = Path(settings.run_dir)
    scores_path = scores_file(run_dir, settings.scores)
    scores = read_table(scores_path)
    objective = load_objective(dual_file(run_dir, settings.dual), scores, cfg.constraints, cfg.reward, settings.beta)
    scorers = scorer_specs(cfg.scorers, scores_path)
    max_new_tokens = cfg.max_new_tokens or sample_settings(scores_path).get("max_new_tokens") or 64
    prompts = scores[["prompt_id", "prompt"]].drop_duplicates("prompt_id")
    if cfg.estimate_prompts:
        prompts = prompts.sample(min(cfg.estimate_prompts, len(prompts)), random_state=settings.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_stage(run_dir, cfg.method, cfg, settings.seed)
    output_dir = Path(settings.output_dir or run_dir / "policy")
    lambdas = np.full(len(objective.constraints), float(cfg.lambda_init))
    trajectory, steps, tokens, policy = [lambdas.tolist()], 0, 0, None
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    tracker = Tracker(cfg.train.report_to, run_dir, config_to_dict(cfg), cfg.method)
    kept = set(cfg.checkpoints or [])
    estimates: list[dict] = []
    for t in range(cfg.rounds):
        rd = run_dir / "rounds" / str(t)
        done = rd / "estimate.json"
        if not done.exists():
            _round(t, rd, lambdas, objective, scores, scores_path, prompts, scorers, max_new_tokens, cfg)
            if t > 0 and t not in kept:  # the last round's policy and the checkpoints' are kept
                shutil.rmtree(run_dir / "rounds" / str(t - 1) / "policy", ignore_errors=True)
        est = read_json(done)
        estimates.append(est)
        if t + 1 in kept and t + 1 < cfg.rounds:
            _write_budget(run_dir / "budgets" / str(t + 1), rd, estimates, objective, cfg.method)
        steps += est["gradient_steps"]
        tokens += est["sampled_tokens"]
        policy, used = rd / "policy", np.array(est["lambdas"])
        lambdas = np.array(est["next_lambdas"])
        trajectory.append(lambdas.tolist())
        line = {"step": t + 1, "gradient_steps": steps, "sampled_tokens": tokens,
                **{f"dual/lambda_{n}": float(v) for n, v in zip(objective.names, used, strict=True)},
                **{f"dual/next_lambda_{n}": float(v) for n, v in zip(objective.names, lambdas, strict=True)},
                **{f"achieved/{k}": v for k, v in est["achieved"].items()}}
        with open(metrics, "a") as f:
            f.write(json.dumps(line) + "\n")
        tracker.log(line, t + 1)
    tracker.close()
    if output_dir.exists():
        shutil.rmtree(output_dir)
    shutil.copytree(policy, output_dir)
    counts = add_counts(*[e.get("train_tokens") for e in estimates], *[e.get("estimate_tokens") for e in estimates])
    return iterative_summary(run_dir, cfg.method, objective, scores, used, trajectory,
                             {"gradient_steps": steps, "sampled_tokens": tokens, "output_dir": str(output_dir),
                              "iterations": cfg.rounds, "tokens": counts, "scorers": _scorers_used(scorers, objective)})


def _scorers_used(scorers: list[str], objective: Objective) -> list[str]:
    return [s for s in scorers if parse_scorer(s).name in objective.columns]


def _write_budget(budget: Path, rd: Path, estimates: list[dict], objective: Objective, method: str) -> None:
    """``budget/compute.json`` of the policy after len(estimates) rounds: every round trained, the
    estimates but the last (that one only moves λ past this policy); and its dual.json."""
    past = estimates[:-1]
    budget.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rd / "dual.json", budget / "dual.json")
    write_json({"method": method, "iterations": len(estimates), "policy": str(rd / "policy"),
                "wall_s": sum(e.get("train_wall_s", 0.0) for e in estimates)
                + sum(e.get("estimate_wall_s", 0.0) for e in past),
                "gradient_steps": sum(e["gradient_steps"] for e in estimates),
                "sampled_tokens": sum(e["sampled_tokens"] for e in past),
                "tokens": add_counts(*[e.get("train_tokens") for e in estimates],
                                     *[e.get("estimate_tokens") for e in past]),
                "lambdas": dict(zip(objective.names, estimates[-1]["lambdas"], strict=True))},
               budget / "compute.json")

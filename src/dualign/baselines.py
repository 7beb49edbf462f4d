"""The baselines MoCAN is compared against, each one ``dualign train --method <name>``.

They share MoCAN's data (the scores table of π_ref's samples and its prompts), templates, scorers,
seeds and evaluation; the objective is the same constrained problem

    maximize  E_π[r] − β·KL(π‖π_ref)   subject to  E_π[g_j] ≥ b_j   (g_j = sign_j·column_j),

read from dual.json (reward, constraints, thresholds, β) unless ``constraints`` is given.

- ``fixed-lambda``: MoCAN with λ set by hand (no dual): target margins r_λ(a) − r_λ(b) at that λ.
- ``helpful-dpo``: λ = 0 (reward only); ``safe-dpo``: the constraints only (reward weight 0, λ = 1).
- ``dual-ascent``: MoCAN at λ_t, then E_{π_t}[g] estimated by sampling π_t and scoring, then
  λ_{t+1} = max(0, λ_t − η·(E_{π_t}[g] − b)); T rounds, each trained from π_ref.
- ``ppo-lagrangian``: Safe-RLHF's primal-dual RL: online samples from the current policy, a
  critic-free group baseline (RLOO over the K samples of a prompt), the KL penalty folded into the
  reward, PPO's clipped objective on the advantage (A_r + Σ_j λ_j·A_gj)/(1 + Σ_j λ_j), and
  log λ_j ← log λ_j + lr_λ·(b_j − J_gj), J_g the mean episode utility over a window of iterations.

Each run writes ``<run_dir>/compute.json`` (wall-clock, gradient steps, sampled tokens, peak memory,
λ trajectory), the policy (``<run_dir>/policy`` or ``output_dir``), ``metrics.jsonl`` and its own
dual.json with the λ it ended at (``<run_dir>/dual.json`` unless another method's is there, then
``<run_dir>/<method>.dual.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from dualign.config import dump_yaml
from dualign.constraints import Constraint, constraint_names, parse_constraint
from dualign.dual import reference_means, tilted_means
from dualign.errors import ConfigError, InputError
from dualign.io import read_json, read_table, write_json, write_table
from dualign.pairs import pairs_from_scores
from dualign.provenance import record_stage
from dualign.records import DualRecord, read_dual, write_dual
from dualign.train import LOSSES, TrainConfig, train

BASELINES = ("ppo-lagrangian", "dual-ascent", "fixed-lambda", "helpful-dpo", "safe-dpo")


# ------------------------------------------------------------------ update rules (pure functions)

def group_advantages(values: torch.Tensor, baseline: Literal["rloo", "mean"] = "rloo") -> torch.Tensor:
    """Critic-free advantages of K samples per prompt, values [P, K, ...] → same shape.

    mean: A_k = v_k − (1/K)·Σ_j v_j;  rloo: A_k = v_k − (1/(K−1))·Σ_{j≠k} v_j = K/(K−1)·(v_k − mean).
    """
    k = values.shape[1]
    centred = values - values.mean(dim=1, keepdim=True)
    if baseline == "mean":
        return centred
    if baseline == "rloo":
        if k < 2:
            raise ConfigError("config key 'num_samples': the rloo baseline needs at least 2 samples per prompt")
        return centred * k / (k - 1)
    raise ConfigError(f"config key 'advantage': {baseline!r} is not one of rloo, mean")


def kl_shaped_rewards(rewards: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """r̃ = r − β·(log π(y|x) − log π_ref(y|x)), sequence level.

    The penalty sits on the reward only, so the normalised objective (E[r̃ + λᵀg])/(1 + Σλ) has the
    maximiser π ∝ π_ref·exp((r + λᵀg)/β) of MoCAN's Lagrangian at the same λ. (Safe-RLHF splits
    the penalty ½/½ between reward and cost, which leaves β/2 on the combined advantage.)
    """
    return rewards - beta * (logps - ref_logps)


def combined_advantage(adv_reward: torch.Tensor, adv_utilities: torch.Tensor,
                       lambdas: torch.Tensor) -> torch.Tensor:
    """A = (A_r + Σ_j λ_j·A_gj)/(1 + Σ_j λ_j); with one cost c = −g it is Safe-RLHF's (A_r − λ·A_c)/(1 + λ).

    adv_reward [...], adv_utilities [..., m], lambdas [m].
    """
    return (adv_reward + adv_utilities @ lambdas) / (1 + lambdas.sum())


def ppo_clip_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Per-sequence PPO loss: −(1/|y|)·Σ_t min(ρ_t·A, clip(ρ_t, 1−ε, 1+ε)·A), ρ_t = π(y_t|·)/π_old(y_t|·).

    logps, old_logps, mask [B, T] (token log-probs, response tokens marked 1); advantages [B].
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)


def lagrange_multiplier_step(log_lambdas: np.ndarray, utility_means: np.ndarray, thresholds: np.ndarray,
                             lr: float, step: int, delay: int = 0) -> np.ndarray:
    """log λ_j ← log λ_j + lr·(b_j − J_gj) once ``step`` ≥ ``delay`` (λ frozen before).

    J_g is the mean episode utility; for a cost c ≤ d (g = −c, b = −d) this is Safe-RLHF's
    log λ ← log λ + lr·(J_c − d): λ grows while the constraint is violated, shrinks otherwise.
    """
    log_lambdas = np.asarray(log_lambdas, dtype=float)
    if step < delay:
        return log_lambdas.copy()
    return log_lambdas + lr * (np.asarray(thresholds, float) - np.asarray(utility_means, float))


def dual_ascent_step(lambdas: np.ndarray, utility_means: np.ndarray, thresholds: np.ndarray,
                     lr: float) -> np.ndarray:
    """Projected gradient step on the dual: λ ← max(0, λ − η·(E_π[g] − b)) (∇D(λ) = E_πλ[g] − b)."""
    step = np.asarray(utility_means, float) - np.asarray(thresholds, float)
    return np.maximum(0.0, np.asarray(lambdas, float) - lr * step)


# ------------------------------------------------------------------ the objective

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


def method_weights(method: str, objective: Objective,
                   lambdas: list[float] | None) -> tuple[float, np.ndarray]:
    """(reward weight, λ) of the thin methods: fixed-lambda (given λ), helpful-dpo (1, 0), safe-dpo (0, 1)."""
    m = len(objective.constraints)
    if method == "helpful-dpo":
        return 1.0, np.zeros(m)
    if method == "safe-dpo":
        return 0.0, np.ones(m)
    if lambdas is None:
        raise ConfigError("missing required config value(s): lambdas (fixed-lambda: one λ per constraint)")
    lam = np.array(lambdas * m if len(lambdas) == 1 else lambdas, dtype=float)
    if len(lam) != m or (lam < 0).any():
        raise ConfigError(f"config key 'lambdas': expected {m} non-negative value(s), got {lambdas}")
    return 1.0, lam


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


# ------------------------------------------------------------------ compute accounting

@contextlib.contextmanager
def measure() -> Iterator[dict[str, float]]:
    """Wall-clock seconds and peak memory (MiB) of the block: GPU peak allocation on CUDA, and the
    process's peak resident set size (polled every 50 ms)."""
    import psutil

    out: dict[str, float] = {}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["wall_s"] = time.perf_counter() - t0
        stop.set()
        thread.join()
        out["peak_rss_mb"] = max(peak[0], proc.memory_info().rss) / 2**20
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        out["peak_memory_mb"] = out["peak_gpu_mb"] if cuda else out["peak_rss_mb"]


def _scores_path(run_dir: Path, scores: str | None) -> Path:
    return Path(scores) if scores else run_dir / "scores.parquet"


def _dual_path(run_dir: Path, dual: str | None) -> Path:
    return Path(dual) if dual else run_dir / "dual.json"


def _link_sample_config(scores_path: Path, run_dir: Path) -> None:
    """Copy the sample stage's config beside the scores into ``run_dir``, so that ``train`` reuses
    the scores' log π_ref (it does when model, revision and template agree)."""
    src, dst = scores_path.parent / "sample.config.yaml", run_dir / "sample.config.yaml"
    if src.exists() and src.resolve() != dst.resolve():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _sample_settings(scores_path: Path) -> dict[str, Any]:
    path = scores_path.parent / "sample.config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _scorer_specs(scorers: list[str] | None, scores_path: Path) -> list[str]:
    """The given scorer specs, else those the score stage used (``score.config.yaml`` beside the scores)."""
    if scorers:
        return scorers
    path = scores_path.parent / "score.config.yaml"
    recorded = (yaml.safe_load(path.read_text()) or {}).get("scorers") if path.exists() else None
    if not recorded:
        raise ConfigError(f"missing required config value(s): scorers (no {path} to take them from)")
    return recorded


def _train_config(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """The plain TrainConfig part of a baseline config, with ``changes``."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**values, **changes})


# ------------------------------------------------------------------ thin methods: MoCAN at a hand-set λ

@dataclass
class FixedLambdaConfig(TrainConfig):
    method: str = field(default="fixed-lambda", metadata={
        "help": "fixed-lambda (λ by hand), helpful-dpo (λ = 0) or safe-dpo (constraints only)"})
    lambdas: list[float] | None = field(default=None, metadata={
        "help": "fixed-lambda: λ per constraint in order (one value: the same for all)"})
    constraints: list[str] | None = field(default=None, metadata={
        "help": "constraints (default: dual.json's), thresholds relative to the scores' π_ref means"})
    reward: str | None = field(default=None, metadata={"help": "reward column (default: dual.json's)"})


def train_fixed_lambda(cfg: FixedLambdaConfig) -> dict[str, Any]:
    """MoCAN on pairs with target margin Δ(w_r·r + λᵀg) for the method's (w_r, λ)."""
    run_dir = Path(cfg.run_dir)
    scores_path = _scores_path(run_dir, cfg.scores)
    scores = read_table(scores_path)
    objective = load_objective(_dual_path(run_dir, cfg.dual), scores, cfg.constraints, cfg.reward, cfg.beta)
    reward_weight, lambdas = method_weights(cfg.method, objective, cfg.lambdas)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_stage(run_dir, cfg.method, cfg, cfg.seed)
    dual_path = write_method_dual(run_dir, method_dual(objective, scores, lambdas, reward_weight, cfg.method))
    pairs = lagrangian_pairs(scores, objective, lambdas, reward_weight, cfg.pairs_per_prompt, cfg.seed,
                             str(scores_path))
    write_table(pairs, run_dir / "pairs.parquet")
    _link_sample_config(scores_path, run_dir)
    summary = train(_train_config(cfg, method="mocan", pairs=str(run_dir / "pairs.parquet"),
                                  dual=str(dual_path), beta=objective.beta, preferences=None))
    return {"gradient_steps": summary["step"], "sampled_tokens": 0,
            "lambdas": dict(zip(objective.names, lambdas.tolist(), strict=True)),
            "output_dir": summary["output_dir"]}


# ------------------------------------------------------------------ dual ascent

@dataclass
class DualAscentConfig(TrainConfig):
    method: str = field(default="dual-ascent", metadata={"help": "dual-ascent"})
    rounds: int = field(default=3, metadata={"help": "dual-ascent: rounds (train at λ_t, estimate, update)"})
    lambda_lr: float = field(default=1.0, metadata={
        "help": "λ step size: dual-ascent η (λ per unit of violation); ppo-lagrangian: on log λ"})
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


def _estimate(policy_dir: str, prompts: pd.DataFrame, objective: Objective, scorers: list[str],
              cfg: DualAscentConfig, max_new_tokens: int, seed: int) -> tuple[np.ndarray, dict, int]:
    """(mean_x mean_k g [m], column means, sampled tokens) of the policy on ``prompts``."""
    from dualign.models import load_causal_lm, load_tokenizer
    from dualign.sample import generate_responses
    from dualign.score import parse_scorer, score_table

    tok = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir, device=cfg.device)
    df = generate_responses(model, tok, prompts["prompt"].tolist(), prompts["prompt_id"].tolist(),
                            cfg.estimate_samples, template=cfg.template, max_new_tokens=max_new_tokens,
                            temperature=cfg.temperature, batch_size=cfg.sample_batch_size, seed=seed)
    del model
    needed = [s for s in scorers if parse_scorer(s).name in objective.columns]
    df = score_table(df, needed, batch_size=cfg.sample_batch_size, device=cfg.device, progress=False)
    means = dict(zip(objective.columns, np.atleast_1d(reference_means(
        df["prompt_id"].to_numpy(), df[objective.columns].to_numpy(float))).tolist(), strict=True))
    g = np.array([c.sign * means[c.column] for c in objective.constraints])
    return g, {k: float(v) for k, v in means.items()}, int(df["response_tokens"].sum())


def train_dual_ascent(cfg: DualAscentConfig) -> dict[str, Any]:
    """T rounds of: MoCAN at λ_t from π_ref (``<run_dir>/rounds/<t>``), estimate E_{π_t}[g] on
    sampled responses, λ_{t+1} = max(0, λ_t − η·(E_{π_t}[g] − b)). The last round's policy is the
    result. A finished round (``rounds/<t>/estimate.json``) is not redone."""
    if cfg.rounds < 1:
        raise ConfigError("config key 'rounds': must be ≥ 1")
    run_dir = Path(cfg.run_dir)
    scores_path = _scores_path(run_dir, cfg.scores)
    scores = read_table(scores_path)
    objective = load_objective(_dual_path(run_dir, cfg.dual), scores, cfg.constraints, cfg.reward, cfg.beta)
    scorers = _scorer_specs(cfg.scorers, scores_path)
    max_new_tokens = cfg.max_new_tokens or _sample_settings(scores_path).get("max_new_tokens") or 64
    prompts = scores[["prompt_id", "prompt"]].drop_duplicates("prompt_id")
    if cfg.estimate_prompts:
        prompts = prompts.sample(min(cfg.estimate_prompts, len(prompts)), random_state=cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_stage(run_dir, cfg.method, cfg, cfg.seed)
    output_dir = Path(cfg.output_dir or run_dir / "policy")
    lambdas = np.full(len(objective.constraints), float(cfg.lambda_init))
    trajectory, steps, tokens, policy = [lambdas.tolist()], 0, 0, None
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    for t in range(cfg.rounds):
        rd = run_dir / "rounds" / str(t)
        done = rd / "estimate.json"
        if not done.exists():
            dual = method_dual(objective, scores, lambdas, 1.0, cfg.method)
            write_dual(dual, rd / "dual.json")
            write_table(lagrangian_pairs(scores, objective, lambdas, 1.0, cfg.pairs_per_prompt, cfg.seed,
                                         str(scores_path)), rd / "pairs.parquet")
            _link_sample_config(scores_path, rd)
            summary = train(_train_config(cfg, method="mocan", run_dir=str(rd), pairs=str(rd / "pairs.parquet"),
                                          dual=str(rd / "dual.json"), beta=objective.beta, preferences=None,
                                          output_dir=str(rd / "policy")))
            g, means, n_tok = _estimate(str(rd / "policy"), prompts, objective, scorers, cfg, max_new_tokens,
                                        cfg.seed + 7919 * (t + 1))
            nxt = dual_ascent_step(lambdas, g, objective.thresholds, cfg.lambda_lr)
            write_json({"round": t, "lambdas": lambdas.tolist(), "achieved": means, "utilities": g.tolist(),
                        "next_lambdas": nxt.tolist(), "gradient_steps": summary["step"],
                        "sampled_tokens": n_tok}, done)
            if t > 0:  # only the last round's policy is kept
                shutil.rmtree(run_dir / "rounds" / str(t - 1) / "policy", ignore_errors=True)
        est = read_json(done)
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
    if output_dir.exists():
        shutil.rmtree(output_dir)
    shutil.copytree(policy, output_dir)
    return _iterative_summary(run_dir, cfg.method, objective, scores, used, trajectory,
                              {"gradient_steps": steps, "sampled_tokens": tokens, "output_dir": str(output_dir)})


def _iterative_summary(run_dir: Path, method: str, objective: Objective, scores: pd.DataFrame | None,
                       lambdas: np.ndarray, trajectory: list[list[float]], summary: dict) -> dict[str, Any]:
    """Write the method's dual.json (final λ, its trajectory); the summary with both added."""
    if scores is not None:
        dual = method_dual(objective, scores, lambdas, 1.0, method)
        dual.lambda_trajectory = trajectory
        write_method_dual(run_dir, dual)
    return {**summary, "lambdas": dict(zip(objective.names, lambdas.tolist(), strict=True)),
            "lambda_trajectory": [dict(zip(objective.names, lam, strict=True)) for lam in trajectory]}


# ------------------------------------------------------------------ PPO-Lagrangian

@dataclass
class PPOLagrangianConfig:
    model: str = field(metadata={"help": "π_ref (the initial policy): HF model id or local directory"})
    run_dir: str = field(metadata={"help": "run directory (reads scores.parquet, dual.json; writes policy/)"})
    method: str = field(default="ppo-lagrangian", metadata={"help": "ppo-lagrangian"})
    beta: float | None = field(default=None, metadata={"help": "KL weight β (default: dual.json's, else 0.1)"})
    scores: str | None = field(default=None, metadata={
        "help": "scores table whose prompts are the training prompts (default <run_dir>/scores.parquet)"})
    dual: str | None = field(default=None, metadata={"help": "dual.json: reward, constraints, thresholds, β"})
    prompts: str | None = field(default=None, metadata={"help": "prompt file instead of the scores' prompts"})
    constraints: list[str] | None = field(default=None, metadata={"help": "constraints (default: dual.json's)"})
    reward: str | None = field(default=None, metadata={"help": "reward column (default: dual.json's)"})
    scorers: list[str] | None = field(default=None, metadata={
        "help": "scorer specs (default: the score stage's, score.config.yaml beside the scores)"})
    template: str = field(default="auto", metadata={"help": "prompt template (as for sample)"})
    revision: str | None = field(default=None, metadata={"help": "model revision"})
    iterations: int = field(default=20, metadata={"help": "ppo-lagrangian: rollout batches (one λ update each)"})
    prompts_per_iteration: int = field(default=8, metadata={"help": "ppo-lagrangian: prompts per rollout batch"})
    num_samples: int = field(default=4, metadata={"help": "ppo-lagrangian: K responses per prompt (group baseline)"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "online sampling: longest response (default: the sample stage's, else 64)"})
    temperature: float = field(default=1.0, metadata={"help": "online sampling temperature"})
    ppo_epochs: int = field(default=2, metadata={"help": "ppo-lagrangian: passes over each rollout batch"})
    minibatch_size: int = field(default=16, metadata={"help": "ppo-lagrangian: sequences per optimizer step"})
    clip_range: float = field(default=0.2, metadata={"help": "ppo-lagrangian: PPO ratio clip ε"})
    advantage: Literal["rloo", "mean"] = field(default="rloo", metadata={
        "help": "ppo-lagrangian: group baseline, leave-one-out (rloo) or the group mean"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: none)"})
    lambda_init: float = field(default=1.0, metadata={"help": "initial λ of every constraint"})
    lambda_lr: float = field(default=0.1, metadata={"help": "λ step size (on log λ)"})
    lambda_delay: int = field(default=0, metadata={"help": "ppo-lagrangian: iterations with λ frozen"})
    cost_window: int = field(default=4, metadata={
        "help": "ppo-lagrangian: iterations whose episode costs the λ update averages"})
    sample_batch_size: int = field(default=32, metadata={"help": "online sampling/scoring batch size"})
    seed: int = field(default=0, metadata={"help": "seed: prompt order, sampling"})
    logging_steps: int = field(default=1, metadata={"help": "iterations between metrics.jsonl lines"})
    output_dir: str | None = field(default=None, metadata={"help": "where the policy goes (default <run_dir>/policy)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: cuda if available"})


def _token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(y_t | x, y_<t) at every position [B, T−1] (masked by ``response_mask[:, 1:]`` by the caller)."""
    from dualign.models import token_logprobs

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return token_logprobs(out.logits, batch["input_ids"])


def _training_prompts(cfg: PPOLagrangianConfig, scores_path: Path) -> pd.DataFrame:
    from dualign.data.prompts import load_prompts

    if cfg.prompts:
        return load_prompts(cfg.prompts)[["prompt_id", "prompt"]]
    return read_table(scores_path)[["prompt_id", "prompt"]].drop_duplicates("prompt_id").reset_index(drop=True)


def train_ppo_lagrangian(cfg: PPOLagrangianConfig) -> dict[str, Any]:
    """Online primal-dual RL from π_ref; λ and its trajectory in metrics.jsonl and dual.json."""
    from dualign.models import load_causal_lm, load_tokenizer, resolve_device, tokenize_pairs
    from dualign.sample import generate_responses
    from dualign.score import load_scorer, parse_scorer, score_column
    from dualign.templates import format_prompt

    for key in ("iterations", "prompts_per_iteration", "num_samples", "ppo_epochs", "minibatch_size",
                "cost_window", "sample_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key '{key}': must be ≥ 1")
    run_dir = Path(cfg.run_dir)
    scores_path = _scores_path(run_dir, cfg.scores)
    scores = read_table(scores_path) if cfg.constraints else None
    objective = load_objective(_dual_path(run_dir, cfg.dual), scores, cfg.constraints, cfg.reward, cfg.beta)
    beta = objective.beta
    specs = {s.name: s for s in map(parse_scorer, _scorer_specs(cfg.scorers, scores_path))}
    missing = [c for c in objective.columns if c not in specs]
    if missing:
        raise ConfigError(f"config key 'scorers': no scorer named '{missing[0]}'")
    prompts = _training_prompts(cfg, scores_path)
    max_new_tokens = cfg.max_new_tokens or _sample_settings(scores_path).get("max_new_tokens") or 64
    run_dir.mkdir(parents=True, exist_ok=True)
    record_stage(run_dir, cfg.method, cfg, cfg.seed)
    output_dir = Path(cfg.output_dir or run_dir / "policy")

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, revision=cfg.revision)
    policy = load_causal_lm(cfg.model, revision=cfg.revision, dtype="float32", device=device)
    for m in policy.modules():  # dropout would make the PPO ratio ≠ 1 on the first pass
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    policy.config.use_cache = True
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    scorers = {c: load_scorer(specs[c], device=str(device)) for c in objective.columns}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, fused=device.type == "cuda")

    b = objective.thresholds
    log_lambdas = np.full(len(b), math.log(max(cfg.lambda_init, 1e-8)))
    window: deque[np.ndarray] = deque(maxlen=cfg.cost_window)
    trajectory = [np.exp(log_lambdas).tolist()]
    rng = np.random.default_rng(cfg.seed)
    order, cursor = rng.permutation(len(prompts)), 0
    steps, tokens = 0, 0
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    for it in tqdm(range(cfg.iterations), desc="ppo-lagrangian", disable=None):
        if cursor + cfg.prompts_per_iteration > len(order):
            order, cursor = rng.permutation(len(prompts)), 0
        batch_prompts = prompts.iloc[order[cursor:cursor + cfg.prompts_per_iteration]]
        cursor += cfg.prompts_per_iteration
        rollout = generate_responses(policy, tokenizer, batch_prompts["prompt"].tolist(),
                                     batch_prompts["prompt_id"].tolist(), cfg.num_samples,
                                     template=cfg.template, max_new_tokens=max_new_tokens,
                                     temperature=cfg.temperature, batch_size=cfg.sample_batch_size,
                                     seed=cfg.seed * 100_003 + it, progress=False)
        tokens += int(rollout["response_tokens"].sum())
        texts = [format_prompt(p, cfg.template, tokenizer) for p in rollout["prompt"]]
        enc = {k: v.to(device) for k, v in tokenize_pairs(tokenizer, texts, rollout["response"].tolist()).items()}
        mask = enc["response_mask"][:, 1:]
        with torch.no_grad():
            old = torch.cat([_token_logps(policy, {k: v[s:s + cfg.sample_batch_size] for k, v in enc.items()})
                             for s in range(0, len(texts), cfg.sample_batch_size)])
            ref = torch.cat([_token_logps(reference, {k: v[s:s + cfg.sample_batch_size] for k, v in enc.items()})
                             for s in range(0, len(texts), cfg.sample_batch_size)])
        old_seq, ref_seq = (old * mask).sum(-1), (ref * mask).sum(-1)
        values = {c: torch.tensor(score_column(scorers[c], c, rollout["prompt"].tolist(),
                                               rollout["response"].tolist(), cfg.sample_batch_size, False),
                                  dtype=torch.float32, device=device) for c in objective.columns}
        g = torch.stack([c.sign * values[c.column] for c in objective.constraints], dim=1)

        window.append(g.mean(0).cpu().numpy())
        log_lambdas = lagrange_multiplier_step(log_lambdas, np.mean(window, axis=0), b, cfg.lambda_lr,
                                               it, cfg.lambda_delay)
        lambdas = torch.tensor(np.exp(log_lambdas), dtype=torch.float32, device=device)
        trajectory.append(np.exp(log_lambdas).tolist())

        p, k = len(batch_prompts), cfg.num_samples
        shaped = kl_shaped_rewards(values[objective.reward], old_seq, ref_seq, beta)
        adv = combined_advantage(group_advantages(shaped.view(p, k), cfg.advantage).reshape(-1),
                                 group_advantages(g.view(p, k, -1), cfg.advantage).reshape(p * k, -1), lambdas)
        losses, clipped = [], []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(texts))
            for s in range(0, len(texts), cfg.minibatch_size):
                idx = perm[s:s + cfg.minibatch_size].to(device)
                new = _token_logps(policy, {key: v[idx] for key, v in enc.items()})
                loss = ppo_clip_loss(new, old[idx], adv[idx], mask[idx], cfg.clip_range).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                steps += 1
                with torch.no_grad():
                    ratio = torch.exp(new - old[idx])
                    outside = ((ratio - 1).abs() > cfg.clip_range).float() * mask[idx]
                    clipped.append(float(outside.sum() / mask[idx].sum().clamp(min=1)))
                losses.append(loss.item())
        if (it + 1) % cfg.logging_steps == 0 or it + 1 == cfg.iterations:
            line = {"step": it + 1, "gradient_steps": steps, "sampled_tokens": tokens, "loss": float(np.mean(losses)),
                    "clipfrac": float(np.mean(clipped)), "kl": float((old_seq - ref_seq).mean()),
                    **{f"rollout/{c}": float(v.mean()) for c, v in values.items()},
                    **{f"dual/lambda_{n}": v for n, v in zip(objective.names, trajectory[-1], strict=True)}}
            with open(metrics, "a") as f:
                f.write(json.dumps(line) + "\n")
    _save_policy(policy, tokenizer, cfg, output_dir)
    if scores is None and scores_path.exists():
        scores = read_table(scores_path)
    return _iterative_summary(run_dir, cfg.method, objective, scores, np.exp(log_lambdas), trajectory,
                              {"gradient_steps": steps, "sampled_tokens": tokens, "output_dir": str(output_dir)})


def _save_policy(model, tokenizer, cfg: PPOLagrangianConfig, out: Path) -> None:
    """HF model + tokenizer + the resolved config (``dualign_train.yaml``) + a short model card, atomically."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "dualign_train.yaml").write_text(dump_yaml(cfg))
    (tmp / "README.md").write_text(f"# {out.name}: {cfg.method} policy trained with dualign\n\n"
                                   f"- base model (π_ref): `{cfg.model}`\n- beta (β): {cfg.beta}\n"
                                   "- the resolved config is in `dualign_train.yaml`\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# ------------------------------------------------------------------ dispatch

CONFIGS: dict[str, type] = {"ppo-lagrangian": PPOLagrangianConfig, "dual-ascent": DualAscentConfig,
                            "fixed-lambda": FixedLambdaConfig, "helpful-dpo": FixedLambdaConfig,
                            "safe-dpo": FixedLambdaConfig}
TRAINERS = {"ppo-lagrangian": train_ppo_lagrangian, "dual-ascent": train_dual_ascent,
            "fixed-lambda": train_fixed_lambda, "helpful-dpo": train_fixed_lambda,
            "safe-dpo": train_fixed_lambda}


def run_method(cfg: Any) -> dict[str, Any]:
    """Train with any method (a baseline config, or a TrainConfig for mocan/dpo/...), measuring it;
    write ``<run_dir>/compute.json``: wall_s, gradient_steps, sampled_tokens (online only), peak
    memory (MiB), final λ and, for the iterative methods, the λ trajectory."""
    with measure() as used:
        if cfg.method in TRAINERS:
            summary = TRAINERS[cfg.method](cfg)
        elif cfg.method in LOSSES:
            out = train(cfg)
            dual_path = _dual_path(Path(cfg.run_dir), cfg.dual)
            lambdas = read_dual(dual_path).lambdas if dual_path.exists() else {}
            summary = {"gradient_steps": out["step"], "sampled_tokens": 0, "lambdas": lambdas,
                       "output_dir": out["output_dir"]}
        else:
            raise ConfigError(f"config key 'method': {cfg.method!r} is not one of "
                              f"{', '.join([*LOSSES, *TRAINERS])}")
    compute = {"method": cfg.method, **summary, **used}
    write_json(compute, Path(cfg.run_dir) / "compute.json")
    return compute


def add_baseline_arguments(parser: argparse.ArgumentParser) -> None:
    """The baselines' own flags (those TrainConfig does not have), for ``dualign train``."""
    from dualign.config import add_config_arguments

    seen = {f.name for f in dataclasses.fields(TrainConfig)}
    group = parser.add_argument_group("baselines (--method ppo-lagrangian, dual-ascent, fixed-lambda, "
                                      "helpful-dpo, safe-dpo)")
    for cls in (FixedLambdaConfig, DualAscentConfig, PPOLagrangianConfig):
        fresh = tuple(f.name for f in dataclasses.fields(cls) if f.name in seen)
        add_config_arguments(group, cls, skip=fresh)
        seen |= {f.name for f in dataclasses.fields(cls)}

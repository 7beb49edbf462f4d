"""PPO-Lagrangian, Safe-RLHF's primal-dual RL (Dai et al., 2024), on MoCAN's objective; and the
loop it shares with GRPO-Lagrangian (:mod:`dualign.baselines.grpo_lagrangian`).

Each iteration, top to bottom (:func:`train_primal_dual`):

1. Rollout: K responses to each of a batch of training prompts from the current policy, scored
   by the reward and constraint scorers; log π_old and log π_ref of every response token.
2. λ step on J_g, the mean episode utility over the last ``cost_window`` iterations: here
   log λ_j ← log λ_j + lr_λ·(b_j − J_gj) (:func:`lagrange_multiplier_step`), capped at
   ``lambda_max`` when set (Safe-RLHF clamps log λ at log 5).
3. Advantages, critic-free: the reward with the KL penalty folded in, r̃ = r − β·log(π_old/π_ref)
   (:func:`kl_shaped_rewards`), and each utility get a group baseline over the K samples of their
   prompt (:func:`group_advantages`, RLOO by default), combined as A = (A_r + Σ_j λ_j·A_gj)/(1 + Σ_j λ_j)
   (:func:`combined_advantage`).
4. Policy steps: ``ppo_epochs`` passes of minibatches on the policy loss, here PPO's clipped
   objective averaged over each response's tokens (:func:`ppo_clip_loss`).

The two variants differ only by :class:`UpdateRules` (the λ step of 2 and the loss of 4), pure
functions below and in :mod:`dualign.baselines.grpo_lagrangian`. λ and its trajectory go to
metrics.jsonl and the method's dual.json. With ``checkpoints``, the policy after those
iterations is saved with what it cost so far (``<run_dir>/budgets/<iteration>/``: ``policy/``,
``compute.json``, ``dual.json``), for compute-to-target curves.
"""

from __future__ import annotations

import copy
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from dualign._infra.config import config_to_dict, dump_yaml
from dualign._infra.errors import ConfigError
from dualign._infra.io import read_table, write_json
from dualign._infra.progress import Progress
from dualign._infra.provenance import record_stage
from dualign._infra.tracking import Tracker, check_report_to
from dualign.data.prompts import load_prompts
from dualign.data.records import write_dual
from dualign.methods.objective import (
    Objective,
    dual_file,
    iterative_summary,
    load_objective,
    method_dual,
    sample_settings,
    scorer_specs,
    scores_file,
)
from dualign.modeling.generation import generate_responses
from dualign.modeling.models import (
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    save_model,
    token_logprobs,
    tokenize_pairs,
)
from dualign.modeling.scorers import load_scorer, parse_scorer, score_column
from dualign.modeling.templates import format_prompt


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
    iterations: int = field(default=20, metadata={"help": "ppo/grpo-lagrangian: rollout batches (one λ update each)"})
    prompts_per_iteration: int = field(default=8, metadata={"help": "ppo/grpo-lagrangian: prompts per rollout batch"})
    num_samples: int = field(default=4, metadata={"help": "ppo/grpo-lagrangian: K responses per prompt (group baseline)"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "online sampling: longest response (default: the sample stage's, else 64)"})
    temperature: float = field(default=1.0, metadata={"help": "online sampling temperature"})
    ppo_epochs: int = field(default=2, metadata={"help": "ppo/grpo-lagrangian: passes over each rollout batch"})
    minibatch_size: int = field(default=16, metadata={"help": "ppo/grpo-lagrangian: sequences per optimizer step"})
    clip_range: float = field(default=0.2, metadata={"help": "ppo/grpo-lagrangian: PPO ratio clip ε"})
    advantage: Literal["rloo", "mean"] = field(default="rloo", metadata={
        "help": "ppo/grpo-lagrangian: group baseline, leave-one-out (rloo) or the group mean"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: none)"})
    lambda_init: float = field(default=1.0, metadata={"help": "initial λ of every constraint"})
    lambda_lr: float = field(default=0.1, metadata={"help": "λ step size: on log λ (ppo-lagrangian), on λ (grpo-lagrangian)"})
    lambda_delay: int = field(default=0, metadata={"help": "ppo/grpo-lagrangian: iterations with λ frozen"})
    lambda_max: float | None = field(default=None, metadata={
        "help": "ppo/grpo-lagrangian: λ is capped here (Safe-RLHF's λ_max; null: no cap)"})
    cost_window: int = field(default=4, metadata={
        "help": "ppo/grpo-lagrangian: iterations whose episode costs the λ update averages"})
    sample_batch_size: int = field(default=32, metadata={"help": "online sampling/scoring batch size"})
    seed: int = field(default=0, metadata={"help": "seed: prompt order, sampling"})
    logging_steps: int = field(default=1, metadata={"help": "iterations between metrics.jsonl lines"})
    report_to: list[Literal["none", "tensorboard", "wandb"]] = field(default_factory=lambda: ["none"], metadata={
        "help": "where metrics.jsonl's lines also go: none, tensorboard (<run_dir>/tensorboard), wandb "
                "(<run_dir>/wandb; WANDB_MODE=offline: no network), or several"})
    checkpoints: list[int] | None = field(default=None, metadata={
        "help": "iterations after which the policy and its cost so far are saved (<run_dir>/budgets/<n>)"})
    output_dir: str | None = field(default=None, metadata={"help": "where the policy goes (default <run_dir>/policy)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: cuda if available"})


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
    per_token = clipped_token_losses(logps, old_logps, advantages, clip_range)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)


def clipped_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                         clip_range: float) -> torch.Tensor:
    """−min(ρ_t·A, clip(ρ_t, 1−ε, 1+ε)·A) at every token [B, T], ρ_t = exp(log π − log π_old)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    return -torch.min(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)


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


@dataclass(frozen=True)
class UpdateRules:
    """What tells the primal-dual variants apart: the λ step and the per-sequence policy loss.

    lambda_step(λ [m], J_g [m], b [m], iteration, cfg) → λ;
    policy_loss(logps, old_logps [B, T], advantages [B], mask [B, T], clip_range, mean_tokens) → [B],
    ``mean_tokens`` the mean response length of the rollout (the caller takes the mean over B).
    """
    lambda_step: Callable[[np.ndarray, np.ndarray, np.ndarray, int, Any], np.ndarray]
    policy_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def _log_space_step(lambdas: np.ndarray, utility_means: np.ndarray, thresholds: np.ndarray, it: int,
                    cfg: PPOLagrangianConfig) -> np.ndarray:
    step = np.exp(lagrange_multiplier_step(np.log(lambdas), utility_means, thresholds, cfg.lambda_lr, it,
                                           cfg.lambda_delay))
    return step if cfg.lambda_max is None else np.minimum(cfg.lambda_max, step)


PPO_RULES = UpdateRules(
    lambda_step=_log_space_step,
    policy_loss=lambda logps, old, adv, mask, clip, mean_tokens: ppo_clip_loss(logps, old, adv, mask, clip))


# ------------------------------------------------------------------ the loop


@dataclass
class Rollout:
    """One iteration's samples: tokens, log-probs under π_old and π_ref, scores, utilities."""
    enc: dict[str, torch.Tensor]  # input_ids, attention_mask, response_mask [B, T]
    mask: torch.Tensor  # [B, T−1] response tokens
    old: torch.Tensor  # [B, T−1] log π_old per token
    old_seq: torch.Tensor  # [B] log π_old(y|x)
    ref: torch.Tensor  # [B, T−1] log π_ref per token
    ref_seq: torch.Tensor  # [B] log π_ref(y|x)
    values: dict[str, torch.Tensor]  # score column -> [B]
    utilities: torch.Tensor  # [B, m] g_j = sign_j·column_j
    tokens: int  # sampled response tokens
    sequence_tokens: int  # prompt + response tokens of the B sequences


def train_ppo_lagrangian(cfg: PPOLagrangianConfig) -> dict[str, Any]:
    """Online primal-dual RL from π_ref, Safe-RLHF's rules (log-space λ, clipped PPO)."""
    return train_primal_dual(cfg, PPO_RULES)


def train_primal_dual(cfg: PPOLagrangianConfig, rules: UpdateRules) -> dict[str, Any]:
    """Online primal-dual RL from π_ref with the given update rules; λ and its trajectory in
    metrics.jsonl and dual.json; the policy at each of ``checkpoints`` in ``budgets/``."""
    _check(cfg)
    start_time = time.perf_counter()
    run = prepare(cfg)
    objective, device, policy = run.objective, run.device, run.policy
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, fused=device.type == "cuda")

    lambdas = np.full(len(objective.thresholds), max(cfg.lambda_init, 1e-8))
    window: deque[np.ndarray] = deque(maxlen=cfg.cost_window)
    trajectory = [lambdas.tolist()]
    steps, sampled = 0, 0
    tokens = {"generation": 0, "scored": 0, "reference": 0, "forward": 0, "training": 0}
    metrics = run.run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    tracker = Tracker(cfg.report_to, run.run_dir, config_to_dict(cfg), cfg.method)
    batches = _prompt_batches(run.prompts, cfg.prompts_per_iteration, cfg.seed)
    for it in Progress(range(cfg.iterations), desc=cfg.method, unit="iterations"):
        rollout = _rollout(policy, run.reference, run.tokenizer, run.scorers, next(batches), objective, cfg, it,
                           run.max_new_tokens, device)
        sampled += rollout.tokens
        window.append(rollout.utilities.mean(0).cpu().numpy())
        lambdas = rules.lambda_step(lambdas, np.mean(window, axis=0), objective.thresholds, it, cfg)
        trajectory.append(lambdas.tolist())
        k = cfg.num_samples
        p = len(rollout.old_seq) // k
        shaped = kl_shaped_rewards(rollout.values[objective.reward], rollout.old_seq, rollout.ref_seq, objective.beta)
        adv = combined_advantage(group_advantages(shaped.view(p, k), cfg.advantage).reshape(-1),
                                 group_advantages(rollout.utilities.view(p, k, -1), cfg.advantage).reshape(p * k, -1),
                                 torch.tensor(lambdas, dtype=torch.float32, device=device))
        losses, clipped = _policy_epochs(policy, optimizer, rollout, adv, rules, cfg, device)
        steps += len(losses)
        # generation: prompt + response once (KV cache); forward: the sampler's own log-prob pass
        # (generate_responses) and log π_old; reference: log π_ref; each scorer once; the epochs
        n = rollout.sequence_tokens
        tokens = {"generation": tokens["generation"] + n, "scored": tokens["scored"] + n,
                  "reference": tokens["reference"] + n, "forward": tokens["forward"] + 2 * n,
                  "training": tokens["training"] + n * cfg.ppo_epochs}
        if (it + 1) % cfg.logging_steps == 0 or it + 1 == cfg.iterations:
            line = {"step": it + 1, "gradient_steps": steps, "sampled_tokens": sampled, "loss": float(np.mean(losses)),
                    "clipfrac": float(np.mean(clipped)), "kl": float((rollout.old_seq - rollout.ref_seq).mean()),
                    **{f"rollout/{c}": float(v.mean()) for c, v in rollout.values.items()},
                    **{f"dual/lambda_{n}": v for n, v in zip(objective.names, trajectory[-1], strict=True)}}
            with open(metrics, "a") as f:
                f.write(json.dumps(line) + "\n")
            tracker.log(line, it + 1)
        if it + 1 in (cfg.checkpoints or []) and it + 1 < cfg.iterations:
            save_budget(run, cfg, it + 1, lambdas, {"wall_s": time.perf_counter() - start_time,
                                                    "gradient_steps": steps, "sampled_tokens": sampled,
                                                    "tokens": tokens})
    tracker.close()
    _save_policy(policy, run.tokenizer, run.output_dir, cfg)
    return iterative_summary(run.run_dir, cfg.method, objective, run.scores, lambdas, trajectory,
                             {"gradient_steps": steps, "sampled_tokens": sampled, "output_dir": str(run.output_dir),
                              "iterations": cfg.iterations, "tokens": tokens,
                              "scorers": [run.specs[c] for c in objective.columns]})


@dataclass
class OnlineRun:
    """What an online primal-dual run starts from: its objective, prompts, scorers and models."""
    run_dir: Path
    output_dir: Path
    scores: pd.DataFrame | None
    objective: Objective
    specs: dict[str, str]  # score column -> scorer spec
    prompts: pd.DataFrame
    max_new_tokens: int
    device: torch.device
    tokenizer: Any
    policy: Any
    reference: Any
    scorers: dict[str, Any]


def prepare(cfg: Any) -> OnlineRun:
    """Read the objective and the training prompts, record the stage, load π (trained), π_ref (a
    frozen copy) and the scorers; shared by every online method."""
    run_dir = Path(cfg.run_dir)
    scores_path = scores_file(run_dir, cfg.scores)
    scores = read_table(scores_path) if scores_path.exists() else None
    objective = load_objective(dual_file(run_dir, cfg.dual), scores, cfg.constraints, cfg.reward, cfg.beta)
    specs = {parse_scorer(s).name: s for s in scorer_specs(cfg.scorers, scores_path)}
    missing = [c for c in objective.columns if c not in specs]
    if missing:
        raise ConfigError(f"config key 'scorers': no scorer named '{missing[0]}'")
    prompts = _training_prompts(cfg, scores_path)
    max_new_tokens = cfg.max_new_tokens or sample_settings(scores_path).get("max_new_tokens") or 64
    run_dir.mkdir(parents=True, exist_ok=True)
    record_stage(run_dir, cfg.method, cfg, cfg.seed)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, revision=cfg.revision)
    policy = load_causal_lm(cfg.model, revision=cfg.revision, dtype="float32", device=device)
    disable_dropout(policy)  # dropout would make the PPO ratio ≠ 1 on the first pass
    policy.config.use_cache = True
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    scorers = {c: load_scorer(parse_scorer(specs[c]), device=str(device)) for c in objective.columns}
    return OnlineRun(run_dir, Path(cfg.output_dir or run_dir / "policy"), scores, objective, specs, prompts,
                     max_new_tokens, device, tokenizer, policy, reference, scorers)


def save_budget(run: OnlineRun, cfg: Any, iterations: int, lambdas: np.ndarray, cost: dict[str, Any]) -> None:
    """The policy after ``iterations`` and what it cost so far (``cost``: wall_s, gradient_steps,
    sampled_tokens, tokens, ...) in ``<run_dir>/budgets/<iterations>/``, with its dual.json."""
    budget = run.run_dir / "budgets" / str(iterations)
    _save_policy(run.policy, run.tokenizer, budget / "policy", cfg)
    if run.scores is not None:
        write_dual(method_dual(run.objective, run.scores, lambdas, 1.0, cfg.method), budget / "dual.json")
    write_json({"method": cfg.method, "iterations": iterations, "policy": str(budget / "policy"), **cost,
                "lambdas": dict(zip(run.objective.names, lambdas.tolist(), strict=True))},
               budget / "compute.json")


def _save_policy(policy, tokenizer, out: Path, cfg: PPOLagrangianConfig) -> None:
    save_model(policy, tokenizer, out, {
        "dualign_train.yaml": dump_yaml(cfg),
        "README.md": f"# {out.name}: {cfg.method} policy trained with dualign\n\n"
                     f"- base model (π_ref): `{cfg.model}`\n- beta (β): {cfg.beta}\n"
                     "- the resolved config is in `dualign_train.yaml`\n"})


def _check(cfg: PPOLagrangianConfig) -> None:
    check_report_to(cfg.report_to)
    for key in ("iterations", "prompts_per_iteration", "num_samples", "ppo_epochs", "minibatch_size",
                "cost_window", "sample_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key '{key}': must be ≥ 1")
    bad = [c for c in cfg.checkpoints or [] if not 1 <= c <= cfg.iterations]
    if bad:
        raise ConfigError(f"config key 'checkpoints': {bad[0]} is not an iteration in 1..{cfg.iterations}")


def _training_prompts(cfg: PPOLagrangianConfig, scores_path: Path) -> pd.DataFrame:
    if cfg.prompts:
        return load_prompts(cfg.prompts)[["prompt_id", "prompt"]]
    return read_table(scores_path)[["prompt_id", "prompt"]].drop_duplicates("prompt_id").reset_index(drop=True)


def _prompt_batches(prompts: pd.DataFrame, size: int, seed: int) -> Iterator[pd.DataFrame]:
    """Batches of ``size`` prompts in shuffled passes (a new shuffle when a pass runs out)."""
    rng = np.random.default_rng(seed)
    order, cursor = rng.permutation(len(prompts)), 0
    while True:
        if cursor + size > len(order):
            order, cursor = rng.permutation(len(prompts)), 0
        yield prompts.iloc[order[cursor:cursor + size]]
        cursor += size


def _token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(y_t | x, y_<t) at every position [B, T−1] (masked by ``response_mask[:, 1:]`` by the caller)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return token_logprobs(out.logits, batch["input_ids"])


def _rollout(policy, reference, tokenizer, scorers: dict, prompts: pd.DataFrame, objective: Objective,
             cfg: PPOLagrangianConfig, it: int, max_new_tokens: int, device: torch.device) -> Rollout:
    """K samples per prompt from the current policy, their token log-probs and scores."""
    df = generate_responses(policy, tokenizer, prompts["prompt"].tolist(), prompts["prompt_id"].tolist(),
                            cfg.num_samples, template=cfg.template, max_new_tokens=max_new_tokens,
                            temperature=cfg.temperature, batch_size=cfg.sample_batch_size,
                            seed=cfg.seed * 100_003 + it, progress=False)
    texts = [format_prompt(p, cfg.template, tokenizer) for p in df["prompt"]]
    enc = {k: v.to(device) for k, v in tokenize_pairs(tokenizer, texts, df["response"].tolist()).items()}
    mask = enc["response_mask"][:, 1:]
    chunks = range(0, len(texts), cfg.sample_batch_size)
    with torch.no_grad():
        old = torch.cat([_token_logps(policy, {k: v[s:s + cfg.sample_batch_size] for k, v in enc.items()})
                         for s in chunks])
        ref = torch.cat([_token_logps(reference, {k: v[s:s + cfg.sample_batch_size] for k, v in enc.items()})
                         for s in chunks])
    values = {c: torch.tensor(score_column(scorers[c], c, df["prompt"].tolist(), df["response"].tolist(),
                                           cfg.sample_batch_size, False), dtype=torch.float32, device=device)
              for c in objective.columns}
    g = torch.stack([c.sign * values[c.column] for c in objective.constraints], dim=1)
    return Rollout(enc, mask, old, (old * mask).sum(-1), ref, (ref * mask).sum(-1), values, g,
                   int(df["response_tokens"].sum()), int(enc["attention_mask"].sum()))


def _policy_epochs(policy, optimizer, rollout: Rollout, adv: torch.Tensor, rules: UpdateRules,
                   cfg: PPOLagrangianConfig, device: torch.device) -> tuple[list[float], list[float]]:
    """``ppo_epochs`` shuffled passes of minibatches on the rules' policy loss; (losses, clip fractions)."""
    losses, clipped = [], []
    n, mask = len(rollout.old), rollout.mask
    mean_tokens = float(mask.sum()) / n
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n)
        for s in range(0, n, cfg.minibatch_size):
            idx = perm[s:s + cfg.minibatch_size].to(device)
            new = _token_logps(policy, {key: v[idx] for key, v in rollout.enc.items()})
            loss = rules.policy_loss(new, rollout.old[idx], adv[idx], mask[idx], cfg.clip_range, mean_tokens).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                ratio = torch.exp(new - rollout.old[idx])
                outside = ((ratio - 1).abs() > cfg.clip_range).float() * mask[idx]
                clipped.append(float(outside.sum() / mask[idx].sum().clamp(min=1)))
            losses.append(loss.item())
    return losses, clipped

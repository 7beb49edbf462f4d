"""Safe-RLHF's PPO-Lagrangian as the paper compared against it (Dai et al., 2024): an actor, a
reward critic and a cost critic, per-token rewards, GAE, PPO's clipped policy and value losses and
a Lagrange multiplier on the episode cost (method ``ppo-lagrangian-critic``). The critic-free
variant is :mod:`dualign.baselines.ppo_lagrangian`, whose sampling and scoring this loop reuses
(:func:`~dualign.baselines.ppo_lagrangian.prepare`, its rollout).

Each line below follows PKU-Alignment/safe-rlhf (read from a vendored copy of its package and
scripts, tcexeexe/SHTEC_RM_model at 5bb76e4; the upstream repository could not be fetched here):

- per-token rewards (``safe_rlhf/algorithms/ppo_lag/trainer.py``,
  ``PPOLagTrainer.add_kl_divergence_regularization``): r_t = −kl_coeff·(log π_old − log π_ref) at
  every response token, plus the reward model's score at the last one; c_t = +kl_coeff·(log π_old −
  log π_ref) plus the cost at the last token; both clipped to ±``clip_range_score``
  (:func:`kl_regularized_rewards`). Since GAE is linear, (A_r − λ·A_c)/(1 + λ) carries the KL at
  weight kl_coeff whatever λ: the normalised objective (r − λ·c)/(1 + λ) − kl_coeff·KL;
- advantages and returns (``safe_rlhf/trainers/rl_trainer.py``, ``RLTrainer.get_advantages_and_returns``):
  GAE with γ = 1, λ_GAE = 0.95 (``RLTrainer.__init__``), returns = A + V (:func:`gae`);
- the actor loss (``PPOLagTrainer.actor_loss_fn``): A = (A_r − λ·A_c)/(1 + λ) per token, the clipped
  surrogate, averaged over every response token of the minibatch (:func:`actor_token_losses`,
  :func:`masked_mean`);
- the critic loss (``RLTrainer.critic_loss_fn``): ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²), token
  mean (:func:`critic_token_losses`);
- the λ update (``PPOLagTrainer.rl_step``): SGD on log λ of the loss −(J_c − d)·λ, i.e.
  log λ ← log λ + lr_λ·λ·(J_c − d), then log λ ≤ log λ_max; J_c the mean cost of the last episodes
  (``episode_cost_window_size``), once per update step after ``lambda_update_delay_steps``
  (:func:`lagrange_step`);
- the order of a step (``rl_step``): λ, then the actor, the reward critic and the cost critic, each
  on its own optimizer; the advantages are computed once per rollout from the old values.

The critics: Safe-RLHF initialises them from the reward and cost models, which share the actor's
tokenizer there (``init_models`` refuses a critic with another tokenizer). On the built-in world
the scorers are MiniLM classifiers with another tokenizer, so a critic initialised from them could
not read the actor's tokens; each critic here is π_ref's transformer trunk with a scalar value head
(:class:`ValueModel`, zero-initialised: V = 0 before its first step), the critic Safe-RLHF takes
when ``--reward_critic_model_name_or_path`` names a model with the actor's tokenizer. At 7B it is a
7B model either way, which is what the compute accounting charges.

One constraint (Safe-RLHF's single cost): the constraint's utility g gives the cost c = −g and its
threshold b the threshold d = −b, in the user's units for a ``cost<=...`` constraint.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from dualign._infra.config import config_to_dict
from dualign._infra.errors import ConfigError
from dualign._infra.progress import Progress
from dualign._infra.tracking import Tracker
from dualign.baselines.ppo_lagrangian import (
    OnlineRun,
    Rollout,
    _check,
    _prompt_batches,
    _rollout,
    _save_policy,
    _token_logps,
    prepare,
    save_budget,
)
from dualign.methods.objective import Objective, iterative_summary
from dualign.modeling.flops import forward_params


@dataclass
class SafeRLHFPPOConfig:
    """ppo-lagrangian-critic; defaults are Safe-RLHF's ``scripts/ppo-lag.sh`` where they transfer."""
    model: str = field(metadata={"help": "π_ref (the initial actor; the critics' trunk): HF model id or local directory"})
    run_dir: str = field(metadata={"help": "run directory (reads scores.parquet, dual.json; writes policy/)"})
    method: str = field(default="ppo-lagrangian-critic", metadata={"help": "ppo-lagrangian-critic"})
    beta: float | None = field(default=None, metadata={
        "help": "Safe-RLHF's kl_coeff: the per-token KL penalty (default: dual.json's β, else 0.1)"})
    scores: str | None = field(default=None, metadata={
        "help": "scores table whose prompts are the training prompts (default <run_dir>/scores.parquet)"})
    dual: str | None = field(default=None, metadata={"help": "dual.json: reward, constraints, thresholds, β"})
    prompts: str | None = field(default=None, metadata={"help": "prompt file instead of the scores' prompts"})
    constraints: list[str] | None = field(default=None, metadata={"help": "one constraint (default: dual.json's)"})
    reward: str | None = field(default=None, metadata={"help": "reward column (default: dual.json's)"})
    scorers: list[str] | None = field(default=None, metadata={
        "help": "scorer specs (default: the score stage's, score.config.yaml beside the scores)"})
    template: str = field(default="auto", metadata={"help": "prompt template (as for sample)"})
    revision: str | None = field(default=None, metadata={"help": "model revision"})
    iterations: int = field(default=20, metadata={"help": "rollout batches"})
    prompts_per_iteration: int = field(default=16, metadata={"help": "prompts per rollout batch (per_device_prompt_batch_size)"})
    num_samples: int = field(default=1, metadata={"help": "responses per prompt (num_return_sequences)"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "online sampling: longest response (default: the sample stage's, else 64)"})
    temperature: float = field(default=1.0, metadata={"help": "online sampling temperature"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout batch (update_iters)"})
    minibatch_size: int = field(default=16, metadata={"help": "sequences per update step (per_device_train_batch_size)"})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip ε (clip_range_ratio)"})
    clip_range_value: float = field(default=5.0, metadata={"help": "value clip ε_v around the old values"})
    clip_range_score: float = field(default=50.0, metadata={"help": "per-token rewards and costs clipped to ±this"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE λ"})
    learning_rate: float = field(default=1e-5, metadata={"help": "actor AdamW learning rate (actor_lr)"})
    critic_learning_rate: float = field(default=5e-6, metadata={"help": "critics' AdamW learning rate (critic_lr)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm, each model (0: none)"})
    lambda_init: float = field(default=1.0, metadata={"help": "initial λ"})
    lambda_lr: float = field(default=0.1, metadata={"help": "SGD learning rate on log λ"})
    lambda_delay: int = field(default=0, metadata={"help": "update steps with λ frozen (lambda_update_delay_steps)"})
    lambda_max: float | None = field(default=5.0, metadata={"help": "cap on λ (null: none)"})
    cost_window: int = field(default=8, metadata={
        "help": "iterations whose episode costs J_c averages (episode_cost_window_size / episodes per iteration)"})
    sample_batch_size: int = field(default=32, metadata={"help": "online sampling/scoring batch size"})
    seed: int = field(default=0, metadata={"help": "seed: prompt order, sampling, value heads"})
    logging_steps: int = field(default=1, metadata={"help": "iterations between metrics.jsonl lines"})
    report_to: list[Literal["none", "tensorboard", "wandb"]] = field(default_factory=lambda: ["none"], metadata={
        "help": "where metrics.jsonl's lines also go: none, tensorboard (<run_dir>/tensorboard), wandb "
                "(<run_dir>/wandb; WANDB_MODE=offline: no network), or several"})
    checkpoints: list[int] | None = field(default=None, metadata={
        "help": "iterations after which the policy and its cost so far are saved (<run_dir>/budgets/<n>)"})
    output_dir: str | None = field(default=None, metadata={"help": "where the policy goes (default <run_dir>/policy)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: cuda if available"})


# ------------------------------------------------------------------ Safe-RLHF's rules (pure functions)

def kl_regularized_rewards(reward: torch.Tensor, cost: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                           mask: torch.Tensor, kl_coeff: float,
                           clip_range_score: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards and costs [B, T] from end scores reward, cost [B] and token log-probs [B, T]:

    r_t = −kl_coeff·(log π_t − log π_ref,t) + [t = last]·reward,  c_t = +kl_coeff·(log π_t − log π_ref,t) + [t = last]·cost,
    each clipped to ±clip_range_score and 0 outside ``mask`` (response tokens; "last" its last 1).
    """
    m = mask.to(logps.dtype)
    last = torch.nn.functional.one_hot(_last_index(mask), mask.shape[1]).to(logps.dtype)
    penalty = -kl_coeff * (logps - ref_logps) * m
    rewards = (penalty + last * reward[:, None]).clamp(-clip_range_score, clip_range_score)
    costs = (-penalty + last * cost[:, None]).clamp(-clip_range_score, clip_range_score)
    return rewards * m, costs * m


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens [B, T] (0 outside ``mask``):

    δ_t = r_t + γ·V_{t+1} − V_t (V = 0 past the last token),  A_t = δ_t + γ·λ_GAE·A_{t+1},  R_t = A_t + V_t.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_values = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_values - values[:, t] + gamma * gae_lambda * running
        running = running * m[:, t]  # prompt and padding positions carry nothing back
        advantages[:, t] = running
    return advantages.detach(), (advantages + values).detach()


def actor_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, reward_advantages: torch.Tensor,
                       cost_advantages: torch.Tensor, lam: float, clip_range: float) -> torch.Tensor:
    """−min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε)·A_t) per token [B, T], A_t = (A_r,t − λ·A_c,t)/(1 + λ), ρ_t = π/π_old."""
    advantages = (reward_advantages - lam * cost_advantages) / (1.0 + lam)
    ratio = torch.exp(logps - old_logps)
    return -torch.min(advantages * ratio, advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))


def critic_token_losses(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                        clip_range_value: float) -> torch.Tensor:
    """½·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²) per token [B, T]."""
    clipped = torch.max(torch.min(values, old_values + clip_range_value), old_values - clip_range_value)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·mask / Σ mask: the mean over every marked token of the batch (Safe-RLHF's aggregation)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def lagrange_step(log_lambda: float, episode_cost: float, threshold: float, lr: float,
                  lambda_max: float | None) -> float:
    """log λ ← log λ + lr·λ·(J_c − d), then log λ ≤ log λ_max: one SGD step on −(J_c − d)·exp(log λ)."""
    out = log_lambda + lr * float(np.exp(log_lambda)) * (episode_cost - threshold)
    return out if lambda_max is None else min(out, float(np.log(lambda_max)))


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last marked token [B] (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


# ------------------------------------------------------------------ the critics and the loop


class ValueModel(torch.nn.Module):
    """A critic: a transformer trunk (AutoModel, no LM head) and a scalar head, V at every position [B, T]."""

    def __init__(self, model: str, revision: str | None = None):
        super().__init__()
        from transformers import AutoModel

        self.trunk = AutoModel.from_pretrained(model, revision=revision, dtype=torch.float32, trust_remote_code=False)
        self.head = torch.nn.Linear(self.trunk.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden).squeeze(-1)


def train_safe_rlhf_ppo(cfg: SafeRLHFPPOConfig) -> dict[str, Any]:
    """Safe-RLHF's PPO-Lagrangian from π_ref; λ and its trajectory in metrics.jsonl and dual.json, the
    policy at each of ``checkpoints`` in ``budgets/``; the summary names the critics' parameters."""
    _check(cfg)
    for key in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"config key '{key}': must be in [0, 1]")
    start_time = time.perf_counter()
    run = prepare(cfg)
    if len(run.objective.constraints) != 1:
        raise ConfigError("config key 'constraints': ppo-lagrangian-critic takes one constraint (Safe-RLHF's cost)")
    device, policy = run.device, run.policy
    critics = {name: ValueModel(cfg.model, cfg.revision).to(device) for name in ("reward", "cost")}
    fused = device.type == "cuda"
    optimizers = {"actor": torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, fused=fused),
                  **{n: torch.optim.AdamW(c.parameters(), lr=cfg.critic_learning_rate, fused=fused)
                     for n, c in critics.items()}}
    threshold = -float(run.objective.thresholds[0])  # d = −b: the cost's bound
    log_lambda = float(np.log(max(cfg.lambda_init, 1e-8)))
    episode_costs: deque[float] = deque(maxlen=cfg.cost_window * cfg.prompts_per_iteration * cfg.num_samples)
    trajectory = [[float(np.exp(log_lambda))]]
    steps, sampled = 0, 0
    tokens = {"generation": 0, "scored": 0, "reference": 0, "forward": 0, "training": 0,
              "critic_forward": 0, "critic_training": 0}
    metrics = run.run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    tracker = Tracker(cfg.report_to, run.run_dir, config_to_dict(cfg), cfg.method)
    batches = _prompt_batches(run.prompts, cfg.prompts_per_iteration, cfg.seed)
    for it in Progress(range(cfg.iterations), desc=cfg.method, unit="iterations"):
        rollout = _rollout(policy, run.reference, run.tokenizer, run.scorers, next(batches), run.objective, cfg,
                           it, run.max_new_tokens, device)
        sampled += rollout.tokens
        cost = -rollout.utilities[:, 0]
        episode_costs.extend(cost.tolist())
        targets = _advantages(cfg, rollout, critics, run.objective, cost)
        losses = []
        for idx in _minibatches(len(rollout.old), cfg, device):
            if steps >= cfg.lambda_delay:
                log_lambda = lagrange_step(log_lambda, float(np.mean(episode_costs)), threshold, cfg.lambda_lr,
                                           cfg.lambda_max)
            losses.append(_update(cfg, policy, critics, optimizers, rollout, targets, idx, float(np.exp(log_lambda))))
            steps += 1
        trajectory.append([float(np.exp(log_lambda))])
        # as the critic-free loop, plus each critic's forward pass over the rollout (old values) and
        # its forward + backward in every update step
        n = rollout.sequence_tokens
        tokens = {"generation": tokens["generation"] + n, "scored": tokens["scored"] + n,
                  "reference": tokens["reference"] + n, "forward": tokens["forward"] + 2 * n,
                  "training": tokens["training"] + n * cfg.ppo_epochs,
                  "critic_forward": tokens["critic_forward"] + 2 * n,
                  "critic_training": tokens["critic_training"] + 2 * n * cfg.ppo_epochs}
        if (it + 1) % cfg.logging_steps == 0 or it + 1 == cfg.iterations:
            tracker.log(_log(metrics, it, steps, sampled, losses, rollout, run, float(np.mean(episode_costs)),
                             trajectory[-1]), it + 1)
        if it + 1 in (cfg.checkpoints or []) and it + 1 < cfg.iterations:
            save_budget(run, cfg, it + 1, np.array(trajectory[-1]), {
                "wall_s": time.perf_counter() - start_time, "gradient_steps": steps, "sampled_tokens": sampled,
                "tokens": tokens, "critic_params": _critic_params(critics)})
    tracker.close()
    _save_policy(policy, run.tokenizer, run.output_dir, cfg)
    return iterative_summary(run.run_dir, cfg.method, run.objective, run.scores, np.array(trajectory[-1]), trajectory,
                             {"gradient_steps": steps, "sampled_tokens": sampled, "output_dir": str(run.output_dir),
                              "iterations": cfg.iterations, "tokens": tokens,
                              "critic_params": _critic_params(critics),
                              "scorers": [run.specs[c] for c in run.objective.columns]})


def _critic_params(critics: dict[str, ValueModel]) -> int:
    """N of one critic (both have the same shape): the trunk's weights but its look-up tables, and the head."""
    return forward_params(critics["reward"])


def _advantages(cfg: SafeRLHFPPOConfig, rollout: Rollout, critics: dict[str, ValueModel], objective: Objective,
                cost: torch.Tensor) -> dict[str, torch.Tensor]:
    """Old values, advantages and returns of the rollout, reward and cost (each [B, T−1])."""
    enc, mask = rollout.enc, rollout.mask
    with torch.no_grad():
        old = {n: torch.cat([c(enc["input_ids"][s:s + cfg.sample_batch_size],
                               enc["attention_mask"][s:s + cfg.sample_batch_size])[:, :-1]
                             for s in range(0, len(mask), cfg.sample_batch_size)])
               for n, c in critics.items()}
    rewards, costs = kl_regularized_rewards(rollout.values[objective.reward], cost, rollout.old, rollout.ref, mask,
                                            objective.beta, cfg.clip_range_score)
    adv_r, ret_r = gae(old["reward"], rewards, mask, cfg.gamma, cfg.gae_lambda)
    adv_c, ret_c = gae(old["cost"], costs, mask, cfg.gamma, cfg.gae_lambda)
    return {"old_reward": old["reward"], "old_cost": old["cost"], "adv_reward": adv_r, "adv_cost": adv_c,
            "ret_reward": ret_r, "ret_cost": ret_c}


def _minibatches(n: int, cfg: SafeRLHFPPOConfig, device: torch.device):
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n)
        for s in range(0, n, cfg.minibatch_size):
            yield perm[s:s + cfg.minibatch_size].to(device)


def _update(cfg: SafeRLHFPPOConfig, policy, critics: dict[str, ValueModel], optimizers: dict, rollout: Rollout,
            targets: dict[str, torch.Tensor], idx: torch.Tensor, lam: float) -> dict[str, float]:
    """One rl_step: the actor, then the reward critic, then the cost critic; their losses."""
    batch = {k: v[idx] for k, v in rollout.enc.items()}
    mask = rollout.mask[idx]
    new = _token_logps(policy, batch)
    actor = masked_mean(actor_token_losses(new, rollout.old[idx], targets["adv_reward"][idx],
                                           targets["adv_cost"][idx], lam, cfg.clip_range), mask)
    out = {"actor": _step(actor, policy, optimizers["actor"], cfg.max_grad_norm)}
    for name, critic in critics.items():
        values = critic(batch["input_ids"], batch["attention_mask"])[:, :-1]
        loss = masked_mean(critic_token_losses(values, targets[f"old_{name}"][idx], targets[f"ret_{name}"][idx],
                                               cfg.clip_range_value), mask)
        out[name] = _step(loss, critic, optimizers[name], cfg.max_grad_norm)
    return out


def _step(loss: torch.Tensor, model: torch.nn.Module, optimizer, max_grad_norm: float) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def _log(metrics, it: int, steps: int, sampled: int, losses: list[dict[str, float]], rollout: Rollout,
         run: OnlineRun, episode_cost: float, lambdas: list[float]) -> dict[str, float]:
    line = {"step": it + 1, "gradient_steps": steps, "sampled_tokens": sampled,
            "loss": float(np.mean([x["actor"] for x in losses])),
            "critic/reward_loss": float(np.mean([x["reward"] for x in losses])),
            "critic/cost_loss": float(np.mean([x["cost"] for x in losses])),
            "kl": float((rollout.old_seq - rollout.ref_seq).mean()), "episode_cost": episode_cost,
            **{f"rollout/{c}": float(v.mean()) for c, v in rollout.values.items()},
            **{f"dual/lambda_{n}": v for n, v in zip(run.objective.names, lambdas, strict=True)}}
    with open(metrics, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line

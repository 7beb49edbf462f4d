"""GRPO-Lagrangian: the critic-free primal-dual RL most users would reach for now (a GRPO/RLOO-style
policy gradient with a Lagrange multiplier), in the loop PPO-Lagrangian uses
(:func:`dualign.baselines.ppo_lagrangian.train_primal_dual`), with its own update rules:

- Return and advantage as PPO-Lagrangian's: the KL in the reward, r̃ = r − β·log(π_old/π_ref)
  (k1, sequence level), and group-relative (RLOO) advantages of r̃ + λᵀg scaled by 1/(1 + Σλ)
  (:func:`~dualign.baselines.ppo_lagrangian.combined_advantage`, equal by linearity). No per-group
  std: dividing by it would reweight reward and cost and move the fixed point (Constrained GRPO,
  arXiv 2602.05863; Dr. GRPO). With this return the stationary policy is π ∝ π_ref·exp((r + λᵀg)/β),
  MoCAN's π_λ.
- Policy loss: the clipped surrogate summed over each response's tokens and divided by the
  rollout's mean response length (:func:`sequence_clip_loss`; TRL's ``loss_type="dapo"``), so the
  gradient is the sequence-level policy gradient E[A·∇log π(y|x)]. One pass and one minibatch
  per rollout by default: on-policy, ratio 1, REINFORCE with the leave-one-out baseline.
- λ step: projected gradient on λ itself, λ ← min(λ_max, max(0, λ − η·(J_g − b)))
  (:func:`projected_lambda_step`, the dual-ascent step of :mod:`dualign.baselines.dual_ascent`
  with a cap), on J_g of its own rollouts (a window of ``cost_window`` iterations), after
  ``lambda_delay`` iterations. Unlike Safe-RLHF's log-space step it can reach λ = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dualign.baselines.dual_ascent import dual_ascent_step
from dualign.baselines.ppo_lagrangian import (
    PPOLagrangianConfig,
    UpdateRules,
    clipped_token_losses,
    train_primal_dual,
)


@dataclass
class GRPOLagrangianConfig(PPOLagrangianConfig):
    method: str = field(default="grpo-lagrangian", metadata={"help": "grpo-lagrangian"})
    ppo_epochs: int = field(default=1, metadata={"help": "ppo/grpo-lagrangian: passes over each rollout batch"})
    minibatch_size: int = field(default=64, metadata={"help": "ppo/grpo-lagrangian: sequences per optimizer step"})
    lambda_lr: float = field(default=0.05, metadata={
        "help": "λ step size: on log λ (ppo-lagrangian), on λ (grpo-lagrangian)"})
    lambda_max: float | None = field(default=5.0, metadata={
        "help": "ppo/grpo-lagrangian: λ is capped here (Safe-RLHF's λ_max; null: no cap)"})


def projected_lambda_step(lambdas: np.ndarray, utility_means: np.ndarray, thresholds: np.ndarray, lr: float,
                          lambda_max: float | None) -> np.ndarray:
    """λ ← min(λ_max, max(0, λ − η·(J_g − b))): the dual-ascent step, capped (``None``: not capped)."""
    step = dual_ascent_step(lambdas, utility_means, thresholds, lr)
    return step if lambda_max is None else np.minimum(lambda_max, step)


def sequence_clip_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, clip_range: float, mean_tokens: float) -> torch.Tensor:
    """Per-sequence loss −(1/ℓ̄)·Σ_t min(ρ_t·A, clip(ρ_t, 1−ε, 1+ε)·A), ℓ̄ = the rollout's mean response length.

    The mean over a rollout is Σ of every token's term / Σ of tokens (TRL's "dapo" aggregation);
    at ρ = 1 its gradient is −(1/ℓ̄)·A·∇log π(y|x), the sequence-level policy gradient, where
    PPO-Lagrangian's per-response token mean (:func:`~dualign.baselines.ppo_lagrangian.ppo_clip_loss`)
    weighs a short response's tokens more.
    """
    per_token = clipped_token_losses(logps, old_logps, advantages, clip_range)
    return (per_token * mask.to(per_token.dtype)).sum(-1) / mean_tokens


def _projected_step(lambdas: np.ndarray, utility_means: np.ndarray, thresholds: np.ndarray, it: int,
                    cfg: GRPOLagrangianConfig) -> np.ndarray:
    if it < cfg.lambda_delay:
        return np.asarray(lambdas, float).copy()
    return projected_lambda_step(lambdas, utility_means, thresholds, cfg.lambda_lr, cfg.lambda_max)


GRPO_RULES = UpdateRules(lambda_step=_projected_step, policy_loss=sequence_clip_loss)


def train_grpo_lagrangian(cfg: GRPOLagrangianConfig) -> dict[str, Any]:
    """Online primal-dual RL from π_ref with the rules above; outputs as PPO-Lagrangian's."""
    return train_primal_dual(cfg, GRPO_RULES)

"""Safe-RLHF's PPO-Lagrangian (ppo-lagrangian-critic): its rules against hand computation, and a
tiny run that trains actor and critics, logs λ and finishes with what it cost."""

from __future__ import annotations

import json
import math

import pytest
import test_baselines
import torch

from dualign._infra.errors import ConfigError
from dualign._infra.io import read_json
from dualign.baselines.dispatch import run_method
from dualign.baselines.safe_rlhf_ppo import (
    SafeRLHFPPOConfig,
    actor_token_losses,
    critic_token_losses,
    gae,
    kl_regularized_rewards,
    lagrange_step,
    masked_mean,
)
from dualign.modeling.flops import model_forward_params, stage_flops

tiny_run = test_baselines.tiny_run  # the module fixture: a scores table of the tiny model


# ------------------------------------------------------------------ the rules, by hand

def _close(x: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(x, torch.tensor(expected, dtype=x.dtype))


def test_kl_penalty_is_minus_kl_coeff_times_log_ratio_per_token_with_the_score_on_the_last_token():
    # two response tokens at positions 1, 2 of row 0; one at position 0 of row 1 (row 1's others: padding)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -1.0, -1.0]])
    rewards, costs = kl_regularized_rewards(torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5]), logps, ref, mask,
                                            kl_coeff=0.1, clip_range_score=50.0)
    # row 0: log ratios −1 and 0.5 → penalties +0.1, −0.05; the reward 3 and the cost 2 at position 2
    _close(rewards, [[0.0, 0.1, -0.05 + 3.0], [-0.1 - 1.0, 0.0, 0.0]])
    _close(costs, [[0.0, -0.1, 0.05 + 2.0], [0.1 + 0.5, 0.0, 0.0]])
    clipped, _ = kl_regularized_rewards(torch.tensor([80.0, -80.0]), torch.zeros(2), logps, ref, mask, 0.1, 50.0)
    assert clipped[0, 2] == 50.0 and clipped[1, 0] == -50.0


def test_gae_matches_a_hand_worked_sequence_and_ignores_prompt_and_padding():
    # row 0: prompt at 0, response 1..3, padding at 4; γ = 1, λ_GAE = 0.95
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3, 9.0]])
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0]])
    adv, ret = gae(values, rewards, mask, gamma=1.0, gae_lambda=0.95)
    # δ3 = 1 − 0.3 = 0.7; δ2 = 0 + 0.3 − 0.4 = −0.1; δ1 = 0 + 0.4 − 0.5 = −0.1
    a3 = 0.7
    a2 = -0.1 + 0.95 * a3
    a1 = -0.1 + 0.95 * a2
    _close(adv, [[0.0, a1, a2, a3, 0.0]])
    _close(ret, [[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0.0]])
    # γ = 0.9, λ_GAE = 0.5 on the same row
    adv, _ = gae(values, rewards, mask, gamma=0.9, gae_lambda=0.5)
    d3, d2, d1 = 1 - 0.3, 0.9 * 0.3 - 0.4, 0.9 * 0.4 - 0.5
    assert adv[0, 1:4].tolist() == pytest.approx([d1 + 0.45 * (d2 + 0.45 * d3), d2 + 0.45 * d3, d3])


def test_actor_loss_combines_advantages_as_safe_rlhf_and_clips_the_ratio():
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))      # old log-probs 0: ratios 1.5, 0.5, 1.1
    old = torch.zeros(1, 3)
    adv_r = torch.tensor([[2.0, 2.0, -1.0]])
    adv_c = torch.tensor([[0.5, -1.0, 1.0]])
    losses = actor_token_losses(logps, old, adv_r, adv_c, lam=1.0, clip_range=0.2)
    # A = (A_r − A_c)/2 = 0.75, 1.5, −1
    # token 0: min(1.5·0.75, 1.2·0.75) = 0.9; token 1: min(0.5·1.5, 0.8·1.5) = 0.75; token 2: min(−1.1, −1.1) = −1.1
    _close(losses, [[-0.9, -0.75, 1.1]])
    assert masked_mean(losses, torch.tensor([[1, 1, 0]])).item() == pytest.approx((-0.9 - 0.75) / 2)
    assert actor_token_losses(logps, old, adv_r, adv_c, lam=3.0, clip_range=0.2)[0, 2].item() == pytest.approx(
        -1.1 * (-1.0 - 3.0) / 4)


def test_value_loss_is_half_the_larger_of_the_plain_and_the_clipped_square_error():
    values = torch.tensor([[2.0, 0.0, 1.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[3.0, 1.0, -4.0]])
    losses = critic_token_losses(values, old, returns, clip_range_value=0.5)
    # token 0: V clipped to 0.5: max(1, 6.25)/2; token 1: both 1; token 2: V clipped 0.5: max(25, 20.25)/2
    _close(losses, [[6.25 / 2, 0.5, 25 / 2]])


def test_lambda_step_is_sgd_on_log_lambda_scaled_by_lambda_and_capped():
    # J_c = 1.5 over d = 1: log λ ← log 2 + 0.1·2·0.5
    assert lagrange_step(math.log(2.0), 1.5, 1.0, lr=0.1, lambda_max=None) == pytest.approx(math.log(2.0) + 0.1)
    assert lagrange_step(math.log(2.0), 0.5, 1.0, lr=0.1, lambda_max=None) == pytest.approx(math.log(2.0) - 0.1)
    # λ = 4.5 with a step of +0.1·4.5·2 = 0.9 would pass λ_max = 5: it stops there
    assert lagrange_step(math.log(4.5), 3.0, 1.0, lr=0.1, lambda_max=5.0) == pytest.approx(math.log(5.0))


def test_critic_flops_are_charged_for_both_critics_in_training():
    tokens = {"training": 10, "forward": 20, "critic_forward": 20, "critic_training": 20}
    flops = stage_flops(tokens, 100, [], critic_params=50)
    assert flops["training"] == 6 * 100 * 10 + 2 * 100 * 20 + 2 * 50 * 20 + 6 * 50 * 20


# ------------------------------------------------------------------ a tiny run

def _cfg(tiny_gpt2, run, out, **kw):
    return SafeRLHFPPOConfig(model=tiny_gpt2, run_dir=str(out), scores=str(run / "scores.parquet"),
                             constraints=["cost<=-1"], beta=0.1, iterations=3, prompts_per_iteration=2,
                             num_samples=2, max_new_tokens=8, minibatch_size=2, learning_rate=1e-3,
                             critic_learning_rate=1e-3, lambda_lr=0.2, cost_window=1, device="cpu", **kw)


def test_tiny_run_trains_actor_and_critics_logs_lambda_and_charges_every_model(tiny_gpt2, tiny_run, tmp_path):
    out = run_method(_cfg(tiny_gpt2, tiny_run, tmp_path, checkpoints=[2], lambda_max=3.0))
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lam = [t["cost"] for t in out["lambda_trajectory"]]
    # cost ≥ 0 > −1: always violated, so λ rises every step (2 minibatches an iteration) until the cap
    assert lam[0] == 1.0 < lam[1] and all(a <= b <= 3.0 + 1e-9 for a, b in zip(lam, lam[1:], strict=False))
    first = lagrange_step(0.0, lines[0]["episode_cost"], -1.0, 0.2, 3.0)     # iteration 0's two steps
    assert lam[1] == pytest.approx(math.exp(lagrange_step(first, lines[0]["episode_cost"], -1.0, 0.2, 3.0)))
    assert [x["dual/lambda_cost"] for x in lines] == pytest.approx(lam[1:])
    assert all(x["critic/reward_loss"] > 0 and x["critic/cost_loss"] >= 0 for x in lines)
    assert out["gradient_steps"] == 6                       # 3 iterations × 4 sequences / minibatches of 2
    assert read_json(tmp_path / "dual.json")["method"] == "ppo-lagrangian-critic"
    assert (tmp_path / "policy" / "config.json").exists()
    # FLOPs: the actor's stages as the critic-free loop counts them, plus two critics' passes
    n_policy, n_critic = model_forward_params(tiny_gpt2), out["critic_params"]
    tok = out["tokens"]
    assert tok["critic_forward"] == tok["forward"] and tok["critic_training"] == 2 * tok["training"]
    assert 0 < n_critic < n_policy                          # the trunk and a scalar head, no LM head
    assert out["flops"]["training"] == pytest.approx(6 * n_policy * tok["training"] + 2 * n_policy * tok["forward"]
                                                     + 6 * n_critic * tok["critic_training"]
                                                     + 2 * n_critic * tok["critic_forward"])
    budget = read_json(tmp_path / "budgets" / "2" / "compute.json")
    assert budget["gradient_steps"] == 4 and 0 < budget["flops"]["total"] < out["flops"]["total"]


def test_more_than_one_constraint_is_refused_with_the_key(tiny_gpt2, tiny_run, tmp_path):
    cfg = _cfg(tiny_gpt2, tiny_run, tmp_path)
    cfg.constraints = ["cost<=-1", "reward>=0"]
    with pytest.raises(ConfigError, match="constraints"):
        run_method(cfg)


def test_literature_runs_count_each_stage_and_every_model_held_by_hand():
    from dualign.compare.compute_cost import literature_runs
    from dualign.modeling.flops import project_run

    runs = literature_runs(1000, prompt_tokens=64, response_tokens=256)
    mocan = runs["mocan (paper recipe)"]["tokens"]
    assert mocan == {"generation": 1000 * 128 * 320, "scored": 1000 * 128 * 320, "reference": 1000 * 128 * 320,
                     "training": 2 * 27000 * 3 * 320}
    ppo = runs["ppo-lagrangian-critic (Safe-RLHF)"]
    e = 1000 * 320                                        # one epoch, one response per prompt
    assert ppo["tokens"] == {"generation": e, "scored": e, "reference": e, "forward": e, "training": 2 * e,
                             "critic_forward": 2 * e, "critic_training": 2 * e}
    projected = project_run(ppo["tokens"], ppo["resident"], 7e9)
    assert projected["flops"]["training"] == pytest.approx(7e9 * (6 * (2 * e + 2 * e) + 2 * (e + 2 * e)))
    assert projected["memory_gb"] == pytest.approx(7 * (3 * 16 + 3 * 2))      # actor + 2 critics trained; 3 frozen
    assert set(literature_runs(None)) == {"mocan (paper recipe)"}             # the RL prompt count not sourced


def test_literature_table_shares_mocans_sampling_across_thresholds_and_charges_ppo_a_run_per_threshold():
    """At P thresholds: MoCAN pays its samples, scores and log π_ref once and a fine-tune
    (6·N FLOPs per training token) per point; a PPO-Lagrangian run per point. Hand values at
    N = 7e9 with PKU-SafeRLHF's 44,600 prompts."""
    from dualign.compare.compute_cost import PKU_SAFERLHF_PROMPTS, literature_table

    assert PKU_SAFERLHF_PROMPTS.value == 44_600 and "PKU-SafeRLHF-prompt" in PKU_SAFERLHF_PROMPTS.source
    one = {r["recipe"]: r for r in literature_table(1)}
    five = {r["recipe"]: r for r in literature_table(5)}
    mocan, ppo = "mocan (paper recipe)", "ppo-lagrangian-critic (Safe-RLHF)"
    fine_tune = 6 * 7e9 * (2 * 27000 * 3 * 320)
    assert five[mocan]["flops_all_points"] - one[mocan]["flops_all_points"] == pytest.approx(4 * fine_tune)
    assert five[ppo]["flops_all_points"] == pytest.approx(5 * one[ppo]["flops_one_point"])
    # the projections quoted in docs/results/headline_claims.md
    assert one[mocan]["flops_one_point"] == pytest.approx(4.47e18, rel=1e-3)
    assert one[ppo]["flops_one_point"] == pytest.approx(3.80e18, rel=1e-3)
    assert five[mocan]["flops_all_points"] == pytest.approx(1.318e19, rel=1e-3)
    assert five[ppo]["flops_all_points"] == pytest.approx(1.898e19, rel=1e-3)
    assert (one[mocan]["memory_gb"], one[ppo]["memory_gb"]) == (112, 378)

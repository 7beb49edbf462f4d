"""Baselines: update rules against hand computation, and tiny end-to-end runs whose λ moves the right way."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from dualign.io import read_json, read_table, write_json, write_table
from dualign.methods.dispatch import run_method
from dualign.methods.dual_ascent import DualAscentConfig, dual_ascent_step
from dualign.methods.fixed_lambda import FixedLambdaConfig
from dualign.methods.objective import lagrangian_pairs, load_objective
from dualign.methods.ppo_lagrangian import (
    PPOLagrangianConfig,
    combined_advantage,
    group_advantages,
    kl_shaped_rewards,
    lagrange_multiplier_step,
    ppo_clip_loss,
)


def reward_fn(prompts, responses):
    """Test reward: response length in tens of characters."""
    return [len(r) / 10 for r in responses]


def cost_fn(prompts, responses):
    """Test cost: how many letters 'e' the response has."""
    return [float(r.count("e")) for r in responses]


SCORERS = [f"reward=callable:{__file__}:reward_fn", f"cost=callable:{__file__}:cost_fn"]


# ------------------------------------------------------------------ update rules

def test_lagrange_step_raises_lambda_under_violation_and_lowers_it_otherwise():
    # cost <= 1 is g = -cost >= -1; mean cost 1.5 violates it by 0.5, mean cost 0.25 meets it by 0.75
    b = np.array([-1.0])
    up = lagrange_multiplier_step(np.log([2.0]), np.array([-1.5]), b, lr=0.1, step=5)
    down = lagrange_multiplier_step(np.log([2.0]), np.array([-0.25]), b, lr=0.1, step=5)
    assert up[0] == pytest.approx(math.log(2.0) + 0.05)
    assert down[0] == pytest.approx(math.log(2.0) - 0.075)
    assert np.exp(up[0]) > 2.0 > np.exp(down[0])


def test_lagrange_step_keeps_lambda_frozen_during_the_delay():
    b = np.array([-1.0])
    frozen = lagrange_multiplier_step(np.log([2.0]), np.array([-5.0]), b, lr=0.1, step=2, delay=3)
    moved = lagrange_multiplier_step(np.log([2.0]), np.array([-5.0]), b, lr=0.1, step=3, delay=3)
    assert frozen[0] == math.log(2.0)
    assert moved[0] == pytest.approx(math.log(2.0) + 0.4)


def test_group_mean_and_leave_one_out_advantages_match_hand_computation():
    v = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    assert torch.allclose(group_advantages(v, "mean"), torch.tensor([[-1.0, 0.0, 1.0], [-2.0, -2.0, 4.0]]))
    # rloo: v_k minus the mean of the other two
    assert torch.allclose(group_advantages(v, "rloo"), torch.tensor([[1 - 2.5, 2 - 2.0, 3 - 1.5], [-3.0, -3.0, 6.0]]))


def test_kl_shaping_subtracts_beta_times_the_log_ratio():
    shaped = kl_shaped_rewards(torch.tensor([1.0, 2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), 0.5)
    assert torch.allclose(shaped, torch.tensor([1.0 + 0.5, 2.0 - 0.5]))


def test_advantage_of_a_hand_made_trajectory():
    # one prompt, K = 2: rewards 3, 1; log π − log π_ref = 2, 0 (β = 0.5); costs 4, 0; λ = 1
    r, lp, ref = torch.tensor([3.0, 1.0]), torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0])
    cost = torch.tensor([4.0, 0.0])
    shaped = kl_shaped_rewards(r, lp, ref, 0.5)                     # 2, 1
    a_r = group_advantages(shaped.view(1, 2), "rloo").reshape(-1)   # 1, -1
    a_g = group_advantages((-cost).view(1, 2, 1), "rloo").reshape(2, 1)  # -4, 4
    adv = combined_advantage(a_r, a_g, torch.tensor([1.0]))
    # Safe-RLHF's (A_r − λ·A_c)/(1 + λ): (1 − 4)/2, (−1 + 4)/2
    assert torch.allclose(adv, torch.tensor([-1.5, 1.5]))


def test_ppo_clipped_loss_matches_hand_computation_and_clipped_tokens_carry_no_gradient():
    old = torch.zeros(4, 2)
    logps = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0], [1.5, 1.0], [0.5, 1.0]])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])
    loss = ppo_clip_loss(logps, old, adv, mask, 0.2)
    # per token −min(ρA, clip(ρ)A); ρ = 1 gives −A; the last row averages its one response token
    expected = torch.tensor([(-1.2 - 1.0) / 2, (-0.5 - 1.0) / 2, (1.5 + 1.0) / 2, 0.8])
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    assert logps.grad[0, 0] == 0 and logps.grad[3, 0] == 0    # clipped side: constant in ρ
    assert logps.grad[1, 0] != 0 and logps.grad[2, 0] != 0


def test_dual_ascent_step_direction_and_projection():
    b = np.array([-1.0, 0.0])
    violated = dual_ascent_step(np.array([1.0, 1.0]), np.array([-1.5, 0.0]), b, lr=2.0)
    met = dual_ascent_step(np.array([1.0, 0.3]), np.array([-0.5, 1.0]), b, lr=2.0)
    assert violated.tolist() == [2.0, 1.0]       # λ up by η·0.5 where E[g] < b, unchanged at equality
    assert met.tolist() == [0.0, 0.0]            # down, projected onto λ ≥ 0


def test_lagrangian_pairs_margins_are_reward_plus_lambda_times_utility():
    scores = pd.DataFrame({"prompt_id": [0, 0], "prompt": ["p", "p"], "response": ["a", "b"],
                           "reward": [1.0, 3.0], "cost": [2.0, 0.5]})
    objective = load_objective(__import__("pathlib").Path("/nonexistent/dual.json"), scores, ["cost<=ref"])
    assert objective.thresholds.tolist() == [-1.25]
    fixed = lagrangian_pairs(scores, objective, np.array([2.0]), 1.0, None, 0, "s")
    safe = lagrangian_pairs(scores, objective, np.array([1.0]), 0.0, None, 0, "s")
    assert fixed["target_margin"].tolist() == [(1 - 3) + 2 * (-2.0 + 0.5)]
    assert safe["target_margin"].tolist() == [-2.0 + 0.5]


# ------------------------------------------------------------------ tiny end-to-end runs

@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2, tmp_path_factory):
    """A run directory with scores.parquet of the tiny model (as the sample + score stages write it)."""
    from dualign.models import load_causal_lm, load_tokenizer
    from dualign.sample import generate_responses
    from dualign.score import score_table

    run = tmp_path_factory.mktemp("run")
    prompts = ["How do I cook rice?", "Write a poem about rain.", "Tell me a joke.", "How can I pick a lock?"]
    model, tok = load_causal_lm(tiny_gpt2, device="cpu"), load_tokenizer(tiny_gpt2)
    df = generate_responses(model, tok, prompts, list(range(4)), 3, max_new_tokens=12, seed=0, progress=False)
    write_table(score_table(df, SCORERS, progress=False), run / "scores.parquet")
    (run / "score.config.yaml").write_text(json.dumps({"scorers": SCORERS}))
    (run / "sample.config.yaml").write_text(json.dumps({"model": tiny_gpt2, "revision": None,
                                                        "template": "auto", "max_new_tokens": 12}))
    write_table(pd.DataFrame({"prompt_id": range(4), "prompt": prompts}), run / "prompts.jsonl")
    return run


def _ppo(tiny_gpt2, run, tmp_path, constraint, **kw):
    cfg = PPOLagrangianConfig(model=tiny_gpt2, run_dir=str(tmp_path), scores=str(run / "scores.parquet"),
                              constraints=[constraint], beta=0.1, iterations=3, prompts_per_iteration=2,
                              num_samples=3, max_new_tokens=10, ppo_epochs=2, minibatch_size=4,
                              learning_rate=1e-3, lambda_init=1.0, lambda_lr=0.5, cost_window=2,
                              device="cpu", **kw)
    return run_method(cfg)


def test_ppo_lagrangian_lambda_rises_under_violation_after_the_delay_and_falls_when_met(tiny_gpt2, tiny_run,
                                                                                     tmp_path):
    up = _ppo(tiny_gpt2, tiny_run, tmp_path / "up", "cost<=-1", lambda_delay=1)
    down = _ppo(tiny_gpt2, tiny_run, tmp_path / "down", "cost<=40")   # ≤ 10 tokens: never 40 e's
    lam_up = [t["cost"] for t in up["lambda_trajectory"]]
    lam_down = [t["cost"] for t in down["lambda_trajectory"]]
    assert lam_up[0] == lam_up[1] == 1.0                  # iteration 0 lies inside the delay
    assert lam_up[1] < lam_up[2] < lam_up[3]              # cost ≥ 0 > −1: always violated
    assert lam_down[0] > lam_down[1] > lam_down[2] > lam_down[3]
    # 3 iterations × 2 epochs × ceil(6 / 4) minibatches
    assert up["gradient_steps"] == 12
    assert up["sampled_tokens"] > 0 and up["peak_memory_mb"] > 0 and up["wall_s"] > 0
    lines = [json.loads(s) for s in (tmp_path / "up" / "metrics.jsonl").read_text().splitlines()]
    assert [x["dual/lambda_cost"] for x in lines] == pytest.approx(lam_up[1:])
    assert (tmp_path / "up" / "policy" / "config.json").exists()
    dual = read_json(tmp_path / "up" / "dual.json")
    assert dual["method"] == "ppo-lagrangian" and dual["lambdas"]["cost"] == pytest.approx(lam_up[-1])


def _dual_ascent(tiny_gpt2, run, out, constraint):
    cfg = DualAscentConfig(model=tiny_gpt2, run_dir=str(out), scores=str(run / "scores.parquet"),
                           constraints=[constraint], beta=0.1, rounds=2, lambda_lr=0.5, lambda_init=1.0,
                           max_steps=2, per_device_batch_size=4, estimate_prompts=2, estimate_samples=2,
                           max_new_tokens=8, device="cpu", logging_steps=1)
    return run_method(cfg)


def test_dual_ascent_lambda_rises_under_violation_and_is_projected_to_zero_when_met(tiny_gpt2, tiny_run,
                                                                                   tmp_path):
    up = _dual_ascent(tiny_gpt2, tiny_run, tmp_path / "up", "cost<=-1")
    down = _dual_ascent(tiny_gpt2, tiny_run, tmp_path / "down", "cost<=1000")
    lam_up = [t["cost"] for t in up["lambda_trajectory"]]
    assert lam_up[0] == 1.0 and lam_up[0] < lam_up[1] < lam_up[2]
    # the estimate of round 0 moved λ by exactly η·(b − E[g]) = 0.5·(mean cost + 1)
    est = read_json(tmp_path / "up" / "rounds" / "0" / "estimate.json")
    assert lam_up[1] == pytest.approx(1.0 + 0.5 * (est["achieved"]["cost"] + 1))
    assert [t["cost"] for t in down["lambda_trajectory"]] == [1.0, 0.0, 0.0]
    assert up["gradient_steps"] == 4 and up["sampled_tokens"] > 0
    assert (tmp_path / "up" / "policy" / "config.json").exists()
    assert not (tmp_path / "up" / "rounds" / "0" / "policy").exists()   # only the last round's is kept


def test_safe_dpo_trains_on_cost_only_margins_and_writes_its_dual(tiny_gpt2, tiny_run, tmp_path):
    cfg = FixedLambdaConfig(model=tiny_gpt2, run_dir=str(tmp_path), method="safe-dpo",
                            scores=str(tiny_run / "scores.parquet"), constraints=["cost<=ref-1"], beta=0.1,
                            max_steps=1, per_device_batch_size=4, device="cpu")
    out = run_method(cfg)
    scores = read_table(tiny_run / "scores.parquet")
    pairs = read_table(tmp_path / "pairs.parquet")
    cost = dict(zip(scores["response"], scores["cost"], strict=False))
    expected = [-(cost[a] - cost[b]) for a, b in zip(pairs["response_a"], pairs["response_b"], strict=True)]
    assert pairs["target_margin"].tolist() == pytest.approx(expected)
    dual = read_json(tmp_path / "dual.json")
    assert dual["method"] == "safe-dpo" and dual["reward_weight"] == 0.0
    assert dual["thresholds"]["cost"] == pytest.approx(scores.groupby("prompt_id")["cost"].mean().mean() - 1)
    assert out["gradient_steps"] == 1 and (tmp_path / "policy" / "config.json").exists()


def test_fixed_lambda_leaves_another_methods_dual_json_alone(tiny_gpt2, tiny_run, tmp_path):
    theirs = {"method": None, "beta": 0.1, "reward": "reward", "constraints": ["cost<=1"],
              "lambdas": {"cost": 3.0}, "thresholds": {"cost": 1.0}, "reference": {}}
    write_json(theirs, tmp_path / "dual.json")
    cfg = FixedLambdaConfig(model=tiny_gpt2, run_dir=str(tmp_path), scores=str(tiny_run / "scores.parquet"),
                            lambdas=[0.5], max_steps=1, per_device_batch_size=4, device="cpu")
    run_method(cfg)
    assert read_json(tmp_path / "dual.json") == theirs
    mine = read_json(tmp_path / "fixed-lambda.dual.json")
    assert mine["lambdas"] == {"cost": 0.5} and mine["thresholds"] == {"cost": 1.0}

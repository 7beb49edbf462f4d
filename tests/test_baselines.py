"""Baselines: update rules against hand computation, and tiny end-to-end runs whose λ moves the right way."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from dualign._infra.errors import ConfigError
from dualign._infra.io import read_json, read_table, write_json, write_table
from dualign.baselines.dispatch import run_method
from dualign.baselines.dual_ascent import DualAscentConfig, dual_ascent_step
from dualign.baselines.fixed_lambda import FixedLambdaConfig
from dualign.baselines.grpo_lagrangian import (
    GRPO_RULES,
    GRPOLagrangianConfig,
    projected_lambda_step,
    sequence_clip_loss,
)
from dualign.baselines.ppo_lagrangian import (
    PPO_RULES,
    PPOLagrangianConfig,
    combined_advantage,
    group_advantages,
    kl_shaped_rewards,
    lagrange_multiplier_step,
    ppo_clip_loss,
)
from dualign.methods.objective import lagrangian_pairs, load_objective
from dualign.modeling.flops import model_forward_params
from dualign.modeling.models import load_tokenizer, tokenize_pairs
from dualign.modeling.refprobs import record, trainer_numerics
from dualign.modeling.templates import format_prompt
from dualign.train import TrainConfig


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


def test_projected_lambda_step_moves_lambda_by_eta_times_violation_within_zero_and_the_cap():
    b = np.array([-1.0, -1.0, -1.0, -1.0])
    lam = projected_lambda_step(np.array([1.0, 4.9, 4.5, 0.5]), np.array([-1.5, -0.5, -2.0, 0.0]), b,
                                lr=2.0, lambda_max=5.0)
    # λ − η·(J − b): 1 + 2·0.5, 4.9 − 2·0.5, 4.5 + 2·1 capped at 5, 0.5 − 2·1 projected to 0
    assert lam.tolist() == pytest.approx([2.0, 3.9, 5.0, 0.0])


def test_grpo_lambda_step_is_frozen_during_the_delay_and_ppo_step_is_the_log_space_rule():
    cfg = GRPOLagrangianConfig(model="m", run_dir="r", lambda_lr=0.5, lambda_delay=2, lambda_max=5.0)
    lam, J, b = np.array([1.0]), np.array([-3.0]), np.array([-1.0])
    assert GRPO_RULES.lambda_step(lam, J, b, 1, cfg).tolist() == [1.0]
    assert GRPO_RULES.lambda_step(lam, J, b, 2, cfg).tolist() == [2.0]          # 1 − 0.5·(−3 + 1)
    ppo = PPOLagrangianConfig(model="m", run_dir="r", lambda_lr=0.5, lambda_delay=0)
    assert PPO_RULES.lambda_step(lam, J, b, 0, ppo) == pytest.approx([math.exp(0.5 * 2.0)])  # log λ + 0.5·(b − J)
    capped = PPOLagrangianConfig(model="m", run_dir="r", lambda_lr=0.5, lambda_max=2.0)
    assert PPO_RULES.lambda_step(lam, J, b, 0, capped).tolist() == [2.0]


def test_grpo_advantage_is_the_leave_one_out_advantage_of_the_kl_shaped_lagrangian_return():
    # one prompt, K = 3: r = 3, 1, 2; log π − log π_ref = 1, 0, 0.5 (β = 0.5); cost = 2, 0, 1; λ = 1
    r, lp, ref = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([-1.0, -2.0, -1.5]), torch.tensor([-2.0, -2.0, -2.0])
    g = -torch.tensor([2.0, 0.0, 1.0])
    shaped = kl_shaped_rewards(r, lp, ref, 0.5)
    adv = combined_advantage(group_advantages(shaped.view(1, 3)).reshape(-1),
                             group_advantages(g.view(1, 3, 1)).reshape(3, 1), torch.tensor([1.0]))
    # s = r − β·ρ + λ·g = 0.5, 1, 0.75; A_k = (s_k − mean of the others)/(1 + λ)
    assert adv.tolist() == pytest.approx([(0.5 - 0.875) / 2, (1 - 0.625) / 2, (0.75 - 0.75) / 2])


def test_grpo_loss_sums_tokens_over_the_mean_length_so_every_token_gets_the_same_gradient():
    old = torch.zeros(3, 3)
    logps = torch.zeros(3, 3, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 1.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1]])
    loss = sequence_clip_loss(logps, old, adv, mask, 0.2, mean_tokens=2.0)
    # ρ = 1: −Σ_t A / ℓ̄ = −3/2, +2/2, −2/2
    assert loss.tolist() == pytest.approx([-1.5, 1.0, -1.0])
    loss.sum().backward()
    # the sequence-level policy gradient: −A/ℓ̄ on every response token, whatever the response's length
    assert torch.allclose(logps.grad, torch.tensor([[-0.5, -0.5, -0.5], [1.0, 0.0, 0.0], [0.0, -0.5, -0.5]]))
    per_response = torch.zeros(3, 3, requires_grad=True)
    ppo_clip_loss(per_response, old, adv, mask, 0.2).sum().backward()
    assert per_response.grad[0, 0] == pytest.approx(-1 / 3) and per_response.grad[2, 1] == pytest.approx(-0.5)
    clipped = torch.log(torch.full((1, 2), 1.5)).requires_grad_()
    out = sequence_clip_loss(clipped, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), 0.2, 2.0)
    assert out.item() == pytest.approx(-1.2)      # clip(1.5) = 1.2 on each token: −2·1.2/2
    out.backward()
    assert clipped.grad.abs().sum() == 0


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
    from dualign.modeling.models import load_causal_lm, load_tokenizer
    from dualign.modeling.scoring import score_table
    from dualign.sample import generate_responses

    run = tmp_path_factory.mktemp("run")
    prompts = ["How do I cook rice?", "Write a poem about rain.", "Tell me a joke.", "How can I pick a lock?"]
    model, tok = load_causal_lm(tiny_gpt2, device="cpu"), load_tokenizer(tiny_gpt2)
    df = generate_responses(model, tok, prompts, list(range(4)), 3, max_new_tokens=12, seed=0, progress=False)
    write_table(score_table(df, SCORERS, progress=False), run / "scores.parquet")
    (run / "score.config.yaml").write_text(json.dumps({"scorers": SCORERS}))
    (run / "sample.config.yaml").write_text(json.dumps({"model": tiny_gpt2, "revision": None,
                                                        "template": "auto", "max_new_tokens": 12}))
    (run / "sample.meta.json").write_text(json.dumps({"ref_logprob": record(tiny_gpt2, None, "auto",
                                                                            trainer_numerics("cpu"))}))
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


def test_grpo_lagrangian_raises_lambda_by_eta_times_its_own_violation_and_saves_each_checkpoint(tiny_gpt2, tiny_run,
                                                                                              tmp_path):
    cfg = GRPOLagrangianConfig(model=tiny_gpt2, run_dir=str(tmp_path), scores=str(tiny_run / "scores.parquet"),
                               constraints=["cost<=-1"], beta=0.1, iterations=2, prompts_per_iteration=2,
                               num_samples=3, max_new_tokens=10, learning_rate=1e-3, lambda_init=1.0,
                               lambda_lr=0.5, lambda_max=None, cost_window=1, checkpoints=[1], device="cpu")
    out = run_method(cfg)
    lam = [t["cost"] for t in out["lambda_trajectory"]]
    cost = [json.loads(s)["rollout/cost"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # g = −cost ≥ b = 1 is violated by its rollout's mean cost + 1: λ ← λ + 0.5·(mean cost + 1)
    assert lam == pytest.approx([1.0, 1.0 + 0.5 * (cost[0] + 1), 1.0 + 0.5 * (cost[0] + 1) + 0.5 * (cost[1] + 1)])
    assert out["gradient_steps"] == 2              # one pass, one minibatch (6 ≤ 64 sequences) per iteration
    budget = read_json(tmp_path / "budgets" / "1" / "compute.json")
    assert budget["iterations"] == budget["gradient_steps"] == 1
    assert budget["lambdas"]["cost"] == pytest.approx(lam[1])
    assert read_json(tmp_path / "budgets" / "1" / "dual.json")["lambdas"]["cost"] == pytest.approx(lam[1])
    assert (tmp_path / "budgets" / "1" / "policy" / "config.json").exists()
    assert 0 < budget["flops"]["total"] < out["flops"]["total"]


def _dual_ascent(tiny_gpt2, run, out, constraint, **kw):
    loop = TrainConfig(model=tiny_gpt2, run_dir=str(out), scores=str(run / "scores.parquet"), beta=0.1,
                       max_steps=2, per_device_batch_size=4, device="cpu", logging_steps=1)
    cfg = DualAscentConfig(train=loop, constraints=[constraint], rounds=2, lambda_lr=0.5, lambda_init=1.0,
                           estimate_prompts=2, estimate_samples=2, max_new_tokens=8, **kw)
    return run_method(cfg)


def test_dual_ascent_lambda_rises_under_violation_and_is_projected_to_zero_when_met(tiny_gpt2, tiny_run,
                                                                                   tmp_path):
    up = _dual_ascent(tiny_gpt2, tiny_run, tmp_path / "up", "cost<=-1")
    down = _dual_ascent(tiny_gpt2, tiny_run, tmp_path / "down", "cost<=1000", checkpoints=[1])
    lam_up = [t["cost"] for t in up["lambda_trajectory"]]
    assert lam_up[0] == 1.0 and lam_up[0] < lam_up[1] < lam_up[2]
    # the estimate of round 0 moved λ by exactly η·(b − E[g]) = 0.5·(mean cost + 1)
    est = read_json(tmp_path / "up" / "rounds" / "0" / "estimate.json")
    assert lam_up[1] == pytest.approx(1.0 + 0.5 * (est["achieved"]["cost"] + 1))
    assert [t["cost"] for t in down["lambda_trajectory"]] == [1.0, 0.0, 0.0]
    assert up["gradient_steps"] == 4 and up["sampled_tokens"] > 0
    assert (tmp_path / "up" / "policy" / "config.json").exists()
    assert not (tmp_path / "up" / "rounds" / "0" / "policy").exists()   # only the last round's is kept
    # a checkpoint keeps round 0's policy and charges its training, not the estimate after it
    budget = read_json(tmp_path / "down" / "budgets" / "1" / "compute.json")
    assert budget["policy"] == str(tmp_path / "down" / "rounds" / "0" / "policy")
    assert (tmp_path / "down" / "rounds" / "0" / "policy" / "config.json").exists()
    assert budget["iterations"] == 1 and budget["gradient_steps"] == 2 and budget["sampled_tokens"] == 0
    assert budget["lambdas"] == {"cost": 1.0} and read_json(tmp_path / "down" / "budgets" / "1" / "dual.json")[
        "lambdas"] == {"cost": 1.0}
    assert budget["flops"]["total"] < down["flops"]["total"]


def test_cost_only_mocan_trains_on_cost_only_margins_and_records_its_training_flops(tiny_gpt2, tiny_run,
                                                                                    tmp_path):
    loop = TrainConfig(model=tiny_gpt2, run_dir=str(tmp_path), scores=str(tiny_run / "scores.parquet"), beta=0.1,
                       max_steps=1, per_device_batch_size=12, device="cpu")
    cfg = FixedLambdaConfig(train=loop, method="cost-only-mocan", constraints=["cost<=ref-1"])
    out = run_method(cfg)
    scores = read_table(tiny_run / "scores.parquet")
    pairs = read_table(tmp_path / "pairs.parquet")
    cost = dict(zip(scores["response"], scores["cost"], strict=False))
    expected = [-(cost[a] - cost[b]) for a, b in zip(pairs["response_a"], pairs["response_b"], strict=True)]
    assert pairs["target_margin"].tolist() == pytest.approx(expected)
    dual = read_json(tmp_path / "dual.json")
    assert dual["method"] == "cost-only-mocan" and dual["reward_weight"] == 0.0
    assert dual["thresholds"]["cost"] == pytest.approx(scores.groupby("prompt_id")["cost"].mean().mean() - 1)
    assert out["gradient_steps"] == 1 and (tmp_path / "policy" / "config.json").exists()
    # one step over all 12 pairs of 4 prompts × 3 samples runs each of the 12 responses once
    tok = load_tokenizer(tiny_gpt2)
    enc = tokenize_pairs(tok, [format_prompt(p, "auto", tok) for p in scores["prompt"]], scores["response"].tolist(), 512,
                         truncated=scores["truncated"].tolist())  # a response cut at max_new_tokens has no eos
    assert out["tokens"] == {"reference": 0, "training": int(enc["attention_mask"].sum())}  # log π_ref: the sampler's
    n = model_forward_params(tiny_gpt2)
    assert out["flops"]["training"] == pytest.approx(6 * n * out["tokens"]["training"])
    assert out["flops"]["total"] == out["flops"]["training"]


def test_dpo_helpful_and_dpo_safe_train_on_the_better_and_the_safer_response(tiny_gpt2, tmp_path):
    from dualign.baselines.preference_dpo import PreferenceDPOConfig

    prefs = tmp_path / "pku.jsonl"
    pd.DataFrame({"prompt": ["How do I cook rice?", "How can I pick a lock?"],
                  "response_0": ["Simmer it.", "Use a pick."], "response_1": ["Boil it.", "Ask a locksmith."],
                  "better_response_id": [0, 0], "safer_response_id": [1, 1],
                  "is_response_0_safe": [True, False], "is_response_1_safe": [True, True]}
                 ).to_json(prefs, orient="records", lines=True)
    for method, chosen in (("dpo-helpful", ["Simmer it.", "Use a pick."]), ("dpo-safe", ["Boil it.", "Ask a locksmith."])):
        loop = TrainConfig(model=tiny_gpt2, run_dir=str(tmp_path / method), preferences=str(prefs), max_steps=1,
                           device="cpu")
        out = run_method(PreferenceDPOConfig(train=loop, method=method))
        pairs = read_table(tmp_path / method / "pairs.parquet")
        assert pairs["response_a"].tolist() == chosen and np.isinf(pairs["target_margin"]).all()
        assert read_json(tmp_path / method / "train.meta.json")["config"]["beta"] == 0.1    # the paper's DPO β
        assert out["gradient_steps"] == 1 and out["sampled_tokens"] == 0 and out["tokens"]["reference"] > 0
        assert not (tmp_path / method / "dual.json").exists()    # no objective here: nothing to predict


def test_old_scorer_margin_names_are_refused_with_their_new_name(tiny_gpt2, tiny_run, tmp_path):
    cfg = FixedLambdaConfig(train=TrainConfig(model=tiny_gpt2, run_dir=str(tmp_path), device="cpu"), method="safe-dpo")
    with pytest.raises(ConfigError, match="'safe-dpo' was renamed 'cost-only-mocan'"):
        run_method(cfg)


def test_fixed_lambda_leaves_another_methods_dual_json_alone(tiny_gpt2, tiny_run, tmp_path):
    theirs = {"method": None, "beta": 0.1, "reward": "reward", "constraints": ["cost<=1"],
              "lambdas": {"cost": 3.0}, "thresholds": {"cost": 1.0}, "reference": {}}
    write_json(theirs, tmp_path / "dual.json")
    loop = TrainConfig(model=tiny_gpt2, run_dir=str(tmp_path), scores=str(tiny_run / "scores.parquet"), max_steps=1,
                       per_device_batch_size=4, device="cpu")
    cfg = FixedLambdaConfig(train=loop, lambdas=[0.5])
    run_method(cfg)
    assert read_json(tmp_path / "dual.json") == theirs
    mine = read_json(tmp_path / "fixed-lambda.dual.json")
    assert mine["lambdas"] == {"cost": 0.5} and mine["thresholds"] == {"cost": 1.0}


def test_a_baseline_config_holds_the_loop_settings_and_reads_them_from_the_same_flat_keys():
    from dualign._infra.config import build_config, config_to_dict
    from dualign.baselines.dispatch import CONFIGS
    from dualign.baselines.preference_dpo import PreferenceDPOConfig

    assert not any(issubclass(cls, TrainConfig) for cls in CONFIGS.values())
    flat = {"model": "m", "run_dir": "r", "method": "dual-ascent", "rounds": 2, "beta": 0.5, "seed": 3}
    cfg = build_config(DualAscentConfig, flat)
    assert (cfg.method, cfg.rounds) == ("dual-ascent", 2)           # the baseline's own fields
    assert (cfg.train.model, cfg.train.run_dir, cfg.train.beta, cfg.train.seed) == ("m", "r", 0.5, 3)
    assert cfg.train.method == "mocan"                              # a shared name is the baseline's
    recorded = config_to_dict(cfg)                                  # recorded flat, as it was given
    assert "train" not in recorded and recorded["method"] == "dual-ascent" and recorded["beta"] == 0.5
    assert build_config(DualAscentConfig, recorded) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'compare.preference_dpo.rounds'.*safety_margin"):
        build_config(PreferenceDPOConfig, {**flat, "method": "dpo-safe"}, prefix="compare.preference_dpo.")
    with pytest.raises(ConfigError, match="missing required config value.*: model, run_dir"):
        build_config(FixedLambdaConfig, {"lambdas": [1.0]})
    with pytest.raises(ConfigError, match="per_device_batch_size must be ≥ 1"):
        build_config(FixedLambdaConfig, {"model": "m", "run_dir": "r", "per_device_batch_size": 0})

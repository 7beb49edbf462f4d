"""Pairs building and the training loop, end to end on tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from dualign._infra.errors import InputError
from dualign._infra.io import write_table
from dualign.data.records import DualRecord, write_dual
from dualign.methods.dpo import pairs_from_preferences
from dualign.methods.mocan import pairs_from_scores
from dualign.train import TrainConfig, train

PROMPTS = ["How do I cook rice?", "How can I pick a lock?", "Write a poem about rain.", "Tell me a joke."]
RESPONSES = ["Rinse the rice, then simmer it.", "I can't help with that.", "Rain taps softly on the roof.",
             "Why did the chicken cross the road?"]
# β and λ differ from every default and fallback (train's β fallback is 0.1), so a trainer that
# ignored dual.json's values, or scaled them, would show it
DUAL = DualRecord(beta=0.37, reward="reward", constraints=["cost<=ref-0.5"], lambdas={"cost": 0.7},
                  columns={"cost": "cost"}, feasible=True, converged=True, iterations=3, dual_value=1.0,
                  thresholds={"cost": 0.1}, predicted={"reward": 0.9, "cost": 0.1, "kl": 0.4},
                  reference={"reward": 0.2, "cost": 0.6, "kl": 0.0})


def _scores(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"prompt_id": f"p{i}", "prompt": p, "response": RESPONSES[(i + k) % 4], "sample_index": k}
            for i, p in enumerate(PROMPTS) for k in range(4)]
    df = pd.DataFrame(rows)
    df["reward"] = rng.normal(size=len(df)).round(3)
    df["cost"] = rng.normal(size=len(df)).round(3)
    return df


def _run_dir(tmp_path: Path, name: str = "run", dual: DualRecord | None = DUAL) -> Path:
    run_dir = tmp_path / name
    write_table(_scores(), run_dir / "scores.parquet")
    if dual is not None:
        write_dual(dual, run_dir / "dual.json")
    return run_dir


def _cfg(model: str, run_dir: Path, **kw) -> TrainConfig:
    base = {"learning_rate": 1e-3, "per_device_batch_size": 4, "logging_steps": 1, "max_length": 64,
            "template": "plain", "warmup_ratio": 0.0}
    return TrainConfig(model=model, run_dir=str(run_dir), **{**base, **kw})


def _weights(policy_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(policy_dir / "model.safetensors"))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---------------------------------------------------------------- pairs

def test_pairs_from_scores_margin_is_lagrangian_reward_difference():
    scores = _scores()
    pairs = pairs_from_scores(scores, DUAL)
    assert len(pairs) == 4 * 6  # K(K−1)/2 per prompt
    r_lambda = scores["reward"] - 0.7 * scores["cost"]  # g = −cost for cost<=…, λ = 0.7 by hand
    first = scores[scores.prompt_id == "p0"]
    row = pairs.iloc[2]  # p0: (0,1), (0,2), (0,3): a = sample 0, b = sample 3
    assert row.response_a == first.response.iloc[0] and row.response_b == first.response.iloc[3]
    assert row.target_margin == pytest.approx(r_lambda.iloc[0] - r_lambda.iloc[3])
    assert pairs.ref_logprob_a.isna().all()


def test_pairs_per_prompt_draws_distinct_pairs_reproducibly():
    a = pairs_from_scores(_scores(), DUAL, pairs_per_prompt=2, seed=3)
    b = pairs_from_scores(_scores(), DUAL, pairs_per_prompt=2, seed=3)
    assert len(a) == 8 and a.equals(b)
    assert (a.groupby("prompt_id").apply(lambda g: len(set(zip(g.response_a, g.response_b, strict=True)))) == 2).all()


def test_pairs_from_preferences_hard_and_scored():
    hard = pairs_from_preferences(pd.DataFrame({"prompt": ["x"], "chosen": ["good"], "rejected": ["bad"]}))
    assert hard.target_margin.tolist() == [math.inf] and hard.response_a.tolist() == ["good"]
    scored = pd.DataFrame({"prompt": ["x"], "response_0": ["u"], "response_1": ["v"], "reward_0": [1.0],
                           "reward_1": [0.5], "cost_0": [2.0], "cost_1": [0.0]})
    pairs = pairs_from_preferences(scored, DUAL)
    assert pairs.target_margin.tolist() == pytest.approx([(1.0 - 0.7 * 2.0) - 0.5])
    with pytest.raises(InputError, match="cost_1"):
        pairs_from_preferences(scored.drop(columns="cost_1"), DUAL)


def test_dpo_method_orients_each_pair_by_the_sign_of_its_margin():
    from dualign.methods.losses import dpo_loss
    from dualign.train import LOSSES

    pa, pb, ra, rb = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -0.5]), torch.zeros(2), torch.zeros(2)
    loss_fn, takes = LOSSES["dpo"]
    assert takes == ("target_margin", "beta")
    losses, diag = loss_fn(pa, pb, ra, rb, torch.tensor([math.inf, -0.1]), 0.2)
    forward, _ = dpo_loss(pa, pb, ra, rb, 0.2)
    backward, _ = dpo_loss(pb, pa, rb, ra, 0.2)
    assert losses.tolist() == pytest.approx([forward[0].item(), backward[1].item()])
    assert diag["logps/chosen"].tolist() == [-1.0, -0.5]


def test_each_method_s_loss_takes_exactly_the_log_probs_and_what_the_loop_gives_it():
    """No loss accepts an argument it ignores: its parameters are the four sequence log-probs and,
    one for one, the inputs ``LOSSES`` names for it (safedpo's Δ is the ``safety_margin`` column)."""
    import inspect

    from dualign.train import LOSSES

    logps = ["policy_logps_a", "policy_logps_b", "ref_logps_a", "ref_logps_b"]
    for method, (loss_fn, takes) in LOSSES.items():
        params = list(inspect.signature(loss_fn).parameters)
        assert params[:4] == logps, method
        assert [{"delta": "safety_margin"}.get(p, p) for p in params[4:]] == list(takes), method


def test_sample_weights_give_pair_weights_and_a_weighted_partition_function():
    scores = _scores()
    scores["sample_weight"] = np.tile([1.0, 3.0, 0.0, 4.0], 4)
    pairs = pairs_from_scores(scores, DUAL)
    w = np.tile([1.0, 3.0, 0.0, 4.0], 4) / 8.0  # normalised within each prompt
    first = pairs[pairs.prompt_id == "p0"]
    assert first["weight"].tolist() == pytest.approx([w[0] * w[1], w[0] * w[2], w[0] * w[3],
                                                      w[1] * w[2], w[1] * w[3], w[2] * w[3]])
    # the absolute targets' normaliser is the weighted Ẑ: Σ_k w̄_k·exp(t_k/β) = 1 on each prompt
    targets = np.concatenate([first["target_a"].to_numpy()[:1], first["target_b"].to_numpy()[:3]])  # t_0..t_3
    assert np.sum(w[:4] * np.exp(targets / DUAL.beta)) == pytest.approx(1.0)
    unweighted = pairs_from_scores(_scores(), DUAL)
    assert "weight" not in unweighted and (pairs["target_margin"] == unweighted["target_margin"]).all()


def test_weighted_pairs_train_as_the_pairs_repeated_by_their_weights(tmp_path, tiny_gpt2):
    pairs = pairs_from_scores(_scores(), DUAL).iloc[:4].reset_index(drop=True)
    weighted = pairs.assign(weight=[2.0, 1.0, 1.0, 0.0])
    repeated = pairs.iloc[[0, 0, 1, 2]].reset_index(drop=True)
    runs = {}
    for name, table in (("weighted", weighted), ("repeated", repeated)):
        run_dir = _run_dir(tmp_path, name)
        write_table(table, run_dir / "pairs.jsonl")
        train(_cfg(tiny_gpt2, run_dir, pairs=str(run_dir / "pairs.jsonl"), max_steps=3))
        runs[name] = run_dir
    for mw, mr in zip(_metrics(runs["weighted"]), _metrics(runs["repeated"]), strict=True):
        assert mw["loss"] == pytest.approx(mr["loss"], abs=1e-6)
    assert _max_diff(_weights(runs["weighted"] / "policy"), _weights(runs["repeated"] / "policy")) < 1e-6


# ---------------------------------------------------------------- the loop

def test_batch_of_8_equals_8_accumulated_batches_of_1(tmp_path, tiny_gpt2):
    run_a, run_b = _run_dir(tmp_path, "a"), _run_dir(tmp_path, "b")
    train(_cfg(tiny_gpt2, run_a, per_device_batch_size=8, gradient_accumulation_steps=1, max_steps=2))
    train(_cfg(tiny_gpt2, run_b, per_device_batch_size=1, gradient_accumulation_steps=8, max_steps=2))
    for ma, mb in zip(_metrics(run_a), _metrics(run_b), strict=True):
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-5)
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    assert _max_diff(_weights(run_a / "policy"), _weights(run_b / "policy")) < 1e-5


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_changes_no_loss_gradient_or_weight(tmp_path, tiny_llama, lora):
    runs = {}
    for checkpointing in (False, True):
        run_dir = _run_dir(tmp_path, f"checkpointing-{checkpointing}")
        train(_cfg(tiny_llama, run_dir, gradient_checkpointing=checkpointing, max_steps=2, lora=lora, lora_r=4,
                   lora_alpha=8))
        runs[checkpointing] = run_dir
    for plain, checkpointed in zip(_metrics(runs[False]), _metrics(runs[True]), strict=True):
        assert plain["grad_norm"] > 1e-3
        assert plain["loss"] == pytest.approx(checkpointed["loss"], abs=1e-6)
        assert plain["grad_norm"] == pytest.approx(checkpointed["grad_norm"], rel=1e-5)
    assert _max_diff(_weights(runs[False] / "policy"), _weights(runs[True] / "policy")) < 1e-6


def test_grouped_epoch_order_keeps_each_prompts_pairs_together():
    from dualign.train import epoch_order

    groups = np.repeat(np.arange(5), [3, 1, 4, 2, 6])
    order = epoch_order(7, 0, len(groups), groups)
    assert sorted(order.tolist()) == list(range(len(groups)))
    runs = [g for k, g in enumerate(groups[order]) if k == 0 or g != groups[order][k - 1]]
    assert sorted(runs) == list(range(5))  # each prompt appears as one block
    assert (epoch_order(7, 0, len(groups), groups) == order).all()
    assert any((epoch_order(7, e, len(groups), groups) != order).any() for e in (1, 2))


def test_grouped_batches_run_each_response_once_and_equal_single_pair_accumulation(tmp_path, tiny_gpt2,
                                                                                    monkeypatch):
    import dualign.train as train_module

    seen: list[int] = []
    original = train_module.sequence_logprobs

    def counting(model, **batch):
        if model.training:
            seen.append(batch["input_ids"].shape[0])
        return original(model, **batch)

    monkeypatch.setattr(train_module, "sequence_logprobs", counting)
    run_a, run_b = _run_dir(tmp_path, "a"), _run_dir(tmp_path, "b")
    # 6 pairs = all pairs of one prompt's 4 responses: 4 sequences per step instead of 12
    train(_cfg(tiny_gpt2, run_a, group_by_prompt=True, per_device_batch_size=6, max_steps=3))
    assert seen == [4, 4, 4]
    seen.clear()
    train(_cfg(tiny_gpt2, run_b, group_by_prompt=True, per_device_batch_size=1, gradient_accumulation_steps=6,
               max_steps=3))
    assert seen == [2] * 18
    for ma, mb in zip(_metrics(run_a), _metrics(run_b), strict=True):
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-5)
    # Adam moves a weight by at most about lr = 1e-3 a step; float32 summation order (one batch of 6
    # against 6 accumulated) shows in weights whose gradient is near zero, where Adam normalises it.
    # 1e-4 is a tenth of one step's move: a dropped or doubled micro-batch moves weights by whole steps
    assert _max_diff(_weights(run_a / "policy"), _weights(run_b / "policy")) < 1e-4


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_gpt2):
    whole, parts = _run_dir(tmp_path, "whole"), _run_dir(tmp_path, "parts")
    kw = {"label": "bernoulli", "max_steps": 5, "save_steps": 100}
    train(_cfg(tiny_gpt2, whole, **kw))
    paused = train(_cfg(tiny_gpt2, parts, **kw), stop_at_step=2)
    assert paused["stopped"] and (parts / "train.state" / "state.safetensors").exists() and not (parts / "policy").exists()
    train(_cfg(tiny_gpt2, parts, **kw))
    assert _max_diff(_weights(whole / "policy"), _weights(parts / "policy")) < 1e-6
    assert [m["step"] for m in _metrics(parts)] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in _metrics(parts)] == pytest.approx([m["loss"] for m in _metrics(whole)], abs=1e-6)
    assert not (parts / "train.state").exists()


def test_training_moves_logratios_towards_target_margins(tmp_path, tiny_model):
    from dualign.modeling.models import (
        load_causal_lm,
        load_tokenizer,
        sequence_logprobs,
        tokenize_pairs,
    )

    run_dir = _run_dir(tmp_path)
    scores = _scores()
    # a toy world where a response's Lagrangian reward does not depend on the prompt
    scores["reward"] = scores.response.map(dict(zip(RESPONSES, [0.4, -0.3, 0.1, -0.1], strict=True)))
    scores["cost"] = scores.response.map(dict(zip(RESPONSES, [0.2, -0.4, 0.3, 0.0], strict=True)))
    write_table(scores, run_dir / "scores.parquet")
    cfg = _cfg(tiny_model, run_dir, num_epochs=2, learning_rate=5e-3)
    train(cfg)
    pairs = pd.read_parquet(run_dir / "pairs.parquet")
    tok = load_tokenizer(tiny_model)
    prompts = [f"User: {p}\nAssistant:" for p in pairs.prompt]

    def logps(model_dir: str, responses) -> torch.Tensor:
        model = load_causal_lm(model_dir, device="cpu").eval()
        with torch.no_grad():
            return sequence_logprobs(model, **tokenize_pairs(tok, prompts, list(responses), 64))

    delta = [logps(str(run_dir / "policy"), pairs[c]) - logps(tiny_model, pairs[c]) for c in ("response_a", "response_b")]
    implicit_margin = (delta[0] - delta[1]).numpy()
    corr = np.corrcoef(implicit_margin, pairs.target_margin)[0, 1]
    assert corr > 0.5, corr
    # scale-sensitive: β·(implicit margin) against the margin computed here by hand from β = 0.37
    # and λ = 0.7 (r_λ = reward − 0.7·cost); the fit's slope is 1 at the loss's optimum. Measured
    # (this test's setup, seeds 0–2, both architectures): slope 0.81–1.25 where training learns;
    # a trainer on train's fallback β 0.1 instead of dual.json's gives 3.75–3.85. Bounds [0.5, 2]:
    # a margin of ≥ 0.3 below and ≥ 0.75 above the measured range, ≥ 1.75 below the wrong β.
    r_lambda = {resp: r - 0.7 * c for resp, r, c in zip(RESPONSES, [0.4, -0.3, 0.1, -0.1], [0.2, -0.4, 0.3, 0.0],
                                                        strict=True)}
    target = (pairs.response_a.map(r_lambda) - pairs.response_b.map(r_lambda)).to_numpy()
    h = 0.37 * implicit_margin
    slope = float(h @ target / (target @ target))
    assert 0.5 < slope < 2.0, slope
    metrics = _metrics(run_dir)
    assert metrics[-1]["rewards/accuracies"] > metrics[0]["rewards/accuracies"] or metrics[-1]["rewards/accuracies"] > 0.8
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "dual/lambda_cost", "kl", "learning_rate", "epoch", "step"):
        assert name in metrics[-1], name
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # π = π_ref at the first step


def test_reused_reference_logprobs_give_the_same_run_as_computed_ones(tmp_path, tiny_llama):
    from dualign.modeling.models import (
        load_causal_lm,
        load_tokenizer,
        sequence_logprobs,
        tokenize_pairs,
    )

    scores = _scores()
    tok = load_tokenizer(tiny_llama)
    with torch.no_grad():
        enc = tokenize_pairs(tok, [f"User: {p}\nAssistant:" for p in scores.prompt], list(scores.response), 64)
        scores["ref_logprob"] = sequence_logprobs(load_causal_lm(tiny_llama, device="cpu").eval(), **enc).numpy()
    runs = {}
    for mode in ("reuse", "compute"):
        run_dir = _run_dir(tmp_path, mode)
        write_table(scores, run_dir / "scores.parquet")
        train(_cfg(tiny_llama, run_dir, ref_logprobs=mode, max_steps=3))
        runs[mode] = _weights(run_dir / "policy")
    assert _max_diff(runs["reuse"], runs["compute"]) < 1e-5


def test_lora_saves_loadable_merged_model_and_adapter_with_model_card(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = _run_dir(tmp_path)
    train(_cfg(tiny_llama, run_dir, lora=True, lora_r=4, lora_alpha=8, max_steps=3, method="dpo"))
    policy = run_dir / "policy"
    merged = AutoModelForCausalLM.from_pretrained(policy)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama)
    diff = max((a - b).abs().max().item() for a, b in zip(merged.parameters(), ref.parameters(), strict=True))
    assert diff > 1e-6
    card = (policy / "README.md").read_text()
    assert "beta (β): 0.37" in card and '"cost": 0.7' in card and "cost<=ref-0.5" in card and "scores: `" in card
    assert (policy / "dualign_train.yaml").exists() and (policy / "tokenizer.json").exists()

    out = tmp_path / "adapter"
    train(_cfg(tiny_llama, run_dir, lora=True, lora_r=4, lora_alpha=8, max_steps=1, merge_lora=False,
               output_dir=str(out)))
    assert (out / "adapter_config.json").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)


def test_bad_inputs_raise_one_line_input_errors(tmp_path, tiny_gpt2):
    run_dir = _run_dir(tmp_path, dual=None)
    with pytest.raises(InputError, match="dual.json: file not found"):
        train(_cfg(tiny_gpt2, run_dir))
    write_dual(DUAL, run_dir / "dual.json")
    write_table(_scores().drop(columns="cost"), run_dir / "scores.parquet")
    with pytest.raises(InputError, match="missing score column 'cost'") as e:
        train(_cfg(tiny_gpt2, run_dir))
    assert "\n" not in str(e.value)
    write_table(_scores(), run_dir / "scores.parquet")
    with pytest.raises(InputError, match="does not exist"):
        train(_cfg(str(tmp_path / "no_such_model"), run_dir))


def test_train_cli_smoke(tmp_path, tiny_gpt2):
    run_dir = _run_dir(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dualign", "train", "--model", tiny_gpt2, "--run-dir", str(run_dir),
           "--max-steps", "2", "--per-device-batch-size", "4", "--template", "plain", "--logging-steps", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "trained 2 steps" in res.stdout
    assert (run_dir / "policy" / "model.safetensors").exists() and len(_metrics(run_dir)) == 2
    assert (run_dir / "train.config.yaml").exists() and (run_dir / "train.meta.json").exists()
    bad = subprocess.run([*cmd, "--dual", str(tmp_path / "missing.json")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "missing.json" in bad.stderr

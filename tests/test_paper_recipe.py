"""The paper's recipe (configs/paper_mocan.yaml, configs/paper_pecan.yaml) end to end on stand-ins:
a tiny random LLaMA for Alpaca-7B and tiny random Beaver-layout score models (Safe-RLHF's
LlamaForScore: config keys, ``score_head``, safetensors and sharded ``.bin``), read without the
safe-rlhf package. Only model paths, data files and sizes are overridden, plus what a CPU cannot
run (vLLM, 4-bit weights); every other key is the paper config's own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dualign._infra.config import load_yaml, merge
from dualign.modeling.tiny import save_tiny_causal_lm, save_tiny_score_model
from dualign.pipeline import resolve_run_config, run_pipeline

CONFIGS = Path(__file__).parents[1] / "configs"
PROMPTS = ["How do I cook rice?", "How can I pick a lock?", "Write a poem about rain.", "Tell me a joke."]
TEXTS = [f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT: {r}" for p in PROMPTS
         for r in ("Rinse it, then simmer it.", "I can't help with that.", "Rain taps on the roof.")] * 10


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """π_ref (LLaMA, the Alpaca/Beaver template's texts in its tokenizer), a Beaver reward model in
    safetensors and a Beaver cost model in two .bin shards, and the prompt files."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("paper")
    policy = save_tiny_causal_lm(root / "alpaca", "llama", TEXTS, vocab_size=300, hidden=32, layers=2, heads=2)
    tok = AutoTokenizer.from_pretrained(policy)
    save_tiny_score_model(root / "reward", tok, "reward", weights="safetensors", seed=1)
    save_tiny_score_model(root / "cost", tok, "cost", weights="bin", seed=2)
    pd.DataFrame({"prompt": PROMPTS}).to_json(root / "prompts.jsonl", orient="records", lines=True)
    return {"model": str(policy), "reward": str(root / "reward"), "cost": str(root / "cost"),
            "prompts": str(root / "prompts.jsonl")}


def _recomputed_prediction(scores: pd.DataFrame, lam: float, beta: float) -> dict[str, float]:
    """E_{π_λ}[reward], E_{π_λ}[cost] averaged over prompts, π_λ ∝ π_ref · exp((reward − λ·cost)/β),
    computed here from the scores table alone."""
    out = {"reward": [], "cost": []}
    for _, group in scores.groupby("prompt_id", sort=False):
        logits = (group["reward"].to_numpy() - lam * group["cost"].to_numpy()) / beta
        w = np.exp(logits - logits.max())
        w /= w.sum()
        for name in out:
            out[name].append(float(w @ group[name].to_numpy()))
    return {name: float(np.mean(v)) for name, v in out.items()}


def test_paper_mocan_recipe_runs_every_stage_on_stand_ins(tmp_path, stand_ins):
    paper = load_yaml(CONFIGS / "paper_mocan.yaml")
    scorers = [f"reward=beaver:{stand_ins['reward']},higher_is_better",
               f"cost=beaver:{stand_ins['cost']},lower_is_better"]
    values = merge(paper, {
        "run_dir": str(tmp_path / "run"), "model": stand_ins["model"],
        "sample": {"prompts": stand_ins["prompts"], "max_prompts": 4, "num_samples": 4, "max_new_tokens": 8,
                   "batch_size": 16, "backend": "hf"},
        "score": {"scorers": scorers, "batch_size": 16},
        "dual": {"constraints": ["cost<=ref-0.001"], "bootstrap": 20},
        "train": {"load_in_4bit": False, "pairs_per_prompt": 3, "max_length": 64, "logging_steps": 1},
        "evaluate": {"prompts": stand_ins["prompts"], "scorers": scorers, "max_new_tokens": 8, "bootstrap": 20},
    })
    for key in ("template", "label", "lora", "merge_lora", "lora_r", "gradient_checkpointing", "learning_rate"):
        assert values["train"][key] == paper["train"][key]  # the recipe itself is the paper config's
    cfg = resolve_run_config(values)
    report = run_pipeline(cfg, log=lambda line: None)

    run = Path(values["run_dir"])
    for name in ("samples.parquet", "scores.parquet", "dual.json", "policy/adapter_config.json",
                 "metrics.jsonl", "eval/report.json"):
        assert (run / name).exists(), name
    for stage in ("sample", "score", "dual", "train", "evaluate"):
        assert (run / f"{stage}.done").exists(), stage
    record = json.loads((run / "sample.meta.json").read_text())["ref_logprob"]
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # train's numerics there
    assert record == {"model": stand_ins["model"], "revision": None, "template": "beaver", "dtype": "float32",
                      "autocast": "bfloat16" if gpu_bf16 else None, "quantization": None}
    scores = pd.read_parquet(run / "scores.parquet")
    assert len(scores) == 16 and scores[["reward", "cost"]].std().min() > 0
    dual = json.loads((run / "dual.json").read_text())
    again = _recomputed_prediction(scores, dual["lambdas"]["cost"], dual["beta"])
    assert dual["predicted"]["reward"] == pytest.approx(again["reward"], abs=1e-9)
    assert dual["predicted"]["cost"] == pytest.approx(again["cost"], abs=1e-9)
    assert dual["lambdas"]["cost"] > 0  # the margin binds, so λ* is not the trivial 0
    assert report["constraints"][0]["predicted"] == pytest.approx(dual["predicted"]["cost"])


def test_paper_pecan_recipe_runs_every_stage_on_stand_ins(tmp_path, stand_ins):
    paper = load_yaml(CONFIGS / "paper_pecan.yaml")
    rng = np.random.default_rng(0)
    answers = ["Rinse it, then simmer it.", "I can't help with that.", "Rain taps on the roof.", "Sure, here it is."]
    pku = pd.DataFrame([{"prompt": p, "response_0": answers[i % 4], "response_1": answers[(i + 1) % 4],
                         "better_response_id": int(rng.integers(2)), "safer_response_id": int(rng.integers(2)),
                         "is_response_0_safe": True, "is_response_1_safe": bool(i % 2)}
                        for i, p in enumerate(PROMPTS * 2)])
    prefs = tmp_path / "pku.jsonl"
    pku.to_json(prefs, orient="records", lines=True)
    values = merge(paper, {
        "run_dir": str(tmp_path / "run"), "model": stand_ins["model"],
        "sample": {"prompts": stand_ins["prompts"], "max_prompts": 4, "num_samples": 4, "max_new_tokens": 6,
                   "batch_size": 16, "backend": "hf"},
        "prealign": {"preferences": str(prefs), "train": {"max_length": 64, "num_epochs": 1, "learning_rate": 5e-2,
                                                           "per_device_batch_size": 2, "gradient_accumulation_steps": 1}},
        "score": {"preferences": str(prefs), "batch_size": 16},
        "dual": {"constraints": ["h_g>=ref+0.001"], "bootstrap": 20},
        "train": {"load_in_4bit": False, "max_length": 64, "logging_steps": 1},
        "evaluate": {"prompts": stand_ins["prompts"], "max_new_tokens": 6, "bootstrap": 20},
    })
    cfg = resolve_run_config(values)
    run_pipeline(cfg, log=lambda line: None)

    run = Path(values["run_dir"])
    for name in ("prealign/helpful/policy/config.json", "prealign/safe/policy/config.json", "scores.parquet",
                 "preference_scores.parquet", "dual.json", "policy/adapter_config.json", "eval/report.json"):
        assert (run / name).exists(), name
    for stage in ("sample", "prealign", "score", "dual", "train", "evaluate"):
        assert (run / f"{stage}.done").exists(), stage
    scores = pd.read_parquet(run / "scores.parquet")
    dual = json.loads((run / "dual.json").read_text())
    lam, beta = dual["lambdas"]["h_g"], dual["beta"]
    again = _recomputed_prediction(scores.rename(columns={"h_r": "reward"}).assign(cost=-scores["h_g"]), lam, beta)
    assert dual["predicted"]["h_r"] == pytest.approx(again["reward"], abs=1e-9)
    assert dual["predicted"]["h_g"] == pytest.approx(-again["cost"], abs=1e-9)
    assert scores["h_g"].std() > 0

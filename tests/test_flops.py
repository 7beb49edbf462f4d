"""FLOPs accounting against hand computation: parameter counts, per-stage FLOPs, the 7B projection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualign.modeling.flops import (
    forward_params,
    gpu_hours,
    model_forward_params,
    project_run,
    stage_flops,
)


def test_forward_params_of_tiny_gpt2_and_llama_match_their_architectures(tiny_gpt2, tiny_llama):
    from dualign.modeling.models import load_causal_lm

    g = json.loads((Path(tiny_gpt2) / "config.json").read_text())
    d, layers, vocab = g["n_embd"], g["n_layer"], g["vocab_size"]
    # per block: qkv d×3d + 3d, attention out d×d + d, MLP d×4d + 4d and 4d×d + d, two layer norms 4d;
    # the final layer norm 2d; the (tied) output projection V×d; token and position tables not counted
    gpt2 = layers * (12 * d * d + 13 * d) + 2 * d + vocab * d
    assert model_forward_params(tiny_gpt2) == gpt2 == forward_params(load_causal_lm(tiny_gpt2, device="cpu"))

    c = json.loads((Path(tiny_llama) / "config.json").read_text())
    d, inner, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
    # q and o d×d, k and v d×kv, gate/up/down 3·d×inner, two RMS norms; final norm; tied output V×d
    llama = layers * (2 * d * d + 2 * d * kv + 3 * d * inner + 2 * d) + d + vocab * d
    assert model_forward_params(tiny_llama) == llama


def test_stage_flops_are_two_n_t_forward_and_six_n_t_forward_backward():
    tokens = {"generation": 10, "scored": 10, "reference": 10, "forward": 5, "training": 20}
    flops = stage_flops(tokens, 100, [50, 30, None])       # a callable scorer (None) is not counted
    assert flops == {"generation": 2 * 100 * 10, "scoring": 2 * (50 + 30) * 10, "reference": 2 * 100 * 10,
                     "training": 6 * 100 * 20 + 2 * 100 * 5, "total": 2000 + 1600 + 2000 + 13000}


def test_projection_recosts_the_token_counts_at_7b_with_two_scorers_and_resident_memory():
    tokens = {"generation": 1e6, "scored": 1e6, "reference": 1e6, "training": 3e6}
    row = project_run(tokens, (1, 3), params=7e9)
    n = 7e9
    assert row["flops"]["generation"] == pytest.approx(2 * n * 1e6)
    assert row["flops"]["scoring"] == pytest.approx(2 * 2 * n * 1e6)    # a reward and a cost model
    assert row["flops"]["training"] == pytest.approx(6 * n * 3e6)
    assert row["flops"]["total"] == pytest.approx(n * (2e6 + 4e6 + 2e6 + 18e6))
    # policy trained (16 B/param) with π_ref, reward and cost frozen (2 B/param each)
    assert row["memory_gb"] == pytest.approx(7 * (16 + 3 * 2))
    hours = (2 * n * 1e6 / 0.1 + (4 * n * 1e6 + 2 * n * 1e6 + 18 * n * 1e6) / 0.4) / 989e12 / 3600
    assert row["h100_hours"] == pytest.approx(hours) == pytest.approx(gpu_hours(row["flops"]))

"""PeCAN: implicit-reward scorer, dual on implicit rewards (relative constraints only), PeCAN loss
population optimum, and an end-to-end run on tiny models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from dualign._infra.errors import ConfigError, InputError
from dualign._infra.io import write_json, write_table
from dualign.data.constraints import parse_constraint
from dualign.data.records import DualRecord
from dualign.data.score_table import validate_scores
from dualign.dual import DualConfig, run_dual, solve_constraints
from dualign.modeling.scorers import parse_scorer
from dualign.score import ScoreConfig, score, score_table

PROMPTS = ["How do I cook rice?", "How can I pick a lock?", "Write a poem about rain."]
RESPONSES = ["Rinse the rice, then simmer it.", "I can't help with that.", "Rain taps softly."]


@pytest.fixture(scope="module")
def tiny_policy(tiny_gpt2, tmp_path_factory) -> str:
    """π: tiny_gpt2 with every weight perturbed (a stand-in for a DPO-pre-aligned model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("policy")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(out)
    return str(out)


def _hand_logprob(model_dir: str, prompt: str, response: str) -> float:
    """log π(response + eos | "User: {prompt}\\nAssistant:") summed token by token, one unpadded row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    p_ids = tok(f"User: {prompt}\nAssistant:")["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p_ids + r_ids])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    return float(sum(logp[t - 1, ids[0, t]] for t in range(len(p_ids), ids.shape[1])))


# ----------------------------------------------------------------------------- implicit scorer
def test_parse_implicit_scorer_options():
    spec = parse_scorer("h_g=implicit:/m/pi_g,beta=0.25,higher_is_better")
    assert (spec.kind, spec.target, spec.beta, spec.direction) == ("implicit", "/m/pi_g", 0.25, "higher_is_better")
    with pytest.raises(ConfigError, match="beta= is an option of implicit scorers only"):
        parse_scorer("r=hf:/m/rm,beta=0.1")
    with pytest.raises(ConfigError, match="beta must be a positive number"):
        parse_scorer("h=implicit:/m/p,beta=-1")


def test_implicit_reward_equals_beta_times_hand_computed_logratio(tiny_gpt2, tiny_policy):
    ref = [_hand_logprob(tiny_gpt2, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    pol = [_hand_logprob(tiny_policy, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert max(abs(a - b) for a, b in zip(ref, pol, strict=True)) > 0.1  # the two models do differ
    df = pd.DataFrame({"prompt": PROMPTS, "response": RESPONSES, "ref_logprob": ref})
    out = score_table(df, [f"h=implicit:{tiny_policy},beta=0.5"], batch_size=2, template="plain",
                      progress=False)
    np.testing.assert_allclose(out["h"], 0.5 * (np.array(pol) - np.array(ref)), atol=1e-4)
    # without a ref_logprob column, π_ref's log-probs come from ref_model
    out2 = score_table(df.drop(columns="ref_logprob"), [f"h=implicit:{tiny_policy},beta=0.5"],
                       template="plain", progress=False, ref_model=tiny_gpt2)
    np.testing.assert_allclose(out2["ref_logprob"], ref, atol=1e-4)
    np.testing.assert_allclose(out2["h"], out["h"], atol=1e-4)
    with pytest.raises(InputError, match="implicit scorer 'h' needs a 'ref_logprob' column"):
        score_table(df.drop(columns="ref_logprob"), [f"h=implicit:{tiny_policy}"], progress=False)


def test_implicit_reward_of_reference_on_sample_stage_output_is_zero(tiny_gpt2, tmp_path):
    """Same template and tokens as the sample stage: π = π_ref gives h = 0 on every sample."""
    from dualign.sample import SampleConfig, sample

    prompts = tmp_path / "prompts.jsonl"
    pd.DataFrame({"prompt": PROMPTS}).to_json(prompts, orient="records", lines=True)
    run = tmp_path / "run"
    sample(SampleConfig(model=tiny_gpt2, prompts=str(prompts), run_dir=str(run), num_samples=2,
                        max_new_tokens=8, device="cpu"))
    score(ScoreConfig(scorers=[f"h0=implicit:{tiny_gpt2},beta=2"], run_dir=str(run), device="cpu"))
    scores = pd.read_parquet(run / "scores.parquet")
    assert np.abs(scores["h0"]).max() < 1e-4
    meta = json.loads((run / "score.meta.json").read_text())
    assert meta["scorers"]["h0"] == {"kind": "implicit", "target": tiny_gpt2, "direction": "higher_is_better",
                                     "declared": False, "beta": 2.0}


# ----------------------------------------------------------------------------- dual on implicit
def _implicit_scores(num_prompts=30, k=6, seed=0, shift_r=None, shift_g=None):
    rng = np.random.default_rng(seed)
    n = num_prompts * k
    h_r = rng.normal(size=n)
    h_g = -0.7 * h_r + 0.7 * rng.normal(size=n)
    pid = np.repeat(np.arange(num_prompts), k)
    if shift_r is not None:
        h_r = h_r + shift_r[pid]
        h_g = h_g + shift_g[pid]
    return pd.DataFrame({"prompt_id": pid, "h_r": h_r, "h_g": h_g})


def test_dual_lambda_invariant_to_per_prompt_constants_in_implicit_rewards():
    rng = np.random.default_rng(5)
    constraint = [parse_constraint("h_g>=ref+0.4")]
    base = solve_constraints(validate_scores(_implicit_scores(), ["h_r", "h_g"]), 0.5, "h_r", constraint)
    shifted_df = _implicit_scores(shift_r=rng.normal(scale=30, size=30), shift_g=rng.normal(scale=30, size=30))
    shifted = solve_constraints(validate_scores(shifted_df, ["h_r", "h_g"]), 0.5, "h_r", constraint)
    assert base.lambdas["h_g"] > 0.05  # the constraint binds
    assert shifted.lambdas["h_g"] == pytest.approx(base.lambdas["h_g"], rel=1e-6)
    assert shifted.predicted["kl"] == pytest.approx(base.predicted["kl"], rel=1e-6)
    gain = {k: d.predicted["h_g"] - d.reference["h_g"] for k, d in (("b", base), ("s", shifted))}
    assert gain["s"] == pytest.approx(gain["b"], abs=1e-6)


def _run_dir_with_implicit(tmp_path):
    write_table(_implicit_scores(), tmp_path / "scores.parquet")
    write_json({"scorers": {"h_r": {"kind": "implicit"}, "h_g": {"kind": "implicit"}}},
               tmp_path / "score.meta.json")
    return tmp_path


def test_dual_refuses_absolute_threshold_on_implicit_column(tmp_path):
    run = _run_dir_with_implicit(tmp_path)
    with pytest.raises(InputError, match="'h_g' is an implicit reward .* relative to π_ref, e.g. 'h_g>=ref\\+0.5'"):
        run_dual(DualConfig(constraints=["h_g>=0.5"], reward="h_r"), run)
    report = run_dual(DualConfig(constraints=["h_g>=ref+0.4"], reward="h_r", beta=0.5), run)
    assert report.lambdas["h_g"] > 0


def test_cli_dual_absolute_implicit_threshold_is_one_line_exit_2(tmp_path):
    run = _run_dir_with_implicit(tmp_path)
    res = subprocess.run([sys.executable, "-m", "dualign", "dual", str(run / "scores.parquet"),
                          "--reward", "h_r", "--constraint", "h_g>=0.5"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "implicit reward" in res.stderr


# ----------------------------------------------------------------------------- PeCAN loss
def test_pecan_population_optimum_is_reference_tilted_by_combined_implicit_reward():
    """Finite toy: 6 responses to one prompt, all pairs weighted by a data distribution μ ≠ π_ref.
    Minimising the expected PeCAN loss over every π gives π ∝ π_ref·exp((r̂ + λ·ĝ)/β) with
    r̂ = β_r·log(π_r/π_ref), ĝ = β_g·log(π_g/π_ref) (the pre-aligned models' implicit rewards)."""
    from dualign.methods.dpo import pairs_from_preferences
    from dualign.train import LOSSES

    rng = np.random.default_rng(0)
    n, beta, beta_r, beta_g, lam = 6, 0.5, 0.3, 0.2, 0.8
    pi_ref, pi_r, pi_g, mu = (rng.dirichlet(np.ones(n)) for _ in range(4))
    r_hat, g_hat = beta_r * np.log(pi_r / pi_ref), beta_g * np.log(pi_g / pi_ref)
    i, j = np.triu_indices(n, 1)
    prefs = pd.DataFrame({"prompt": "x", "response_0": [str(a) for a in i], "response_1": [str(b) for b in j],
                          "h_r_0": r_hat[i], "h_r_1": r_hat[j], "h_g_0": g_hat[i], "h_g_1": g_hat[j]})
    dual = DualRecord(beta=beta, reward="h_r", constraints=["h_g>=ref+0.1"], lambdas={"h_g": lam})
    margin = torch.tensor(pairs_from_preferences(prefs, dual)["target_margin"].to_numpy())
    weight = torch.tensor(mu[i] * mu[j])
    log_ref = torch.tensor(np.log(pi_ref))
    theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, 0)
        loss_fn, _ = LOSSES["pecan"]
        losses, _ = loss_fn(logp[i], logp[j], log_ref[i], log_ref[j], margin, beta, "soft", torch.Generator())
        loss = (weight * losses).sum() / weight.sum()
        loss.backward()
        return loss

    opt.step(closure)
    target = pi_ref * np.exp((r_hat + lam * g_hat) / beta)
    assert (target / target.sum()).max() < 0.5  # not collapsed: the check below has teeth
    np.testing.assert_allclose(torch.softmax(theta, 0).detach().numpy(), target / target.sum(), atol=1e-6)
    # the official code's labels σ(Δlog(π_r/π_ref) + λ·Δlog(π_g/π_ref)) drop β_r, β_g: another optimum
    unscaled = pi_ref * np.exp((np.log(pi_r / pi_ref) + lam * np.log(pi_g / pi_ref)) / beta)
    assert np.abs(unscaled / unscaled.sum() - target / target.sum()).max() > 0.05


# ----------------------------------------------------------------------------- end to end
PREFS = [  # (prompt, response_0, response_1, better, safer, safe_0, safe_1)
    ("How do I cook rice?", "Rinse the rice, then simmer it for fifteen minutes.", "I can't help with that.",
     0, 0, True, True),
    ("How can I pick a lock?", "Use a tension wrench and a pick.", "I can't help with that, but a locksmith can.",
     0, 1, False, True),
    ("Write a poem about rain.", "No.", "Rain taps softly on the roof at night.", 1, 1, True, True),
    ("How can I hurt someone?", "I can't help with that.", "Hit them hard when they are alone.",
     1, 0, True, False),
    ("Tell me a joke.", "Why did the chicken cross the road?", "I can't help with that.", 0, 0, True, True),
    ("How do I steal a car?", "Break the window and hotwire it.", "I can't help with that.", 0, 1, False, True),
]


def test_pecan_end_to_end_on_tiny_models(tiny_gpt2, tmp_path):
    """sample → DPO π_r, π_g on the two views → implicit scores → dual → pecan, on tiny models."""
    from dualign.prealign import PrealignConfig, implicit_scorers, prealign
    from dualign.sample import SampleConfig, sample
    from dualign.train import TrainConfig, train

    prefs_path = tmp_path / "prefs.jsonl"
    cols = ["prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
            "is_response_0_safe", "is_response_1_safe"]
    pd.DataFrame(PREFS, columns=cols).to_json(prefs_path, orient="records", lines=True)
    prompts = tmp_path / "prompts.jsonl"
    pd.DataFrame({"prompt": [p[0] for p in PREFS]}).to_json(prompts, orient="records", lines=True)
    run = tmp_path / "run"
    sample(SampleConfig(model=tiny_gpt2, prompts=str(prompts), run_dir=str(run), num_samples=4,
                        max_new_tokens=8, device="cpu"))
    fast = {"learning_rate": 3e-3, "max_steps": 12, "per_device_batch_size": 6, "warmup_ratio": 0.0,
            "logging_steps": 4, "device": "cpu"}
    policies = prealign(PrealignConfig(preferences=str(prefs_path), model=tiny_gpt2, run_dir=str(run),
                                       beta_r=0.1, beta_g=0.2, train=fast))
    score(ScoreConfig(scorers=implicit_scorers(policies), run_dir=str(run), preferences=str(prefs_path),
                      device="cpu"))
    assert json.loads((run / "score.meta.json").read_text())["scorers"]["h_g"]["beta"] == 0.2

    scored = pd.read_parquet(run / "preference_scores.parquet")
    better = np.array([p[3] for p in PREFS])
    safer = np.array([p[4] for p in PREFS])
    # sign conventions: π_r's implicit reward prefers the better response, π_g's the safer one
    h_r = scored[["h_r_0", "h_r_1"]].to_numpy()
    h_g = scored[["h_g_0", "h_g_1"]].to_numpy()
    rows = np.arange(len(PREFS))
    assert (h_r[rows, better] > h_r[rows, 1 - better]).all()
    assert (h_g[rows, safer] > h_g[rows, 1 - safer]).all()
    np.testing.assert_allclose(scored["ref_logprob_0"],
                               [_hand_logprob(tiny_gpt2, p[0], p[1]) for p in PREFS], atol=1e-4)

    scores = pd.read_parquet(run / "scores.parquet")
    ref_mean = scores.groupby("prompt_id")["h_g"].mean().mean()
    reachable = scores.groupby("prompt_id")["h_g"].max().mean()
    offset = 0.5 * (reachable - ref_mean)
    with pytest.raises(InputError, match="implicit reward"):
        run_dual(DualConfig(constraints=[f"h_g>={ref_mean + offset}"], reward="h_r", beta=0.1), run)
    report = run_dual(DualConfig(constraints=[f"h_g>=ref+{offset}"], reward="h_r", beta=0.1), run)
    lam = report.lambdas["h_g"]
    assert report.feasible and np.isfinite(lam) and lam >= 0

    summary = train(TrainConfig(model=tiny_gpt2, run_dir=str(run), method="pecan",
                                preferences=str(run / "preference_scores.parquet"), **fast))
    pairs = pd.read_parquet(run / "pairs.parquet")
    np.testing.assert_allclose(pairs["target_margin"], (scored["h_r_0"] - scored["h_r_1"])
                               + lam * (scored["h_g_0"] - scored["h_g_1"]), rtol=1e-12)
    np.testing.assert_allclose(pairs["ref_logprob_a"], scored["ref_logprob_0"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.01
    assert summary["output_dir"] == str(run / "policy")
    assert "method: pecan" in (run / "policy" / "README.md").read_text()

    # the other pair source: all within-prompt pairs of π_ref's samples, margins from their implicit rewards
    on_samples = tmp_path / "on_samples"
    on_samples.mkdir()
    for name in ("scores.parquet", "dual.json", "sample.config.yaml"):
        shutil.copyfile(run / name, on_samples / name)
    train(TrainConfig(model=tiny_gpt2, run_dir=str(on_samples), method="pecan", pairs_from="scores",
                      label="regression", group_by_prompt=True, **{**fast, "max_steps": 3}))
    pairs = pd.read_parquet(on_samples / "pairs.parquet")
    assert len(pairs) == scores["prompt_id"].nunique() * 6  # all pairs of K=4 samples
    first = scores[scores["prompt_id"] == pairs["prompt_id"].iloc[0]]
    r_lam = (first["h_r"] + lam * first["h_g"]).to_numpy()
    assert pairs["target_margin"].iloc[0] == pytest.approx(r_lam[0] - r_lam[1], rel=1e-12)


def test_pecan_bad_inputs_are_one_line(tmp_path):
    from dualign.train import TrainConfig, load_pairs

    write_json({"beta": 0.1, "reward": "h_r", "constraints": ["h_g>=ref+0.1"], "lambdas": {"h_g": 0.5}},
               tmp_path / "dual.json")
    base = {"prompt": ["p"], "response_0": ["a"], "response_1": ["b"], "h_r_0": [0.1], "h_r_1": [0.2],
            "h_g_0": [0.3]}
    write_table(pd.DataFrame(base), tmp_path / "no_h_g_1.parquet")
    write_table(pd.DataFrame({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}), tmp_path / "trl.jsonl")

    def cfg(**kw):
        return TrainConfig(model="unused", run_dir=str(tmp_path), method="pecan", **kw)

    with pytest.raises(InputError, match="missing score column 'h_g_1'"):
        load_pairs(cfg(preferences=str(tmp_path / "no_h_g_1.parquet")))
    with pytest.raises(InputError, match="pecan needs prompt/response_0/response_1 pairs"):
        load_pairs(cfg(preferences=str(tmp_path / "trl.jsonl")))
    with pytest.raises(InputError, match="preference_scores.parquet: file not found"):
        load_pairs(cfg())
    with pytest.raises(ConfigError, match="pecan uses soft or bernoulli labels on preference pairs"):
        load_pairs(cfg(label="regression"))
    with pytest.raises(ConfigError, match="pairs_from=scores trains on the scores table"):
        load_pairs(cfg(pairs_from="scores", preferences=str(tmp_path / "trl.jsonl")))
    write_table(pd.DataFrame({**base, "h_g_1": [0.4]}), tmp_path / "ok.parquet")
    pairs, _, _ = load_pairs(cfg(preferences=str(tmp_path / "ok.parquet")))
    assert pairs["target_margin"].tolist() == pytest.approx([(0.1 - 0.2) + 0.5 * (0.3 - 0.4)])
    res = subprocess.run([sys.executable, "-m", "dualign", "train", "--model", "unused", "--run-dir",
                          str(tmp_path), "--method", "pecan", "--preferences", str(tmp_path / "trl.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "pecan needs prompt/response_0/response_1" in res.stderr


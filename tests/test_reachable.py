"""The reachable tilt (``dual: {tilt: reachable}``): the within-prompt centring and the cross-fitted
ridge against hand computation, the fitted columns on a world whose learnable part is known, the
solve it feeds (equal to the plain dual when the features carry the score, infeasible when they
carry nothing), the evaluation noise it adds to a confidence plan, and π_ref's features with their
cache, on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dualign._infra.errors import InfeasibleConstraintError
from dualign._infra.segments import Segments
from dualign.cli import main
from dualign.data.constraints import parse_constraint
from dualign.data.score_table import read_scores
from dualign.dual import DualConfig, run_dual, solve_constraints
from dualign.dual.reachable import (
    cross_fitted_ridge,
    prompt_folds,
    reachable_columns,
    within_prompt,
)
from dualign.dual.solver import evaluation_se, flat_samples


def test_within_prompt_subtracts_each_prompts_mean():
    ids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    x = np.arange(9.0) ** 1.5
    h = np.column_stack([x, -2 * x + 1])
    seg = Segments.of(ids)
    centred, means = within_prompt(seg, h)
    expected = pd.DataFrame(h).groupby(ids).transform("mean").to_numpy()
    np.testing.assert_allclose(means, expected, rtol=1e-12)
    np.testing.assert_allclose(centred, h - expected, rtol=1e-12)
    np.testing.assert_allclose(within_prompt(seg, x)[1], expected[:, 0], rtol=1e-12)


def test_cross_fitted_ridge_predicts_each_fold_from_the_others_by_the_normal_equations():
    rng = np.random.default_rng(0)
    h, y = rng.normal(size=(40, 3)), rng.normal(size=40)
    fold = np.repeat([0, 1, 2, 3], 10)
    alpha = 0.3
    pred = cross_fitted_ridge(h, y, fold, alpha)
    for f in range(4):
        a, t = h[fold != f], y[fold != f]
        lam = alpha * np.mean(np.sum(a * a, axis=0))   # α × the mean diagonal of AᵀA
        w = np.linalg.inv(a.T @ a + lam * np.eye(3)) @ a.T @ t
        np.testing.assert_allclose(pred[fold == f], h[fold == f] @ w, rtol=1e-10)
    # a fold's own targets never enter its prediction
    y2 = y.copy()
    y2[fold == 2] += 100.0
    np.testing.assert_allclose(cross_fitted_ridge(h, y2, fold, alpha)[fold == 2], pred[fold == 2], rtol=1e-12)


def test_reachable_columns_keep_prompt_means_and_recover_the_learnable_share():
    """s = prompt effect + ĥᵀw (learnable, variance 1) + noise (variance 1): the cross-fitted R² is
    the learnable share, 0.5 (±0.03 at 6,000 rows), and the prompt means are kept exactly."""
    rng = np.random.default_rng(1)
    n_prompts, k, d = 750, 8, 4
    ids = np.repeat(np.arange(n_prompts), k)
    h = rng.normal(size=(ids.size, d))
    w = rng.normal(size=d)
    w /= np.linalg.norm(w)
    s = np.repeat(rng.normal(scale=3, size=n_prompts), k) + h @ w + rng.normal(size=ids.size)
    seg = Segments.of(ids)
    fit = reachable_columns(seg, {"cost": s}, h, alpha=1e-3, folds=5, seed=0)
    # within-prompt centring shrinks both parts by (k−1)/k, so the share stays 1/2
    assert fit.r2["cost"] == pytest.approx(0.5, abs=0.03)
    # the noise's variance 1 (±0.05: the estimate's own spread is about 0.02 at 5,250 degrees of
    # freedom), not the (k−1)/k that dividing by n instead of n − N (N prompt means taken out) gives
    assert fit.residual_variance["cost"] == pytest.approx(1.0, rel=0.05)
    np.testing.assert_allclose(within_prompt(seg, fit.columns["cost"])[1], within_prompt(seg, s)[1], atol=1e-9)
    folds = prompt_folds(seg, 5, 0)
    assert all(len(set(folds[ids == p])) == 1 for p in range(20))   # a prompt's samples share a fold


def _table(n_prompts=300, k=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"p{i:04d}" for i in range(n_prompts)], k)
    cost = np.repeat(rng.normal(size=n_prompts), k) + rng.normal(size=ids.size)
    reward = 0.5 * cost + rng.normal(size=ids.size)
    return pd.DataFrame({"prompt_id": ids, "prompt": [f"q{i}" for i in ids],
                         "response": [f"a{j}" for j in range(ids.size)], "reward": reward, "cost": cost})


def test_features_that_carry_the_score_give_the_plain_dual_and_features_that_carry_nothing_refuse(tmp_path):
    df = _table()
    path = tmp_path / "scores.parquet"
    df.sample(frac=1.0, random_state=3).to_parquet(path)   # file order is not the grouped order
    shuffled = pd.read_parquet(path)
    scores = read_scores(path, ["reward", "cost"])
    constraints = [parse_constraint("cost<=ref-0.3")]
    plain = solve_constraints(scores, 1.0, "reward", constraints)
    carry = shuffled[["reward", "cost"]].to_numpy()   # features in the file's row order
    reach = solve_constraints(scores, 1.0, "reward", constraints, features=carry, ridge_alpha=1e-9)
    assert reach.lambdas["cost"] == pytest.approx(plain.lambdas["cost"], rel=1e-5)
    assert reach.predicted["reward"] == pytest.approx(plain.predicted["reward"], rel=1e-5)
    assert reach.reachable.r2 == pytest.approx({"reward": 1.0, "cost": 1.0}, abs=1e-8)
    assert reach.reachable.samples_predicted == pytest.approx(plain.predicted, rel=1e-5)
    noise = np.random.default_rng(9).normal(size=(len(shuffled), 3))
    with pytest.raises(InfeasibleConstraintError, match="cost"):
        solve_constraints(scores, 1.0, "reward", constraints, features=noise, ridge_alpha=10.0)


def test_reachable_tilt_asks_a_larger_lambda_when_half_the_score_is_noise(tmp_path):
    """A reward constant within each prompt and a cost whose within-prompt spread is half learnable,
    half noise, features that see the learnable half: a tilt of variance-v scores moves the mean by
    about λ·v/β, so the reachable tilt (v ≈ 1, not 2) needs about twice the λ for the same change,
    and at that λ the plain K-sample tilt predicts about twice the change that was asked."""
    rng = np.random.default_rng(4)
    df = _table(400, 8, seed=4)
    learn = rng.normal(size=len(df))
    df["cost"] = np.repeat(rng.normal(size=400), 8) + learn + rng.normal(size=len(df))
    df["reward"] = np.repeat(rng.normal(size=400), 8)
    path = tmp_path / "scores.parquet"
    df.to_parquet(path)
    scores = read_scores(path, ["reward", "cost"])
    constraints = [parse_constraint("cost<=ref-0.5")]
    plain = solve_constraints(scores, 1.0, "reward", constraints)
    reach = solve_constraints(scores, 1.0, "reward", constraints, features=learn[:, None])
    assert 0.4 < reach.reachable.r2["cost"] < 0.6
    assert 1.6 < reach.lambdas["cost"] / plain.lambdas["cost"] < 2.4
    asked = reach.reachable.samples_predicted["cost"] - reach.reference["cost"]
    assert -1.2 < asked < -0.8 and reach.predicted["cost"] - reach.reference["cost"] == pytest.approx(-0.5, abs=1e-6)


def test_residual_variance_adds_its_noise_to_the_evaluation_se():
    """SE² grows by ε²·(2 for a relative threshold, 1 for an absolute one)/(n_e·k_e)."""
    rng = np.random.default_rng(2)
    seg = Segments.rectangular(50, 4)
    samples = flat_samples(seg, rng.normal(size=200), rng.normal(size=(200, 2)), None, np.arange(50))
    lam, rel = np.array([0.4, 0.2]), np.array([True, False])
    base = evaluation_se(samples, lam, 1.0, rel, 32, 2)
    more = evaluation_se(samples, lam, 1.0, rel, 32, 2, residual_variance=np.array([0.7, 0.7]))
    np.testing.assert_allclose(more**2 - base**2, [2 * 0.7 / 64, 0.7 / 64], rtol=1e-10)


def test_run_dual_computes_pi_refs_features_once_and_records_the_reachable_fit(tiny_gpt2, tmp_path, capsys):
    df = _table(60, 4, seed=5)
    bad = np.random.default_rng(6).random(len(df)) < 0.5   # the cost follows the words of the response
    df["response"] = np.where(bad, "no, never, no", "sure, here it is")
    df["cost"] += 2.0 * bad
    df.to_parquet(tmp_path / "scores.parquet")
    cfg = DualConfig(constraints=["cost<=ref-0.2"], beta=1.0, tilt="reachable", model=tiny_gpt2,
                     template="plain", device="cpu", ridge_alpha=1.0)
    record = run_dual(cfg, tmp_path)
    cache = tmp_path / "reachable_features.safetensors"
    written = cache.stat().st_mtime_ns
    saved = json.loads((tmp_path / "dual.json").read_text())
    assert set(saved["reachable"]["r2"]) == {"reward", "cost"} and saved["reachable"]["r2"]["cost"] > 0.3
    assert saved["reachable"]["samples_predicted"]["cost"] == pytest.approx(record.reachable.samples_predicted["cost"])
    assert record.predicted["cost"] == pytest.approx(record.thresholds["cost"], abs=1e-6)
    again = run_dual(cfg, tmp_path)
    assert cache.stat().st_mtime_ns == written and again.lambdas == record.lambdas
    from safetensors.numpy import load_file
    features = load_file(str(cache))["features"]
    assert features.shape[0] == len(df) and features.dtype == np.float32
    run_dual(DualConfig(**{**cfg.__dict__, "template": "none"}), tmp_path)   # other texts → recomputed
    assert cache.stat().st_mtime_ns != written
    with pytest.raises(Exception, match="model"):
        run_dual(DualConfig(constraints=["cost<=ref-0.2"], tilt="reachable"), tmp_path / "other")

    # `dualign plan --tilt reachable`: the same solve at each threshold, on the run's cached features
    run_dual(cfg, tmp_path)
    out = tmp_path / "plan"
    args = ["plan", str(tmp_path / "scores.parquet"), "--constraint", "cost<=ref-{0.1:0.3:3}", "--beta", "1.0",
            "--out", str(out), "--tilt", "reachable", "--model", tiny_gpt2, "--template", "plain", "--device", "cpu",
            "--ridge-alpha", "1.0"]
    assert main(args[:8] + ["--tilt", "reachable"]) == 2
    assert "--model" in capsys.readouterr().err and not out.exists()
    no_sweep = [*args[:3], "cost<=ref-0.2", *args[4:]]   # refused before π_ref's forward pass
    assert main(no_sweep) == 2
    assert "exactly one constraint with a sweep" in capsys.readouterr().err and not out.exists()
    assert main(args) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert plan["tilt"] == "reachable" and plan["reachable_r2"] == pytest.approx(saved["reachable"]["r2"])
    middle = next(p for p in plan["points"] if p["offset"] == pytest.approx(-0.2))
    assert middle["lambda"] == pytest.approx(saved["lambdas"]["cost"], rel=1e-6)
    assert middle["predicted_reward"] == pytest.approx(saved["predicted"]["reward"], rel=1e-6)
    assert not (out / "reachable_features.safetensors").exists()   # the run's cache was read, not copied
    assert "from the reachable tilt" in printed and "R²" in printed

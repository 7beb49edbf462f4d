"""The statistics of the plan (issue #26): the evaluation's predicted standard error against the
exact one of a known world, the reachable fit refitted on prompt resamples, the CIs of what the
fine-tune is trained towards, and the report's comparison of a prediction with an achieved change."""

from __future__ import annotations

import numpy as np
import pytest

from dualign._infra.segments import Segments
from dualign.data.constraints import parse_constraint
from dualign.dual.reachable import (
    cross_fitted_ridge,
    linearized_refit,
    reachable_columns,
    refit_columns,
)
from dualign.dual.solver import evaluation_se, flat_samples


def _discrete_world(seed: int = 0, prompts: int = 3000, responses: int = 64):
    """Each prompt has ``responses`` equally likely answers under π_ref with known (r, g)."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(prompts, responses))
    g = 0.5 * rng.normal(size=(prompts, 1)) + h + 0.5 * rng.normal(size=(prompts, responses))
    r = 0.7 * h + rng.normal(size=(prompts, responses))
    return rng, r, g


@pytest.mark.parametrize("relative", [True, False])
def test_evaluation_se_matches_the_exact_se_of_a_discrete_world(relative):
    """π_λ ∝ π_ref·exp((r + λg)/β) over each prompt's 64 answers gives the exact SE of an evaluation
    of 256 prompts × 8 responses; the prediction from 500 prompts × K = 8 samples, averaged over 40
    draws, lies within 3% of it (the draws' spread puts the mean's s.e. near 0.4%). At this mild
    tilt the old estimate ran about 4% narrow for a paired threshold (the plug-in within-prompt
    variances, low by (K−1)/K) and about 16% wide for an absolute one (the noise of μ̂(x) in the
    between-prompt variance)."""
    rng, r, g = _discrete_world()
    beta, lam = 5.0, 0.2
    logits = (r + lam * g) / beta
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    mu_l, mu_r = (p * g).sum(1), g.mean(1)
    var_l, var_r = (p * g * g).sum(1) - mu_l**2, g.var(1)
    n_e, k_e = 256, 8
    diff, within = (mu_l - mu_r, var_l + var_r) if relative else (mu_l, var_l)
    exact = np.sqrt(diff.var() / n_e + within.mean() / (n_e * k_e))
    predicted = []
    for _ in range(40):
        rows = rng.choice(len(g), 500, replace=False)
        picks = rng.integers(0, g.shape[1], size=(500, 8))
        samples = flat_samples(Segments.rectangular(500, 8), r[rows[:, None], picks].ravel(),
                               g[rows[:, None], picks].reshape(-1, 1), None, np.arange(500))
        predicted.append(evaluation_se(samples, np.array([lam]), beta, np.array([relative]), n_e, k_e)[0])
    assert np.mean(predicted) / exact == pytest.approx(1.0, abs=0.03)


def _reachable_problem(n_prompts=150, k=6, d=30, seed=0):
    """Scores with a learnable part in 2 of d noisy features and as much noise again."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n_prompts), k)
    h = rng.normal(size=(ids.size, d))
    cost = np.repeat(rng.normal(size=n_prompts), k) + h[:, 0] + rng.normal(size=ids.size)
    reward = 0.8 * h[:, 0] + 0.6 * h[:, 1] + rng.normal(size=ids.size)
    return ids, h, {"reward": reward, "cost": cost}


def test_refit_columns_equals_the_fit_on_the_resample_with_its_rows_repeated():
    ids, h, cols = _reachable_problem()
    seg = Segments.of(ids)
    fit = reachable_columns(seg, cols, h, alpha=1e-2, seed=3)
    counts = np.random.default_rng(1).multinomial(seg.num, np.full(seg.num, 1 / seg.num))
    rows = np.concatenate([np.flatnonzero(ids == x) for x in range(seg.num) for _ in range(counts[x])])
    naive_fold = fit.fold[rows]  # a prompt's copies stay in its fold
    pred = {}
    for j, name in enumerate(fit.columns):
        s_within = fit.s_within[rows, j]
        pred[name] = fit.s_mean[rows, j] + cross_fitted_ridge(fit.h_within[rows], s_within, naive_fold, 1e-2)
    exact = refit_columns(seg, fit, counts)
    drawn = np.repeat(counts > 0, 6)
    for j, name in enumerate(fit.columns):
        np.testing.assert_allclose(exact[rows, j], pred[name], rtol=1e-9, atol=1e-9)
    # with every prompt drawn once the refit is the fit itself, exactly and to first order
    ones = np.ones(seg.num, dtype=np.int64)
    np.testing.assert_allclose(refit_columns(seg, fit, ones), np.stack(list(fit.columns.values()), 1), atol=1e-9)
    np.testing.assert_allclose(linearized_refit(seg, fit)(ones), np.stack(list(fit.columns.values()), 1), atol=1e-9)
    # the first-order refit moves s̃ as the exact one does: its shift explains ≥ 90% of the exact
    # shift's sum of squares on the drawn rows (a one-step error, second order in the counts' change)
    base = np.stack(list(fit.columns.values()), 1)[drawn]
    shift, approx = exact[drawn] - base, linearized_refit(seg, fit)(counts)[drawn] - base
    assert np.sum((approx - shift) ** 2) < 0.1 * np.sum(shift**2)


def test_the_fit_error_widens_the_reachable_dual_ci_and_the_target_gets_its_own_ci():
    """Refitting the ridge on each prompt resample puts the fit's own error into λ*'s CI: with 30
    features of which 28 are noise, on 900 rows, the CI is wider than with ŵ held fixed (old
    behaviour); the K-sample tilt of the raw scores at λ* (what the fine-tune trains towards) gets
    its bootstrap CI, which holds its point estimate."""
    import dataclasses

    from dualign.data.score_table import Scores
    from dualign.dual.stage import reachable_fit, solve_constraints

    ids, h, cols = _reachable_problem(seed=2)
    scores = Scores(prompt_index=ids, columns=cols, sample_weights=None, source="synthetic",
                    rows=np.arange(1, ids.size + 1), prompt_ids=np.unique(ids).astype(str))
    constraint = [parse_constraint("cost<=ref-0.3")]
    fit = reachable_fit(scores, ["reward", "cost"], h, 1e-2)
    refit = solve_constraints(scores, 1.0, "reward", constraint, bootstrap=200, fit=fit)
    fixed = solve_constraints(scores, 1.0, "reward", constraint, bootstrap=200,
                              fit=dataclasses.replace(fit, h_within=None))
    width = {k: np.diff(r.ci.lambdas["cost"])[0] for k, r in (("refit", refit), ("fixed", fixed))}
    assert width["refit"] > 1.2 * width["fixed"]
    assert refit.reachable.fit_resampled and not fixed.reachable.fit_resampled
    target, ci = refit.reachable.samples_predicted, refit.reachable.samples_predicted_change_ci
    for key in ("reward", "cost"):
        change = target[key] - refit.reference[key]
        assert ci[key][0] < change < ci[key][1]
    assert refit.reachable.samples_predicted_ci["kl"][0] < target["kl"] < refit.reachable.samples_predicted_ci["kl"][1]


def test_the_model_card_predicts_what_the_report_predicts_and_names_the_target_and_the_plan():
    """On the reachable tilt the card predicts the plan's means and the trained target's KL (the
    report's prediction: reward -2.29, cost -4, KL 0.63 here), and names the target
    (reachable.samples_predicted, with its CIs) and the plan; on the K-sample tilt dual.json's
    predicted is the target."""
    from dualign.data.records import DualRecord, ReachableTilt
    from dualign.train import TrainConfig, model_card

    cfg = TrainConfig(run_dir="out", model="m", output_dir="out/policy")
    dual = DualRecord(beta=10.0, reward="reward", constraints=["cost<=ref-4"], lambdas={"cost": 1.2},
                      predicted={"reward": -2.29, "cost": -4.0, "kl": 0.43}, reference={"reward": 0.0, "cost": 0.0, "kl": 0.0})
    plain = model_card(cfg, dual, {}, 10)
    assert 'trained towards (dual.json): {"reward": -2.29, "cost": -4.0, "kl": 0.43}' in plain
    dual.reachable = ReachableTilt(r2={}, residual_sd={}, samples_predicted={"reward": -2.9, "cost": -5.1, "kl": 0.63},
                                   samples_predicted_ci={"kl": [0.55, 0.7]})
    card = model_card(cfg, dual, {}, 10)
    lines = card.splitlines()
    deliver = next(line for line in lines if line.startswith("- predicted to deliver"))
    target = next(line for line in lines if "trained towards" in line)
    planned = next(line for line in lines if line.startswith("- planned"))
    assert '{"reward": -2.29, "cost": -4.0, "kl": 0.63}' in deliver
    assert '"kl": 0.63' in target and '"kl": [0.55, 0.7]' in target and '"kl": 0.43' not in target
    assert '"kl": 0.43' in planned


def test_recalibration_plans_on_the_runs_reachable_tilt_and_its_dual_json_keeps_it(tmp_path):
    """A run planned on the reachable tilt: recalibration's planning scores are the dual's fitted
    ones (at λ* they predict exactly the dual's plan), and the dual.json of a round keeps
    ``reachable`` with the original scores' tilt at λ (at λ*: the dual's samples_predicted), so the
    report still says tilt: reachable (it said samples, planned on the raw scores)."""
    from safetensors.numpy import save_file

    from dualign.data.example import example_scores
    from dualign.data.records import read_dual, write_dual
    from dualign.data.score_table import read_scores
    from dualign.dual.stage import solve_constraints
    from dualign.methods.objective import load_objective, method_dual
    from dualign.recalibrate import planning_scores, round_dual

    table = example_scores(120, 6, seed=4)
    table.to_parquet(tmp_path / "scores.parquet")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(table), 12)).astype(np.float32)
    features[:, 0] += table["cost"].to_numpy()
    save_file({"features": features}, str(tmp_path / "reachable_features.safetensors"))
    scores = read_scores(tmp_path / "scores.parquet", ["reward", "cost"])
    record = solve_constraints(scores, 1.0, "reward", [parse_constraint("cost<=ref-0.4")], features=features,
                               ridge_alpha=1e-2, seed=5)
    write_dual(record, tmp_path / "dual.json")
    dual = read_dual(tmp_path / "dual.json")
    objective = load_objective(tmp_path / "dual.json")
    lambdas = np.array([dual.lambdas["cost"]])
    planned = planning_scores(tmp_path, table, dual)
    at_star = method_dual(objective, planned, lambdas, 1.0, "recalibrate")
    assert at_star.predicted["cost"] == pytest.approx(dual.predicted["cost"], abs=1e-6)
    assert method_dual(objective, table, lambdas, 1.0, "recalibrate").predicted["cost"] != \
        pytest.approx(dual.predicted["cost"], abs=1e-3)      # the raw scores' tilt is another prediction
    out = round_dual(objective, table, planned, lambdas, dual.reachable)
    assert out.reachable is not None
    for key in ("reward", "cost", "kl"):
        assert out.reachable.samples_predicted[key] == pytest.approx(dual.reachable.samples_predicted[key], abs=1e-6)


def test_fresh_prompts_are_repeatable_and_avoid_every_excluded_prompt():
    """The fresh evaluation set of a build: the same rows from the same seed, none of the build's
    splits nor of an excluded set among them, another set from another seed, harmful about as
    often as the world's harmful_fraction (0.5 ± 0.1 at 256 prompts: 3 s.d.)."""
    from dualign.world.config import world_config
    from dualign.world.corpus import fresh_prompts, make_prompts

    build = world_config("small", {"seed": 101})
    exclude = {r["prompt"] for rows in make_prompts(build).values() for r in rows}
    exclude |= {r["prompt"] for r in make_prompts(world_config("small"))["eval"]}
    rows = fresh_prompts(build, 256, exclude)
    assert rows == fresh_prompts(build, 256, exclude)
    texts = [r["prompt"] for r in rows]
    assert len(set(texts)) == 256 and not set(texts) & exclude
    other = {r["prompt"] for r in fresh_prompts(world_config("small", {"seed": 102}), 256, exclude)}
    assert len(other & set(texts)) < 128
    assert abs(np.mean([r["harmful"] for r in rows]) - build.harmful_fraction) < 0.1
    assert rows[0]["prompt_id"] == "fresh-00000" and {"topic", "harmful"} <= set(rows[0])


def test_build_rates_counts_each_criterion_per_variant_and_the_margins_paired_cost():
    """scripts/build_rates.py's tally on hand-made rows: counts per variant, and the margin's cost
    as the mean of confidence − default over the same (build, seed) pairs only."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_rates.py"
    spec = importlib.util.spec_from_file_location("build_rates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def row(build, variant, seed, met, kl, reward):
        return {"build": build, "variant": variant, "train seed": seed, "met": met, "met confidently": False,
                "KL within 1.25×": True, "reward prediction in CI": met, "helpfulness within 0.05": True,
                "KL achieved": kl, "reward change achieved": reward}

    rows = [row(101, "default", 0, True, 0.5, -2.0), row(101, "default", 1, False, 0.7, -1.0),
            row(101, "confidence 0.95", 0, True, 0.9, -3.0), row(102, "confidence 0.95", 0, True, 2.0, -9.0),
            row(101, "tilt samples", 0, False, 0.4, 0.0)]
    table = module.rates(rows)
    assert table["default"]["met"] == [1, 2] and table["default"]["KL within 1.25×"] == [2, 2]
    assert table["confidence 0.95"]["met"] == [2, 2] and table["tilt samples"]["met"] == [0, 1]
    cost = table["margin cost (confidence 0.95 − default, achieved, mean)"]
    assert cost["KL"] == pytest.approx(0.4) and cost["reward change"] == pytest.approx(-1.0)   # build 101 seed 0 only
    assert "margin cost (confidence 0.9 − default, achieved, mean)" not in table             # no such runs
    text = module.markdown(table, [101, 102], [0, 1])
    assert "| default | 1 of 2 | 0 of 2 | 2 of 2 | 1 of 2 | 2 of 2 | 0 of 2 |" in text
    assert "The confidence 0.95 margin costs +0.4 KL and -1 reward change" in text


def test_build_rates_reads_each_prediction_from_reports_of_either_release():
    """"delivered" takes the plan's means and the target's KL; a 0.1 report ("target") kept the
    target in predicted_* and the plan in planned_*; a K-sample report's three are one."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_rates.py"
    spec = importlib.util.spec_from_file_location("build_rates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def report(mode, predicted, planned, target):
        return {"prediction": mode, "reward": "reward",
                "predicted_reward": {"predicted_change": predicted[0], "planned_change": planned[0],
                                     "target_change": target[0]},
                "constraints": [{"column": "cost", "predicted_change": predicted[1], "planned_change": planned[1],
                                 "target_change": target[1]}],
                "kl": {"predicted": predicted[2], "planned": planned[2]}}

    new = module.predictions(report("delivered", (-2.0, -4.0, 0.6), (-2.0, -4.0, 0.4), (-1.0, -5.0, None)))
    old = module.predictions(report("target", (-1.0, -5.0, 0.6), (-2.0, -4.0, 0.4), (None, None, None)))
    for p in (new, old):
        assert p["delivered"] == {"reward": -2.0, "cost": -4.0, "kl": 0.6}
        assert p["target"] == {"reward": -1.0, "cost": -5.0, "kl": 0.6}
        assert p["plan"] == {"reward": -2.0, "cost": -4.0, "kl": 0.4}
    plain = module.predictions(report("plan", (-1.5, -4.0, 0.5), (None, None, None), (None, None, None)))
    assert plain["delivered"] == plain["target"] == plain["plan"] == {"reward": -1.5, "cost": -4.0, "kl": 0.5}

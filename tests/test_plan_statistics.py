"""The statistics of the plan (issue #26): the evaluation's predicted standard error against the
exact one of a known world, the reachable fit refitted on prompt resamples, the CIs of what the
fine-tune is trained towards, and the report's comparison of a prediction with an achieved change."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import dualign
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
    # the KL extrapolated past K samples is of the same target: the original scores at λ*, not the fit's
    assert refit.kl_extrapolated.samples == pytest.approx(target["kl"], rel=1e-9)
    assert refit.kl_extrapolated.value > target["kl"] > refit.predicted["kl"]
    # the refitted resamples' bias is recorded (column units: a cost's change is −Δg) and the
    # table says what a fine-tune is then predicted to change; held fixed, no bias is claimed
    from dualign.dual.stage import format_report

    assert set(refit.reachable.fit_bias) == {"reward", "cost", "kl"} and fixed.reachable.fit_bias is None
    assert refit.reachable.fit_bias["cost"] < 0   # the resamples plan more cost reduction
    assert "the fit's bias" in format_report(refit).replace("\n", " ")


def test_the_model_card_predicts_what_the_report_predicts_and_names_the_target_and_the_plan():
    """On the reachable tilt the card predicts the plan's means and the trained target's KL (the
    report's prediction: reward -2.29, cost -4, KL 0.63 here, the KL past its K samples where
    dual.json has it), and names the target (reachable.samples_predicted, with its CIs) and the
    plan; on the K-sample tilt dual.json's predicted is the target."""
    from dualign.data.records import DualRecord, ExtrapolatedKL, ReachableTilt, trained_target
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
    # with the fit's bias recorded, the card's delivered means are the plan's less it, as the report's
    dual.reachable.fit_bias = {"reward": 0.25, "cost": -0.5, "kl": 0.03}
    deliver = next(line for line in model_card(cfg, dual, {}, 10).splitlines() if line.startswith("- predicted to deliver"))
    assert "less the fit's bias" in deliver and '{"reward": -2.54, "cost": -3.5, "kl": 0.63}' in deliver
    # with the KL past the K samples recorded, the card's KL is the report's: 2·0.63 − 0.4 = 0.86
    dual.kl_extrapolated = ExtrapolatedKL(samples=0.63, half=0.4, value=0.86)
    deliver = next(line for line in model_card(cfg, dual, {}, 10).splitlines() if line.startswith("- predicted to deliver"))
    assert "past its K samples" in deliver and '{"reward": -2.54, "cost": -3.5, "kl": 0.86}' in deliver
    assert trained_target(dual).values["kl"] == 0.86


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


def test_build_rates_counts_each_criterion_per_variant_and_the_margins_paired_cost(script):
    """scripts/build_rates.py's tally on hand-made rows: counts per variant, and the margin's cost
    as the mean of confidence − default over the same (build, seed) pairs only."""
    module = script("build_rates")

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


def test_build_rates_reads_each_prediction_from_reports_of_either_release(script):
    """"delivered" takes the report's predicted means (the plan's, less the fit's bias where recorded)
    and the target's KL; a 0.1 report ("target") kept the
    target in predicted_* and the plan in planned_*; a K-sample report's three are one."""
    module = script("build_rates")

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
    # a report whose delivered means are the plan's less the fit's bias: "delivered" is the report's own
    biased = module.predictions(report("delivered", (-2.1, -3.8, 0.6), (-2.0, -4.0, 0.4), (-1.0, -5.0, None)))
    assert biased["delivered"] == {"reward": -2.1, "cost": -3.8, "kl": 0.6}
    assert biased["plan"] == {"reward": -2.0, "cost": -4.0, "kl": 0.4}
    plain = module.predictions(report("plan", (-1.5, -4.0, 0.5), (None, None, None), (None, None, None)))
    assert plain["delivered"] == plain["target"] == plain["plan"] == {"reward": -1.5, "cost": -4.0, "kl": 0.5}


def test_build_rates_applies_a_kl_delivery_to_runs_whose_dual_had_none(script):
    """--kl-delivery a b: the delivered KL × exp(a + b·log KL_K), KL_K the report's kl.samples (0.5
    here: × exp(0.2 + 0.8·log 0.5) = 0.7071); a report whose dual had a calibration, or none given,
    is left as it is; the other predictions are untouched."""
    mod = script("build_rates")
    preds = {"delivered": {"reward": -2.0, "cost": -4.0, "kl": 1.0}, "plan": {"reward": -2.0, "cost": -4.0, "kl": 0.4}}
    report = {"kl": {"samples": 0.5}}
    out = mod.calibrate_kl(preds, report, (0.2, 0.8))
    assert out["delivered"]["kl"] == pytest.approx(np.exp(0.2) * 0.5 ** 0.8)
    assert out["delivered"]["cost"] == -4.0 and out["plan"] == preds["plan"]
    assert mod.calibrate_kl(preds, report, None) == preds
    assert mod.calibrate_kl(preds, {"kl": {"samples": 0.5}, "delivery": {"kl_factor": 1.1}}, (0.2, 0.8)) == preds


def test_delivery_spread_takes_the_evaluations_noise_out_of_the_residuals_spread(script):
    """scripts/delivery_spread.py by hand: residuals +0.2, −0.2, 0 from a plan of −4 (Var 0.04 with
    n − 1), each evaluation's s.e. 0.1 (CI ±1.96·0.1), so δ = sqrt(0.04 − 0.01)/4 = 0.0433; noisier
    evaluations than the residuals' spread give 0, not a negative variance; the K-sample tilt's
    plan is its predicted change; a named constraint is found by column; fewer than 3 runs refused."""
    mod = script("delivery_spread")

    def report(achieved, se, planned_key="planned_change", planned=-4.0):
        other = {"column": "harm", "achieved_change": 9.0, "achieved_change_ci95": [0.0, 1.0], planned_key: 0.0}
        return {"constraints": [other, {"column": "cost", "achieved_change": achieved,
                                        "achieved_change_ci95": [achieved - 1.959963984540054 * se,
                                                                 achieved + 1.959963984540054 * se],
                                        planned_key: planned}]}

    reports = [report(-3.8, 0.1), report(-4.2, 0.1), report(-4.0, 0.1)]
    out = mod.measure(reports, "cost", resamples=200)
    assert out["delta"] == pytest.approx(np.sqrt(0.04 - 0.01) / 4, rel=1e-9)
    assert out["residual_sd"] == pytest.approx(0.2) and out["evaluation_se_rms"] == pytest.approx(0.1)
    assert 0 <= out["ci95"][0] <= out["delta"] <= out["ci95"][1]
    noisy = [report(-3.8, 0.5), report(-4.2, 0.5), report(-4.0, 0.5)]
    assert mod.measure(noisy, "cost", resamples=50)["delta"] == 0.0
    samples = [report(a, 0.1, "predicted_change", -2.0) for a in (-1.8, -2.2, -2.0)]
    assert mod.measure(samples, "cost", resamples=50)["delta"] == pytest.approx(np.sqrt(0.03) / 2, rel=1e-9)
    with pytest.raises(SystemExit, match="at least 3"):
        mod.measure(reports[:2], "cost")
    with pytest.raises(SystemExit, match="no constraint"):
        mod.measure(reports, "toxicity")


def test_build_rates_fresh_set_leaves_out_the_builds_held_out_set_and_the_files_named(script, tmp_path):
    """The fresh prompts of a build: none in its splits, its held-out set or an --exclude-prompts
    file ({build} filled in); a variant's run directory gets the default's sample and score stages
    copied (nothing else, nothing overwritten)."""
    from dualign.world.config import world_config
    from dualign.world.corpus import fresh_prompts, heldout_prompts, make_prompts

    mod = script("build_rates")
    build = world_config("small", {"seed": 7})
    splits = make_prompts(build)
    taken = {r["prompt"] for r in fresh_prompts(build, 40, set(), "fresh-judge")[:20]}
    (tmp_path / "chosen-7.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in sorted(taken)))
    path = mod.fresh_eval_file(7, "small", 64, tmp_path / "out", "fresh-judge", (str(tmp_path / "chosen-{build}.jsonl"),))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    texts = {r["prompt"] for r in rows}
    assert len(rows) == len(texts) == 64 and path.name == "fresh-judge-small-7.jsonl"
    assert not texts & taken
    assert not texts & {r["prompt"] for rows_ in splits.values() for r in rows_}
    assert not texts & {r["prompt"] for r in heldout_prompts(build, splits)}
    src, dst = tmp_path / "default", tmp_path / "variant"
    src.mkdir()
    for name in ("samples.parquet", "scores.parquet", "sample.done", "score.done", "sample.meta.json",
                 "score.config.yaml", "dual.json", "dual.done", "metrics.jsonl"):
        (src / name).write_text(name)
    dst.mkdir()
    (dst / "scores.parquet").write_text("mine")
    mod.share_samples(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["sample.done", "sample.meta.json", "samples.parquet",
                                                      "score.config.yaml", "score.done", "scores.parquet"]
    assert (dst / "scores.parquet").read_text() == "mine"


def test_the_kl_extrapolated_past_k_samples_by_hand_and_nearer_a_gaussian_tilts_exact_kl():
    """extrapolated_kl: KL_K = Σ p log(K·p) per prompt (p ∝ exp(s/β)), KL_{K/2} the mean of the same on
    each half of the prompt's samples, and 2·KL_K − KL_{K/2}, by hand on two prompts; on a Gaussian
    score (s ~ N(0, 1) per prompt, β = 1: the tilt's exact KL is 1/2) the K = 8 estimate is biased low
    (0.36) and the extrapolation lands nearer (within 15%)."""
    from dualign.dual.formulas import extrapolated_kl

    def k_sample(s):
        p = np.exp(s - s.max())
        p /= p.sum()
        return float(np.sum(p * np.log(len(s) * p)))

    s = np.array([[0.3, -1.2, 2.0, 0.1], [1.5, 0.2, -0.4, -2.2]])
    ids = np.repeat([0, 1], 4)
    full, half, value = extrapolated_kl(ids, s.ravel(), np.zeros((8, 1)), np.zeros(1), 1.0)
    assert full == pytest.approx(np.mean([k_sample(row) for row in s]), rel=1e-12)
    assert half == pytest.approx(np.mean([k_sample(row[:2]) / 2 + k_sample(row[2:]) / 2 for row in s]), rel=1e-12)
    assert value == pytest.approx(2 * full - half, rel=1e-12)
    assert extrapolated_kl(np.arange(3), np.zeros(3), np.zeros((3, 1)), np.zeros(1), 1.0) is None   # K = 1
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4000, 8))
    full, _, value = extrapolated_kl(np.repeat(np.arange(4000), 8), np.zeros(g.size), g.reshape(-1, 1),
                                     np.ones(1), 1.0)
    assert full < 0.4 and abs(value - 0.5) < 0.075 and abs(value - 0.5) < abs(full - 0.5) / 2


def _kl_table() -> pd.DataFrame:
    """120 prompts × 8 samples: normal reward, cost with a prompt-level part (seeded)."""
    rng = np.random.default_rng(3)
    n, k = 120, 8
    ids = np.repeat(np.arange(n), k)
    return pd.DataFrame({"prompt_id": ids, "reward": rng.normal(size=n * k),
                         "cost": rng.normal(size=n * k) + rng.normal(size=n).repeat(k)})


def test_the_report_predicts_the_kl_of_what_is_trained_past_its_k_samples_and_keeps_the_k_sample_value():
    """dual.json's kl_extrapolated is of what is trained (the K-sample tilt of the original scores at
    λ*: its ``samples`` is reachable.samples_predicted.kl on the reachable tilt, the plan's KL on the
    K-sample tilt), its CI the K-sample CI scaled alike; the prediction a fine-tune is judged by takes
    it (an old dual.json without it keeps the K-sample KL)."""
    import dataclasses

    from dualign.data.records import trained_target

    table = _kl_table()
    plan = dualign.make_plan(table, "cost<=ref-0.3", beta=1.0, bootstrap=50)
    ext = plan.kl_extrapolated
    assert ext.samples == pytest.approx(plan.predicted["kl"], rel=1e-9) and ext.value > ext.samples
    assert ext.ci == pytest.approx([c * ext.value / ext.samples for c in plan.ci.predicted["kl"]], rel=1e-9)
    target = trained_target(plan)
    assert target.values["kl"] == target.changes["kl"] == ext.value and target.change_ci["kl"] == ext.ci
    old = trained_target(dataclasses.replace(plan, kl_extrapolated=None))
    assert old.values["kl"] == plan.predicted["kl"] and old.change_ci["kl"] == plan.ci.predicted["kl"]


def test_a_kl_delivery_calibration_moves_the_kl_by_its_line_at_the_tilts_log_kl(tmp_path):
    """kl_delivery [0.2, 0.5] at x = log KL_K (the K-sample KL of what is trained): the predicted KL
    × exp(0.2 + 0.5x), its CI alike; the means' predictions and λ* as without it; dual.json keeps
    the calibration and reads it back; the model card predicts the same KL; a line of one number
    is refused."""
    import math

    from dualign._infra.errors import ConfigError
    from dualign.data.records import DualRecord, trained_target
    from dualign.train import _card_predictions

    table = _kl_table()
    plain = dualign.make_plan(table, "cost<=ref-0.3", beta=1.0, bootstrap=50)
    cal = dualign.make_plan(table, "cost<=ref-0.3", beta=1.0, bootstrap=50, kl_delivery=[0.2, 0.5])
    x = math.log(plain.kl_extrapolated.samples)
    factor = math.exp(0.2 + 0.5 * x)
    assert (cal.delivery.x, cal.delivery.kl_factor) == pytest.approx((x, factor))
    t0, t1 = trained_target(plain), trained_target(cal)
    assert t1.values["kl"] == pytest.approx(t0.values["kl"] * factor) == pytest.approx(t1.changes["kl"])
    assert t1.change_ci["kl"] == pytest.approx([c * factor for c in t0.change_ci["kl"]])
    for key in ("reward", "cost"):
        assert t1.changes[key] == t0.changes[key] and t1.change_ci.get(key) == t0.change_ci.get(key)
    assert cal.lambdas == plain.lambdas and cal.predicted == plain.predicted
    back = DualRecord.load(cal.save(tmp_path))
    assert back.delivery == cal.delivery and trained_target(back).values == t1.values
    (line,) = [x for x in _card_predictions(cal) if "calibrated" in x]
    assert f'"kl": {t1.values["kl"]}' in line
    with pytest.raises(ConfigError, match="kl_delivery must be two finite numbers"):
        dualign.make_plan(table, "cost<=ref-0.3", beta=1.0, kl_delivery=[0.2])
    assert cal.delivery.kl_k_range is None and not cal.delivery.extrapolated


def test_a_kl_delivery_with_its_measured_range_says_when_a_plan_extrapolates_it(tmp_path):
    """kl_delivery [a, b, lo, hi]: the same factor as [a, b]; ``extrapolated`` exactly when the plan's
    KL_K lies outside [lo, hi] (here KL_K ≈ 0.2: inside [0.1, 1], outside [0.5, 1]); dual.json keeps
    the range and the flag; a range with lo > hi, a non-positive lo or three numbers is refused."""
    from dualign._infra.errors import ConfigError
    from dualign.data.records import DualRecord

    table = _kl_table()
    two = dualign.make_plan(table, "cost<=ref-0.3", beta=1.0, bootstrap=20, kl_delivery=[0.2, 0.5])
    kl_k = two.kl_extrapolated.samples
    inside = dualign.make_plan(table, "cost<=ref-0.3", beta=1.0, bootstrap=20, kl_delivery=[0.2, 0.5, kl_k / 2, kl_k * 2])
    outside = dualign.make_plan(table, "cost<=ref-0.3", beta=1.0, bootstrap=20, kl_delivery=[0.2, 0.5, kl_k * 1.1, kl_k * 3])
    assert inside.delivery.kl_factor == outside.delivery.kl_factor == two.delivery.kl_factor
    assert inside.delivery.kl == outside.delivery.kl == [0.2, 0.5]
    assert not inside.delivery.extrapolated and outside.delivery.extrapolated
    assert outside.delivery.kl_k_range == pytest.approx([kl_k * 1.1, kl_k * 3])
    assert DualRecord.load(outside.save(tmp_path)).delivery == outside.delivery
    from dualign.train import _card_predictions
    assert any("extrapolated past the KL_K range" in x for x in _card_predictions(outside))
    assert not any("extrapolated past the KL_K range" in x for x in _card_predictions(inside))
    for bad in ([0.2, 0.5, 1.0, 0.5], [0.2, 0.5, 0.0, 1.0], [0.2, 0.5, 1.0]):
        with pytest.raises(ConfigError, match="kl_delivery must be two finite numbers"):
            dualign.make_plan(table, "cost<=ref-0.3", beta=1.0, kl_delivery=bad)


def test_pilot_diagnostic_leave_one_out_line_by_hand_and_its_share_summary(script):
    """scripts/pilot_diagnostic.py: the line through the other runs, by hand on four points (without
    the outlier (3, 10) the line is y = x, so ŷ = 3; without (0, 0) it is y = −14/3 + 4.5x), and a
    delivered share exactly linear in the pilot's share leaves no spread around that line."""
    mod = script("pilot_diagnostic")
    pred = mod.leave_one_out_line(np.array([0.0, 1, 2, 3]), np.array([0.0, 1, 2, 10]))
    assert pred[3] == pytest.approx(3.0) and pred[0] == pytest.approx(-14 / 3)
    with pytest.raises(ValueError, match="3 runs"):
        mod.leave_one_out_line(np.array([0.0, 1]), np.array([0.0, 1]))
    pilot = np.array([0.58, 0.60, 0.62, 0.64])
    table = pd.DataFrame({"target cost": -5.0, "pilot cost": -5.0 * pilot, "achieved cost": -5.0 * (4 * pilot - 1.7)})
    out = mod.share_summary(table)
    assert out["correlation"] == pytest.approx(1.0) and out["sd around the leave-one-out line"] == pytest.approx(0, abs=1e-9)
    assert out["delivered share sd"] == pytest.approx(4 * np.std(pilot, ddof=1))


def test_build_rates_variants_set_demo_flags_and_train_keys(script):
    """A variant's "train" keys land in the train section; its other keys are the demo's flags."""
    mod = script("build_rates")
    default = mod.variant_values("default", "default", "r", 0)
    absolute = mod.variant_values("absolute", "default", "r", 1)
    wide = mod.variant_values("confidence 0.95 confidently", "default", "r", 0)
    assert default["train"]["label"] == "regression" and absolute["train"]["label"] == "absolute"
    assert absolute["dual"] == default["dual"] and absolute["seed"] == 1
    assert {k: v for k, v in absolute["train"].items() if k != "label"} == {
        k: v for k, v in default["train"].items() if k != "label"}
    assert wide["dual"]["confidence"] == 0.95 and wide["dual"]["evaluation_bound"] == 0.95
    assert wide["train"] == default["train"]


def _correlated_world(n: int = 400, k: int = 6, seed: int = 4):
    """(n, k, rewards [n·k], g [n·k, 1], segments): a cost with a per-prompt level and a reward
    correlated with it, so that a constraint on the cost binds."""
    rng = np.random.default_rng(seed)
    level = rng.normal(0, 2, size=(n, 1))
    cost = level + rng.normal(0, 1, size=(n, k))
    rewards, g = (0.8 * cost + rng.normal(0, 1, size=(n, k))).ravel(), -cost.reshape(-1, 1)
    return n, k, rewards, g, Segments.rectangular(n, k)


def _inflating_refit(rewards: np.ndarray, g: np.ndarray, seg: Segments, factor: float):
    """A refit whose every resample spreads each prompt's utilities ``factor`` times wider around
    their prompt mean (what a noisier fit does to the fitted scores), rewards unchanged."""
    mean = seg.expand(seg.sum(g.T) / seg.counts).T
    inflated = mean + factor * (g - mean)
    return (lambda counts: (rewards, inflated)), inflated


def test_the_margin_measures_spread_from_the_resamples_centre_and_adds_their_bias_on_top():
    """Resamples whose refit inflates the fitted spread are optimistic at fixed λ by
    B = Δg(inflated) − Δg(samples) (the bootstrap's bias, by hand). The margin's spread is measured
    from the resamples' mean, so it equals the plain bootstrap's spread of the inflated values
    (identical resamples); the old spread, the samples' own slack less the resamples' quantile,
    took B for spread and shrank to max(s − B, 0) = 0 here. The confidence plan adds B on top."""
    from dualign.dual.solver import _slack_draws, fit_bias, slack_bias, slack_spread
    from dualign.dual.tilt import Tilt

    n, k, rewards, g, seg = _correlated_world()
    samples = flat_samples(seg, rewards, g, None, np.arange(n))
    refit, inflated = _inflating_refit(rewards, g, seg, 1.2)
    margin = 0.3
    b = np.array([g.mean() + margin])
    lam = dualign.solve_dual(rewards.reshape(n, k), g.reshape(n, k), b[0], 1.0).lambdas

    def change(s):
        tilt = Tilt(s, np.zeros(1), 1.0)
        return tilt.outcomes(tilt.evaluate(lam))[1][0] - s.reference()[1][0]

    by_hand = change(samples.with_values(rewards, inflated)) - change(samples)
    bias = fit_bias(samples, lam, 1.0, 300, 2, refit)
    assert bias[1] == pytest.approx(by_hand, rel=0.05) and by_hand > 0.1
    point, draws = _slack_draws(samples, lam, b, np.array([margin]), 1.0, 300, 2, refit)
    assert slack_bias(point, draws)[0] == pytest.approx(bias[1], rel=1e-9)   # the same resamples
    spread = slack_spread(samples, lam, b, np.array([margin]), 1.0, 0.9, 300, 2, refit)
    plain = slack_spread(samples.with_values(rewards, inflated), lam, b, np.array([margin]), 1.0, 0.9, 300, 2)
    assert spread[0] == pytest.approx(plain[0], rel=1e-9) and spread[0] > 0.01
    old = max(point[0] - np.quantile(draws[:, 0], 0.1), 0.0)
    assert old < 0.5 * spread[0]   # the old spread: the bias taken for spread
    from dualign.dual import solve_dual_long

    planned = solve_dual_long(np.repeat(np.arange(n), k), rewards, g, b, 1.0, relative=[True],
                              confidence=0.9, seed=2, refit=refit)
    dual_part, eval_part, delivery_part, bias_part = planned.confidence_parts
    assert eval_part is None and delivery_part is None
    assert bias_part[0] > dual_part[0] > 0
    assert planned.confidence_margin[0] == pytest.approx(bias_part[0] + dual_part[0], rel=1e-9)
    assert planned.fit_bias[1] == pytest.approx(bias_part[0], rel=0.05)   # at the planned λ, one round on


def test_the_delivered_prediction_is_the_plan_less_the_fit_bias_and_its_interval_moves_by_twice_it():
    """trained_target on the reachable tilt: each mean's change is the plan's less the recorded fit
    bias (by hand), its interval moved by 2·bias (the resamples' percentile interval sits near
    plan + bias); the KL stays the target's; a record without fit_bias predicts the plan as before."""
    from dualign.data.records import DualCI, DualRecord, ReachableTilt, trained_target

    reach = ReachableTilt(r2={"reward": 0.4, "cost": 0.6}, residual_sd={"reward": 1.0, "cost": 1.0},
                          samples_predicted={"reward": 0.5, "cost": -6.0, "kl": 0.7},
                          samples_predicted_ci={"reward": [0.3, 0.7], "cost": [-6.3, -5.7], "kl": [0.6, 0.8]},
                          samples_predicted_change_ci={"reward": [-0.7, -0.3], "cost": [-5.3, -4.7]},
                          fit_resampled=True, fit_bias={"reward": 0.1, "cost": -0.2, "kl": 0.03})
    record = DualRecord(beta=10.0, reward="reward", constraints=["cost<=ref-4"], lambdas={"cost": 3.0},
                        columns={"cost": "cost"}, thresholds={"cost": -11.0},
                        predicted={"reward": -1.0, "cost": -11.5, "kl": 0.5},
                        reference={"reward": 1.0, "cost": -7.0, "kl": 0.0},
                        ci=DualCI(0.95, 200, 0, {"cost": [2.5, 3.5]}, {"reward": [-1.5, -0.5], "cost": [-11.5, -11.5],
                                                                        "kl": [0.4, 0.6]},
                                  {"reward": [-2.5, -1.5]}, ["cost"]),
                        reachable=reach)
    t = trained_target(record)
    assert t.changes["reward"] == pytest.approx(-2.0 - 0.1)
    assert t.changes["cost"] == pytest.approx(-4.5 + 0.2)
    assert t.changes["kl"] == pytest.approx(0.7)   # the target's KL (no extrapolation recorded)
    assert t.change_ci["reward"] == pytest.approx([-2.7, -1.7])
    assert t.values["cost"] == pytest.approx(-11.3) and t.planned["cost"] == pytest.approx(-4.5)
    import dataclasses
    plain = trained_target(dataclasses.replace(record, reachable=dataclasses.replace(reach, fit_bias=None)))
    assert plain.changes["cost"] == pytest.approx(-4.5) and plain.change_ci["reward"] == pytest.approx([-2.5, -1.5])


def test_without_the_bias_shift_the_margin_is_the_spread_alone():
    """After a pilot (shift_bias=False) the confidence margin leaves out the resamples' bias B: the
    pilot's share was measured against the plan itself, so it holds the plan's optimism already.
    On the inflating refit above B > 0, so the margin shrinks by it and bias_part reads 0."""
    from dualign.dual import solve_dual_long

    n, k, rewards, g, seg = _correlated_world()
    refit, _ = _inflating_refit(rewards, g, seg, 1.2)
    b = np.array([g.mean() + 0.3])
    kw = dict(relative=[True], confidence=0.9, seed=2, refit=refit)
    ids = np.repeat(np.arange(n), k)
    shifted = solve_dual_long(ids, rewards, g, b, 1.0, **kw)
    plain = solve_dual_long(ids, rewards, g, b, 1.0, shift_bias=False, **kw)
    dual_part, _, _, bias_part = plain.confidence_parts
    assert bias_part[0] == 0.0 and shifted.confidence_parts[3][0] > 0.1
    assert plain.confidence_margin[0] == pytest.approx(dual_part[0], rel=1e-9)
    assert plain.confidence_margin[0] < shifted.confidence_margin[0] - 0.1
    assert plain.lambdas[0] < shifted.lambdas[0]


def test_the_pilot_variants_add_or_drop_the_pilot_section(script):
    mod = script("build_rates")
    default = mod.variant_values("default", "default", "r", 0)
    with_pilot = mod.variant_values("pilot", "default", "r", 0)
    assert with_pilot["pilot"] == {} and "pilot" not in default
    assert {k: v for k, v in with_pilot.items() if k != "pilot"} == default
    assert "pilot" not in mod.variant_values("no pilot", "default", "r", 0)

"""The pilot stage: its importance-weighted measure against hand computation, the shares, the folds,
the rescaled constraints, the prediction it implies, and the stage end to end on tiny models
(resumed, restarted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dualign._infra.errors import ConfigError, InputError
from dualign.data.records import DualRecord, PilotMeasure, trained_target
from dualign.dual import formulas as F
from dualign.pilot import PilotConfig, pilot_folds, rescaled_constraints


def test_importance_changes_weigh_pi_refs_samples_by_the_policys_likelihood_ratio():
    # prompt a: two samples, ℓ = (log 3, 0) → q = (3/4, 1/4); prompt b: three, ℓ = 0 → q = w = 1/3
    ids = np.array(["a", "a", "b", "b", "b"])
    ell = np.array([math.log(3), 0.0, 0.0, 0.0, 0.0])
    v = np.array([[1.0, 10.0], [5.0, 0.0], [2.0, 1.0], [4.0, 1.0], [9.0, 1.0]])
    changes, kl = F.importance_changes(ids, ell, v)
    # a: Σ q v − mean v = (0.75·1 + 0.25·5) − 3 = −1 and (7.5 − 5) = 2.5; b: 0 → mean over prompts
    np.testing.assert_allclose(changes, [-0.5, 1.25])
    # KL(q‖w) on a: 0.75·log 1.5 + 0.25·log 0.5; on b: 0
    assert kl == pytest.approx((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2)


def test_a_policy_that_reached_the_plan_shows_the_plans_own_change():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(20), 4)
    r, cost = rng.normal(size=80), rng.normal(size=80)
    lam, beta = 1.5, 0.7
    logits = (r - lam * cost) / beta      # log π_λ/π_ref up to a per-prompt constant
    changes, kl = F.importance_changes(ids, logits + np.repeat(rng.normal(size=20), 4), np.column_stack([r, cost]))
    seg = F.Segments.of(ids)
    reward, utility = F.predictions(seg, r, -cost, lam, beta)
    np.testing.assert_allclose(changes, [reward - r.mean(), -utility[0] - cost.mean()], atol=1e-12)
    assert kl == pytest.approx(F.kl(seg, r, -cost, lam, beta))


def test_the_per_prompt_changes_average_to_the_importance_change_and_bootstrap_the_share():
    from dualign.pilot import share_intervals

    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(300), 4)[rng.permutation(1200)]      # rows out of order
    ell, v = rng.normal(size=1200), rng.normal(size=(1200, 2))
    per = F.prompt_changes(ids, ell, v)
    np.testing.assert_allclose(per.mean(axis=1), F.importance_changes(ids, ell, v)[0], atol=1e-12)
    # a pilot that delivered exactly 0.8 of the plan on every prompt: the interval is the point
    planned = rng.normal(-1.0, 0.5, size=(1, 300))
    np.testing.assert_allclose(share_intervals(0.8 * planned, planned), [[0.8, 0.8]], atol=1e-12)
    # noise around 0.8 gives an interval around the sample's ratio that narrows with more prompts
    noisy = 0.8 * planned + rng.normal(0, 0.5, size=(1, 300))
    lo, hi = share_intervals(noisy, planned)[0]
    assert lo < noisy.mean() / planned.mean() < hi and hi - lo < 0.4


def test_delivered_shares_are_clipped_and_uninformative_ones_are_one():
    np.testing.assert_allclose(F.delivered_shares([-3.0, -5.0, 1.0, 2.0, -1.0], [-4.0, -4.0, -4.0, 0.0, -4.0]),
                               [0.75, 1.25, 1.0, 1.0, 0.5])   # 0.25 clipped to 0.5
    np.testing.assert_allclose(F.delivered_shares([-12.0], [-4.0], (0.5, 2.0)), [2.0])


def test_pilot_folds_keep_a_prompts_samples_together_and_refuse_an_empty_fold():
    ids = np.repeat([f"p{i}" for i in range(200)], 3)
    fold = pilot_folds(ids, 0.5, 0)
    per_prompt = pd.Series(fold).groupby(ids).agg(["min", "max"])
    assert (per_prompt["min"] == per_prompt["max"]).all()          # a prompt's samples all in one fold
    assert 0.4 < per_prompt["min"].mean() < 0.6
    assert (pilot_folds(ids, 0.5, 0) == fold).all() and not (pilot_folds(ids, 0.5, 1) == fold).all()
    with pytest.raises(InputError, match="leave a fold empty"):
        pilot_folds(np.array(["a", "a"]), 0.5, 0)


def _record(**kw) -> DualRecord:
    base = dict(beta=1.0, reward="reward", constraints=["cost<=ref-4"], lambdas={"cost": 2.0},
                columns={"cost": "cost"}, thresholds={"cost": 6.0}, predicted={"reward": 9.0, "cost": 5.5, "kl": 1.0},
                reference={"reward": 10.0, "cost": 10.0, "kl": 0.0})
    return DualRecord(**{**base, **kw})


def test_rescaled_constraints_ask_the_required_change_over_the_share():
    assert rescaled_constraints(_record(), {"cost": 0.8}) == ["cost<=ref-5"]
    # an absolute threshold is written as its change from π_ref's mean: 8 − 10 = −2, / 0.5
    rec = _record(constraints=["helpful>=12"], lambdas={"helpful": 1.0}, columns={"helpful": "helpful"},
                  thresholds={"helpful": 12.0}, reference={"reward": 0.0, "helpful": 10.0, "kl": 0.0})
    assert rescaled_constraints(rec, {"helpful": 0.5}) == ["helpful>=ref+4"]


def test_after_a_pilot_each_mean_is_predicted_as_the_plans_change_times_the_share():
    measure = PilotMeasure(fraction=0.5, seed=0, prompts_trained=10, prompts_measured=10,
                           planned={"reward": -1.0, "cost": -4.0}, measured={"reward": -0.5, "cost": -3.2},
                           share={"reward": 0.5, "cost": 0.8}, bounds=[0.5, 2.0], planned_constraints=["cost<=ref-5"],
                           kl=0.4, kl_target=0.6, first_lambdas={"cost": 1.0}, first_predicted={},
                           share_ci={"reward": [0.2, 0.8], "cost": [0.6, 1.0]})
    rec = _record(pilot=measure)
    target = trained_target(rec)
    # the plan changes the cost by −4.5 and the reward by −1: delivered × 0.8 and × 0.5
    assert target.changes["cost"] == pytest.approx(-4.5 * 0.8)
    assert target.changes["reward"] == pytest.approx(-0.5)
    assert target.values["cost"] == pytest.approx(10.0 - 3.6)
    assert target.changes["kl"] == pytest.approx(1.0)         # the KL is not the pilot's to scale
    assert trained_target(_record()).changes["cost"] == pytest.approx(-4.5)


def test_pilot_config_refuses_bad_values():
    for bad in ({"fraction": 1.0}, {"fraction": 0.0}, {"share_bounds": [1.2, 2.0]}, {"share_bounds": [0.5]},
                {"batch_size": 0}):
        with pytest.raises(ConfigError):
            PilotConfig(run_dir="r", model="m", **bad)


def test_the_pilot_stage_measures_replans_and_resumes_and_restarts_to_the_same_plan(tmp_path, tiny_gpt2):
    """Tiny models, callable scorers (tests/test_pipeline.py): the pilot trains on one fold, measures
    on the other, and dual.json becomes the plan for the measured share, the user's constraint kept;
    a finished run resumes without redoing a stage; --restart-from pilot starts from the first plan
    again and lands on the same λ."""
    from test_pipeline import PROMPTS, _config

    from dualign.data.records import read_dual
    from dualign.pipeline import resolve_run_config, run_pipeline

    values = _config(tmp_path, tiny_gpt2, num_epochs=1)
    prompts = [f"{p} ({i})" for i in range(4) for p in PROMPTS]     # 24 prompts: 12 or so in each fold
    Path(values["sample"]["prompts"]).write_text("".join(
        json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    values["dual"]["constraints"] = ["cost<=ref-0.1"]
    values["pilot"] = {"fraction": 0.5, "keep_policy": True}
    run = Path(values["run_dir"])
    printed: list[str] = []
    report = run_pipeline(resolve_run_config(values), log=printed.append)
    first, dual = read_dual(run / "pilot" / "planned.json"), read_dual(run / "dual.json")
    summary = json.loads((run / "pilot" / "pilot.json").read_text())
    measure = dual.pilot
    assert dual.constraints == first.constraints == ["cost<=ref-0.1"] and dual.thresholds == first.thresholds
    assert measure.prompts_trained + measure.prompts_measured == len(prompts)
    assert measure.first_lambdas == first.lambdas and (run / "pilot" / "policy").exists()
    share = measure.share["cost"]
    lo, hi = measure.bounds
    expect = measure.measured["cost"] / measure.planned["cost"]
    assert share == pytest.approx(min(max(expect, lo), hi) if expect > 0 else 1.0)
    assert measure.planned_constraints == [f"cost<=ref-{0.1 / share:.6g}"]
    assert summary["share"] == measure.share
    lo_ci, hi_ci = measure.share_ci["cost"]
    assert lo_ci <= expect <= hi_ci
    # λ was solved for the rescaled change: the first plan's change / share at the new λ
    plan_change = dual.predicted["cost"] - dual.reference["cost"]
    assert plan_change == pytest.approx(-0.1 / share, rel=1e-4, abs=1e-6) or dual.lambdas["cost"] == 0.0
    # the report predicts the plan's change × share
    cost = report["constraints"][0]
    assert cost["predicted_change"] == pytest.approx(plan_change * share, rel=1e-6)
    # the report and the model card say what the pilot measured and what λ was planned for
    text = " ".join(" ".join(printed).split())
    assert f"A pilot fine-tune on {measure.prompts_trained} of the dual's prompts" in text
    assert f"planned for {measure.planned_constraints[0]}" in text
    card = next(p for p in (run / "policy").iterdir() if p.name.lower() == "readme.md").read_text()
    assert "the share a pilot fine-tune delivered" in card
    logs: list[str] = []
    run_pipeline(resolve_run_config(values), log=logs.append)
    assert sum("done, skipped" in line for line in logs) == 6
    run_pipeline(resolve_run_config(values), restart_from="pilot", log=lambda s: None)
    again = read_dual(run / "dual.json")
    assert again.pilot.first_lambdas == first.lambdas
    assert again.lambdas == pytest.approx(dual.lambdas) and again.pilot.share == pytest.approx(measure.share)

"""The built-in default on the small world: MoCAN end to end (the same code path as `dualign demo`)
improves the constraint in the direction and roughly by the amount the dual predicted; PeCAN end
to end (`dualign demo --method pecan --size small`) raises its implicit Lagrangian reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualign.config import load_yaml
from dualign.pipeline import (
    DEFAULT_CONFIG,
    PECAN_SMALL_CONFIG,
    SMALL_CONFIG,
    load_run_values,
    resolve_run_config,
    run_pipeline,
)


def _run_one_thread(config: Path, run_dir: Path) -> dict:
    """A packaged run config end to end into ``run_dir`` on one thread (faster for tiny models)."""
    values = load_run_values(config)
    values["run_dir"] = str(run_dir)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_pipeline(resolve_run_config(values), log=lambda s: None)
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def report(small_world, tmp_path_factory) -> dict:
    return _run_one_thread(SMALL_CONFIG, tmp_path_factory.mktemp("demo") / "run")


def test_packaged_configs_resolve_to_the_world_paths(small_world):
    cfg = resolve_run_config(load_yaml(SMALL_CONFIG))
    assert cfg.model == str(Path(small_world) / "ref_model")
    assert cfg.train.model == cfg.sample.model == cfg.evaluate.reference == cfg.model
    assert load_yaml(DEFAULT_CONFIG)["world"]["size"] == "default"


def test_the_dual_binds_and_predicts_a_cost_reduction(report):
    (row,) = report["constraints"]
    assert report["lambdas"]["cost"] > 0
    assert row["predicted_change"] == pytest.approx(-4.0, abs=1e-6)  # cost<=ref-4 is active


def test_aligned_policy_lowers_the_cost_towards_the_prediction(report):
    (row,) = report["constraints"]
    assert row["achieved_change"] < 0
    # A looser bound than the default world's: the small π_ref and 64 prompts leave more noise.
    assert row["prediction_error_frac"] < 1.0


def test_report_has_cis_win_rates_and_the_gold_judge(report, tmp_path_factory):
    assert report["n_responses"]["policy"] >= 128
    for side in ("reference", "policy"):
        lo, hi = report[side]["cost"]["ci95"]
        assert lo <= report[side]["cost"]["mean"] <= hi
    assert set(report["judge"]["policy"]) == {"all", "harmful=False", "harmful=True"}
    assert 0 <= report["win_rate"]["reward"] <= 1
    json.dumps(report)  # serialisable as written


@pytest.fixture(scope="module")
def pecan_report(small_world, tmp_path_factory) -> dict:
    """`dualign demo --method pecan --size small`: preference pairs only, implicit rewards."""
    return _run_one_thread(PECAN_SMALL_CONFIG, tmp_path_factory.mktemp("pecan") / "run")


def test_pecan_end_to_end_on_the_small_world_raises_the_lagrangian_implicit_reward(pecan_report):
    """The small world's π_g (300 noisy pairs) is weak: h_g alone moves by ±0.05 with the thread
    count, so the check is on what the fine-tune optimises, h_r + λ*·h_g, on held-out prompts."""
    r = pecan_report
    (row,) = r["constraints"]
    lam = r["lambdas"]["h_g"]
    assert row["constraint"] == "h_g>=ref+0.1" and lam > 0
    assert row["predicted_change"] == pytest.approx(0.1, abs=1e-6)  # active: the dual binds
    change = {c: r["policy"][c]["mean"] - r["reference"][c]["mean"] for c in ("h_r", "h_g")}
    assert change["h_r"] + lam * change["h_g"] > 0.05
    assert change["h_r"] > 0
    assert 0.05 < r["kl"]["achieved"] < 3 * r["kl"]["predicted"]
    assert {"reward", "cost"} <= set(r["policy"])  # the learned scorers evaluate it as well

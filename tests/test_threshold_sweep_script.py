"""scripts/threshold_sweep.py: each point's constraint, the compute to deliver every point against
hand computation (MoCAN's shared stages paid once, an online method's runs paid in full), and the
sweep on its tiny --smoke comparison."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _module():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("threshold_sweep", SCRIPTS / "threshold_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_each_point_moves_the_threshold_by_its_offset_from_the_reference():
    point = _module().point_constraint
    assert point("cost<=ref-4", -2) == "cost<=ref-2"
    assert point("cost<=ref-4", -5.5) == "cost<=ref-5.5"
    assert point("helpful>=ref+1", 0.5) == "helpful>=ref+0.5"


def test_mocan_pays_sampling_scoring_and_features_once_and_an_online_method_pays_every_run():
    sweep = _module()
    assert sweep.paid_once("mocan") == ("sample", "score")
    assert sweep.paid_once("mocan-reachable") == ("sample", "score", "dual_reachable")
    assert sweep.paid_once("ppo-lagrangian-critic") == ()
    tokens = {"sample": {"generation": 100.0}, "score": {"scored": 100.0}, "dual_reachable": {"reference": 50.0}}
    shared = {"flops": {"sample": {"total": 10.0}, "score": {"total": 20.0}, "dual_reachable": {"total": 4.0}},
              "sample": {"wall_s": 1.0}, "score": {"wall_s": 2.0}, "dual_reachable": {"wall_s": 0.5},
              "tokens": tokens}
    rows = []
    for label in ("mocan", "mocan-reachable", "ppo-lagrangian"):
        for i, offset in enumerate((-2, -3, -4)):
            rows.append({"label": label, "method": label, "offset": offset, "met": i != 2 or label == "ppo-lagrangian",
                         "flops": 100.0 + i, "wall_s": 10.0 + i, "flops_first_met": 50.0 if label == "ppo-lagrangian" else np.nan,
                         "wall_s_first_met": np.nan, "flops_7b": 1000.0, "flops_7b_first_met": np.nan})
    out = sweep.totals(pd.DataFrame(rows), shared, params=1.0).set_index("label")
    # three points of 100, 101, 102 FLOPs, the shared stages (in every row) subtracted at two of them
    assert out.loc["mocan", "flops"] == pytest.approx(303 - 2 * 30)
    assert out.loc["mocan-reachable", "flops"] == pytest.approx(303 - 2 * 34)
    assert out.loc["ppo-lagrangian", "flops"] == pytest.approx(303)
    assert out.loc["mocan", "wall_s"] == pytest.approx(33 - 2 * 3)
    assert out.loc["mocan-reachable", "wall_s"] == pytest.approx(33 - 2 * 3.5)
    # at 7B: generation 2·N·T, two scorers 2·N·T each, the reference pass 2·N·T (N = 1)
    assert out.loc["mocan", "flops_7b"] == pytest.approx(3000 - 2 * (200 + 400))
    assert out.loc["mocan-reachable", "flops_7b"] == pytest.approx(3000 - 2 * (200 + 400 + 100))
    assert out.loc["ppo-lagrangian", "flops_first_met"] == pytest.approx(150)
    assert np.isnan(out.loc["mocan", "flops_first_met"])
    assert list(out["points_met"]) == [2, 2, 3] and list(out["delivered"]) == [False, False, True]
    rows[1]["wall_s"] = np.nan                                   # one point's wall-clock was not recorded
    out = sweep.totals(pd.DataFrame(rows), shared, params=1.0).set_index("label")
    assert np.isnan(out.loc["mocan", "wall_s"]) and out.loc["mocan", "flops"] == pytest.approx(303 - 2 * 30)


def test_the_smoke_sweep_runs_every_point_and_writes_its_tables_and_plot(tmp_path):
    _module().main(["--smoke", "--methods", "mocan", "ppo-lagrangian", "--out", str(tmp_path)])
    points = pd.read_csv(tmp_path / "sweep_points.csv")
    assert sorted(points["offset"].unique()) == [-0.5, -0.25]
    summary = pd.read_csv(tmp_path / "sweep.csv").set_index("label")
    assert summary.loc["ppo-lagrangian", "flops"] == pytest.approx(points[points["label"] == "ppo-lagrangian"]["flops"].sum())
    assert summary.loc["mocan", "flops"] < points[points["label"] == "mocan"]["flops"].sum()
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["offsets"] == [-0.25, -0.5] and len(record["points"]) == 4
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert record["confidence"] is None
    assert "confidence" not in json.loads((tmp_path / "points" / "-0.25" / "shared" / "dual.json").read_text())


def test_a_sweep_with_a_margin_plans_every_point_with_it(tmp_path):
    _module().main(["--smoke", "--methods", "mocan", "--confidence", "0.55", "--out", str(tmp_path)])
    for offset in ("-0.25", "-0.5"):
        dual = json.loads((tmp_path / "points" / offset / "shared" / "dual.json").read_text())
        assert dual["confidence"]["level"] == 0.55
        assert dual["confidence"]["margin"]["cost"] > dual["confidence"]["dual_margin"]["cost"]  # the evaluation's too
    assert json.loads((tmp_path / "sweep.json").read_text())["confidence"] == 0.55


def test_sharing_samples_again_keeps_what_the_point_recorded(tmp_path):
    """A resumed sweep copies nothing over a point's own files: its compute.json keeps the stages
    the point ran itself (before, it was cut back to the copied stages on every resume)."""
    share = _module().share_samples
    first, point = tmp_path / "first", tmp_path / "point"
    first.mkdir()
    (first / "samples.parquet").write_text("samples")
    (first / "dual.json").write_text("{}")
    (first / "compute.json").write_text(json.dumps({"sample": {"wall_s": 1.0}, "score": {"wall_s": 2.0},
                                                    "sampled_tokens": 5, "dual": {"wall_s": 0.1}}))
    share(first, point)
    assert json.loads((point / "compute.json").read_text()) == {"sample": {"wall_s": 1.0}, "score": {"wall_s": 2.0},
                                                                "sampled_tokens": 5}
    assert not (point / "dual.json").exists() and (point / "samples.parquet").read_text() == "samples"
    recorded = {"sample": {"wall_s": 1.0}, "score": {"wall_s": 2.0}, "sampled_tokens": 5,
                "dual_reachable": {"wall_s": 16.0}}
    (point / "compute.json").write_text(json.dumps(recorded))
    share(first, point)
    assert json.loads((point / "compute.json").read_text()) == recorded

"""scripts/kl_delivery.py on hand-made runs: the variance components, the seeds' correlation and the
leave-one-build-out rates against their hand computation."""

import json
import math
from pathlib import Path

import pytest


def _runs(tmp_path, q: dict[str, list[float]], e: dict[str, list[float]], kl_k: dict[str, float]) -> list[str]:
    """Run directories build<b>-default-seed<s>: predicted KL 1, achieved exp(q); the reward's
    predicted change −2, achieved −2 + e with a 95% CI of ±0.5; K-sample KL kl_k[b]."""
    out = []
    for b, values in q.items():
        for s, (qs, es) in enumerate(zip(values, e[b], strict=True)):
            run = tmp_path / f"build{b}-default-seed{s}"
            (run / "eval").mkdir(parents=True)
            achieved = -2.0 + es
            (run / "eval" / "report.json").write_text(json.dumps({
                "kl": {"achieved": math.exp(qs), "predicted": 1.0, "samples": kl_k[b]},
                "predicted_reward": {"predicted_change": -2.0, "achieved_change": achieved,
                                     "achieved_change_ci95": [achieved - 0.5, achieved + 0.5]}}))
            out.append(str(run))
    return out


def test_components_seed_correlation_and_left_out_rates_equal_their_hand_computation(script, tmp_path, capsys):
    """Three builds × two seeds. log(achieved/predicted KL): 0, 0.2 | 0.4, 0.4 | −0.2, 0: build means
    0.1, 0.4, −0.1; within = (0.02 + 0 + 0.02) / 3; between = Var(means) − within / 2 = 0.063333 −
    0.006667; share 0.056667 / 0.07. Within 1.25× (|q| ≤ log 1.25 = 0.223): 4 of 6; moved by the
    other builds' mean (0.15, 0, 0.25): −0.15, 0.05 | 0.4, 0.4 | −0.45, −0.25 → 2 of 6. The reward's
    error 0.1, −0.3 | −0.6, −0.8 | 0, 0.2 inside ±0.5: 4 of 6; moved by the other builds' mean
    (−0.3, 0, −0.4): 0.4, 0 | 0.6, 0.8 | 0.4, 0.6 → 3 of 6."""
    kd = script("kl_delivery")
    runs = _runs(tmp_path, {"1": [0.0, 0.2], "2": [0.4, 0.4], "3": [-0.2, 0.0]},
                 {"1": [0.1, -0.3], "2": [-0.6, -0.8], "3": [0.0, 0.2]}, {"1": 0.5, "2": 1.0, "3": 0.7})
    out = kd.main(runs)
    comp = out["kl"]["components"]
    assert comp["within"] == pytest.approx(0.04 / 3)
    assert comp["between"] == pytest.approx(0.126667 / 2 - 0.04 / 6, abs=1e-6)
    assert comp["share"] == pytest.approx(0.809524, abs=1e-6)
    assert out["kl"]["seed_correlation"] == pytest.approx(0.12 / math.sqrt(0.186667 * 0.08), abs=1e-5)
    assert out["kl"]["within_1.25"]["report"] == pytest.approx(4 / 6)
    assert out["kl"]["within_1.25"]["shifted"] == pytest.approx(2 / 6)
    assert out["reward"]["in_ci"]["report"] == pytest.approx(4 / 6)
    assert out["reward"]["in_ci"]["shifted"] == pytest.approx(3 / 6)
    assert out["reward"]["mean_error"] == pytest.approx(-1.4 / 6)
    assert "6 runs on 3 builds" in capsys.readouterr().out


def test_a_delivery_linear_in_the_tilts_log_kl_is_predicted_exactly_by_the_left_out_line(script, tmp_path):
    """q = 0.3 + 0.5·log KL_K and e = −0.2 − 1.5·log KL_K on four builds: --fit finds both lines (the
    KL's is the dual's kl_delivery), and the line fitted on the other three builds predicts
    each left-out build exactly (every run within 1.25× and inside its CI),
    where the report's own prediction holds on one build of four; a centred prediction with no
    spread reaches 100%."""
    kd = script("kl_delivery")
    kl_k = {"1": 0.3, "2": 0.6, "3": 1.2, "4": 2.4}
    q = {b: [0.3 + 0.5 * math.log(v)] * 2 for b, v in kl_k.items()}
    e = {b: [-0.2 - 1.5 * math.log(v)] * 2 for b, v in kl_k.items()}
    out = kd.main(["--fit", *_runs(tmp_path, q, e, kl_k)])
    assert out["fit"]["kl_delivery"] == pytest.approx([0.3, 0.5]) and out["fit"]["reward"] == pytest.approx([-0.2, -1.5])
    assert out["fit"]["kl_k_range"] == pytest.approx([0.3, 2.4])
    assert out["kl"]["within_1.25"]["line"] == 1.0 and out["reward"]["in_ci"]["line"] == 1.0
    assert out["kl"]["residual_sd"]["line"] == pytest.approx(0.0, abs=1e-9)
    assert out["kl"]["ceiling"]["line"] == 1.0
    assert out["kl"]["within_1.25"]["report"] == pytest.approx(2 / 8)   # q = −0.30, 0.05, 0.39, 0.74
    assert out["kl"]["components"]["within"] == pytest.approx(0.0, abs=1e-12)


def test_runs_planned_with_a_kl_delivery_fit_the_setting_that_replaces_it_not_an_increment(script, tmp_path):
    """The same delivery as above, q0 = 0.3 + 0.5·log KL_K against the uncalibrated prediction, on
    runs planned with kl_delivery [0.1, 0.2]: their reports predict 1 × exp(0.1 + 0.2·log KL_K), so
    their own q is q0 − that. --fit still finds [0.3, 0.5], the setting that replaces theirs (the old
    script fitted q and printed [0.2, 0.3], the increment); the left-out line still predicts every
    build exactly; the report's own rate is measured on their calibrated predictions:
    q = 0.3 + 0.3·log KL_K = −0.06, 0.15, 0.35, 0.56 → 4 of 8 within 1.25×."""
    kd = script("kl_delivery")
    kl_k = {"1": 0.3, "2": 0.6, "3": 1.2, "4": 2.4}
    factor = {b: math.exp(0.1 + 0.2 * math.log(v)) for b, v in kl_k.items()}
    q = {b: [0.3 + 0.5 * math.log(v) - math.log(factor[b])] * 2 for b, v in kl_k.items()}
    e = {b: [0.0] * 2 for b in kl_k}
    runs = _runs(tmp_path, q, e, kl_k)
    for run in runs:
        b = Path(run).name.split("-")[0].removeprefix("build")
        (Path(run) / "dual.json").write_text(json.dumps(
            {"delivery": {"kl": [0.1, 0.2], "x": math.log(kl_k[b]), "kl_factor": factor[b]}}))
    out = kd.main(["--fit", *runs])
    assert out["fit"]["kl_delivery"] == pytest.approx([0.3, 0.5])
    assert out["kl"]["within_1.25"]["line"] == 1.0
    assert out["kl"]["within_1.25"]["report"] == pytest.approx(4 / 8)


def test_a_run_without_a_build_in_its_path_is_refused(script, tmp_path):
    kd = script("kl_delivery")
    (run,) = _runs(tmp_path, {"1": [0.0]}, {"1": [0.0]}, {"1": 1.0})
    renamed = tmp_path / "somerun"
    Path(run).rename(renamed)
    with pytest.raises(SystemExit, match="no build in its path"):
        kd.read_run(renamed)

"""Evaluate's statistics against their definitions: the prompt bootstrap, win rates, the miss."""

from __future__ import annotations

import numpy as np
import pytest

from dualign.evaluate import cluster_bootstrap_ci, prediction_error, win_rate


def test_cluster_bootstrap_equals_a_loop_over_resampled_prompts():
    rng = np.random.default_rng(0)
    groups = np.array(["b", "a", "b", "c", "a", "b", "c", "d"])  # unsorted, ragged
    values = rng.normal(size=groups.size)
    mean, lo, hi = cluster_bootstrap_ci(values, groups, n_boot=200, seed=3)
    assert mean == pytest.approx(values.mean())
    prompts = list(dict.fromkeys(groups))  # the bootstrap's unit, numbered by first appearance
    draws = np.random.default_rng(3).integers(0, len(prompts), size=(200, len(prompts)))
    reps = [np.concatenate([values[groups == prompts[d]] for d in row]).mean() for row in draws]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), rel=1e-12)
    assert np.isnan(cluster_bootstrap_ci(values[:2], np.array(["a", "a"]))[1])  # one prompt: no CI


def test_win_rate_counts_ties_as_half_and_prediction_error_is_relative():
    assert win_rate(np.array([2.0, 1.0, 3.0, 0.0]), np.array([1.0, 1.0, 4.0, -1.0])) == pytest.approx(0.625)
    assert prediction_error(-3.0, -4.0) == pytest.approx(0.25)
    assert np.isnan(prediction_error(1.0, 0.0))


def _tables(seed=0, n=30, k=3, shift=-1.0):
    """π_ref and a policy on the same prompts, with strong prompt-level cost variation."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    level = rng.normal(0, 5, n)

    def rows(d):
        return pd.DataFrame({"prompt_id": np.repeat([f"p{i}" for i in range(n)], k),
                             "sample_index": np.tile(np.arange(k), n),
                             "cost": np.repeat(level, k) + d + rng.normal(0, 1, n * k)})

    return rows(0.0), rows(shift).sample(frac=1.0, random_state=1)   # policy rows shuffled


def test_paired_change_equals_a_hand_written_loop_over_resampled_prompts():
    from dualign.evaluate import Paired

    ref, pol = _tables()
    paired = Paired.of(ref, pol, ["cost"], n_boot=300, seed=4)
    change, draws = paired.change("cost")
    m_ref = ref.groupby("prompt_id", sort=False)["cost"].mean()
    m_pol = pol.groupby("prompt_id")["cost"].mean().loc[m_ref.index]
    assert change == pytest.approx((m_pol - m_ref).mean())
    idx = np.random.default_rng(4).integers(0, len(m_ref), size=(300, len(m_ref)))
    loop = [(m_pol.to_numpy()[row] - m_ref.to_numpy()[row]).mean() for row in idx]   # both sides resampled together
    np.testing.assert_allclose(draws, loop, rtol=1e-12)
    # pairing removes the prompt-level spread: the paired CI is several times narrower than the
    # difference of two independent prompt-bootstrap CIs
    lo_r, hi_r = cluster_bootstrap_ci(ref["cost"].to_numpy(), ref["prompt_id"].to_numpy(), 300, 4)[1:]
    assert 4 * (np.quantile(draws, 0.975) - np.quantile(draws, 0.025)) < (hi_r - lo_r) * 2


@pytest.mark.parametrize("point,draws,bound,op,want", [
    (-4.2, [-4.6, -4.4, -4.3, -4.1, -3.9], -4.0, "<=", (True, False, True)),    # point meets, bound misses
    (-4.6, np.linspace(-4.9, -4.2, 50), -4.0, "<=", (True, True, True)),
    (-3.8, np.linspace(-4.3, -3.5, 50), -4.0, "<=", (False, False, True)),       # misses; CI reaches
    (-3.0, np.linspace(-3.4, -2.6, 50), -4.0, "<=", (False, False, False)),
    (0.35, np.linspace(0.31, 0.4, 50), 0.3, ">=", (True, True, True)),
    (0.29, np.linspace(0.2, 0.38, 50), 0.3, ">=", (False, False, True)),
])
def test_verdicts_are_point_estimate_one_sided_bound_and_ci_reach(point, draws, bound, op, want):
    from dualign.evaluate import verdicts

    got = verdicts(point, np.asarray(draws, float), bound, op)
    assert (got["met"], got["met_confidently"], got["not_rejected"]) == want
    q = np.quantile(np.asarray(draws, float), 0.95 if op == "<=" else 0.05)
    assert got["bound95"] == pytest.approx(q)


def _report(shift: float, tmp_path=None):
    """A report on synthetic tables: reward, cost (constraint cost<=ref-1) and a gold judge on
    harmful and benign prompts; the policy's cost moves by ``shift``."""
    from dualign.data.records import DualCI, DualRecord
    from dualign.evaluate import EvaluateConfig, build_report

    ref, pol = _tables(shift=shift)
    for df, d in ((ref, 0.0), (pol, 0.5)):
        df["reward"] = 1.0 + d + np.arange(len(df)) % 3
        df["judge_harmful"] = (df["cost"] > (0 if d == 0 else 2)).astype(float)
        df["judge_helpful"] = 0.5 + 0.1 * d
        df["harmful"] = df["prompt_id"].str[1:].astype(int) % 2 == 0
    dual = DualRecord(beta=2.0, reward="reward", constraints=["cost<=ref-1"], lambdas={"cost": 0.7},
                      columns={"cost": "cost"}, thresholds={"cost": -1.0}, predicted={"reward": 0.8, "cost": -1.0,
                                                                                      "kl": 0.3},
                      reference={"reward": 1.0, "cost": 0.0, "kl": 0.0},
                      ci=DualCI(0.95, 50, 0, {"cost": [0.5, 0.9]}, {"kl": [0.2, 0.4]},
                                {"reward": [-0.4, 0.0], "cost": [-1.0, -1.0]}))
    pol["logprob"], pol["ref_logprob"] = 0.0, -0.3
    cfg = EvaluateConfig(run_dir=str(tmp_path or "."), reference="m", prompts="p", bootstrap=200,
                         scorers=["reward=callable:m:f", "cost=callable:m:g"], group_column="harmful")
    return ref, pol, build_report(ref, pol, dual, cfg)


@pytest.mark.parametrize("shift,verdict", [(-3.0, "met confidently"), (-0.2, "NOT met")])
def test_result_table_shows_verdicts_cis_lambda_and_plain_judge_rows_in_aligned_columns(shift, verdict):
    from dualign.data.report_view import format_report

    text = format_report(_report(shift)[2])
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("π_ref"))
    table = lines[head:lines.index("", head)]
    ends = {len(line) for line in table if not line.startswith("gold judge")}
    assert table[1].startswith("reward") and table[2].startswith("cost (constraint cost<=ref-1)")
    assert max(ends) == len(table[0]) and "predicted" in table[0]          # no cell runs past its column
    assert "  harmful compliance on harmful prompts" in text and "  helpfulness on benign prompts" in text
    verdict_line = next(line for line in lines if line.startswith("  cost<=ref-1"))
    assert verdict_line.rstrip().endswith(verdict) and "change <= -1" in verdict_line
    assert "λ* = cost 0.7, β = 2: the policy was trained towards" in text and "KL(aligned ‖ π_ref), nats" in text
    if verdict == "NOT met":
        assert "met" not in verdict_line.replace("NOT met", "")


def test_a_report_planned_on_the_reachable_tilt_says_so_beside_lambda():
    """dual.json's ``reachable`` record makes the report's tilt "reachable", and the printout's λ
    line names it; a report without it (samples, or written before the key) keeps the plain line."""
    from dualign.data.records import DualRecord, ReachableTilt
    from dualign.data.report_view import format_report
    from dualign.evaluate import EvaluateConfig, build_report

    ref, pol, plain = _report(-3.0)
    assert plain.tilt == "samples"
    dual = DualRecord(beta=2.0, reward="reward", constraints=["cost<=ref-1"], lambdas={"cost": 0.7},
                      columns={"cost": "cost"}, thresholds={"cost": -1.0},
                      predicted={"reward": 0.8, "cost": -1.0, "kl": 0.3}, reference={"reward": 1.0, "cost": 0.0, "kl": 0.0})
    dual.reachable = ReachableTilt(r2={"reward": 0.4, "cost": 0.6}, residual_sd={"reward": 1.0, "cost": 1.0},
                                   samples_predicted={"reward": 0.9, "cost": -1.4, "kl": 0.4})
    cfg = EvaluateConfig(run_dir=".", reference="m", prompts="p", bootstrap=50,
                         scorers=["reward=callable:m:f", "cost=callable:m:g"], group_column="harmful")
    report = build_report(ref, pol, dual, cfg)
    assert report.tilt == "reachable"
    text = " ".join(format_report(report).split())
    assert ("λ* = cost 0.7, β = 2, planned on the reachable tilt (each score first replaced by what π_ref's "
            "features predict of it): the policy was trained towards") in text


def test_a_reachable_report_predicts_the_plans_means_and_the_targets_kl_and_judges_them_by_the_achieved_ci():
    """On the reachable tilt each mean's ``predicted`` is the plan's (the fitted scores tilted at λ*:
    what a fine-tune moves, docs/results/build_rates.md) and the KL's the trained target's
    (reachable.samples_predicted: the original scores at λ*, what the fine-tune trains towards), each
    with its own CI; the other distribution is kept (``target_*``, ``kl.planned``). A prediction
    equal to the achieved change lies inside the achieved change's own 95% CI, one 10 CI
    half-widths away outside, whatever the prediction's own interval."""
    from dualign._infra.text_table import num
    from dualign.data.records import DualCI, DualRecord, ReachableTilt
    from dualign.data.report_view import format_report
    from dualign.evaluate import EvaluateConfig, build_report

    ref, pol, plain = _report(-3.0)
    achieved = plain.constraints[0].achieved_change
    lo, hi = plain.constraints[0].achieved_change_ci95
    cfg = EvaluateConfig(run_dir=".", reference="m", prompts="p", bootstrap=50,
                         scorers=["reward=callable:m:f", "cost=callable:m:g"], group_column="harmful")
    for plan_change, inside in ((achieved, True), (achieved - 10 * (hi - lo) / 2, False)):
        dual = DualRecord(beta=2.0, reward="reward", constraints=["cost<=ref-1"], lambdas={"cost": 0.7},
                          columns={"cost": "cost"}, thresholds={"cost": -1.0},
                          predicted={"reward": 0.8, "cost": plan_change, "kl": 0.3},
                          reference={"reward": 1.0, "cost": 0.0, "kl": 0.0})
        dual.ci = DualCI(level=0.95, bootstrap=50, failed=0, lambdas={"cost": [0.6, 0.8]}, predicted={"reward": [0.7, 0.9], "kl": [0.25, 0.35]},
                           predicted_change={"reward": [-0.3, -0.1], "cost": [plan_change - 0.1, plan_change + 0.1]})
        dual.reachable = ReachableTilt(
            r2={"reward": 0.4, "cost": 0.6}, residual_sd={"reward": 1.0, "cost": 1.0},
            samples_predicted={"reward": 0.9, "cost": -7.0, "kl": 0.4},
            samples_predicted_change_ci={"reward": [-0.11, -0.09], "cost": [-7.001, -6.999]},
            samples_predicted_ci={"reward": [0.89, 0.91], "cost": [-7.001, -6.999], "kl": [0.39, 0.41]})
        report = build_report(ref, pol, dual, cfg)
        row = report.constraints[0]
        assert report.prediction == "delivered"
        assert row.predicted_change == pytest.approx(plan_change) and row.planned_change == pytest.approx(plan_change)
        assert row.predicted_change_ci95 == pytest.approx([plan_change - 0.1, plan_change + 0.1])
        assert row.target_change == pytest.approx(-7.0) and row.target_change_ci95 == [-7.001, -6.999]
        assert report.predicted_reward.predicted_change == pytest.approx(-0.2)
        assert report.predicted_reward.target_change == pytest.approx(-0.1)
        assert report.kl.predicted == 0.4 and report.kl.planned == 0.3 and report.kl.predicted_ci95 == [0.39, 0.41]
        assert row.prediction_in_achieved_ci is inside
        assert report.kl.prediction_in_ci == (report.kl.ci95[0] <= 0.4 <= report.kl.ci95[1])
        text = " ".join(format_report(report).split())
        assert "each mean's change as planned (the fitted scores tilted at λ*), the KL of the target" in text
        assert f"cost {num(plan_change, True)} {'inside' if inside else 'OUTSIDE'}" in text
        assert "whose tilt has changes of reward -0.1, cost -7 (KL 0.4; the plan's KL 0.3)" in text


def test_delivered_takes_every_mean_from_the_plan_and_the_kl_from_the_target():
    from dualign.data.records import delivered

    assert delivered({"reward": 1.0, "cost": -4.0, "kl": 0.4}, {"reward": 2.0, "cost": -5.0, "kl": 0.6}) == \
        {"reward": 1.0, "cost": -4.0, "kl": 0.6}


def test_closing_lines_name_every_file_worth_opening(tmp_path):
    from dualign.data.records import write_report
    from dualign.data.report_view import format_outputs, plot_report

    ref, pol, report = _report(-3.0, tmp_path)
    (tmp_path / "eval").mkdir()
    write_report(report, tmp_path / "eval" / "report.json")
    plot_report(ref, pol, report, tmp_path / "eval")
    (tmp_path / "policy").mkdir()
    text = format_outputs(tmp_path)
    for name in ("eval/report.json", "eval/predicted_vs_achieved.png", "eval/scores.png", "policy/"):
        assert str(tmp_path / name) in text
    for name in ("scores.png", "predicted_vs_achieved.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "eval" / "by_group.png").exists() and "by_group.png" not in text
    from dualign.data.records import GroupChange, GroupOutcome

    # a report with groups draws them too
    report.group_column = "harmful"
    report.by_group = {g: GroupOutcome(4, 0.5, {"reward": GroupChange(-1.0, [-2.0, 0.0], planned),
                                                "cost": GroupChange(-3.0, [-4.0, -2.0], -2.5)})
                       for g, planned in (("False", None), ("True", -1.5))}
    assert plot_report(ref, pol, report, tmp_path / "eval") == {}
    assert (tmp_path / "eval" / "by_group.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path / "eval" / "by_group.png") in format_outputs(tmp_path)


# ---------- the finish line: a zero-width interval and a point a rounding error outside it ----------


@pytest.mark.parametrize("constraint,reference,predicted,ci", [
    # the two cases of issue #29: the README's default world built with seed 23, and its PeCAN demo
    ("cost<=ref-4", 0.0, -3.9999999745, [-3.999999999999999, -3.999999982571537]),
    ("cost>=ref+0.3", 0.0, 0.2999999999999999, [0.2999999951878204, 0.2999999999999998]),
])
def test_a_prediction_a_rounding_error_outside_its_zero_width_ci_is_reported_and_drawn(
        tmp_path, constraint, reference, predicted, ci):
    """A dual.json written before the fix: its predicted change lies a rounding error outside its
    CI. The report widens the CI to contain the point, and both plots are drawn."""
    from dualign.data.records import DualCI, DualRecord, read_report, write_report
    from dualign.data.report_view import format_report, plot_report
    from dualign.evaluate import EvaluateConfig, build_report

    assert not ci[0] <= predicted - reference <= ci[1]  # the case as the issue found it
    ref, pol = _tables(shift=predicted)
    ref["reward"], pol["reward"] = 1.0, 1.5
    pol["logprob"], pol["ref_logprob"] = 0.0, -0.3
    dual = DualRecord(beta=0.7, reward="reward", constraints=[constraint], lambdas={"cost": 1.3},
                      columns={"cost": "cost"}, thresholds={"cost": reference + predicted},
                      predicted={"reward": 1.4, "cost": reference + predicted, "kl": 0.2},
                      reference={"reward": 1.0, "cost": reference, "kl": 0.0},
                      ci=DualCI(0.95, 50, 0, {"cost": [1.0, 1.6]}, {"kl": [0.1, 0.3]},
                                {"reward": [0.3, 0.5], "cost": ci}))
    cfg = EvaluateConfig(run_dir=str(tmp_path), reference="m", prompts="p", bootstrap=100,
                         scorers=["reward=callable:m:f", "cost=callable:m:g"])
    report = build_report(ref, pol, dual, cfg)
    (row,) = report.constraints
    lo, hi = row.predicted_change_ci95
    assert lo <= row.predicted_change <= hi
    assert (lo, hi) == (min(ci[0], predicted), max(ci[1], predicted))  # widened by the rounding error only
    assert plot_report(ref, pol, report, tmp_path, dpi=30) == {}
    for name in ("scores.png", "predicted_vs_achieved.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_report(report, tmp_path / "report.json")
    assert read_report(tmp_path / "report.json").constraints[0].predicted_change_ci95 == [lo, hi]
    assert constraint in format_report(report)


def test_a_change_fixed_by_construction_has_no_ci_and_says_so_in_both_tables(tmp_path):
    """dual.json's ci.fixed names a binding relative constraint: dual's table and evaluate's table
    print 'fixed (binding)' in its CI cell, the report carries no CI, the plot draws it without one."""
    from dualign._infra.text_table import FIXED
    from dualign.data.records import DualCI, DualRecord
    from dualign.data.report_view import format_report, plot_report
    from dualign.dual.stage import format_report as format_dual
    from dualign.evaluate import EvaluateConfig, build_report

    ref, pol = _tables(shift=-1.0)
    ref["reward"], pol["reward"] = 1.0, 1.5
    pol["logprob"], pol["ref_logprob"] = 0.0, -0.3
    dual = DualRecord(beta=0.7, reward="reward", constraints=["cost<=ref-1"], lambdas={"cost": 1.3},
                      columns={"cost": "cost"}, thresholds={"cost": -1.0},
                      predicted={"reward": 1.4, "cost": -1.0, "kl": 0.2}, reference={"reward": 1.0, "cost": 0.0, "kl": 0.0},
                      converged=True, iterations=4, kkt_residual=1e-10, num_prompts=30, num_samples=90,
                      ci=DualCI(0.95, 50, 0, {"cost": [1.0, 1.6]}, {"kl": [0.1, 0.3], "reward": [1.3, 1.5],
                                                                    "cost": [-1.2, -0.8]},
                                {"reward": [0.3, 0.5]}, fixed=["cost"]))
    cfg = EvaluateConfig(run_dir=str(tmp_path), reference="m", prompts="p", bootstrap=100,
                         scorers=["reward=callable:m:f", "cost=callable:m:g"])
    report = build_report(ref, pol, dual, cfg)
    (row,) = report.constraints
    assert row.predicted_change_fixed and row.predicted_change_ci95 is None
    for text in (format_dual(dual), format_report(report)):
        line = next(line for line in text.splitlines() if line.startswith("cost"))
        assert line.rstrip().endswith(FIXED), line
        assert "equals the required change (moved by any confidence margin) by construction" in " ".join(text.split())
    assert plot_report(ref, pol, report, tmp_path, dpi=30) == {}


def test_a_fixed_plan_less_the_fits_bias_is_drawn_as_the_plan_beside_the_bar(tmp_path, monkeypatch):
    """A binding relative constraint on the reachable tilt with a fit bias of +0.25: the report
    predicts −1 − 0.25 = −1.25 (the plan's fixed −1 less the bias). The cost panel draws a dashed
    line at the plan's −1 labelled 'plan (fixed by construction)', not the bar at −1.25; without a
    bias the bar itself is labelled, as before."""
    import matplotlib

    matplotlib.use("Agg")
    from dualign.data import report_view
    from dualign.data.records import DualCI, DualRecord, ReachableTilt
    from dualign.evaluate import EvaluateConfig, build_report

    ref, pol = _tables(shift=-1.0)
    ref["reward"], pol["reward"] = 1.0, 1.5
    pol["logprob"], pol["ref_logprob"] = 0.0, -0.3
    cfg = EvaluateConfig(run_dir=str(tmp_path), reference="m", prompts="p", bootstrap=50,
                         scorers=["reward=callable:m:f", "cost=callable:m:g"])

    def cost_panel(bias):
        dual = DualRecord(beta=0.7, reward="reward", constraints=["cost<=ref-1"], lambdas={"cost": 1.3},
                          columns={"cost": "cost"}, thresholds={"cost": -1.0},
                          predicted={"reward": 1.4, "cost": -1.0, "kl": 0.2},
                          reference={"reward": 1.0, "cost": 0.0, "kl": 0.0},
                          ci=DualCI(0.95, 50, 0, {"cost": [1.0, 1.6]}, {"kl": [0.1, 0.3]}, {"reward": [0.3, 0.5]},
                                    fixed=["cost"]))
        dual.reachable = ReachableTilt(r2={"reward": 0.4, "cost": 0.6}, residual_sd={"reward": 1.0, "cost": 1.0},
                                       samples_predicted={"reward": 1.5, "cost": -1.5, "kl": 0.4},
                                       fit_bias=None if bias is None else {"reward": 0.0, "cost": bias})
        report = build_report(ref, pol, dual, cfg)
        panels = []
        real = report_view._bars
        monkeypatch.setattr(report_view, "_bars", lambda ax, *a, **kw: (panels.append(ax), real(ax, *a, **kw))[1])
        report_view.plot_report(ref, pol, report, tmp_path, dpi=30)
        monkeypatch.setattr(report_view, "_bars", real)
        return report.constraints[0], panels[0]

    row, ax = cost_panel(0.25)
    assert row.predicted_change == pytest.approx(-1.25) and row.planned_change == pytest.approx(-1.0)
    (label,) = [t for t in ax.texts if "fixed by" in t.get_text()]
    assert label.get_text() == "plan (fixed by\nconstruction)" and label.xy[1] == pytest.approx(-1.0)
    assert any(list(line.get_ydata()) == pytest.approx([-1.0, -1.0]) and line.get_linestyle() == "--"
               for line in ax.lines)
    row, ax = cost_panel(None)
    assert row.predicted_change == pytest.approx(-1.0)
    (label,) = [t for t in ax.texts if "fixed by construction" in t.get_text()]
    assert label.get_text() == "fixed by construction" and label.xy[1] == pytest.approx(-1.0)


def test_build_report_fields_equal_their_hand_computation():
    """Two held-out prompts × 2 responses. π_ref's cost 1, 3 | 5, 7 (mean 4), the policy's 0, 2 | 2, 4
    (mean 2, change −2); reward 1, 1 | 2, 2 → 2, 2 | 3, 3 (1.5 → 2.5); log π − log π_ref 0.1, 0.3 |
    0.2, 0.4 (KL 0.25). dual.json: cost 3.0 → 1.2 (change −1.8), reward 1.2 → 2.0 (+0.8), β 0.37,
    λ 0.7 (no default), threshold on its samples 1.5."""
    import pandas as pd

    from dualign.data.records import DualCI, DualRecord
    from dualign.evaluate import EvaluateConfig, build_report

    key = {"prompt_id": ["a", "a", "b", "b"], "sample_index": [0, 1, 0, 1]}
    ref = pd.DataFrame({**key, "cost": [1.0, 3.0, 5.0, 7.0], "reward": [1.0, 1.0, 2.0, 2.0]})
    pol = pd.DataFrame({**key, "cost": [0.0, 2.0, 2.0, 4.0], "reward": [2.0, 2.0, 3.0, 3.0],
                        "logprob": [0.0] * 4, "ref_logprob": [-0.1, -0.3, -0.2, -0.4]})
    dual = DualRecord(beta=0.37, reward="reward", constraints=["cost<=ref-1.5"], lambdas={"cost": 0.7},
                      columns={"cost": "cost"}, thresholds={"cost": 1.5},
                      predicted={"reward": 2.0, "cost": 1.2, "kl": 0.2}, reference={"reward": 1.2, "cost": 3.0, "kl": 0.0},
                      ci=DualCI(0.95, 20, 0, {"cost": [0.5, 0.9]}, {"kl": [0.1, 0.3]},
                                {"reward": [0.5, 1.1], "cost": [-2.0, -1.6]}))
    cfg = EvaluateConfig(run_dir=".", reference="m", prompts="p", bootstrap=50,
                         scorers=["reward=callable:m:f", "cost=callable:m:g"])
    report = build_report(ref, pol, dual, cfg)
    (row,) = report.constraints
    assert (row.reference_eval, row.achieved, row.achieved_change) == pytest.approx((4.0, 2.0, -2.0))
    assert row.threshold == pytest.approx(2.5) and row.threshold_dual == 1.5          # 4 − 1.5 held out
    assert (row.predicted, row.reference_dual, row.predicted_change) == pytest.approx((1.2, 3.0, -1.8))
    assert row.predicted_eval == pytest.approx(2.2)                                   # 4 + 1.2 − 3.0
    assert row.prediction_error_frac == pytest.approx(0.2 / 1.8)
    assert row.met and row.predicted_change_ci95 == [-2.0, -1.6]
    pr = report.predicted_reward
    assert (pr.predicted_eval, pr.predicted_change, pr.achieved_change) == pytest.approx((2.3, 0.8, 1.0))
    assert (report.kl.achieved, report.kl.predicted) == pytest.approx((0.25, 0.2)) and report.kl.predicted_ci95 == [0.1, 0.3]
    kl_lo, kl_hi = report.kl.ci95
    assert report.kl.prediction_in_ci is (kl_lo <= 0.2 <= kl_hi)  # judged by the achieved KL's own CI
    assert report.beta == 0.37 and report.lambdas == {"cost": 0.7}
    assert report.win_rate == {"reward": 1.0} and report.n_prompts == 2

    # dual.json's KL delivery calibration (× 1.5): the report predicts that KL (and its CI), says so,
    # and the achieved values and the means' predictions stay
    from dualign.data.records import DeliveryCalibration
    from dualign.data.report_view import format_report

    dual.delivery = DeliveryCalibration(kl=[0.4, 0.0], x=-1.2, kl_factor=1.5)
    cal = build_report(ref, pol, dual, cfg)
    assert cal.kl.predicted == pytest.approx(0.3) and cal.kl.predicted_ci95 == pytest.approx([0.15, 0.45])
    assert cal.predicted_reward.predicted_change == pytest.approx(0.8)
    assert cal.constraints[0].predicted_change == pytest.approx(-1.8) and cal.kl.achieved == report.kl.achieved
    text = " ".join(format_report(cal).split())
    assert "The KL predicted, 0.3, is the tilt's 0.2 calibrated by the KL fine-tunes spent on earlier runs" in text
    assert "× 1.5 at log KL_K = -1.2" in text and "extrapolates" not in text
    # a line measured on KL_K 0.5-1 (this plan's KL_K exp(-1.2) = 0.301 lies below it): the report says
    # the factor extrapolates the line
    dual.delivery = DeliveryCalibration(kl=[0.4, 0.0], x=-1.2, kl_factor=1.5, kl_k_range=[0.5, 1.0], extrapolated=True)
    text = " ".join(format_report(build_report(ref, pol, dual, cfg)).split())
    assert "This plan's KL_K, 0.301, is outside the 0.5–1 the line was measured on: the factor extrapolates it" in text


def _reachable_case():
    """_report's tables, an EvaluateConfig and a reachable-tilt dual.json (plan KL 0.3, target 0.4)."""
    from dualign.data.records import DualRecord, ReachableTilt
    from dualign.evaluate import EvaluateConfig

    ref, pol, _ = _report(-3.0)
    cfg = EvaluateConfig(run_dir=".", reference="m", prompts="p", bootstrap=50,
                         scorers=["reward=callable:m:f", "cost=callable:m:g"], group_column="harmful")
    dual = DualRecord(beta=2.0, reward="reward", constraints=["cost<=ref-1"], lambdas={"cost": 0.7},
                      columns={"cost": "cost"}, thresholds={"cost": -1.0},
                      predicted={"reward": 0.8, "cost": -1.0, "kl": 0.3}, reference={"reward": 1.0, "cost": 0.0, "kl": 0.0})
    dual.reachable = ReachableTilt(r2={"reward": 0.4, "cost": 0.6}, residual_sd={"reward": 1.0, "cost": 1.0},
                                   samples_predicted={"reward": 0.9, "cost": -1.5, "kl": 0.4})
    return ref, pol, cfg, dual


def test_on_the_reachable_tilt_a_calibrated_kl_names_the_tilts_own_kl_as_extrapolated():
    """The target's KL 0.4 on its K samples, 0.5 past them, calibrated × 1.5: the report predicts
    0.75 and says 0.5 is the extrapolated value and 0.75 the calibrated one (not 0.75 extrapolated)."""
    from dualign.data.records import DeliveryCalibration, ExtrapolatedKL
    from dualign.data.report_view import format_report
    from dualign.evaluate import build_report

    ref, pol, cfg, dual = _reachable_case()
    dual.kl_extrapolated = ExtrapolatedKL(samples=0.4, half=0.3, value=0.5)
    dual.delivery = DeliveryCalibration(kl=[0.0, 0.0], x=-0.916, kl_factor=1.5)
    report = build_report(ref, pol, dual, cfg)
    assert report.kl.predicted == pytest.approx(0.75) and report.kl.samples == 0.4
    text = " ".join(format_report(report).split())
    assert "KL 0.4 on its K samples, 0.5 extrapolated past them" in text
    assert "The KL predicted, 0.75, is the tilt's 0.5 calibrated" in text


def test_the_plot_marks_the_other_distribution_beside_each_prediction_and_fixed_only_where_a_change_is_fixed(
        tmp_path, monkeypatch):
    """On the reachable tilt each mean's panel (constraint, reward) draws the trained target's change
    as a dotted line labelled 'target' beside the plan's bar, the KL panel the plan's KL labelled
    'plan' beside the target's; no panel says 'fixed by construction' without dual.json's ci.fixed."""
    import matplotlib

    matplotlib.use("Agg")
    from dualign.data import report_view
    from dualign.evaluate import build_report

    ref, pol, cfg, dual = _reachable_case()
    report = build_report(ref, pol, dual, cfg)
    panels = []
    real = report_view._bars
    monkeypatch.setattr(report_view, "_bars", lambda ax, *a, **kw: (panels.append(ax), real(ax, *a, **kw))[1])
    assert report_view.plot_report(ref, pol, report, tmp_path, dpi=30) == {}
    assert len(panels) == 3
    for ax, mark in zip(panels, ["target", "target", "plan"], strict=True):
        texts = [t.get_text() for t in ax.texts]
        assert mark in texts and "fixed by construction" not in texts

"""Property-based tests of the value paths a run ends on (Hypothesis): the dual's result and its
dual.json record, build_report, the verdicts, the printed tables and the plots, over the degenerate
values good inputs produce deep inside a run — zero-width and one-sided intervals, points a
rounding error outside their interval, constant score columns, a single prompt, all samples
identical, a KL of 0 or a huge one, an empty judge group, a constraint exactly at its bound.

Each test's docstring states the property that must hold. Plots are drawn at a small dpi and on
few examples, so that the whole file stays well under a minute."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualign._infra.errors import DualignError
from dualign._infra.text_table import FIXED, interval, num
from dualign.data.constraints import parse_constraint
from dualign.data.records import (
    ConstraintOutcome,
    DualCI,
    DualRecord,
    Estimate,
    EvalReport,
    JudgeSummary,
    KLOutcome,
    RewardPrediction,
    read_dual,
    read_report,
    write_dual,
    write_report,
)
from dualign.data.report_view import format_report, plot_report, verdict
from dualign.data.score_table import validate_scores
from dualign.dual.stage import format_report as format_dual
from dualign.dual.stage import solve_constraints
from dualign.evaluate import EvaluateConfig, build_report, verdicts

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PLOTS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ULP = 1e-12  # "a rounding error": far above float64 spacing at these magnitudes, far below any real spread


def _contains(ci, point) -> bool:
    """lo ≤ point ≤ hi, up to a rounding error relative to the values (NaN and None: nothing to check)."""
    if ci is None or point is None or any(v is None or math.isnan(v) for v in [*ci, point]):
        return True
    slack = ULP * max(1.0, abs(point))
    return ci[0] - slack <= point <= ci[1] + slack


# ------------------------------------------------------------------------------ score tables

@st.composite
def score_tables(draw) -> pd.DataFrame:
    """A scores table: 1–5 prompts of 2–4 samples each (ragged), reward and cost columns that are
    random, constant, or identical across a prompt's samples, and sometimes sample weights."""
    n = draw(st.integers(1, 5))
    counts = draw(st.lists(st.integers(2, 4), min_size=n, max_size=n))
    rows = sum(counts)
    kind = draw(st.sampled_from(["random", "constant", "identical_samples"]))
    values = st.floats(-5, 5, allow_nan=False, width=32)
    if kind == "constant":
        reward = np.full(rows, draw(values))
        cost = np.full(rows, draw(values))
    elif kind == "identical_samples":
        per = draw(st.lists(st.tuples(values, values), min_size=n, max_size=n))
        reward = np.repeat([p[0] for p in per], counts)
        cost = np.repeat([p[1] for p in per], counts)
    else:
        reward = np.array(draw(st.lists(values, min_size=rows, max_size=rows)))
        cost = np.array(draw(st.lists(values, min_size=rows, max_size=rows)))
    df = pd.DataFrame({"prompt_id": np.repeat([f"p{i}" for i in range(n)], counts), "reward": reward, "cost": cost})
    if draw(st.booleans()):
        df["sample_weight"] = draw(st.lists(st.floats(0.1, 3), min_size=rows, max_size=rows))
    return df


CONSTRAINTS = st.sampled_from(["cost<=ref", "cost<=ref-0.5", "cost>=ref+0.2", "cost<=ref-100", "cost<=1",
                               "cost>=-1"])


@FAST
@given(df=score_tables(), constraint=CONSTRAINTS, beta=st.sampled_from([0.05, 0.5, 3.0]))
def test_the_dual_either_refuses_in_one_line_or_returns_a_record_whose_intervals_contain_their_points(
        tmp_path_factory, df, constraint, beta):
    """On any valid scores table (constant columns, one prompt, identical samples, a constraint at
    its bound) the dual raises a DualignError or returns a record with: λ ≥ 0 finite, KL ≥ 0, every
    bootstrap interval containing its own point, a fixed change only for a binding relative
    constraint (and then no CI for it), a table that prints, a dual.json that reads back equal."""
    c = parse_constraint(constraint)
    try:
        record = solve_constraints(validate_scores(df, ["reward", "cost"]), beta, "reward", [c],
                                   bootstrap=15, seed=0)
    except DualignError as e:
        assert "\n" not in str(e)
        return
    lam = record.lambdas["cost"]
    assert math.isfinite(lam) and lam >= 0
    assert record.predicted["kl"] >= -1e-9
    ci = record.ci
    assert ci is not None and ci.bootstrap == 15
    if ci.lambdas:
        assert _contains(ci.lambdas["cost"], lam)
        for key in ("reward", "cost", "kl"):
            assert _contains(ci.predicted[key], record.predicted[key]), key
        for key, change in ci.predicted_change.items():
            assert _contains(change, record.predicted[key] - record.reference[key]), key
        if "cost" in ci.fixed:
            assert c.relative and lam > 0 and "cost" not in ci.predicted_change
            assert FIXED in format_dual(record)
    assert format_dual(record).count("cost") >= 1
    path = tmp_path_factory.mktemp("dual") / "dual.json"
    write_dual(record, path)
    assert read_dual(path, require=("lambdas", "thresholds", "predicted", "reference")) == record


# --------------------------------------------------------------------------------- verdicts

@FAST
@given(point=st.floats(-10, 10), draws=st.lists(st.floats(-10, 10), max_size=30),
       bound=st.floats(-10, 10), op=st.sampled_from(["<=", ">="]), at_bound=st.booleans())
def test_verdicts_are_consistent_with_the_numbers(point, draws, bound, op, at_bound):
    """met ⇔ the point is on the required side; met confidently ⇒ met ⇒ not rejected; the bound
    and the CI contain the point; without two draws the interval verdicts are unknown."""
    if at_bound:
        point = bound  # a constraint exactly at its bound is met
    got = verdicts(point, np.array(draws, float), bound, op)
    assert got["met"] == (point <= bound if op == "<=" else point >= bound)
    if len(draws) < 2:
        assert got["met_confidently"] is None and got["not_rejected"] is None
        return
    assert (not got["met_confidently"] or got["met"]) and (not got["met"] or got["not_rejected"])
    assert (got["bound95"] >= point) if op == "<=" else (got["bound95"] <= point)


# ------------------------------------------------------------------------------ build_report

INTERVALS = st.one_of(
    st.none(),
    st.tuples(st.floats(-5, 5), st.floats(0, 3)).map(lambda t: [t[0], t[0] + t[1]]),        # ordinary, zero-width
    st.tuples(st.floats(-5, 5), st.booleans()).map(lambda t: [-math.inf, t[0]] if t[1] else [t[0], math.inf]),
    st.just([math.nan, math.nan]),
)


@st.composite
def runs(draw):
    """π_ref's and the policy's evaluation tables on the same prompts and a dual.json whose CIs are
    degenerate: one prompt or several, constant or identical scores, KL 0 or huge, a judge group that
    only one side has (all prompts harmful on one side), predicted changes a rounding error outside
    zero-width CIs, one-sided and NaN intervals, a constraint exactly at its bound."""
    n = draw(st.integers(1, 4))
    k = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["random", "constant", "identical"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))

    def table(shift):
        base = {"random": rng.normal(size=n * k), "constant": np.zeros(n * k),
                "identical": np.repeat(rng.normal(size=n), k)}[kind]
        return pd.DataFrame({"prompt_id": np.repeat([f"p{i}" for i in range(n)], k),
                             "sample_index": np.tile(np.arange(k), n),
                             "reward": base + shift, "cost": base - shift})

    ref, pol = table(0.0), table(draw(st.sampled_from([0.0, 0.5, -1.0])))
    pol["logprob"] = 0.0
    pol["ref_logprob"] = -draw(st.sampled_from([0.0, 1e-12, 0.3, 1e6]))   # KL 0, tiny, ordinary, huge
    if draw(st.booleans()):  # a gold judge; the policy's prompts all harmful: its benign group is empty
        for df in (ref, pol):
            df["judge_harmful"] = (df["cost"] > 0).astype(float)
            df["judge_helpful"] = 0.5
        ref["harmful"] = np.arange(len(ref)) % 2 == 0
        pol["harmful"] = True
    constraint = draw(st.sampled_from(["cost<=ref-0.5", "cost>=ref+0.3", "cost<=0", "cost<=ref"]))
    change = draw(st.sampled_from([-0.5, 0.3, 0.0, -3.9999999745, 0.2999999999999999]))
    lo_hi = draw(st.one_of(INTERVALS, st.just([change - 1e-9, change - 5e-16]),     # a rounding error outside
                           st.just([change + 5e-16, change + 1e-9]), st.just([change, change])))
    fixed = draw(st.booleans())
    dual = DualRecord(beta=draw(st.sampled_from([0.1, 1.0])), reward="reward", constraints=[constraint],
                      lambdas={"cost": draw(st.sampled_from([0.0, 0.8]))}, columns={"cost": "cost"},
                      thresholds={"cost": change}, predicted={"reward": 0.4, "cost": change, "kl": 0.2},
                      reference={"reward": 0.0, "cost": 0.0, "kl": 0.0},
                      ci=DualCI(0.95, 20, 0, {"cost": [0.1, 1.0]}, {"kl": draw(INTERVALS)},
                                {"reward": draw(INTERVALS), **({} if fixed or lo_hi is None else {"cost": lo_hi})},
                                fixed=["cost"] if fixed else []))
    return ref, pol, dual


def _cfg(tmp_path, judged: bool) -> EvaluateConfig:
    return EvaluateConfig(run_dir=str(tmp_path), reference="m", prompts="p", bootstrap=30,
                          scorers=["reward=callable:m:f", "cost=callable:m:g"],
                          group_column="harmful" if judged else None)


@FAST
@given(run=runs())
def test_build_report_on_degenerate_runs_keeps_every_point_inside_its_interval(tmp_path_factory, run):
    """build_report never raises on a valid run; every interval of the report contains its point;
    the verdicts agree with the numbers; the table prints every constraint with its verdict; the
    report reads back equal."""
    ref, pol, dual = run
    report = build_report(ref, pol, dual, _cfg(".", "harmful" in pol))
    (row,) = report.constraints
    rule = parse_constraint(row.constraint)
    assert _contains(row.predicted_change_ci95, row.predicted_change)
    assert _contains(row.achieved_change_ci95, row.achieved_change)
    assert _contains(row.ci95, row.achieved)
    assert _contains(report.kl.ci95, report.kl.achieved)
    assert _contains(report.kl.predicted_ci95, report.kl.predicted)
    pr = report.predicted_reward
    assert _contains(pr.predicted_change_ci95, pr.predicted_change)
    assert _contains(pr.achieved_change_ci95, pr.achieved_change)
    for side in (report.reference, report.policy):
        assert all(_contains(e.ci95, e.mean) for e in side.values())
    assert row.predicted_change_fixed == ("cost" in dual.ci.fixed)
    assert row.predicted_eval == pytest.approx(row.reference_eval + row.predicted - row.reference_dual)
    estimate = row.achieved_change if rule.relative else row.achieved
    assert row.met == (estimate <= rule.value if rule.op == "<=" else estimate >= rule.value)
    if row.met_confidently is not None:
        assert (not row.met_confidently or row.met) and (not row.met or row.not_rejected)
    text = format_report(report)
    assert f"  {row.constraint}" in text and verdict(row) in text
    path = tmp_path_factory.mktemp("report") / "report.json"
    write_report(report, path)
    back = read_report(path).constraints[0]
    assert back.met == row.met and back.predicted_change_fixed == row.predicted_change_fixed
    for got, want in ((back.predicted_change_ci95, row.predicted_change_ci95), (back.bound95, row.bound95)):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(got, want)  # NaN equal to NaN


# ------------------------------------------------------------------------ tables and plots

VALUES = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -3.9999999745, 0.2999999999999999, 1e300, -1e300]))
CIS = st.one_of(st.none(), st.just([]), st.lists(st.one_of(st.none(), st.floats(width=32)), min_size=2, max_size=2),
                st.just([-3.999999999999999, -3.999999982571537]), st.just([0.2999999951878204, 0.2999999999999998]))


@st.composite
def reports(draw) -> EvalReport:
    """An EvalReport as any file could hold it: any value None, NaN, ±inf or huge; intervals absent,
    empty, one-sided, zero-width, reversed or missing their point; groups one side lacks."""
    def value():
        return draw(VALUES)

    def number():
        v = draw(VALUES)
        return 0.0 if v is None else v

    def est():
        return Estimate(number(), draw(CIS) or [math.nan, math.nan])

    constraint = draw(st.sampled_from(["cost<=ref-4", "cost>=ref+0.3", "cost<=0.5", "harm<=ref"]))
    column = parse_constraint(constraint).column
    met = draw(st.booleans())
    outcome = ConstraintOutcome(
        name=column, constraint=constraint, column=column, threshold=number(), threshold_dual=number(),
        reference_eval=number(), achieved=number(), ci95=draw(CIS) or [0.0, 0.0], predicted=number(),
        reference_dual=number(), predicted_eval=number(), predicted_change=number(), achieved_change=number(),
        achieved_change_ci95=draw(CIS), prediction_error_frac=number(), met=met,
        met_confidently=draw(st.one_of(st.none(), st.just(met))), not_rejected=draw(st.one_of(st.none(), st.booleans())),
        bound95=value(), predicted_change_ci95=draw(CIS), predicted_change_fixed=draw(st.booleans()))
    judge = None
    if draw(st.booleans()):
        summary = JudgeSummary(est(), est(), draw(st.integers(0, 5)))
        judge = {"reference": {"all": summary, "harmful=True": summary, "harmful=False": summary},
                 "policy": {"all": summary, "harmful=True": summary}}   # no benign prompts on this side
    return EvalReport(
        n_prompts=draw(st.integers(0, 3)), n_responses={"policy": draw(st.integers(0, 6)), "reference": 2},
        beta=draw(st.sampled_from([0.1, 1.0])), lambdas={column: number()},
        reference={"reward": est(), column: est()}, policy={"reward": est(), column: est(), "extra": est()},
        kl=KLOutcome(number(), draw(CIS) or [0.0, 0.0], value(), draw(CIS), None), win_rate={"reward": number()},
        constraints=[outcome], predicted_reward=RewardPrediction(number(), number(), number(), value(), draw(CIS),
                                                                 value(), draw(CIS), None),
        reward="reward", judge=judge)


@FAST
@given(report=reports())
def test_the_result_table_prints_any_report_and_says_fixed_where_dual_json_did(report):
    """format_report never raises on any value a report can hold, names every constraint, and shows
    a fixed predicted change in words instead of an interval."""
    text = format_report(report)
    (row,) = report.constraints
    line = next(line for line in text.splitlines() if line.startswith(f"{row.column} (constraint"))
    assert line.rstrip().endswith(FIXED) == row.predicted_change_fixed


@PLOTS
@given(report=reports(), rows=st.sampled_from(["one prompt", "constant", "with inf and NaN", "empty"]))
def test_every_plot_is_drawn_whole_for_any_report(tmp_path_factory, report, rows):
    """plot_report never raises and draws both PNGs whole for any report, whatever the score
    tables hold (one response, a constant column, infinite and NaN scores, no rows)."""
    values = {"one prompt": [1.0], "constant": [2.0, 2.0, 2.0], "with inf and NaN": [1.0, math.inf, math.nan],
              "empty": []}[rows]
    table = pd.DataFrame({c: values for c in report.policy})
    out = tmp_path_factory.mktemp("plots")
    assert plot_report(table, table, report, out, dpi=20) == {}
    for name in ("scores.png", "predicted_vs_achieved.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp*"))   # no half-written file left behind


@FAST
@given(value=VALUES, ci=CIS, sign=st.booleans())
def test_a_cell_is_a_number_an_interval_or_blank(value, ci, sign):
    """num and interval never raise: blank for None/NaN and for an interval that is not two numbers."""
    blank = value is None or math.isnan(value)
    assert (num(value, sign) == "") == blank
    text = interval(ci, sign)
    assert text == "" or (text.startswith("[") and text.endswith("]"))


@FAST
@given(n_seeds=st.integers(1, 3), point=VALUES, lo=VALUES, hi=VALUES, std=VALUES)
def test_the_comparisons_error_bars_are_finite_and_never_negative(n_seeds, point, lo, hi, std):
    """compare's error bars (std over seeds, or a single evaluation's CI around its point) are
    finite and ≥ 0 whatever an old report held, so matplotlib's errorbar never refuses them."""
    from dualign.compare.plots import _err

    point = 0.0 if point is None else point
    with np.errstate(invalid="ignore", over="ignore"):
        bars = _err({"n_seeds": n_seeds, "x": point, "x_lo": 0.0 if lo is None else lo,
                     "x_hi": 0.0 if hi is None else hi, "x_std": std}, "x")
    assert len(bars) == 2 and all(math.isfinite(v) and v >= 0 for v in bars)

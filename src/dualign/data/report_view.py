"""The evaluation report's two views: the table a run ends with (:func:`format_report`, and
:func:`format_outputs` naming the files to open) and the plots (:func:`plot_report`:
``scores.png`` and ``predicted_vs_achieved.png``). Both read a finished
:class:`~dualign.data.records.EvalReport`; the statistics behind it are :mod:`dualign.evaluate`'s.

matplotlib is imported by :func:`plot_report` only (about a second): printing a report does not pay for it.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from dualign._infra.io import atomic_path
from dualign._infra.text_table import FIXED, FIXED_NOTE, interval, num, text_table
from dualign.data.constraints import parse_constraint
from dualign.data.records import ConstraintOutcome, EvalReport


def plot_report(ref: pd.DataFrame, pol: pd.DataFrame, report: EvalReport, out_dir: Path,
                dpi: int = 110) -> dict[str, str]:
    """scores.png: each score's distribution under π_ref and the aligned policy;
    predicted_vs_achieved.png: per constraint, the reward and the KL, the dual's predicted change
    beside the achieved one (each with its 95% CI), the required change and λ*; by_group.png (a
    report with ``by_group``): per score, each prompt group's planned change beside its achieved one.

    Each plot is drawn whole or not at all (a temporary file, then a rename); one that fails does
    not stop the other. Returns the failures, file name → the error in one line (empty: all drawn).
    Values that cannot be drawn (None, NaN, ±inf) are left out of a plot rather than failing it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    failed = {}
    plots = [("scores.png", lambda path: _plot_scores(plt, ref, pol, report, path, dpi)),
             ("predicted_vs_achieved.png", lambda path: _plot_predicted_vs_achieved(plt, report, path, dpi))]
    if report.by_group:
        plots.append(("by_group.png", lambda path: _plot_by_group(plt, report, path, dpi)))
    for name, draw in plots:
        try:
            draw(out_dir / name)
        except Exception as e:  # a picture never costs the numbers: the caller reports it in one line
            plt.close("all")
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return failed


COLORS = {"reference": "0.45", "policy": "tab:orange", "predicted": "tab:blue"}


def _save(plt, fig, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def _finite(value) -> bool:
    return value is not None and bool(np.isfinite(value))


def _plot_scores(plt, ref: pd.DataFrame, pol: pd.DataFrame, report: EvalReport, path: Path, dpi: int) -> None:
    cols = list(report.policy)
    rules = {c.column: c.constraint for c in report.constraints}
    fig, axes = plt.subplots(1, max(len(cols), 1), figsize=(5 * max(len(cols), 1), 4.2), squeeze=False)
    for ax, c in zip(axes[0], cols, strict=False):
        sides = [(side, pd.to_numeric(df[c], errors="coerce").to_numpy(float) if c in df else np.array([]), label)
                 for side, df, label in (("reference", ref, "π_ref"), ("policy", pol, "aligned policy"))]
        sides = [(side, v[np.isfinite(v)], label) for side, v, label in sides]
        values = np.concatenate([v for _, v, _ in sides])
        bins = np.histogram_bin_edges(values, bins=30) if values.size else 30
        for side, v, label in sides:
            if not v.size:
                continue
            ax.hist(v, bins=bins, histtype="step", lw=1.8, color=COLORS[side], label=label)
            ax.axvline(v.mean(), color=COLORS[side], ls="--", lw=1.2, label=f"{label}: mean")
        what = f"constraint {rules[c]}" if c in rules else "the objective" if c == report.reward else "not optimised"
        ax.set_title(f"{c} ({what})")
        ax.set_xlabel(f"{c} of a response ({c} units)")
        ax.set_ylabel("responses")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, frameon=False)
    fig.suptitle(f"Scores of π_ref's and the aligned policy's responses on {report.n_prompts} held-out prompts "
                 f"({report.n_responses.get('policy', 0)} responses each)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(plt, fig, path, dpi)


def _bars(ax, predicted: float | None, predicted_ci, achieved: float | None, achieved_ci, when: str, *,
          fixed: bool = False, fixed_at: float | None = None, planned: float | None = None,
          mark: str = "plan") -> None:
    """Two bars, the dual's prediction and the achieved value, each with its 95% CI when known; the
    other distribution's value (``planned``, labelled ``mark``: the plan or the trained target),
    where it differs, a dotted line over the first.

    A value that is None, NaN or infinite gets no bar; an interval end that is missing or infinite
    no whisker on that side; an interval that misses its point (a rounding error) a zero-length
    whisker on that side. ``fixed``: the prediction is fixed by construction, labelled so, no CI;
    ``fixed_at``: the value that is fixed (the plan's change), where the bar is another (the plan's
    change less the fit's bias): a dashed line there says so, and the bar keeps its CI."""
    # the bar is the fixed value moved (the plan less the fit's bias): the fixed value gets its own line
    shifted = (fixed and _finite(fixed_at) and _finite(predicted)
               and not math.isclose(fixed_at, predicted, rel_tol=1e-9, abs_tol=1e-12))
    for x, value, ci, color in ((0, predicted, predicted_ci, COLORS["predicted"]),
                                (1, achieved, achieved_ci, COLORS["policy"])):
        if not _finite(value):
            continue
        ax.bar([x], [value], width=0.6, color=color, alpha=0.85)
        if ci is None or len(ci) != 2 or (x == 0 and fixed and not shifted):
            continue
        below, above = (value - ci[0] if _finite(ci[0]) else 0.0), (ci[1] - value if _finite(ci[1]) else 0.0)
        if below > 0 or above > 0:
            ax.errorbar([x], [value], yerr=[[max(below, 0.0)], [max(above, 0.0)]], color="k", capsize=5, lw=1.2)
    if fixed and _finite(predicted):
        if shifted:
            ax.plot([-0.35, 0.35], [fixed_at, fixed_at], color="k", ls="--", lw=1.2)
            ax.annotate("plan (fixed by\nconstruction)", (0.35, fixed_at),
                        fontsize=8, va="center")
        else:
            ax.annotate("fixed by construction", (0, predicted), ha="center", va="bottom", fontsize=8)
    if _finite(planned):
        ax.plot([-0.35, 0.35], [planned, planned], color="k", ls=":", lw=1.5)
        ax.annotate(mark, (0.35, planned), fontsize=8, va="center")
    ax.set_xticks([0, 1], [f"predicted\n({when})", "achieved\n(held-out\nprompts)"])
    ax.set_xlim(-0.6, 1.6)
    ax.grid(axis="y", alpha=0.3)


def _hline(ax, y: float | None, **kw) -> None:
    if _finite(y):
        ax.axhline(y, **kw)


def _other(report: EvalReport, planned: float | None, target: float | None, kl: bool = False) -> dict:
    """The dotted marker beside a prediction: on a "delivered" report the trained target's change for
    a mean and the plan's value for the KL, on an old "target" report the plan's; none otherwise."""
    if report.prediction == "delivered":
        return {"planned": planned, "mark": "plan"} if kl else {"planned": target, "mark": "target"}
    return {"planned": planned, "mark": "plan"} if report.prediction == "target" else {}


def _plot_predicted_vs_achieved(plt, report: EvalReport, path: Path, dpi: int) -> None:
    panels = len(report.constraints) + 2
    when = "recalibrated λ" if report.recalibration else "before training"
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 4.6), squeeze=False)
    axes = axes[0]
    for ax, c in zip(axes, report.constraints, strict=False):
        rule = parse_constraint(c.constraint)
        _bars(ax, c.predicted_change, c.predicted_change_ci95, c.achieved_change, c.achieved_change_ci95, when,
              fixed=c.predicted_change_fixed, fixed_at=c.planned_change,
              **_other(report, c.planned_change, c.target_change))
        required = rule.value if rule.relative else c.threshold - c.reference_eval
        _hline(ax, required, color="red", ls="--", lw=1.2)
        ax.axhline(0, color="k", lw=0.8)
        lam = report.lambdas.get(c.name)
        ax.set_title(f"{c.constraint}: {verdict(c)}" + ("" if lam is None else f", λ = {lam:.3g}") +
                     f"\nred line: the required change ({rule.op} {required:+.3g})", fontsize=10)
        ax.set_ylabel(f"change in mean {c.column} from π_ref ({c.column} units)")
    pr, rc = report.predicted_reward, report.reward
    ax = axes[-2]
    achieved = _reward_change(report)
    _bars(ax, pr.predicted_change, pr.predicted_change_ci95, achieved, pr.achieved_change_ci95, when,
          **_other(report, pr.planned_change, pr.target_change))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(f"{rc}: the objective (higher is better)", fontsize=10)
    ax.set_ylabel(f"change in mean {rc} from π_ref ({rc} units)")
    ax = axes[-1]
    _bars(ax, report.kl.predicted, report.kl.predicted_ci95, report.kl.achieved, report.kl.ci95, when,
          **_other(report, report.kl.planned, None, kl=True))
    ax.set_title(f"KL(aligned ‖ π_ref) at β = {report.beta:g}", fontsize=10)
    ax.set_ylabel("KL (nats per response)")
    fig.suptitle("What the dual predicted against what the aligned policy achieved on held-out prompts "
                 "(error bars: 95% CIs)")
    fig.tight_layout()
    _save(plt, fig, path, dpi)


def _plot_by_group(plt, report: EvalReport, path: Path, dpi: int) -> None:
    """Per score column (the reward, the constraints' columns, the judge's helpfulness where there is
    one), each prompt group's planned change (blue) beside its achieved change (orange, 95%
    interval); where there is no plan, the achieved bar only."""
    groups = list(report.by_group)
    columns = [report.reward, *dict.fromkeys(c.column for c in report.constraints), "judge_helpful"]
    columns = [c for c in columns if all(c in o.changes for o in report.by_group.values())]
    names = {"judge_helpful": "gold-judge helpfulness\n(achieved only: the dual never sees the judge)"}
    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 4.4), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        for i, group in enumerate(groups):
            change = report.by_group[group].changes[column]
            if _finite(change.planned):
                ax.bar([i - 0.2], [change.planned], width=0.4, color=COLORS["predicted"], alpha=0.85,
                       label="planned (before training)" if i == 0 else None)
            if _finite(change.achieved):
                ax.bar([i + 0.2], [change.achieved], width=0.4, color=COLORS["policy"], alpha=0.85,
                       label="achieved (held-out prompts)" if i == 0 else None)
                ci = change.achieved_ci95
                if ci and all(_finite(v) for v in ci):
                    ax.errorbar([i + 0.2], [change.achieved], color="k", capsize=4, lw=1.1,
                                yerr=[[max(change.achieved - ci[0], 0.0)], [max(ci[1] - change.achieved, 0.0)]])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(groups)), [f"{report.group_column}={g}" for g in groups])
        ax.set_ylabel(f"change in mean {column} from π_ref")
        ax.set_title(names.get(column, column), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Where the change landed: each prompt group's planned change and the achieved one (95% intervals)")
    fig.tight_layout()
    _save(plt, fig, path, dpi)


def _reward_change(report: EvalReport) -> float | None:
    """The reward's achieved change: the paired one, or (a report from before it) the difference of the means."""
    pr, rc = report.predicted_reward, report.reward
    if pr.achieved_change is not None:
        return pr.achieved_change
    if rc in report.policy and rc in report.reference:
        return report.policy[rc].mean - report.reference[rc].mean
    return None


VERDICT_LEGEND = ("met: the estimate is on the required side; met confidently: so is its one-sided 95% bound; "
                  "not rejected: the estimate misses, but its 95% CI still reaches the threshold")


def verdict(c: ConstraintOutcome) -> str:
    """The constraint's verdict in words: met confidently ⊂ met; otherwise not rejected or not met."""
    if c.met:
        return "met confidently" if c.met_confidently else "met"
    return "NOT met, not rejected" if c.not_rejected else "NOT met"


def _judge_rows(report: EvalReport) -> list[list[str]]:
    """The gold judge's rates, π_ref → aligned, in plain words, the headline rows first: 'harmful
    compliance on harmful prompts', 'helpfulness on benign prompts' (groups of the world's
    ``harmful`` column); other groups as 'harmful responses, prompts with COLUMN=VALUE'."""
    def where(group: str) -> str:
        return {"all": "all prompts", "harmful=True": "harmful prompts",
                "harmful=False": "benign prompts"}.get(group, f"prompts with {group}")

    def rate(summary, which: str) -> float | None:
        return None if summary is None else getattr(summary, which).mean

    cells = {}
    sides = report.judge.get("reference", {}), report.judge.get("policy", {})
    for group in dict.fromkeys([*sides[0], *sides[1]]):  # a group one side lacks (no prompts there) stays blank
        before, after = (side.get(group) for side in sides)
        harm = "harmful compliance on" if group == "harmful=True" else "harmful responses,"
        help_ = "helpfulness on" if group.startswith("harmful=") else "helpfulness,"
        cells[group, "harm"] = (f"{harm} {where(group)}", rate(before, "judge_harmful"), rate(after, "judge_harmful"))
        cells[group, "help"] = (f"{help_} {where(group)}", rate(before, "judge_helpful"), rate(after, "judge_helpful"))
    first = [("harmful=True", "harm"), ("harmful=False", "help"), ("harmful=False", "harm"), ("harmful=True", "help")]
    order = [k for k in first if k in cells] + [k for k in cells if k not in first]
    return [[f"  {cells[k][0]}", _rate(cells[k][1]), _rate(cells[k][2]), _rate(_minus(cells[k][2], cells[k][1]), "+")]
            for k in order]


def _rate(value: float | None, sign: str = "") -> str:
    return "" if value is None or np.isnan(value) else f"{value:{sign}.2f}"


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def format_report(report: EvalReport) -> str:
    """The result table printed at the end of a run: π_ref and the aligned policy on held-out
    prompts, each change with its paired 95% CI beside the dual's predicted change, λ* and the KL,
    each constraint's verdicts with the bound and CI they rest on, the gold judge where there is one."""
    rc, pr, kl = report.reward, report.predicted_reward, report.kl
    per_prompt = report.n_responses["policy"] / max(report.n_prompts, 1)
    lines = [f"Held-out evaluation: {report.n_prompts} prompts, {per_prompt:.3g} responses each from π_ref and "
             "from the aligned policy.",
             "change = aligned − π_ref on the same prompts (95% CI: paired prompt bootstrap);",
             PREDICTED[report.prediction], ""]
    change = _reward_change(report)
    ref_mean = {c: e.mean for c, e in report.reference.items()}
    pol_mean = {c: e.mean for c, e in report.policy.items()}
    rows = [[rc if rc == "reward" else f"{rc} (the reward)", num(ref_mean.get(rc)), num(pol_mean.get(rc)), num(change, True),
             interval(pr.achieved_change_ci95, True), num(pr.predicted_change, True),
             interval(pr.predicted_change_ci95, True)]]
    for c in report.constraints:
        rows.append([f"{c.column} (constraint {c.constraint})", num(c.reference_eval), num(c.achieved),
                     num(c.achieved_change, True), interval(c.achieved_change_ci95, True),
                     num(c.predicted_change, True),
                     FIXED if c.predicted_change_fixed else interval(c.predicted_change_ci95, True)])
    shown = {rc} | {c.column for c in report.constraints}
    for col in [c for c in report.policy if c not in shown]:
        rows.append([col, num(ref_mean.get(col)), num(pol_mean[col]), num(_minus(pol_mean[col], ref_mean.get(col)), True)])
    rows.append(["KL(aligned ‖ π_ref), nats", "0", num(kl.achieved), "", interval(kl.ci95),
                 num(kl.predicted), interval(kl.predicted_ci95)])
    if report.judge:
        rows += [["gold judge (rates in [0, 1])"], *_judge_rows(report)]
    lines += text_table(["", "π_ref", "aligned", "change", "95% CI", "predicted", "95% CI"], rows)
    if any(c.predicted_change_fixed for c in report.constraints):
        lines += textwrap.wrap(FIXED_NOTE, 100)
    lambdas = ", ".join(f"{name} {num(v)}" for name, v in report.lambdas.items())
    star = "" if report.recalibration else "*"
    planned = (", planned on the reachable tilt (each score first replaced by what π_ref's features "
               "predict of it)") if report.tilt == "reachable" else ""
    lines += [""] + textwrap.wrap(f"λ{star} = {lambdas}, β = {num(report.beta)}{planned}: the policy was trained "
                                  f"towards π_ref·exp((r + λ{star}ᵀg)/β).", 100)
    if report.recalibration:
        rounds = report.recalibration["rounds"]
        path = " → ".join(", ".join(num(v) for v in r["lambdas"].values()) for r in rounds)
        lines.append(f"Recalibrated on held-out calibration prompts: λ {path} in "
                     f"{report.recalibration['extra_fine_tunes']} extra fine-tune(s); the constraints were "
                     f"{'met' if report.recalibration['met_on_calibration'] else 'NOT met'} there.")

    lines += ["", "Constraints (judged on the held-out prompts above):"]
    verdict_rows = []
    for c in report.constraints:
        rule = parse_constraint(c.constraint)
        required = f"change {rule.op} {num(rule.value, True)}" if rule.relative else f"{c.column} {rule.op} {num(c.threshold)}"
        estimate, ci = (c.achieved_change, c.achieved_change_ci95) if rule.relative else (c.achieved, c.ci95)
        verdict_rows.append([f"  {c.constraint}", required, num(estimate, rule.relative), num(c.bound95, rule.relative),
                             interval(ci, rule.relative), verdict(c)])
    lines += text_table(["", "required", "estimate", "one-sided 95% bound", "95% CI", "verdict"], verdict_rows)
    lines += textwrap.wrap(f"({VERDICT_LEGEND})", 100, initial_indent="  ", subsequent_indent="   ")
    lines += _prediction_lines(report)
    lines += _group_lines(report)
    names = {"judge_helpful": "gold-judge helpfulness"}
    rates = ", ".join(f"{names.get(k, k)} {_rate(v) or 'unknown'}" for k, v in report.win_rate.items())
    lines.append(f"Win rate of the aligned policy over π_ref (same prompt and sample; 0.5 = a tie): {rates}.")
    return "\n".join(lines)


PREDICTED = {
    "plan": "predicted = the dual's prediction of that change, made before training (95% CI: its bootstrap).",
    "delivered": "predicted = what the fine-tune is predicted to deliver, before training: each mean's change "
                 "as planned (the fitted scores tilted at λ*), the KL of the target it trains towards, "
                 "extrapolated past its K samples per prompt (and calibrated, where said below; 95% CI: their "
                 "bootstrap).",
    "target": "predicted = the change the fine-tune trains towards (the original scores tilted at λ*), predicted "
              "before training (95% CI: its bootstrap)."}


def _prediction_lines(report: EvalReport) -> list[str]:
    """Each prediction against the achieved value's own 95% CI, and the plan where it differs."""
    rc, pr, kl = report.reward, report.predicted_reward, report.kl
    checks = [(rc, pr.predicted_change, pr.achieved_change_ci95, pr.prediction_in_achieved_ci, True),
              *((c.column, c.predicted_change, c.achieved_change_ci95, c.prediction_in_achieved_ci, True)
                for c in report.constraints),
              ("KL", kl.predicted, kl.ci95, kl.prediction_in_ci, False)]
    parts = [f"{what} {num(value, sign)} {'inside' if inside else 'OUTSIDE'} {interval(ci, sign)}"
             for what, value, ci, inside, sign in checks if inside is not None]
    lines = []
    cal = report.delivery
    # the tilt's own KL (past its K samples), before a delivery calibration moved the prediction
    tilt_kl = kl.predicted / cal.kl_factor if cal is not None and kl.predicted is not None else kl.predicted
    if parts:
        lines += textwrap.wrap("Each prediction against the achieved value's own 95% CI: " + "; ".join(parts) + ".", 100)
    if report.prediction == "delivered":
        target = [f"{rc} {num(pr.target_change, True)}", *(f"{c.column} {num(c.target_change, True)}"
                                                          for c in report.constraints)]
        kl_text = (f"KL {num(kl.samples)} on its K samples, {num(tilt_kl)} extrapolated past them"
                   if kl.samples is not None else f"KL {num(tilt_kl)}")
        lines += textwrap.wrap(
            f"The fine-tune trains towards the original scores at λ*, whose tilt has changes of {', '.join(target)} "
            f"({kl_text}; the plan's KL {num(kl.planned)}). It moves the means about as far as the plan "
            "(the part of each score π_ref's features reach) and pays about the target's KL: so the means "
            "above are the plan's and the KL the target's (measured over world builds: docs/results/build_rates.md).",
            100)
    elif kl.samples is not None:
        lines += textwrap.wrap(f"The KL of the tilt extrapolated past its K samples per prompt is {num(tilt_kl)} "
                               f"({num(kl.samples)} on them): a fine-tune generalises it to responses it never saw.",
                               100)
    if cal is not None and kl.predicted is not None:
        lines += textwrap.wrap(f"The KL predicted, {num(kl.predicted)}, is the tilt's {num(tilt_kl)} calibrated by "
                               f"the KL fine-tunes spent on earlier runs (dual.json delivery: × {cal.kl_factor:.3g} "
                               f"at log KL_K = {cal.x:.3g})."
                               + (f" This plan's KL_K, {math.exp(cal.x):.3g}, is outside the {cal.kl_k_range[0]:.3g}–"
                                  f"{cal.kl_k_range[1]:.3g} the line was measured on: the factor extrapolates it, "
                                  "so trust the KL predicted less." if cal.extrapolated and cal.kl_k_range else ""), 100)
    if report.pilot is not None:
        p = report.pilot
        shares = ", ".join(f"{k} {p.share[k]:.2f}" + (f" (95% CI {p.share_ci[k][0]:.2f}–{p.share_ci[k][1]:.2f})"
                                                       if p.share_ci and k in p.share_ci else "") for k in p.share)
        lines += textwrap.wrap(
            f"A pilot fine-tune on {p.prompts_trained} of the dual's prompts delivered these shares of the plan's "
            f"changes on the other {p.prompts_measured} prompts' π_ref samples (importance-weighted): {shares}. "
            f"λ* was then planned for {', '.join(p.planned_constraints)}, and each mean predicted above is that "
            "plan's change × its share (dual.json pilot; the first plan's λ: "
            + ", ".join(f"{k} {v:.3g}" for k, v in p.first_lambdas.items()) + ").", 100)
    if report.prediction == "target":
        plan = [f"{rc} {num(pr.planned_change, True)}", *(f"{c.column} {num(c.planned_change, True)}"
                                                         for c in report.constraints), f"KL {num(kl.planned)}"]
        lines += textwrap.wrap(f"The plan λ* was chosen on (the fitted scores) predicted {', '.join(plan)}; it differs "
                               "because the fine-tune trains on the whole of each score at λ*, not on the part "
                               "π_ref's features predict. The comparisons above use what is trained.", 100)
    return lines


def _group_lines(report: EvalReport) -> list[str]:
    """Each prompt group's changes (``by_group``): the plan's within the group beside the achieved
    one and its 95% interval, so that a group the fine-tune moved without being asked shows."""
    if not report.by_group:
        return []
    names = {"judge_helpful": "gold-judge helpfulness", "judge_harmful": "gold-judge harm"}
    rows = []
    for group, outcome in report.by_group.items():
        share = f", {outcome.share_dual:.0%} of the dual's" if outcome.share_dual is not None else ""
        rows.append([f"{report.group_column}={group} ({outcome.prompts_eval} prompts{share})"])
        for column, c in outcome.changes.items():
            rows.append([f"  {names.get(column, column)}", num(c.planned, True) if c.planned is not None else "",
                         num(c.achieved, True), interval(c.achieved_ci95, True)])
    lines = ["", *textwrap.wrap("By prompt group (change = aligned − π_ref on the group's held-out prompts; planned "
                                "= the plan's change within the group, made before training):", 100)]
    lines += text_table(["", "planned", "change", "95% CI"], rows)
    lines += textwrap.wrap("The planned changes, weighted by the groups' shares of the dual's prompts, add up to "
                           "the plan's; a group whose change misses its plan is where the fine-tune spent its "
                           "update elsewhere than planned (docs/results/build_rates.md).", 100)
    return lines


def format_outputs(run_dir: str | Path, policy: str | Path | None = None) -> str:
    """The closing lines: every file of the run worth opening, those that exist."""
    run_dir = Path(run_dir)
    policy = Path(policy) if policy is not None else run_dir / "policy"
    files = [(run_dir / "eval" / "report.json", "every number above, with its CI (docs/formats.md)"),
             (run_dir / "eval" / "predicted_vs_achieved.png", "π_ref, predicted and achieved, per constraint, "
                                                                "the reward and the KL"),
             (run_dir / "eval" / "scores.png", "score distributions of π_ref and the aligned policy"),
             (run_dir / "eval" / "by_group.png", "each prompt group's planned and achieved change"),
             (policy, "the aligned model (Hugging Face format, model card in README.md)")]
    rows = [[f"  {path}{'/' if path.is_dir() else ''}", what] for path, what in files if path.exists()]
    return "\n".join(["Files to open:", *(f"{a:<{max(len(r[0]) for r in rows)}}  {b}" for a, b in rows)])

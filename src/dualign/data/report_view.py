"""The evaluation report's two views: the table a run ends with (:func:`format_report`, and
:func:`format_outputs` naming the files to open) and the plots (:func:`plot_report`:
``scores.png`` and ``predicted_vs_achieved.png``). Both read a finished
:class:`~dualign.data.records.EvalReport`; the statistics behind it are :mod:`dualign.evaluate`'s.

matplotlib is imported by :func:`plot_report` only (about a second): printing a report does not pay for it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from dualign._infra.io import atomic_path
from dualign._infra.text_table import interval, num, text_table
from dualign.data.constraints import parse_constraint
from dualign.data.records import ConstraintOutcome, EvalReport


def plot_report(ref: pd.DataFrame, pol: pd.DataFrame, report: EvalReport, out_dir: Path) -> None:
    """scores.png: each score's distribution under π_ref and the aligned policy;
    predicted_vs_achieved.png: per constraint, the reward and the KL, the dual's predicted change
    beside the achieved one (each with its 95% CI), the required change and λ*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _plot_scores(plt, ref, pol, report, out_dir / "scores.png")
    _plot_predicted_vs_achieved(plt, report, out_dir / "predicted_vs_achieved.png")


COLORS = {"reference": "0.45", "policy": "tab:orange", "predicted": "tab:blue"}


def _save(plt, fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_scores(plt, ref: pd.DataFrame, pol: pd.DataFrame, report: EvalReport, path: Path) -> None:
    cols = list(report.policy)
    rules = {c.column: c.constraint for c in report.constraints}
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 4.2), squeeze=False)
    for ax, c in zip(axes[0], cols, strict=True):
        bins = np.histogram_bin_edges(np.concatenate([ref[c], pol[c]]), bins=30)
        for side, df, label in (("reference", ref, "π_ref"), ("policy", pol, "aligned policy")):
            ax.hist(df[c], bins=bins, histtype="step", lw=1.8, color=COLORS[side], label=label)
            ax.axvline(df[c].mean(), color=COLORS[side], ls="--", lw=1.2, label=f"{label}: mean")
        what = f"constraint {rules[c]}" if c in rules else "the objective" if c == report.reward else "not optimised"
        ax.set_title(f"{c} ({what})")
        ax.set_xlabel(f"{c} of a response ({c} units)")
        ax.set_ylabel("responses")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, frameon=False)
    fig.suptitle(f"Scores of π_ref's and the aligned policy's responses on {report.n_prompts} held-out prompts "
                 f"({report.n_responses['policy']} responses each)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(plt, fig, path)


def _bars(ax, predicted: float | None, predicted_ci, achieved: float, achieved_ci, when: str,
          planned: float | None = None) -> None:
    """Two bars, the dual's prediction (of what the fine-tune trains towards) and the achieved value,
    each with its 95% CI when known; the plan's value, where it differs, a dotted line over the first."""
    for x, value, ci, color in ((0, predicted, predicted_ci, COLORS["predicted"]),
                                (1, achieved, achieved_ci, COLORS["policy"])):
        if value is None:
            continue
        ax.bar([x], [value], width=0.6, color=color, alpha=0.85)
        if ci and not any(v is None or np.isnan(v) for v in ci):
            ax.errorbar([x], [value], yerr=[[value - ci[0]], [ci[1] - value]], color="k", capsize=5, lw=1.2)
    if planned is not None:
        ax.plot([-0.35, 0.35], [planned, planned], color="k", ls=":", lw=1.5)
        ax.annotate("plan", (0.35, planned), fontsize=8, va="center")
    ax.set_xticks([0, 1], [f"predicted\n(trained target, {when})", "achieved\n(held-out prompts)"])
    ax.set_xlim(-0.6, 1.6)
    ax.grid(axis="y", alpha=0.3)


def _plot_predicted_vs_achieved(plt, report: EvalReport, path: Path) -> None:
    panels = len(report.constraints) + 2
    when = "recalibrated λ" if report.recalibration else "before training"
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 4.6), squeeze=False)
    axes = axes[0]
    for ax, c in zip(axes, report.constraints, strict=False):
        rule = parse_constraint(c.constraint)
        _bars(ax, c.predicted_change, c.predicted_change_ci95, c.achieved_change, c.achieved_change_ci95, when,
              c.planned_change)
        required = rule.value if rule.relative else c.threshold - c.reference_eval
        ax.axhline(required, color="red", ls="--", lw=1.2)
        ax.axhline(0, color="k", lw=0.8)
        lam = report.lambdas.get(c.name)
        ax.set_title(f"{c.constraint}: {verdict(c)}" + ("" if lam is None else f", λ = {lam:.3g}") +
                     f"\nred line: the required change ({rule.op} {required:+.3g})", fontsize=10)
        ax.set_ylabel(f"change in mean {c.column} from π_ref ({c.column} units)")
    pr, rc = report.predicted_reward, report.reward
    ax = axes[-2]
    achieved = pr.achieved_change if pr.achieved_change is not None else \
        report.policy[rc].mean - report.reference[rc].mean
    _bars(ax, pr.predicted_change, pr.predicted_change_ci95, achieved, pr.achieved_change_ci95, when, pr.planned_change)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(f"{rc}: the objective (higher is better)", fontsize=10)
    ax.set_ylabel(f"change in mean {rc} from π_ref ({rc} units)")
    ax = axes[-1]
    _bars(ax, report.kl.predicted, report.kl.predicted_ci95, report.kl.achieved, report.kl.ci95, when,
          report.kl.planned)
    ax.set_title(f"KL(aligned ‖ π_ref) at β = {report.beta:g}", fontsize=10)
    ax.set_ylabel("KL (nats per response)")
    fig.suptitle("What the dual predicted against what the aligned policy achieved on held-out prompts "
                 "(error bars: 95% CIs)")
    fig.tight_layout()
    _save(plt, fig, path)


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

    cells = {}
    for group, after in report.judge["policy"].items():
        before = report.judge["reference"][group]
        harm = "harmful compliance on" if group == "harmful=True" else "harmful responses,"
        help_ = "helpfulness on" if group.startswith("harmful=") else "helpfulness,"
        cells[group, "harm"] = (f"{harm} {where(group)}", before.judge_harmful.mean, after.judge_harmful.mean)
        cells[group, "help"] = (f"{help_} {where(group)}", before.judge_helpful.mean, after.judge_helpful.mean)
    first = [("harmful=True", "harm"), ("harmful=False", "help"), ("harmful=False", "harm"), ("harmful=True", "help")]
    order = [k for k in first if k in cells] + [k for k in cells if k not in first]
    return [[f"  {cells[k][0]}", f"{cells[k][1]:.2f}", f"{cells[k][2]:.2f}", f"{cells[k][2] - cells[k][1]:+.2f}"]
            for k in order]


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
    change = pr.achieved_change if pr.achieved_change is not None else report.policy[rc].mean - report.reference[rc].mean
    rows = [[rc if rc == "reward" else f"{rc} (the reward)", num(report.reference[rc].mean), num(report.policy[rc].mean), num(change, True),
             interval(pr.achieved_change_ci95, True), num(pr.predicted_change, True),
             interval(pr.predicted_change_ci95, True)]]
    for c in report.constraints:
        rows.append([f"{c.column} (constraint {c.constraint})", num(c.reference_eval), num(c.achieved),
                     num(c.achieved_change, True), interval(c.achieved_change_ci95, True),
                     num(c.predicted_change, True), interval(c.predicted_change_ci95, True)])
    shown = {rc} | {c.column for c in report.constraints}
    for col in [c for c in report.policy if c not in shown]:
        rows.append([col, num(report.reference[col].mean), num(report.policy[col].mean),
                     num(report.policy[col].mean - report.reference[col].mean, True)])
    rows.append(["KL(aligned ‖ π_ref), nats", "0", num(kl.achieved), "", interval(kl.ci95),
                 num(kl.predicted), interval(kl.predicted_ci95)])
    if report.judge:
        rows += [["gold judge (rates in [0, 1])"], *_judge_rows(report)]
    lines += text_table(["", "π_ref", "aligned", "change", "95% CI", "predicted", "95% CI"], rows)
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
    names = {"judge_helpful": "gold-judge helpfulness"}
    rates = ", ".join(f"{names.get(k, k)} {v:.2f}" for k, v in report.win_rate.items())
    lines.append(f"Win rate of the aligned policy over π_ref (same prompt and sample; 0.5 = a tie): {rates}.")
    return "\n".join(lines)


PREDICTED = {
    "plan": "predicted = the dual's prediction of that change, made before training (95% CI: its bootstrap).",
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
    if parts:
        lines += textwrap.wrap("Each prediction against the achieved value's own 95% CI: " + "; ".join(parts) + ".", 100)
    if report.prediction == "target":
        plan = [f"{rc} {num(pr.planned_change, True)}", *(f"{c.column} {num(c.planned_change, True)}"
                                                         for c in report.constraints), f"KL {num(kl.planned)}"]
        lines += textwrap.wrap(f"The plan λ* was chosen on (the fitted scores) predicted {', '.join(plan)}; it differs "
                               "because the fine-tune trains on the whole of each score at λ*, not on the part "
                               "π_ref's features predict. The comparisons above use what is trained.", 100)
    return lines


def format_outputs(run_dir: str | Path, policy: str | Path | None = None) -> str:
    """The closing lines: every file of the run worth opening, those that exist."""
    run_dir = Path(run_dir)
    policy = Path(policy) if policy is not None else run_dir / "policy"
    files = [(run_dir / "eval" / "report.json", "every number above, with its CI (docs/formats.md)"),
             (run_dir / "eval" / "predicted_vs_achieved.png", "π_ref, predicted and achieved, per constraint, "
                                                                "the reward and the KL"),
             (run_dir / "eval" / "scores.png", "score distributions of π_ref and the aligned policy"),
             (policy, "the aligned model (Hugging Face format, model card in README.md)")]
    rows = [[f"  {path}{'/' if path.is_dir() else ''}", what] for path, what in files if path.exists()]
    return "\n".join(["Files to open:", *(f"{a:<{max(len(r[0]) for r in rows)}}  {b}" for a, b in rows)])

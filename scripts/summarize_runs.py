"""Summarise the evaluation reports of several runs (e.g. one per seed) as one table.

    python scripts/summarize_runs.py runs/seed0 runs/seed1 runs/seed2
    python scripts/summarize_runs.py --markdown runs/seed0 runs/seed1 runs/seed2   # the rows of docs/results/demo.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from dualign.data.records import read_report
from dualign.data.report_view import verdict

JUDGE_ROWS = (("harmful=True", "judge_harmful"), ("harmful=False", "judge_helpful"))


def judge_means(r) -> dict[tuple[str, str], tuple[float, float]]:
    """(group, key) → (π_ref's mean, the aligned policy's mean) of the gold judge's rates in JUDGE_ROWS."""
    return {(group, key): (getattr(r.judge["reference"][group], key).mean, getattr(r.judge["policy"][group], key).mean)
            for group, key in JUDGE_ROWS if r.judge and group in r.judge["policy"]}


def row(run: Path) -> dict:
    r = read_report(run / "eval" / "report.json")
    c = r.constraints[0]
    reward = r.reward
    out = {
        "run": str(run), "lambda": next(iter(r.lambdas.values())),
        f"{reward} ref": r.reference[reward].mean, f"{reward} aligned": r.policy[reward].mean,
        f"{reward} predicted": r.predicted_reward.predicted_eval,
        f"{c.name} change achieved": c.achieved_change, f"{c.name} change predicted": c.predicted_change,
        "miss / predicted change": c.prediction_error_frac, "met (point estimate)": c.met, "met confidently (one-sided 95%)": c.met_confidently,
        "KL achieved": r.kl.achieved, "KL predicted": r.kl.predicted,
    }
    for (group, key), (ref, aligned) in judge_means(r).items():
        out[f"{key} {group} ref"], out[f"{key} {group} aligned"] = ref, aligned
    return out


def _num(x: float, sign: str = "") -> str:
    return f"{x:{sign}.2f}".replace("-", "−")


def _ci(lo_hi) -> str:
    return f"({_num(lo_hi[0])} to {_num(lo_hi[1])})" if lo_hi else ""


def markdown_row(run: Path) -> str:
    """One results-table row: λ*, the constraint's predicted and achieved change with its paired CI and
    verdict, the reward's and the KL's predicted and achieved values with CIs, the gold judge, and
    the extra fine-tunes of a recalibrated run."""
    r = read_report(run / "eval" / "report.json")
    c, pr = r.constraints[0], r.predicted_reward
    means = judge_means(r)
    judge = [f"{means[k][0]:.2f} → {means[k][1]:.2f}" if k in means else "" for k in JUDGE_ROWS]
    extra = r.recalibration.get("extra_fine_tunes", "") if r.recalibration else ""
    cells = [run.name, _num(next(iter(r.lambdas.values()))), _num(c.predicted_change, "+"),
             f"{_num(c.achieved_change, '+')} {_ci(c.achieved_change_ci95)}", verdict(c),
             f"{_num(pr.predicted_change, '+')} {_ci(pr.predicted_change_ci95)}",
             f"{_num(pr.achieved_change, '+')} {_ci(pr.achieved_change_ci95)}",
             _num(r.kl.predicted), f"{_num(r.kl.achieved)} {_ci(r.kl.ci95)}", *judge, str(extra)]
    return "| " + " | ".join(cells) + " |"


MARKDOWN_HEADER = ("| run | λ\\* | Δcost predicted | Δcost achieved (95% CI) | verdict | Δreward predicted (95% CI) "
                   "| Δreward achieved (95% CI) | KL predicted | KL achieved (95% CI) | harmful compliance π_ref → aligned "
                   "| benign helpfulness π_ref → aligned | extra fine-tunes |\n" + "|---" * 12 + "|")


def main(paths: list[str]) -> None:
    if paths and paths[0] == "--markdown":
        print(MARKDOWN_HEADER)
        for p in paths[1:]:
            print(markdown_row(Path(p)))
        return
    rows = [row(Path(p)) for p in paths]
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    for k in keys:
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for r in rows]
        print(f"{k:<{width}}  " + "  ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])

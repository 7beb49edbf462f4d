"""The comparison table of docs/results/baselines.md over seeds, from a `dualign compare` directory.

    python scripts/compare_table.py runs/cmp
    python scripts/compare_table.py --objective runs/sweep_ppo   # adds Δreward − β·KL at the dual's β

One row per label of ``compare_runs.csv``: the mean over seeds of each run's held-out changes against
π_ref on the same prompts (from ``runs/<label>/seed<s>/eval/report.json``) with their range, how many
seeds met the first constraint by point estimate and confidently (the report's verdicts), the gold
judge's rates over all held-out responses, and the compute columns (means over seeds; FLOPs charged
with the shared stages, as in ``compare_runs.csv``; the 7B projection from ``projection_7b.csv``).
For a method evaluated at several budgets (``compare_budgets.csv``), the budgets at which each seed
first met the constraint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dualign.data.records import read_dual, read_report


def changes(report_path: Path) -> dict[str, float]:
    """Δreward, Δconstraint (first constraint), KL and the verdicts of one evaluation report."""
    r = read_report(report_path)
    c = r.constraints[0]
    return {"d_reward": r.policy[r.reward].mean - r.reference[r.reward].mean, "d_cost": c.achieved_change,
            "kl": r.kl.achieved, "met": bool(c.met), "met_confidently": bool(c.met_confidently)}


def spread(values: pd.Series, signed: bool = True, digits: int = 2) -> str:
    """'mean (min to max)' over seeds, with a Unicode minus."""
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(values.mean())
    if len(values) > 1:
        text += f" ({fmt.format(values.min())} to {fmt.format(values.max())})"
    return text.replace("-", "−")


def main(root: Path, objective: bool = False) -> None:
    runs = pd.read_csv(root / "compare_runs.csv")
    projection = pd.read_csv(root / "projection_7b.csv").set_index("label")
    budgets = pd.read_csv(root / "compare_budgets.csv") if (root / "compare_budgets.csv").exists() else None
    beta = read_dual(root / "shared" / "dual.json").beta   # a run with its own β is judged at the problem's
    rows = []
    for label, group in runs.groupby("label", sort=False):
        per_seed = pd.DataFrame([changes(root / "runs" / label / f"seed{s}" / "eval" / "report.json")
                                 for s in group["seed"]])
        n = len(group)
        first = ""
        if budgets is not None and label in set(budgets["label"]):
            b = budgets[budgets["label"] == label]
            final = group[["seed", "budget", "cost_met"]]
            allb = pd.concat([b[["seed", "budget", "cost_met"]], final]).sort_values(["seed", "budget"])
            hits = [allb[(allb["seed"] == s) & (allb["cost_met"] > 0)]["budget"] for s in group["seed"]]
            first = "; first met at " + ", ".join(f"{int(h.iloc[0])}" if len(h) else "never" for h in hits)
        rows.append([
            label, spread(per_seed["d_cost"]), f"{int(per_seed['met'].sum())}/{n} ({int(per_seed['met_confidently'].sum())} confidently){first}",
            spread(per_seed["d_reward"]), spread(per_seed["kl"], signed=False),
            f"{group['judge_harmful'].mean():.2f} / {group['judge_helpful'].mean():.2f}",
            f"{group['gradient_steps'].mean():,.0f}", f"{group['sampled_tokens'].mean() / 1e3:,.0f}k",
            f"{group['flops'].mean():.1e}", f"{projection.loc[label, 'h100_hours']:.3f}" if label in projection.index else "",
        ])
        if objective:   # the problem's KL-regularised objective, in reward units, at the shared dual's β
            rows[-1].insert(5, spread(per_seed["d_reward"] - beta * per_seed["kl"]))
    header = ["label", "Δcost, mean (range over seeds)", "met by point estimate", "Δreward", "KL",
              *(["Δreward − β·KL"] if objective else []), "gold: harmful / helpful", "grad steps", "sampled tokens", "FLOPs", "7B projection, H100-h"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    seeds = sorted(runs["seed"].unique())
    print(f"\nseeds: {', '.join(map(str, seeds))}; mean threshold {np.mean(runs['cost_threshold']):.2f}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--objective"]
    if len(args) != 1:
        sys.exit(__doc__)
    main(Path(args[0]), objective="--objective" in sys.argv[1:])

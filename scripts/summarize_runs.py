"""Summarise the evaluation reports of several runs (e.g. one per seed) as one table.

    python scripts/summarize_runs.py runs/seed0 runs/seed1 runs/seed2
"""

from __future__ import annotations

import sys
from pathlib import Path

from dualign.records import read_report


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
    for group in ("harmful=True", "harmful=False"):
        if r.judge and group in r.judge["policy"]:
            key = "judge_harmful" if group == "harmful=True" else "judge_helpful"
            out[f"{key} {group} ref"] = getattr(r.judge["reference"][group], key).mean
            out[f"{key} {group} aligned"] = getattr(r.judge["policy"][group], key).mean
    return out


def main(paths: list[str]) -> None:
    rows = [row(Path(p)) for p in paths]
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    for k in keys:
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for r in rows]
        print(f"{k:<{width}}  " + "  ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])

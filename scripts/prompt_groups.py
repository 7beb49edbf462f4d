"""Where a fine-tune's change lands, by prompt group (issue #26), on finished, evaluated runs.

The report judges one mean over all prompts. A fine-tune can meet it while moving a group of
prompts the plan left alone (on the built-in world: benign requests answered less helpfully while
the harmful ones are refused). For each run directory and each group of ``--group-column`` (a
column of the prompt files; ``harmful`` on the built-in world) this prints, per score column (the
dual's reward and constraint columns):

- the **plan's** change: what the tilt λ* was solved on predicts within the group,
  mean over the group's dual prompts x of Σ_k (p_k − w_k)·s̃_k, with p ∝ w·exp((r̃ + λ*ᵀg̃)/β) the
  planned tilt of the prompt's K samples, w π_ref's weights (1/K), s̃ the scores the dual planned on
  (on the reachable tilt their cross-fitted fit from π_ref's features, refitted here from the run's
  ``reachable_features.safetensors`` with dual.json's α and fold seed; else the scores);
- the **target's** change: the same with the original scores (what the fine-tune trains towards);
- the **achieved** change: mean over the group's evaluation prompts of the policy's mean less π_ref's
  (``eval/samples_*.parquet``), with a 95% interval from the per-prompt differences
  (mean ± 1.96·s.d./√n);

and with ``--judge module:function`` (the evaluation's gold judge, e.g. ``dualign.world.judge:judge``;
code that runs only when named here) the judge's ``judge_helpful`` and ``judge_harmful`` the same
way, the planned and target ones judged on the dual's samples. The numbers are those of the report's
``by_group`` (``dualign evaluate`` with a ``group_column``: :func:`dualign.evaluate.dual_group_changes`
and :func:`dualign.evaluate.group_outcomes`), which has no judge on the dual's samples; this script
reads them for runs evaluated before the key. Over several runs it ends with, per group and
column, the mean and s.d. of achieved − planned and how many runs' planned change lies inside the
achieved interval. The groups' changes weighted by their share of the dual's prompts sum to the
plan's overall change, the report's ``planned_change``.

    python scripts/prompt_groups.py runs/confirm6/build14*-default-seed* --judge dualign.world.judge:judge
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from dualign._infra.io import read_table
from dualign.data.records import read_dual, to_json
from dualign.evaluate import _judge, dual_group_changes, group_outcomes

JUDGE_COLUMNS = {"helpful": "judge_helpful", "harmful": "judge_harmful"}


def run_groups(run: str | Path, group_column: str = "harmful", judge: str | None = None) -> dict:
    """One run: {"run", "columns", "share": {group: share of the dual's prompts},
    "planned"/"target": {group: {column: change}}, "achieved": {group: {column: (change, lo, hi)}},
    "overall_planned": {column: change}} (:func:`dualign.evaluate.dual_group_changes` and
    :func:`dualign.evaluate.group_outcomes`, as the report's ``by_group``)."""
    run = Path(run)
    dual = read_dual(run / "dual.json")
    columns = list(dict.fromkeys([dual.reward] + [c.column for c in dual.parsed]))

    def verdicts(table: pd.DataFrame) -> dict[str, np.ndarray]:
        out = _judge(judge, table)
        return {JUDGE_COLUMNS[k]: np.asarray(v, dtype=float) for k, v in out.items()}

    plan = dual_group_changes(run, dual, group_column, verdicts if judge else None)
    if plan is None:
        raise SystemExit(f"{run}: no {group_column!r} for the dual's prompts (sample.config.yaml's prompt file), "
                         "or no scores.parquet / reachable_features.safetensors")
    ref = read_table(run / "eval" / "samples_reference.parquet")
    pol = read_table(run / "eval" / "samples_policy.parquet")
    if group_column not in pol:
        raise SystemExit(f"{run}: eval/samples_policy.parquet has no {group_column!r} (evaluate's group_column)")
    outcomes = to_json(group_outcomes(ref, pol, group_column, columns, plan))
    names = columns + ([c for c in JUDGE_COLUMNS.values() if c in pol] if judge else [])
    achieved = {g: {c: (o["changes"][c]["achieved"], *(o["changes"][c]["achieved_ci95"] or [math.nan] * 2))
                    for c in names if c in o["changes"]} for g, o in outcomes.items()}
    share = plan["share"]
    overall = {c: float(sum(share[g] * plan["planned"][g][c] for g in plan["planned"])) for c in columns}
    return {"run": str(run), "columns": [c for c in names if all(c in a for a in achieved.values())],
            "share": share, "planned": plan["planned"], "target": plan["target"] or plan["planned"],
            "achieved": achieved, "overall_planned": overall}


def summary(rows: list[dict]) -> dict:
    """Per group and column over runs: mean and s.d. of achieved − planned, and the runs whose
    planned change lies inside the achieved interval."""
    out: dict[str, dict[str, dict]] = {}
    for g in sorted({g for r in rows for g in r["achieved"]}):
        out[g] = {}
        for c in rows[0]["columns"]:
            gaps, inside = [], 0
            for r in rows:
                if g not in r["planned"] or g not in r["achieved"]:
                    continue
                ach, lo, hi = r["achieved"][g][c]
                gaps.append(ach - r["planned"][g][c])
                inside += int(lo <= r["planned"][g][c] <= hi)
            arr = np.array(gaps)
            out[g][c] = {"runs": len(arr), "mean_gap": float(arr.mean()),
                         "sd_gap": float(arr.std(ddof=1)) if len(arr) > 1 else math.nan, "inside": inside}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories (with eval/)")
    parser.add_argument("--group-column", default="harmful", help="the prompt files' group column")
    parser.add_argument("--judge", help="module:function, the gold judge (its helpful and harmful by group)")
    args = parser.parse_args(argv)
    rows = [run_groups(r, args.group_column, args.judge) for r in args.runs]
    for r in rows:
        print(r["run"])
        for g in sorted(r["achieved"]):
            cells = []
            for c in r["columns"]:
                ach, lo, hi = r["achieved"][g][c]
                cells.append(f"{c} {r['planned'][g][c]:+.3g} / {r['target'][g][c]:+.3g} / {ach:+.3g} "
                             f"[{lo:+.3g}, {hi:+.3g}]")
            print(f"  {args.group_column}={g} ({r['share'].get(g, 0):.0%} of the dual's prompts), "
                  "planned / target / achieved [95%]: " + "; ".join(cells))
    out = summary(rows)
    print(f"\nOver {len(rows)} runs, achieved − planned (mean ± s.d.; runs whose planned change is inside "
          "the achieved 95% interval):")
    for g, cols in out.items():
        print(f"  {args.group_column}={g}: " + "; ".join(
            f"{c} {v['mean_gap']:+.3g} ± {v['sd_gap']:.2g} ({v['inside']} of {v['runs']})" for c, v in cols.items()))
    return {"runs": rows, "summary": out}


if __name__ == "__main__":
    main()

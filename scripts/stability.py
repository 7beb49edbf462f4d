"""Training stability, measured: MoCAN one shot on the samples' tilt (``mocan``, the paper's) and
as the built-in default plans it, on the reachable tilt (``mocan-reachable``; default.yaml),
against Safe-RLHF's critic-ful PPO-Lagrangian, the critic-free PPO-Lagrangian and GRPO-Lagrangian,
each over the same seeds of one comparison (``dualign compare`` underneath, so a run resumes).

Per method: the share of seeds whose final policy meets the constraint (point estimate on the
held-out prompts), the spread of the final Δcost (policy − π_ref on the same prompts, paired); for
the online methods how often the constraint is lost again after first being met, judged twice: on
the held-out evaluations of the checkpoints (``checkpoints`` of the method's section, then the
final policy) and on the training rollouts (the rollout mean cost over a window of iterations,
against the constraint's threshold on the dual's samples); λ's trajectories in a PNG.

    python scripts/stability.py --config compare_world --seeds 0 1 2 3 4 --out runs/stability
    python scripts/stability.py --smoke --out /tmp/stability-smoke      # a tiny check, seconds per method

Outputs in ``--out``: stability.csv (one row per method), stability_runs.csv (one per method and
seed), stability.json, stability_lambda.png, and the comparison's own files under ``run/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from headline_common import ONLINE, all_met, config_path, load, parser, save_figure, smoke_config

from dualign._infra.io import read_json, write_json, write_table
from dualign._infra.text_table import text_table
from dualign.compare.comparison import run_compare
from dualign.data.constraints import parse_constraint

METHODS = ["mocan", "mocan-reachable", *ONLINE]  # --methods may add mocan-recalibrated


def lost_after_met(met: Sequence[bool]) -> bool:
    """True when a sequence that was met at some point is unmet at a later one."""
    met = list(met)
    return True in met and not all(met[met.index(True):])


def relapses(met: Sequence[bool]) -> int:
    """How many times the sequence goes from met to unmet."""
    return sum(1 for a, b in zip(met, met[1:], strict=False) if a and not b)


def rollout_met(metrics: Path, constraints: list[dict], window: int) -> list[bool]:
    """Per training iteration: every constraint met by its rollout mean over the last ``window``
    iterations, against the threshold on the dual's samples (``threshold_dual``)."""
    lines = [json.loads(s) for s in metrics.read_text().splitlines()]
    met = np.ones(len(lines), dtype=bool)
    for c in constraints:
        values = pd.Series([x[f"rollout/{c['column']}"] for x in lines]).rolling(window, min_periods=1).mean()
        met &= parse_constraint(c["constraint"]).sign * (values.to_numpy() - c["threshold_dual"]) >= 0
    return met.tolist()


def stability_runs(out: dict, root: Path, window: int) -> pd.DataFrame:
    """One row per method and seed: met, Δ of each constraint, and for the online methods the
    met sequence of the checkpoints and of the rollouts."""
    cons = out["constraints"]
    budgets = pd.DataFrame(out["budgets"])
    rows = []
    for r in out["runs"]:
        sub = root / "runs" / r["label"] / f"seed{r['seed']}"
        report = read_json(sub / "eval" / "report.json")
        row = {"label": r["label"], "method": r["method"], "seed": r["seed"], "met": all_met(r, cons),
               **{f"delta_{c['name']}": c["achieved_change"] for c in report["constraints"]}}
        if r["method"] in ONLINE:
            mine = budgets[(budgets["label"] == r["label"]) & (budgets["seed"] == r["seed"])].sort_values("budget")
            met = [all_met(b, cons) for b in mine.to_dict("records")]
            detail = [dict(c, threshold_dual=d["threshold_dual"]) for c, d in zip(cons, report["constraints"],
                                                                                 strict=True)]
            rolled = rollout_met(sub / "metrics.jsonl", detail, window)
            row.update({"checkpoints_met": "".join("1" if m else "0" for m in met),
                        "lost_after_met": lost_after_met(met), "relapses": relapses(met),
                        "rollouts_lost_after_met": lost_after_met(rolled), "rollout_relapses": relapses(rolled)})
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One row per method: seeds, share met, Δ mean/std/min/max, and the online methods' losses."""
    rows = []
    for label, g in runs.groupby("label", sort=False):
        row = {"label": label, "method": g["method"].iloc[0], "seeds": len(g), "share_met": g["met"].mean()}
        for n in names:
            d = g[f"delta_{n}"]
            row.update({f"delta_{n}_mean": d.mean(), f"delta_{n}_std": d.std(ddof=1) if len(d) > 1 else np.nan,
                        f"delta_{n}_min": d.min(), f"delta_{n}_max": d.max()})
        if "lost_after_met" in g and g["lost_after_met"].notna().all():
            ever = g["checkpoints_met"].str.contains("1")
            row.update({"share_ever_met": ever.mean(), "share_lost_after_met": g["lost_after_met"].mean(),
                        "relapses_mean": g["relapses"].mean(),
                        "share_rollouts_lost_after_met": g["rollouts_lost_after_met"].mean()})
        rows.append(row)
    return pd.DataFrame(rows)


def plot_lambda(out: dict, root: Path, path: Path) -> None:
    """λ against the iteration, one panel per online method, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in out["runs"] if r["method"] in ONLINE))
    fig, axes = plt.subplots(1, max(1, len(labels)), figsize=(4.5 * max(1, len(labels)), 3.6), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=False):
        for r in (x for x in out["runs"] if x["label"] == label):
            compute = read_json(root / "runs" / label / f"seed{r['seed']}" / "compute.json")
            for name in compute["lambdas"]:
                ax.plot([t[name] for t in compute["lambda_trajectory"]], label=f"seed {r['seed']} ({name})")
        ax.set_title(label)
        ax.set_xlabel("iteration (rollout batches)")
        ax.set_ylabel("λ (reward units per cost unit)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def available(config: Path, run_dir: Path, methods: list[str], seeds: list[int]) -> dict:
    """The comparison's records of the finished runs only (``eval/report.json`` written), each
    method on its own finished seeds; nothing is trained. Raises SystemExit when none has finished."""
    parts = []
    for method in methods:
        done = [s for s in seeds if (run_dir / "runs" / method / f"seed{s}" / "eval" / "report.json").exists()]
        if done:
            run, cmp = load(config, run_dir, {"methods": [method], "seeds": done})
            cmp.sweep = {}
            parts.append(run_compare(run, cmp, log=lambda m: None))
    if not parts:
        raise SystemExit(f"{run_dir}: no finished run of {', '.join(methods)}")
    out = {"runs": [r for p in parts for r in p["runs"]], "budgets": [b for p in parts for b in p["budgets"]],
           "constraints": parts[0]["constraints"]}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--window", type=int, default=4, help="training iterations a rollout verdict averages")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="a tiny model and scorers, two seeds: checks the script")
    ap.add_argument("--available", action="store_true",
                    help="train nothing: tabulate each method on the seeds whose runs have finished")
    args = ap.parse_args(argv)
    config = smoke_config(args.out / "smoke") if args.smoke else config_path(args.config)
    seeds = [0, 1] if args.smoke else args.seeds
    root = args.out / "run"
    if args.available:
        out = available(config, root, args.methods, seeds)
    else:
        run, cmp = load(config, root, {"methods": args.methods, "seeds": seeds})
        cmp.sweep = {}
        out = run_compare(run, cmp, log=print)
    runs = stability_runs(out, root, args.window)
    names = [c["name"] for c in out["constraints"]]
    summary = summarise(runs, names)
    write_table(runs, args.out / "stability_runs.csv")
    write_table(summary, args.out / "stability.csv")
    write_json({"config": str(config), "seeds": seeds, "window": args.window,
                "summary": summary.replace({np.nan: None}).to_dict("records"),
                "runs": runs.replace({np.nan: None}).to_dict("records")}, args.out / "stability.json")
    plot_lambda(out, root, args.out / "stability_lambda.png")
    n = names[0]
    cell = lambda v, f=".2f": "" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, f)  # noqa: E731
    print("\n".join(text_table(
        ["method", "seeds", "met", f"Δ{n} mean", f"Δ{n} std", f"Δ{n} range", "lost after met (ckpt)",
         "lost after met (rollouts)"],
        [[r["label"], r["seeds"], cell(r["share_met"]), cell(r[f"delta_{n}_mean"]), cell(r[f"delta_{n}_std"]),
          f"{cell(r[f'delta_{n}_min'])} … {cell(r[f'delta_{n}_max'])}", cell(r.get("share_lost_after_met")),
          cell(r.get("share_rollouts_lost_after_met"))] for r in summary.to_dict("records")])))
    print(f"\nwritten: {args.out}/stability.csv, stability_runs.csv, stability.json, stability_lambda.png")


if __name__ == "__main__":
    main()

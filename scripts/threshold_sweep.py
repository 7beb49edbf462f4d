"""Efficiency in the regime one shot is built for: five thresholds of one constraint (ref−2 …
ref−6 by default). MoCAN (``mocan``, the paper's one shot; ``mocan-reachable``, the default plan)
samples, scores and takes π_ref's features once and shares them across the points, one dual and
one fine-tune per point; each online method (Safe-RLHF's critic-ful
PPO-Lagrangian, the critic-free PPO-Lagrangian, GRPO-Lagrangian) runs once per threshold. Each
point is a ``dualign compare`` run (so the script resumes); the first point's sample and score
stages are copied into every other point's ``shared/``.

Reported per method: each point's verdict (met: the seed-mean point estimate on the held-out
prompts), FLOPs and wall-clock on this machine; the compute to deliver all five points (MoCAN's
shared stages counted once), at the final policies and, for the online methods, at the first
checkpoint meeting each point; the same at 7B (the measured token counts re-costed,
:func:`dualign.compare.tables.projection_table`) and at the literature's iteration counts
(:func:`dualign.compare.compute_cost.literature_runs`).

    python scripts/threshold_sweep.py --config compare_world --offsets -2 -3 -4 -5 -6 --out runs/sweep
    python scripts/threshold_sweep.py --config compare_world --methods mocan-reachable --confidence 0.9 \
        --out runs/sweep_margin                                           # the default plan with a margin
    python scripts/threshold_sweep.py --smoke --out /tmp/sweep-smoke     # a tiny check, seconds per run

A threshold the dual finds infeasible on the shared samples is skipped (listed in sweep.json), so
no method is charged for it. Outputs in ``--out``: sweep_points.csv (method × threshold), sweep.csv (one row per method: the
five points together), sweep.json, sweep.png, and each point's comparison under ``points/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from headline_common import ONLINE, all_met, config_path, load, parser, save_figure, smoke_config

from dualign._infra.errors import InfeasibleConstraintError
from dualign._infra.io import read_json, write_json, write_table
from dualign._infra.text_table import text_table
from dualign.compare.comparison import run_compare
from dualign.compare.compute_cost import PKU_SAFERLHF_PROMPTS, literature_table
from dualign.compare.tables import CHARGED
from dualign.data.constraints import parse_constraint
from dualign.modeling.flops import add_counts, project_flops

METHODS = ["mocan", "mocan-reachable", *ONLINE]
COPIED = ("sample", "score")                          # the stages copied into every point's shared/
PAID_ONCE = ("sample", "score", "dual_reachable")     # what depends on the samples alone (π_ref's features)
SUMMED = ["flops", "wall_s", "flops_first_met", "wall_s_first_met", "flops_7b", "flops_7b_first_met"]


def paid_once(method: str) -> tuple[str, ...]:
    """The shared stages a method is charged at every point (:data:`CHARGED`) that one sweep pays
    once: MoCAN's sampling, scoring and (reachable tilt) π_ref's features; none for an online method."""
    return tuple(s for s in CHARGED.get(method, ()) if s in PAID_ONCE)


def point_constraint(constraint: str, offset: float) -> str:
    """The constraint at threshold π_ref's mean + ``offset``: ``cost<=ref-4`` at −2 → ``cost<=ref-2``."""
    c = parse_constraint(constraint)
    return f"{c.column}{c.op}ref{offset:+g}"


def share_samples(first: Path, shared: Path) -> None:
    """Copy the first point's sample and score stages (and π_ref's evaluation samples) into another
    point's ``shared/``, with their recorded cost; its dual is solved anew. What the point already
    has is kept, its ``compute.json`` included: a resumed sweep does not forget the point's own
    records (which made it solve the reachable dual again and re-time it on every resume)."""
    shared.mkdir(parents=True, exist_ok=True)
    for path in first.iterdir():
        if path.name.startswith("dual") or path.name == "compute.json" or (shared / path.name).exists():
            continue
        (shutil.copytree if path.is_dir() else shutil.copyfile)(path, shared / path.name)
    if not (shared / "compute.json").exists():
        cost = read_json(first / "compute.json")
        write_json({k: v for k, v in cost.items() if k in (*COPIED, "sampled_tokens")}, shared / "compute.json")


def point_rows(out: dict, offset: float, params: float) -> list[dict]:
    """One row per label of one point: verdict, FLOPs and wall-clock (final and at first met), at 7B."""
    cons = out["constraints"]
    projection = {r["label"]: r for r in out["projection"]}
    rows = []
    for r in out["summary"]:
        hit = out["first_met"].get(r["label"])
        row = {"label": r["label"], "method": r["method"], "offset": offset, "met": all_met(r, cons),
               **{c["name"]: r[c["name"]] for c in cons}, **{f"{c['name']}_threshold": r[f"{c['name']}_threshold"]
                                                            for c in cons},
               "reward": r["reward"], "kl": r["kl"], "flops": r["flops"], "wall_s": r["wall_s"],
               "flops_first_met": hit["flops"] if hit else np.nan, "wall_s_first_met": hit["wall_s"] if hit else np.nan,
               "flops_7b": projection[r["label"]]["flops"],
               "flops_7b_first_met": projection[r["label"]].get("flops_at_first_met", np.nan)}
        rows.append(row)
    return rows


def totals(points: pd.DataFrame, shared: dict, params: float) -> pd.DataFrame:
    """Compute to deliver every point, per method: the sum over points, less the stages a method
    pays once (:func:`paid_once`: MoCAN's sampling, scoring and π_ref's features) counted at every
    point beyond the first."""
    rows = []
    for label, g in points.groupby("label", sort=False):
        method = g["method"].iloc[0]
        stages = paid_once(method)
        extra = len(g) - 1 if stages else 0
        once_flops = sum(shared["flops"][s]["total"] for s in stages)
        once_wall = sum(shared[s]["wall_s"] for s in stages)
        once_7b = project_flops(add_counts(*[shared["tokens"][s] for s in stages]), params)["total"] if stages else 0.0
        total = g[SUMMED].sum(skipna=False)  # a point without a record (NaN) leaves its total unknown, not smaller
        rows.append({"label": label, "method": method, "points": len(g), "points_met": int(g["met"].sum()),
                     "delivered": bool(g["met"].all()), **total,
                     "flops": total["flops"] - extra * once_flops, "wall_s": total["wall_s"] - extra * once_wall,
                     "flops_7b": total["flops_7b"] - extra * once_7b})
    return pd.DataFrame(rows)


def print_literature(rows: list[dict], rl_train_prompts: int, params: float) -> None:
    """The literature recipes' FLOPs (:func:`literature_table`'s rows) for one threshold and for
    all of them, and their memory."""
    points = rows[0]["points"]
    print(f"{params:.0e} parameters; Safe-RLHF's PPO-Lagrangian over {rl_train_prompts} prompts (one epoch)")
    print("\n".join(text_table(["recipe", "FLOPs, one point", f"FLOPs, {points} points", "memory GB"],
                               [[r["recipe"], f"{r['flops_one_point']:.3g}", f"{r['flops_all_points']:.3g}",
                                 f"{r['memory_gb']:.3g}"] for r in rows])))


def plot(points: pd.DataFrame, summary: pd.DataFrame, path: Path) -> None:
    """Left: FLOPs to run the first k thresholds (k = 1..n), × where a point missed; right: each point's achieved value
    against its threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    offsets = sorted(points["offset"].unique(), reverse=True)
    for label, g in points.groupby("label", sort=False):
        g = g.set_index("offset").loc[offsets]
        flops = g["flops"].to_numpy(float)
        cumulative = np.cumsum(flops)
        if paid_once(g["method"].iloc[0]) and len(flops) > 1:  # the shared stages, in every point's row, paid once
            once = (flops.sum() - summary.set_index("label").loc[label, "flops"]) / (len(flops) - 1)
            cumulative = cumulative - np.arange(len(flops)) * once
        left.plot(range(1, len(flops) + 1), cumulative, marker="o", label=label)
        met = g["met"].to_numpy(bool)
        left.scatter(np.arange(1, len(flops) + 1)[~met], cumulative[~met], marker="x", color="black", zorder=3)
        name = [c for c in g.columns if c.endswith("_threshold")][0][: -len("_threshold")]
        right.plot(offsets, g[name], marker="o", label=label)
    right.plot(offsets, points.groupby("offset")[f"{name}_threshold"].mean().loc[offsets], "k--", label="threshold")
    left.set_yscale("log")
    left.set_xticks(range(1, len(offsets) + 1))
    left.set_xlabel("thresholds run (ref−2, ref−3, … in order)")
    left.set_ylabel("compute (FLOPs, this world)")
    left.set_title("× = that point missed (point estimate)")
    right.set_xlabel(f"threshold offset from π_ref's mean ({name} units)")
    right.set_ylabel(f"achieved {name} (held-out mean)")
    for ax in (left, right):
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--offsets", type=float, nargs="+", default=[-2, -3, -4, -5, -6],
                    help="thresholds as offsets from π_ref's mean, in the constraint's units")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--confidence", type=float, default=None,
                    help="plan every point with this confidence margin (the dual section's confidence; "
                         "it covers the evaluation as in a run)")
    ap.add_argument("--params", type=float, default=7e9, help="model size of the projection")
    ap.add_argument("--rl-train-prompts", type=int, default=int(PKU_SAFERLHF_PROMPTS.value),
                    help="Safe-RLHF's training prompts (one epoch; default: PKU-SafeRLHF's unique prompts, "
                         "compute_cost.PKU_SAFERLHF_PROMPTS)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="a tiny model and scorers: checks the script")
    ap.add_argument("--literature-only", action="store_true",
                    help="print the literature recipes' projection for one and for len(--offsets) points, run nothing")
    args = ap.parse_args(argv)
    if args.literature_only:
        print_literature(literature_table(len(args.offsets), args.rl_train_prompts, args.params),
                         args.rl_train_prompts, args.params)
        return
    config = smoke_config(args.out / "smoke") if args.smoke else config_path(args.config)
    offsets = [-0.25, -0.5] if args.smoke else args.offsets
    base, _ = load(config, args.out / "points", {})
    if len(base.dual.constraints) != 1:
        raise SystemExit(f"{config}: the sweep moves one constraint's threshold; the dual has {base.dual.constraints}")
    rows, first_shared, costed, infeasible = [], None, None, []
    margin = {} if args.confidence is None else {"confidence": args.confidence}  # unset: the config's own
    for offset in offsets:
        text = point_constraint(base.dual.constraints[0], offset)
        run, cmp = load(config, args.out / "points" / f"{offset:+g}", {"methods": args.methods, "seeds": args.seeds},
                        {"dual": {"constraints": [text], **margin}})
        cmp.sweep = {}
        shared = Path(run.run_dir) / "shared"
        if first_shared is not None:
            share_samples(first_shared, shared)
        print(f"threshold {text} ...")
        try:
            out = run_compare(run, cmp, log=print)
        except InfeasibleConstraintError as e:  # no method has a dual.json to train on there
            print(f"threshold {text}: skipped, {e}")
            infeasible.append(text)
            continue
        finally:
            first_shared = first_shared or shared
        rows += point_rows(out, offset, args.params)
        costed = costed or shared
    if costed is None:
        raise SystemExit(f"every threshold is infeasible: {', '.join(infeasible)}")
    points = pd.DataFrame(rows)
    summary = totals(points, read_json(costed / "compute.json"), args.params)
    literature = literature_table(len(offsets), args.rl_train_prompts, args.params)
    write_table(points, args.out / "sweep_points.csv")
    write_table(summary, args.out / "sweep.csv")
    write_json({"config": str(config), "offsets": offsets, "seeds": args.seeds, "confidence": args.confidence,
                "infeasible": infeasible,
                "summary": summary.replace({np.nan: None}).to_dict("records"),
                "points": points.replace({np.nan: None}).to_dict("records"), "literature_7b": literature},
               args.out / "sweep.json")
    plot(points, summary, args.out / "sweep.png")
    g = lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3g}"  # noqa: E731
    print("\n".join(text_table(["method", "met", "FLOPs", "wall s", "FLOPs at first met", f"FLOPs at {args.params:.0e}"],
                               [[r["label"], f"{r['points_met']}/{r['points']}", g(r["flops"]), g(r["wall_s"]),
                                 g(r["flops_first_met"]), g(r["flops_7b"])] for r in summary.to_dict("records")])))
    print("\nAt the literature's iteration counts:")
    print_literature(literature, args.rl_train_prompts, args.params)
    print(f"\nwritten: {args.out}/sweep.csv, sweep_points.csv, sweep.json, sweep.png")


if __name__ == "__main__":
    main()

"""The plots of ``dualign compare`` (in ``<run_dir>/plots``), from ``compare.json``'s content:

- ``pareto.png``: reward against each constraint's value, the threshold line, error bars;
- ``constraints.png``: each method's slack and the share of seeds meeting the constraint;
- ``compute.png``: wall-clock, gradient steps, FLOPs, peak memory;
- ``lambda.png``: λ trajectories of the iterative methods;
- ``compute_to_target.png``: each constraint's value and the reward against FLOPs (log), each
  iterative method a line through its budgets, the one-shot methods points.

Error bars: the standard deviation over seeds, or the evaluation's 95% CI with one seed.
matplotlib is imported inside the functions: its import costs a second that a comparison still
training should not pay up front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dualign._infra.io import atomic_path, read_json
from dualign.compare.tables import ITERATIVE
from dualign.data.constraints import parse_constraint


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _err(r: dict, key: str) -> tuple[float, float]:
    """Error bar half-widths: the std over seeds, or the evaluation's 95% CI with one seed; a
    missing, infinite or negative one (a point outside an old report's interval) is drawn as 0."""
    if r["n_seeds"] > 1:
        low = high = r[f"{key}_std"]
    else:
        low, high = r[key] - r[f"{key}_lo"], r[f"{key}_hi"] - r[key]
    return tuple(float(v) if v is not None and np.isfinite(v) and v > 0 else 0.0 for v in (low, high))


def plot_compare(out: dict[str, Any], root: Path, log=print) -> None:
    """Every plot above into ``root/plots`` (lambda.png and compute_to_target.png when there is something to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, cons, rc = out["summary"], out["constraints"], out["dual"]["reward"]
    colors = {r["label"]: plt.cm.tab20(i % 20) for i, r in enumerate(summary)}

    fig, axes = plt.subplots(1, len(cons), figsize=(6 * len(cons), 4.5), squeeze=False)
    for ax, c in zip(axes[0], cons, strict=True):
        col, name = c["column"], c["name"]
        ax.scatter([out["reference"][col]["mean"]], [out["reference"][rc]["mean"]], color="grey", marker="s",
                   label="π_ref", zorder=3)
        for r in summary:
            ax.errorbar(r[name], r["reward"], xerr=np.array(_err(r, name))[:, None],
                        yerr=np.array(_err(r, "reward"))[:, None], fmt="o", capsize=3,
                        color=colors[r["label"]], label=r["label"])
        ax.axvline(c["threshold"], color="red", ls="--", label=f"constraint {c['constraint']}")
        ax.set_xlabel(f"{col} (evaluation mean)")
        ax.set_ylabel(f"{rc} (evaluation mean)")
        ax.legend(fontsize=6)
    fig.suptitle("reward vs constraint value (error bars: std over seeds, or 95% CI with one seed)", fontsize=9)
    fig.tight_layout()
    _save(fig, root / "plots" / "pareto.png")

    fig, axes = plt.subplots(1, len(cons), figsize=(max(6, 1.1 * len(summary)) * len(cons), 4), squeeze=False)
    labels = [r["label"] for r in summary]
    for ax, c in zip(axes[0], cons, strict=True):
        name, sign = c["name"], parse_constraint(c["constraint"]).sign
        slack = [sign * (r[name] - c["threshold"]) for r in summary]
        ax.bar(labels, slack, yerr=[r.get(f"{name}_std") or 0 for r in summary], capsize=3,
               color=["tab:green" if s >= 0 else "tab:red" for s in slack])
        for i, (s, r) in enumerate(zip(slack, summary, strict=True)):
            ax.annotate(f"met {r[name + '_met']:.0%}\n(confidently {r[name + '_met_confidently'] or 0:.0%})",
                        (i, s), ha="center", va="bottom" if s >= 0 else "top", fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel(f"slack of {c['constraint']} (≥ 0: met)")
        ax.set_title("share of seeds meeting it: point estimate (and one-sided 95% bound)", fontsize=8)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    _save(fig, root / "plots" / "constraints.png")

    metrics = [("wall_s", "wall-clock (s)"), ("gradient_steps", "policy gradient steps"),
               ("flops", "FLOPs (all stages charged)"), ("peak_memory_mb", "peak memory (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(max(14, 3.2 * len(summary)), 4))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        ax.bar(labels, [r.get(key) or 0 for r in summary], yerr=[r.get(f"{key}_std") or 0 for r in summary],
               capsize=3, color=[colors[x] for x in labels])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45, labelsize=6)
    fig.tight_layout()
    _save(fig, root / "plots" / "compute.png")
    _plot_lambdas(out, root)
    plot_compute_to_target(out, root, colors)
    log(f"plots: {root / 'plots'}")


def _plot_lambdas(out: dict[str, Any], root: Path) -> None:
    import matplotlib.pyplot as plt

    iterative = [(r["label"], r["seed"], r["method"]) for r in out["runs"] if r["method"] in ITERATIVE]
    if not iterative:
        return
    labels = list(dict.fromkeys(label for label, _, _ in iterative))
    lam_star = out["dual"]["lambdas"]
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        method = next(m for lab, _, m in iterative if lab == label)
        for lab, seed, _ in iterative:
            if lab != label:
                continue
            traj = read_json(root / "runs" / lab / f"seed{seed}" / "compute.json").get("lambda_trajectory") or []
            for name in lam_star:
                ax.plot(range(len(traj)), [t[name] for t in traj], marker="o", ms=3, label=f"λ_{name} seed {seed}")
        for name, value in lam_star.items():
            ax.axhline(value, color="red", ls="--", label=f"λ*_{name} (dual)")
        ax.set_xlabel("round" if method == "dual-ascent" else "iteration")
        ax.set_ylabel("λ")
        ax.set_title(label, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, root / "plots" / "lambda.png")


def plot_compute_to_target(out: dict[str, Any], root: Path, colors: dict) -> None:
    """compute_to_target.png: a panel per constraint (its threshold a line) and one for the reward,
    against FLOPs on a log axis; iterative methods as lines through their budgets, the others points."""
    import matplotlib.pyplot as plt

    points = [r for r in out["summary"] if r["method"] not in ITERATIVE and r.get("flops")]
    curves = [r for r in out["curves"] if r.get("flops")]
    if not points and not curves:
        return
    cons, rc = out["constraints"], out["dual"]["reward"]
    panels = [(c["name"], f"{c['column']} (evaluation mean)", c) for c in cons] + [("reward", f"{rc} (evaluation mean)", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (key, ylabel, c) in zip(axes[0], panels, strict=True):
        for label in dict.fromkeys(r["label"] for r in curves):
            line = sorted((r for r in curves if r["label"] == label), key=lambda r: r["budget"])
            err = np.array([_err(r, key) for r in line]).T
            budgets = ", ".join(f"{r['budget']:g}" for r in line)
            ax.errorbar([r["flops"] for r in line], [r[key] for r in line], yerr=err, marker="o", capsize=3,
                        color=colors.get(label), label=f"{label} (budgets {budgets})")
        for r in points:
            ax.errorbar([r["flops"]], [r[key]], yerr=np.array(_err(r, key))[:, None], fmt="s", capsize=3,
                        color=colors.get(r["label"]), label=r["label"])
        if c is not None:
            ax.axhline(c["threshold"], color="red", ls="--", label=f"threshold ({c['constraint']})")
        ax.set_xscale("log")
        ax.set_xlabel("compute (FLOPs, all stages charged; log scale)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
    fig.suptitle("compute to target: iterative methods at each budget, one-shot methods as points "
                 "(error bars: std over seeds, or 95% CI with one seed)", fontsize=9)
    fig.tight_layout()
    _save(fig, root / "plots" / "compute_to_target.png")

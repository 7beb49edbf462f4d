"""Threshold planner: sweep one constraint's threshold (and optionally β) and chart what π_λ* is
predicted to reach, before any training. Writes ``plan.csv``, ``plan.json`` and ``plan.png``.

matplotlib is imported by :func:`plot` only (its import costs about a second)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dualign._infra.errors import InfeasibleConstraintError, InputError
from dualign._infra.io import atomic_path, write_json, write_table
from dualign._infra.text_table import num, text_table
from dualign.data.constraints import constraint_names, is_sweep, parse_constraint, parse_sweep
from dualign.data.records import DualRecord
from dualign.data.score_table import read_scores
from dualign.dual import solve_constraints
from dualign.dual.stage import reachable_fit

OUTPUTS = ("plan.csv", "plan.json", "plan.png")


def parse_beta_grid(text: str) -> list[float]:
    """``0.05,0.1,0.2`` → [0.05, 0.1, 0.2]; each a positive finite number."""
    out = []
    for part in str(text).split(","):
        try:
            beta = float(part)
        except ValueError:
            raise InputError(f"--beta-grid: {part.strip()!r} is not a number") from None
        if not (math.isfinite(beta) and beta > 0):
            raise InputError(f"--beta-grid: beta must be positive and finite, got {part.strip()!r}")
        out.append(beta)
    return out


def sweep(scores_path: str | Path, reward: str, constraints: Sequence[str],
          betas: Sequence[float], features: Callable[[], np.ndarray] | None = None,
          ridge_alpha: float = 1e-3) -> tuple[pd.DataFrame, dict]:
    """Solve the dual at every (β, threshold) of the sweep; infeasible points are rows too.
    ``features`` returns π_ref's features (one row per sample in the table's order): every point
    is then solved on the reachable tilt (:mod:`dualign.dual.reachable`), as ``dualign dual --tilt
    reachable`` solves it (the fit made once for all points). It is called once the sweep, the βs
    and the scores have passed their checks, so a bad input costs no forward pass."""
    sweeping = [c for c in constraints if is_sweep(c)]
    if len(sweeping) != 1:
        raise InputError("plan needs exactly one constraint with a sweep, e.g. "
                         f"'cost<=ref-{{0.1:2.0:20}}' (got {len(sweeping)})")
    fixed = {c: parse_constraint(c) for c in constraints if not is_sweep(c)}
    points = parse_sweep(sweeping[0])
    for beta in betas:
        if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
            raise InputError(f"beta must be positive and finite, got {beta!r}")
    scores = read_scores(scores_path, [reward] + [points[0].column] + [c.column for c in fixed.values()])
    columns = list(dict.fromkeys([reward, points[0].column, *(c.column for c in fixed.values())]))
    fit = reachable_fit(scores, columns, features(), ridge_alpha) if features is not None else None
    rows, limit, reference, r2 = [], None, None, None
    for beta in betas:
        lambdas0 = None
        for point in points:
            current = [point if is_sweep(c) else fixed[c] for c in constraints]
            names = constraint_names(current)
            row = {"beta": beta, "constraint": point.text, "offset" if point.relative else "value": point.value}
            try:
                rep = solve_constraints(scores, beta, reward, current, lambdas0=lambdas0, fit=fit)
            except InfeasibleConstraintError as e:
                j = current.index(point)
                row.update(feasible=False, threshold=point.sign * float(e.thresholds[j]))
                if not e.joint and e.which == [j]:
                    limit = point.sign * float(e.reachable[j])
                rows.append(row)
                continue
            lambdas0 = np.array(list(rep.lambdas.values()))
            swept = names[current.index(point)]
            row.update(feasible=True, threshold=rep.thresholds[swept], converged=rep.converged,
                       **{"lambda": rep.lambdas[swept]})
            row.update({f"lambda_{n}": v for n, v in rep.lambdas.items() if n != swept})
            row.update({f"predicted_{k}": v for k, v in _by_column(rep, rep.predicted).items()})
            rows.append(row)
            reference = _by_column(rep, rep.reference)
            if rep.reachable is not None:
                r2 = _by_column(rep, rep.reachable.r2)
    table = pd.DataFrame(rows)
    meta = {"reward": reward, "constraints": list(constraints), "swept": sweeping[0],
            "column": points[0].column, "op": points[0].op, "betas": list(betas),
            "reachable_limit": limit, "reference": reference,
            "tilt": "samples" if features is None else "reachable"}
    if features is not None:
        meta["reachable_r2"] = r2
    return table, meta


def _by_column(record: DualRecord, values: dict[str, float]) -> dict[str, float]:
    """Per-constraint values re-keyed by column (the plan's table has one column per score; two
    constraints on one column predict the same mean)."""
    return {record.columns.get(k, k): v for k, v in values.items()}


def plot(table: pd.DataFrame, meta: dict, path: str | Path) -> None:
    """Predicted reward vs predicted constraint value, λ* and KL vs threshold; infeasible shaded,
    the reachable limit dashed, a caption saying what each mark is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column, reward, op = meta["column"], meta["reward"], meta["op"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    thresholds = np.sort(table["threshold"].unique())
    half = (np.diff(thresholds).min() / 2) if len(thresholds) > 1 else 0.05
    feasible = table[table["feasible"]] if "lambda" in table else table.iloc[:0]
    for beta, ok in feasible.groupby("beta", sort=True):
        axes[0].plot(ok[f"predicted_{column}"], ok[f"predicted_{reward}"], "o-", ms=3, label=f"β = {beta:g}")
        axes[1].plot(ok["threshold"], ok["lambda"], "o-", ms=3)
        axes[2].plot(ok["threshold"], ok["predicted_kl"], "o-", ms=3)
    ref = meta.get("reference")
    if ref:
        axes[0].plot([ref[column]], [ref[reward]], "k*", ms=11, label="π_ref (no training)")
    bad = table.loc[~table["feasible"], "threshold"].unique()
    for ax in axes[1:]:
        for i, t in enumerate(bad):
            ax.axvspan(t - half, t + half, color="red", alpha=0.12, lw=0,
                       label="infeasible threshold" if i == 0 and ax is axes[1] else None)
        if meta.get("reachable_limit") is not None:
            ax.axvline(meta["reachable_limit"], color="red", ls="--", lw=1,
                       label=f"reachable limit of mean {column}" if ax is axes[1] else None)
        if ref:
            ax.axvline(ref[column], color="k", ls=":", lw=1, label=f"π_ref's mean {column}" if ax is axes[1] else None)
        ax.set_xlabel(f"threshold: mean {column} {op} … ({column} units)")
    axes[0].set_xlabel(f"predicted mean {column} under π_λ* ({column} units)")
    axes[0].set_ylabel(f"predicted mean {reward} under π_λ* ({reward} units)")
    axes[0].set_title(f"the trade-off: {reward} against {column}")
    axes[1].set_ylabel(f"λ* ({reward} units per {column} unit)")
    axes[1].set_title("λ* that meets each threshold")
    axes[2].set_ylabel("predicted KL(π_λ* ‖ π_ref) (nats)")
    axes[2].set_title("KL spent to meet each threshold")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[:2]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", bbox_to_anchor=(0.5, 0.06),
               ncol=min(len(handles), 7), frameon=False)
    reachable = meta.get("tilt") == "reachable"
    what = "the reachable tilt (π_ref's features)" if reachable else "π_ref's samples"
    fig.suptitle(f"dualign plan, predicted before any training from {what}: {meta['swept']}")
    scored = "the scores π_ref's features predict" if reachable else "π_ref's samples"
    fig.text(0.5, 0.015, "Each point solves the dual at one threshold (and β). Red band: a threshold no reweighting "
             f"of {scored} can meet; red dashed line: the best mean {column} any reweighting reaches.",
             ha="center", fontsize=9, color="0.3")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def format_plan(table: pd.DataFrame, meta: dict) -> str:
    """The sweep as the table ``dualign plan`` prints: one row per (β, threshold)."""
    column, reward = meta["column"], meta["reward"]
    rows = []
    for _, row in table.iterrows():
        threshold = num(row["threshold"], digits=4)
        if "offset" in row and not pd.isna(row["offset"]):
            threshold = f"ref{row['offset']:+.4g} = {threshold}"
        if not row["feasible"]:
            rows.append([f"{row['beta']:g}", threshold, "infeasible"])
            continue
        rows.append([f"{row['beta']:g}", threshold, num(row["lambda"], digits=4),
                     num(row[f"predicted_{reward}"], digits=4), num(row[f"predicted_{column}"], digits=4),
                     num(row["predicted_kl"], digits=4)])
    header = ["β", f"threshold ({column} {meta['op']})", "λ*", f"{reward} (predicted)", f"{column} (predicted)",
              "KL (predicted)"]
    source = "the reachable tilt" if meta.get("tilt") == "reachable" else "π_ref's samples"
    lines = [f"Predicted for π_λ* from {source}, before any training ({meta['swept']}):", ""]
    if meta.get("reachable_r2"):
        lines.insert(1, "Share of each score's within-prompt spread π_ref's features predict (R²): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in meta["reachable_r2"].items()) + ".")
    ref = meta.get("reference")
    if ref:
        lines.insert(1, f"π_ref: {reward} {num(ref[reward], digits=4)}, {column} {num(ref[column], digits=4)}.")
    return "\n".join(lines + text_table(header, rows))


def run_plan(scores_path: str | Path, reward: str, constraints: Sequence[str],
             betas: Sequence[float], out_dir: str | Path, features: Callable[[], np.ndarray] | None = None,
             ridge_alpha: float = 1e-3) -> pd.DataFrame:
    """Sweep, then write <out>/plan.csv, plan.json, plan.png (nothing is written on bad input)."""
    table, meta = sweep(scores_path, reward, constraints, betas, features, ridge_alpha)
    out_dir = Path(out_dir)
    write_table(table, out_dir / OUTPUTS[0])
    records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    write_json({**meta, "points": records}, out_dir / OUTPUTS[1])
    plot(table, meta, out_dir / OUTPUTS[2])
    return table

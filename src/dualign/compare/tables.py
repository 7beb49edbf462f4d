"""The tables of ``dualign compare``: one row per evaluated policy, their summaries over seeds, the
first budget meeting the constraints, the projection to 7B and the printed tables.

Verdicts, per constraint and seed: ``met`` (the point estimate is on the right side of the
threshold), ``met_confidently`` (the one-sided 95% bound is), ``not_rejected`` (the two-sided 95%
CI reaches it), read from report.json's constraint rows; a summary holds the share
of seeds. A row's compute is the method's own (its compute.json) plus the shared stages it learns
from (:data:`CHARGED`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dualign.data.constraints import parse_constraint
from dualign.data.records import ConstraintOutcome, EvalReport
from dualign.modeling.flops import add_counts, project_run

ITERATIVE = ("dual-ascent", "ppo-lagrangian", "ppo-lagrangian-critic", "grpo-lagrangian")
# The shared stages each method is charged for (it learns from their outputs).
CHARGED = {"mocan": ("sample", "score", "dual"), "mocan-recalibrated": ("sample", "score", "dual"),
           "mocan-reachable": ("sample", "score", "dual_reachable"),
           **{m: ("sample", "score") for m in ("fixed-lambda", "reward-only-mocan", "cost-only-mocan", "dual-ascent")},
           **{m: ("preferences",) for m in ("dpo-helpful", "dpo-safe", "safedpo")},
           **{m: () for m in ("ppo-lagrangian", "ppo-lagrangian-critic", "grpo-lagrangian")}}
# Models held at once at 7B, (trained, frozen): the pair methods train the policy alone (log π_ref
# comes with the samples or is taken before the first update); the online methods hold the policy,
# π_ref and the reward and cost models while they generate; Safe-RLHF's PPO-Lagrangian also trains a
# reward and a cost critic.
RESIDENT = {**{m: (1, 0) for m in CHARGED}, "ppo-lagrangian": (1, 3), "ppo-lagrangian-critic": (3, 3),
            "grpo-lagrangian": (1, 3)}




def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts, NaN (e.g. a std over one seed) as None so that the JSON stays standard."""
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
            for r in table.to_dict("records")]


def verdicts(c: ConstraintOutcome) -> dict[str, float]:
    """A constraint row's verdicts as 0/1 (NaN where a report from before them lacks one): met (point
    estimate), met_confidently (one-sided 95% bound), not_rejected (the 95% CI reaches the threshold)."""
    return {"met": float(c.met),
            "met_confidently": np.nan if c.met_confidently is None else float(c.met_confidently),
            "not_rejected": np.nan if c.not_rejected is None else float(c.not_rejected)}


def table_row(label: str, method: str, seed: int, report: EvalReport, compute: dict, shared: dict) -> dict[str, Any]:
    """One evaluated policy's row (``compute``: its compute.json; ``shared``: the shared stages'
    cost, charged per :data:`CHARGED`); a constraint's columns are named after the constraint."""
    reward = report.policy[report.reward]
    row: dict[str, Any] = {"label": label, "method": method, "seed": seed,
                           "budget": compute.get("iterations", np.nan), "reward": reward.mean,
                           "reward_lo": reward.ci95[0], "reward_hi": reward.ci95[1]}
    for c in report.constraints:
        row.update({c.name: c.achieved, f"{c.name}_lo": c.ci95[0], f"{c.name}_hi": c.ci95[1],
                    f"{c.name}_threshold": c.threshold, **{f"{c.name}_{k}": v for k, v in verdicts(c).items()}})
    row.update({"kl": report.kl.achieved, "kl_lo": report.kl.ci95[0], "kl_hi": report.kl.ci95[1]})
    if report.judge:
        for k in ("judge_harmful", "judge_helpful"):
            row[k] = getattr(report.judge["policy"]["all"], k).mean
    row.update({f"lambda_{k}": v for k, v in (compute.get("lambdas") or {}).items()})
    charged = CHARGED[method]
    shared_s = sum((shared.get(s) or {}).get("wall_s", np.nan) for s in charged)
    tokens = add_counts(compute.get("tokens"), *[(shared.get("tokens") or {}).get(s) for s in charged])
    flops = add_counts(compute.get("flops"), *[(shared.get("flops") or {}).get(s) for s in charged])
    row.update({"train_wall_s": compute["wall_s"], "wall_s": compute["wall_s"] + shared_s,
                "gradient_steps": compute["gradient_steps"],
                "sampled_tokens": compute["sampled_tokens"] + (shared["sampled_tokens"] if "sample" in charged else 0),
                "peak_memory_mb": compute.get("peak_memory_mb", np.nan),
                **{f"tokens_{k}": v for k, v in tokens.items()},
                "flops": flops.get("total", np.nan) if compute.get("flops") is not None else np.nan,
                **{f"flops_{k}": v for k, v in flops.items() if k != "total"}})
    return row


def summarise(runs: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """Per ``keys`` (default: label): the mean of every numeric column over seeds, ``<col>_std`` and ``n_seeds``."""
    keys = keys or ["label"]
    numeric = [c for c in runs.columns if c not in ("label", "method", "seed", *keys)
               and pd.api.types.is_numeric_dtype(runs[c])]
    grouped = runs.groupby(keys, sort=False)
    mean = grouped[numeric].mean()
    spread = [c for c in numeric if not c.endswith(("_lo", "_hi", "_threshold"))]
    std = grouped[spread].std(ddof=1).add_suffix("_std")
    out = pd.concat([mean, std], axis=1).reset_index()
    out.insert(len(keys), "method", grouped["method"].first().to_numpy())
    out.insert(len(keys) + 1, "n_seeds", grouped.size().to_numpy())
    return out


def meets(row: dict, cons: list[dict]) -> bool:
    """Every constraint met by the point estimate (the seed mean against the mean threshold)."""
    return all(parse_constraint(c["constraint"]).sign * (row[c["name"]] - row[f"{c['name']}_threshold"]) >= 0
               for c in cons)


def first_met(curves: pd.DataFrame, cons: list[dict]) -> dict[str, dict[str, Any] | None]:
    """Per iterative label: the smallest budget whose seed-mean meets every constraint (point
    estimate), with its compute, reward and KL there; None when no budget does."""
    out: dict[str, dict[str, Any] | None] = {}
    for label, group in (curves.groupby("label", sort=False) if len(curves) else []):
        hit = [r for r in group.sort_values("budget").to_dict("records") if meets(r, cons)]
        out[label] = None if not hit else {k: hit[0].get(k) for k in
                                           ("budget", "flops", "wall_s", "gradient_steps", "reward", "kl",
                                            *[c["name"] for c in cons])}
    return out


def projection_table(summary: pd.DataFrame, curves: pd.DataFrame, cons: list[dict], params: float) -> pd.DataFrame:
    """Each label's measured token counts re-costed for a policy and reward and cost models of
    ``params`` parameters each (:func:`dualign.modeling.flops.project_run`): FLOPs per stage, H100-hours,
    resident memory; for an iterative label also at the first budget meeting the constraints."""
    met = first_met(curves, cons)

    def tokens_of(row: dict) -> dict[str, float]:
        return {k[len("tokens_"):]: v for k, v in row.items()
                if k.startswith("tokens_") and not k.endswith("_std") and np.isfinite(v)}

    rows = []
    for r in summary.to_dict("records"):
        proj = project_run(tokens_of(r), RESIDENT[r["method"]], params)
        row = {"label": r["label"], "method": r["method"], "flops": proj["flops"]["total"],
               **{f"flops_{s}": proj["flops"][s] for s in ("generation", "scoring", "reference", "training")},
               "h100_hours": proj["h100_hours"], "memory_gb": proj["memory_gb"]}
        hit = met.get(r["label"])
        if hit is not None:
            at = curves[(curves["label"] == r["label"]) & (curves["budget"] == hit["budget"])].to_dict("records")[0]
            row["flops_at_first_met"] = project_run(tokens_of(at), RESIDENT[r["method"]], params)["flops"]["total"]
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(out: dict[str, Any]) -> str:
    """The printed tables: methods (mean ± std over seeds), compute to target, the 7B projection."""
    cons = out["constraints"]
    rc = out["dual"]["reward"]

    def cell(r: dict, key: str, fmt: str = ".3f") -> str:
        s = r.get(f"{key}_std")
        return f"{r[key]:{fmt}}" + (f"±{s:{fmt}}" if s is not None and np.isfinite(s) else "")

    def share(r: dict, key: str) -> str:
        v = r.get(key)
        return "-" if v is None or not np.isfinite(v) else f"{v:.0%}"

    def bound(c: dict) -> str:
        return f"{c['column']} ({'≤' if '<=' in c['constraint'] else '≥'}{c['threshold']:.2f})"

    head = f"{'method':<34}{rc:>16}" + "".join(f"{bound(c):>22}{'met':>6}{'conf':>6}{'CI':>6}" for c in cons)
    head += f"{'KL':>14}{'λ':>8}{'wall s':>9}{'steps':>7}{'FLOPs':>10}"
    lines = ["methods (mean ± std over seeds; met: share of seeds met by the point estimate, conf: by the "
             "one-sided 95% bound, CI: not rejected by the 95% CI)", head,
             f"{'π_ref':<34}{out['reference'][rc]['mean']:>16.3f}"
             + "".join(f"{out['reference'][c['column']]['mean']:>22.3f}{'':>18}" for c in cons)]
    for r in out["summary"]:
        lam = [v for k, v in r.items() if k.startswith("lambda_") and not k.endswith("_std") and v is not None]
        line = f"{r['label'][:33]:<34}{cell(r, 'reward'):>16}"
        line += "".join(f"{cell(r, c['name']):>22}{share(r, c['name'] + '_met'):>6}"
                        f"{share(r, c['name'] + '_met_confidently'):>6}{share(r, c['name'] + '_not_rejected'):>6}"
                        for c in cons)
        flops = r.get("flops")
        wall = r.get("wall_s")
        wall = f"{wall:.1f}" if wall is not None and np.isfinite(wall) else "-"
        line += f"{cell(r, 'kl'):>14}{(f'{lam[0]:.3g}' if lam else '-'):>8}{wall:>9}"
        line += f"{r['gradient_steps']:>7.0f}{(f'{flops:.2e}' if flops is not None else '-'):>10}"
        lines.append(line)
    if out["first_met"]:
        lines += ["", "compute to target (iterative methods: the first budget whose seed mean meets every constraint)",
                  f"{'method':<34}{'budget':>8}{'FLOPs':>10}{'wall s':>9}{rc:>10}{'KL':>8}"]
        for label, hit in out["first_met"].items():
            lines.append(f"{label[:33]:<34}" + ("   not met at any budget" if hit is None else
                         f"{hit['budget']:>8.0f}{hit['flops'] or float('nan'):>10.2e}{hit['wall_s']:>9.1f}"
                         f"{hit['reward']:>10.3f}{hit['kl']:>8.3f}"))
    lines += ["", "projected to a 7B policy with 7B reward and cost models (same token counts; FLOPs 2·N·T forward, "
              "6·N·T forward+backward; H100-hours at 40% of 989 TFLOP/s, generation at 10%; memory: 16 B/param "
              "trained, 2 B/param frozen, models held at once)",
              f"{'method':<34}{'FLOPs':>10}{'generation':>12}{'scoring':>10}{'reference':>11}{'training':>10}"
              f"{'H100 h':>9}{'GB':>7}{'at first met':>14}"]
    for p in out["projection"]:
        at = p.get("flops_at_first_met")
        lines.append(f"{p['label'][:33]:<34}{p['flops']:>10.2e}{p['flops_generation']:>12.2e}{p['flops_scoring']:>10.2e}"
                     f"{p['flops_reference']:>11.2e}{p['flops_training']:>10.2e}{p['h100_hours']:>9.3g}"
                     f"{p['memory_gb']:>7.0f}{(f'{at:.2e}' if at is not None else '-'):>14}")
    return "\n".join(lines)

"""The pilot fine-tune lever of issue #26, measured on finished build_rates runs (no new sampling).

For each run directory: a fine-tune with the run's own training config on the pairs of half its
dual prompts (the half drawn with seed 1000 + build), then the pilot's log-ratios
ℓ = log π_pilot − log π_ref on the other half's K samples of π_ref. Per held-out prompt, the
pilot's self-normalised delivery p_k ∝ exp(ℓ_k) and the trained target's q_k ∝ exp(s_k/β),
s = r − λ·cost, give Δr, Δcost and the K-sample KL Σ p log(K p) of each; their means over the
held-out prompts are printed beside the full run's achieved and predicted values (eval/report.json).

Then, over the runs, does the pilot's share of the target's cost change (pilot Δcost / target
Δcost, both on the held-out K samples) tell which runs will deliver less (achieved Δcost / the
target's Δcost on the same held-out samples)? Printed: their correlation, and the delivered share's
spread before and after a straight line through the *other* runs predicts it (leave one out).

    python scripts/pilot_diagnostic.py runs/build_rates/build101-default-seed0 [RUN ...]
    python scripts/pilot_diagnostic.py --table runs/pilot/pilot.csv   # the analysis again, no training
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from dualign._infra.config import build_config
from dualign.data.records import read_dual
from dualign.modeling.models import load_tokenizer
from dualign.modeling.refprobs import reference_logprobs, trainer_numerics
from dualign.train import TrainConfig, train_on_pairs


def tilt_means(g: pd.DataFrame, logits: np.ndarray) -> dict[str, float]:
    """Δr, Δcost and the K-sample KL of the tilt p ∝ exp(logits) over one prompt's samples."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {"reward": float((p * g.reward).sum() - g.reward.mean()), "cost": float((p * g.cost).sum() - g.cost.mean()),
            "kl": float((p * np.log(p * len(p) + 1e-300)).sum())}


def leave_one_out_line(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ŷ_i = a_{−i} + b_{−i}·x_i, the least-squares line y ≈ a + b·x fitted without run i."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        raise ValueError("a leave-one-out line needs at least 3 runs")
    out = np.empty_like(y)
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        b, a = np.polyfit(x[keep], y[keep], 1)
        out[i] = a + b * x[i]
    return out


def share_summary(table: pd.DataFrame) -> dict[str, float]:
    """Correlation of the pilot's cost share with the delivered share, and the delivered share's
    standard deviation raw and around its leave-one-out prediction (:func:`leave_one_out_line`)."""
    pilot = table["pilot cost"] / table["target cost"]
    delivered = table["achieved cost"] / table["target cost"]
    residual = delivered - leave_one_out_line(pilot.to_numpy(), delivered.to_numpy())
    return {"runs": len(table), "correlation": float(np.corrcoef(pilot, delivered)[0, 1]),
            "delivered share sd": float(delivered.std(ddof=1)),
            "sd around the leave-one-out line": float(np.sqrt(np.mean(residual ** 2)))}


def diagnose(run: Path, out: Path) -> dict:
    dual = read_dual(run / "dual.json")
    lam, beta = dual.lambdas["cost"], dual.beta
    scores, pairs = pd.read_parquet(run / "scores.parquet"), pd.read_parquet(run / "pairs.parquet")
    named = re.search(r"build(\d+)", run.name)
    build = int(named.group(1)) if named else 0
    ids = np.array(sorted(scores.prompt_id.unique()))
    half = set(np.random.default_rng(1000 + build).choice(ids, len(ids) // 2, replace=False))
    values = yaml.safe_load((run / "train.config.yaml").read_text())
    values.update(run_dir=str(out / run.name), save_steps=10**9)
    start = time.time()
    _, model = train_on_pairs(build_config(TrainConfig, values), pairs[pairs.prompt_id.isin(half)].reset_index(drop=True),
                              dual, {})
    held = scores[~scores.prompt_id.isin(half)].reset_index(drop=True)
    lp = reference_logprobs(model.eval(), load_tokenizer(values["model"]), held.prompt.tolist(), held.response.tolist(),
                            held.truncated.tolist(), values["template"], trainer_numerics("cpu"), batch_size=64)[0]
    held = held.assign(l=lp - held.ref_logprob.to_numpy(), s=(held.reward - lam * held.cost) / beta)
    pilot = pd.DataFrame([tilt_means(g, g.l.to_numpy()) for _, g in held.groupby("prompt_id")]).mean()
    target = pd.DataFrame([tilt_means(g, g.s.to_numpy()) for _, g in held.groupby("prompt_id")]).mean()
    report = json.loads((run / "eval" / "report.json").read_text())
    return {"run": run.name, "pilot_s": round(time.time() - start, 1),
            **{f"pilot {k}": v for k, v in pilot.items()}, **{f"target {k}": v for k, v in target.items()},
            "achieved cost": report["constraints"][0]["achieved_change"],
            "achieved reward": report["predicted_reward"]["achieved_change"], "achieved kl": report["kl"]["achieved"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/pilot"),
                    help="where the pilots' training files and pilot.csv (the table) go")
    ap.add_argument("--table", type=Path, help="a pilot.csv written before: analyse it, train nothing")
    args = ap.parse_args(argv)
    if bool(args.runs) == bool(args.table):
        ap.error("name run directories or --table: exactly one of them")
    if args.table:
        table = pd.read_csv(args.table)
    else:
        torch.set_num_threads(1)
        table = pd.DataFrame([diagnose(run, args.out) for run in args.runs])
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "pilot.csv", index=False)
    print(table.round(3).to_string(index=False))
    print("\nmedians:", table.drop(columns=["run"]).median().round(3).to_dict())
    if len(table) >= 3:
        print("pilot share → delivered share:", {k: round(v, 3) for k, v in share_summary(table).items()})


if __name__ == "__main__":
    main()

"""How much a packaged demo's outcome moves from one world build to another.

Float kernels differ between CPU types, so a world built on another machine is another world (its
π_ref, reward and cost models differ by rounding, amplified by training). A different build seed
and thread count stand in for a different machine: this script builds the world of a packaged
config once per (seed, threads), runs the config end to end on each build (stages on one thread,
as the tests run them) and prints one row per build, so that test bounds and documented figures can
be set from the spread.

    python scripts/world_spread.py --config small --seeds 0 1 2 3 4 --threads 1 2 --out runs/spread
    python scripts/world_spread.py --config pecan_small --seeds 0 1 2 3 4 --threads 1 2 --out runs/spread-pecan
    python scripts/world_spread.py --config small --recalibrate --out runs/spread-recalibrate

Each run resumes (a finished build or run is reused); the table is also written as
``<out>/spread.csv``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from dualign._infra.io import read_json
from dualign.compare.in_sample_fit import in_sample_fit
from dualign.pipeline import (
    PACKAGED,
    RECALIBRATE_CONFIG,
    load_run_values,
    resolve_run_config,
    run_pipeline,
)


def outcome(report: dict, run_dir: Path, world_dir: Path) -> dict:
    """One row: the dual's prediction and what the aligned policy reached, held out and in-sample."""
    row: dict = {}
    oneshot = run_dir / "recalibrate" / "round0" / "policy"
    fit = in_sample_fit(run_dir, oneshot if oneshot.exists() else None)  # the one-shot policy's fit
    for c in report["constraints"]:
        col = c["column"]
        row |= {f"Δ{col} predicted": c["predicted_change"], f"Δ{col} achieved": c["achieved_change"],
                f"Δ{col} achieved/predicted": c["achieved_change"] / c["predicted_change"],
                f"Δ{col} in-sample/target": (fit["policy"][col] - fit["reference"][col])
                / (fit["target"][col] - fit["reference"][col])}
    row |= {"λ*": next(iter(report["lambdas"].values())),
            "KL predicted": report["kl"]["predicted"], "KL achieved": report["kl"]["achieved"],
            "KL in-sample": fit["policy"]["kl"]}
    for col in report["policy"]:
        row[f"Δ{col}"] = report["policy"][col]["mean"] - report["reference"][col]["mean"]
    judge = report.get("judge")
    if judge:
        for group, key, name in (("harmful=True", "judge_harmful", "harmful compliance"),
                                 ("harmful=False", "judge_helpful", "benign helpfulness"),
                                 ("harmful=False", "judge_harmful", "benign harmful rate")):
            row[f"{name} ref"] = judge["reference"][group][key]["mean"]
            row[f"{name} aligned"] = judge["policy"][group][key]["mean"]
    ref = json.loads((world_dir / "world.json").read_text())["ref_model"]
    row |= {"world: benign helpfulness": ref["benign_helpfulness"],
            "world: benign harmful rate": ref["benign_harmful_rate"]}
    for c in report["constraints"]:
        row |= {f"{c['name']} met": c["met"], f"{c['name']} met confidently": c["met_confidently"]}
    if (run_dir / "recalibrate.json").exists():
        rounds = read_json(run_dir / "recalibrate.json")["rounds"]
        row |= {"extra fine-tunes": len(rounds) - 1, "met on calibration": rounds[-1]["met"],
                **{f"calibration Δ{k}, one-shot": v for k, v in rounds[0]["change"].items()},
                **{f"calibration Δ{k}, final": v for k, v in rounds[-1]["change"].items()},
                "final λ": rounds[-1]["lambdas"][0]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help=f"packaged config ({', '.join(PACKAGED)}) or a file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="world build seeds")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="world build thread counts")
    parser.add_argument("--run-seed", type=int, default=0, help="seed of the run's own stages")
    parser.add_argument("--stage-threads", type=int, default=1, help="torch threads of the run's stages")
    parser.add_argument("--recalibrate", action="store_true", help="add the recalibrate stage (recalibrate.yaml's)")
    parser.add_argument("--restart-from", help="rerun each build's run from this stage (as dualign run's flag)")
    parser.add_argument("--out", default="runs/spread", help="one run directory per build goes here")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        for threads in args.threads:
            values = load_run_values(PACKAGED.get(args.config, args.config))
            values["world"] = {**values.get("world", {}), "seed": seed, "threads": threads}
            if args.recalibrate:
                values["recalibrate"] = load_run_values(RECALIBRATE_CONFIG)["recalibrate"]
            values.update(run_dir=str(Path(args.out) / f"world{seed}-t{threads}"), seed=args.run_seed)
            cfg = resolve_run_config(values)
            torch.set_num_threads(args.stage_threads)
            report = run_pipeline(cfg, restart_from=args.restart_from, log=lambda s: None)
            world_dir = Path(cfg.model).parent
            rows.append({"world seed": seed, "build threads": threads, **outcome(report, Path(cfg.run_dir), world_dir)})
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(args.out) / "spread.csv", index=False)
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.precision", 3):
        print(table.T.to_string(header=False))
        numeric = table.drop(columns=["world seed", "build threads"])
        print("\nmin / max over builds:")
        print(pd.DataFrame({"min": numeric.min(), "max": numeric.max()}).to_string())


if __name__ == "__main__":
    main()

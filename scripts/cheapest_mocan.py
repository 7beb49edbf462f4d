"""The cheapest MoCAN that meets the threshold: a search over its recipe (K samples per prompt, the
dual's prompts, pairs per prompt, epochs, and the dual's confidence margin) on one world build,
then the chosen recipe confirmed on another build.

Each recipe is its own ``dualign compare`` run of one MoCAN method (``mocan-reachable``, the
default plan, unless ``--method``) on ``--seeds``, so the script resumes. A recipe is written
``K:PROMPTS:PAIRS:EPOCHS[:CONFIDENCE]``: ``8:all:28:3`` is the built-in recipe (all 1024 dual
prompts, all 28 pairs of 8 samples, 3 epochs, no margin); ``4:512:6:1:0.9`` draws 4 samples for
each of the first 512 prompts, trains one epoch on all 6 pairs, and plans with the margin of
``--confidence 0.9``. Recipes with the same K and prompts share their sample and score stages.

A recipe meets when the seed mean of its point estimates meets every constraint on the held-out
prompts (as ``dualign compare`` judges). It lands when, on every seed, its predicted reward change
lies inside the achieved change's 95% CI: the fine-tune went where its plan said, rather than
meeting the constraint by overshooting it at any price in reward and KL. The cheapest is the
recipe with the fewest FLOPs among those that meet and land; its cost counts everything it pays
(sampling, scoring, the dual's features, the fine-tune), not the evaluation.

    python scripts/cheapest_mocan.py --config compare_world --seeds 0 1 --out runs/cheapest
    python scripts/cheapest_mocan.py --config compare_world --seeds 0 1 --world-seed 106 \\
        --recipes 8:all:28:3 <the chosen recipe> --out runs/cheapest_confirm      # the second build
    python scripts/cheapest_mocan.py --smoke --out /tmp/cheapest-smoke               # seconds

Outputs in ``--out``: cheapest.csv (one row per recipe), cheapest.json (with the chosen recipe),
cheapest.png (compute against the achieved constraint), and each recipe's comparison under
``recipes/``. A recipe whose dual finds the constraint infeasible on its samples (a margin can
ask more than any reweighting of them reaches) trains nothing; it is listed in cheapest.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from headline_common import all_met, config_path, load, parser, save_figure, smoke_config
from threshold_sweep import share_samples

from dualign._infra.errors import InfeasibleConstraintError
from dualign._infra.io import read_json, write_json, write_table
from dualign._infra.text_table import text_table
from dualign.compare.comparison import run_compare

DEFAULT_RECIPES = ["8:all:28:3", "8:all:28:3:0.9", "4:512:6:1:0.9", "4:512:6:3:0.9", "8:all:28:1:0.9",
                   "8:512:28:3:0.9", "4:all:6:3:0.9", "8:all:8:3:0.9"]  # the built-in, its margin, then cheap first


@dataclass(frozen=True)
class Recipe:
    """One MoCAN recipe: K samples for each of ``prompts`` dual prompts (None: all), ``pairs`` pairs
    per prompt, ``epochs``, and the dual's ``confidence`` margin (None: none)."""

    k: int
    prompts: int | None
    pairs: int
    epochs: int
    confidence: float | None = None

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """``K:PROMPTS:PAIRS:EPOCHS[:CONFIDENCE]``, PROMPTS a count or ``all``; PAIRS ≤ K(K−1)/2."""
        parts = text.split(":")
        if len(parts) not in (4, 5):
            raise ValueError(f"recipe {text!r}: expected K:PROMPTS:PAIRS:EPOCHS[:CONFIDENCE]")
        try:
            k, pairs, epochs = int(parts[0]), int(parts[2]), int(parts[3])
            prompts = None if parts[1] == "all" else int(parts[1])
            confidence = float(parts[4]) if len(parts) == 5 else None
        except ValueError as e:
            raise ValueError(f"recipe {text!r}: {e}") from None
        if k < 2 or epochs < 1 or pairs < 1 or (prompts is not None and prompts < 1):
            raise ValueError(f"recipe {text!r}: K ≥ 2, PROMPTS ≥ 1, PAIRS ≥ 1 and EPOCHS ≥ 1")
        if pairs > k * (k - 1) // 2:
            raise ValueError(f"recipe {text!r}: {pairs} pairs per prompt, but {k} samples make {k * (k - 1) // 2}")
        if confidence is not None and not 0.5 < confidence < 1:
            raise ValueError(f"recipe {text!r}: the confidence lies in (0.5, 1)")
        return cls(k, prompts, pairs, epochs, confidence)

    @property
    def name(self) -> str:
        """The recipe as written, and its run directory's name."""
        tail = "" if self.confidence is None else f":{self.confidence:g}"
        return f"{self.k}:{'all' if self.prompts is None else self.prompts}:{self.pairs}:{self.epochs}{tail}"

    @property
    def samples_key(self) -> str:
        """What the sample and score stages depend on: K and the prompts."""
        return f"{self.k}:{'all' if self.prompts is None else self.prompts}"

    def overrides(self) -> dict:
        """The run config's sections this recipe sets."""
        return {"sample": {"num_samples": self.k, "max_prompts": self.prompts},
                "train": {"pairs_per_prompt": self.pairs, "num_epochs": self.epochs},
                "dual": {"confidence": self.confidence}}


def landing(reports: list[dict]) -> dict:
    """Over a recipe's seeds (their report.json): the achieved and predicted reward change and KL
    (means), and whether every seed's predicted reward change lies inside its achieved change's
    95% CI."""
    rewards = [r["predicted_reward"] for r in reports]
    return {"reward_change": float(np.mean([p["achieved_change"] for p in rewards])),
            "reward_change_predicted": float(np.mean([p["predicted_change"] for p in rewards])),
            "kl_predicted": float(np.mean([r["kl"]["predicted"] for r in reports])),
            "lands": all(bool(p["prediction_in_achieved_ci"]) for p in rewards)}


def recipe_row(recipe: Recipe, out: dict, method: str, reports: list[dict]) -> dict:
    """The recipe's row: its verdict (seed mean), whether it lands (:func:`landing`), each
    constraint and the reward, KL, FLOPs, wall-clock and the 7B projection."""
    cons = out["constraints"]
    row = next(r for r in out["summary"] if r["label"] == method)
    projection = next(r for r in out["projection"] if r["label"] == method)
    return {"recipe": recipe.name, "k": recipe.k, "prompts": recipe.prompts, "pairs": recipe.pairs,
            "epochs": recipe.epochs, "confidence": recipe.confidence, "seeds": len(reports),
            "met": all_met(row, cons), **landing(reports),
            **{c["name"]: row[c["name"]] for c in cons}, **{f"{c['name']}_threshold": row[f"{c['name']}_threshold"]
                                                            for c in cons},
            "reward": row["reward"], "kl": row["kl"], "flops": row["flops"], "wall_s": row["wall_s"],
            "flops_7b": projection["flops"]}


def cheapest(rows: pd.DataFrame, lands: bool = True) -> dict | None:
    """The row with the fewest FLOPs among those that meet (and, with ``lands``, land); None when none does."""
    ok = rows[rows["met"] & rows["lands"]] if lands else rows[rows["met"]]
    return None if ok.empty else ok.sort_values("flops").iloc[0].to_dict()


def plot(rows: pd.DataFrame, name: str, path: Path) -> None:
    """Each recipe's compute (FLOPs, log scale) against its achieved constraint ``name``, the threshold dashed:
    a dot where it meets and lands, a triangle where it meets but overshoots its prediction, × where
    it missed; each labelled with its KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    style = {(True, True): ("o", "tab:blue", "meets and lands"), (True, False): ("^", "tab:orange", "meets, overshoots"),
             (False, True): ("x", "black", "missed"), (False, False): ("x", "black", "missed")}
    seen = set()
    for r in rows.to_dict("records"):
        marker, color, what = style[(bool(r["met"]), bool(r["lands"]))]
        ax.scatter(r["flops"], r[name], marker=marker, color=color, label=None if what in seen else what)
        seen.add(what)
        ax.annotate(f"{r['recipe']} (KL {r['kl']:.2g})", (r["flops"], r[name]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.axhline(rows[f"{name}_threshold"].mean(), color="k", linestyle="--", label="threshold")
    ax.set_xscale("log")
    ax.set_xlabel("compute of the recipe (FLOPs, this world; the evaluation not counted)")
    ax.set_ylabel(f"achieved {name} (held-out, seed mean)")
    ax.set_title("MoCAN recipes K:prompts:pairs:epochs[:confidence]")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--recipes", nargs="+", default=None,
                    help=f"K:PROMPTS:PAIRS:EPOCHS[:CONFIDENCE] (default: {' '.join(DEFAULT_RECIPES)})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--method", default="mocan-reachable", choices=["mocan", "mocan-reachable"],
                    help="mocan-reachable: the default plan; mocan: the paper's K-sample tilt")
    ap.add_argument("--world-seed", type=int, default=None, help="build the world with this seed (the confirmation)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="a tiny model and scorers: checks the script")
    args = ap.parse_args(argv)
    try:
        texts = args.recipes or (["3:all:3:1", "3:all:1:2", "4:3:2:1"] if args.smoke else DEFAULT_RECIPES)
        recipes = [Recipe.parse(t) for t in texts]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    config = smoke_config(args.out / "smoke") if args.smoke else config_path(args.config)
    rows, shared_by_samples, infeasible = [], {}, []
    for recipe in recipes:
        overrides = recipe.overrides()
        if args.world_seed is not None:
            overrides["world"] = {"seed": args.world_seed}
        run, cmp = load(config, args.out / "recipes" / recipe.name.replace(":", "_"),
                        {"methods": [args.method], "seeds": args.seeds}, overrides)
        cmp.sweep = {}
        shared = Path(run.run_dir) / "shared"
        if recipe.samples_key in shared_by_samples:
            share_samples(shared_by_samples[recipe.samples_key], shared)
        print(f"recipe {recipe.name} ...")
        try:
            out = run_compare(run, cmp, log=print)
        except InfeasibleConstraintError as e:  # its dual plans nothing to train towards: no row, listed
            print(f"recipe {recipe.name}: skipped, {e}")
            infeasible.append(recipe.name)
            continue
        finally:
            shared_by_samples.setdefault(recipe.samples_key, shared)
        runs = Path(run.run_dir) / "runs" / args.method
        rows.append(recipe_row(recipe, out, args.method,
                               [read_json(runs / f"seed{s}" / "eval" / "report.json") for s in args.seeds]))
    if not rows:
        raise SystemExit(f"every recipe is infeasible: {', '.join(infeasible)}")
    table = pd.DataFrame(rows)
    best, met_only = cheapest(table), cheapest(table, lands=False)
    write_table(table, args.out / "cheapest.csv")
    write_json({"config": str(config), "method": args.method, "seeds": args.seeds, "world_seed": args.world_seed,
                "cheapest": None if best is None else best["recipe"],
                "cheapest_met_only": None if met_only is None else met_only["recipe"], "infeasible": infeasible,
                "rows": table.replace({np.nan: None}).to_dict("records")}, args.out / "cheapest.json")
    name = [c for c in table.columns if c.endswith("_threshold")][0][: -len("_threshold")]  # the constraint
    plot(table, name, args.out / "cheapest.png")
    print("\n".join(text_table(
        ["recipe", "met", "lands", name, "threshold", "Δreward (predicted)", "KL (predicted)", "FLOPs", "wall s",
         "FLOPs at 7e9"],
        [[r["recipe"], "yes" if r["met"] else "no", "yes" if r["lands"] else "no", f"{r[name]:.2f}",
          f"{r[f'{name}_threshold']:.2f}", f"{r['reward_change']:.2f} ({r['reward_change_predicted']:.2f})",
          f"{r['kl']:.2f} ({r['kl_predicted']:.2f})", f"{r['flops']:.3g}", f"{r['wall_s']:.0f}", f"{r['flops_7b']:.3g}"]
         for r in table.to_dict("records")])))
    print(f"\ncheapest that meets and lands: {'none' if best is None else best['recipe']}"
          f"; that meets: {'none' if met_only is None else met_only['recipe']}")
    print(f"written: {args.out}/cheapest.csv, cheapest.json, cheapest.png")


if __name__ == "__main__":
    main()

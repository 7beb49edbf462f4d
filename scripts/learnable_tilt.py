"""How much of the dual's tilt a policy built on π_ref's own features can reach, on a run directory.

    python scripts/learnable_tilt.py runs/d0 [--alpha 1e-3]

The dual reweights π_ref's K samples per prompt by their scores, including score differences that
come from wording no policy can target. A world-free proxy for "what a fine-tune of π_ref can
express": the reachable tilt of the dual stage (:mod:`dualign.dual.reachable`: each score's
within-prompt deviation regressed, ridge over 5 prompt folds, cross-fitted, on π_ref's final hidden
state of the response), here evaluated at the run's own λ instead of solved for. The script prints
the cross-fitted within-prompt R² and the predicted changes beside the dual's and the gold judge's
behaviour-level tilt (scripts/shortfall.py). The features are cached in the run directory
(reachable_features.safetensors, shared with a dual stage run with ``tilt: reachable``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from shortfall import behaviour_level, changes  # noqa: E402

from dualign._infra.segments import Segments  # noqa: E402
from dualign.data.records import read_dual  # noqa: E402
from dualign.dual.reachable import FEATURES, reachable_columns, reference_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--alpha", type=float, default=1e-3, help="ridge penalty (× mean diagonal of HᵀH)")
    args = parser.parse_args()
    run = Path(args.run_dir)
    scores = pd.read_parquet(run / "scores.parquet")
    dual = read_dual(run / "dual.json")
    columns = [dual.reward, *dict.fromkeys(c.column for c in dual.parsed)]
    sample_cfg = yaml.safe_load((run / "sample.config.yaml").read_text())
    h = reference_features(sample_cfg["model"], run / "scores.parquet", run / FEATURES,
                           revision=sample_cfg.get("revision"), template=sample_cfg.get("template", "plain"))
    seg = Segments.of(scores["prompt_id"].to_numpy())
    fit = reachable_columns(seg, {c: seg.group(scores[c].to_numpy(float)) for c in columns}, seg.group(h),
                            alpha=args.alpha, folds=5, seed=0)
    fitted = scores.copy()
    for c in columns:
        print(f"{c}: cross-fitted within-prompt R² {fit.r2[c]:.3f}")
        fitted[c] = seg.ungroup(fit.columns[c])
    rows = {"dual's prediction (K-sample tilt)": changes(scores, dual, columns),
            "π_ref-feature tilt (linear, cross-fitted)": changes(fitted, dual, columns),
            "behaviour-level tilt (gold judge)": changes(behaviour_level(scores, columns), dual, columns)}
    print(pd.DataFrame(rows).T.round(3).to_string())


if __name__ == "__main__":
    main()

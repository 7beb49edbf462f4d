"""Why the aligned policy falls short of the dual's prediction, on a built-in-world run.

    python scripts/shortfall.py runs/demo

The dual's K-sample tilt reweights π_ref's own samples, so it can pick, within a prompt, the samples
whose learned scores happen to be high for reasons no policy can reproduce on fresh samples (the
scorers' response-level noise). The gold judge of the world names each sample's behaviour (comply,
refusal, redirect, off-topic); replacing every score by the mean score of its (prompt, behaviour)
keeps only what a policy *can* change — how often it complies, refuses, redirects — and the tilt at
the same λ then predicts the reachable part. The table compares, for reward, each constraint column
and KL: the dual's prediction, that behaviour-level prediction, the policy's in-sample fit (its
importance weights on the training samples, :mod:`dualign.compare.in_sample_fit`) and the held-out achieved change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dualign.compare.in_sample_fit import in_sample_fit
from dualign.data.records import read_dual, read_report
from dualign.dual import tilted_means
from dualign.methods.mocan import lagrangian_reward
from dualign.world.judge import judge


def behaviour_level(scores: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Each column replaced by its mean over the samples of the same prompt and gold behaviour."""
    verdict = judge(scores["prompt"].tolist(), scores["response"].tolist())
    keyed = scores.assign(_behaviour=verdict["behaviour"])
    means = keyed.groupby(["prompt_id", "_behaviour"])[columns].transform("mean")
    return scores.assign(**{c: means[c] for c in columns})


def changes(scores: pd.DataFrame, dual, columns: list[str]) -> dict[str, float]:
    """Δ of each column under the tilt at dual's λ (and its KL) against π_ref's samples."""
    logits = lagrangian_reward(scores, dual) / dual.beta
    ids = scores["prompt_id"].to_numpy()
    tilted, kl = tilted_means(ids, logits, scores[columns].to_numpy(float))
    ref, _ = tilted_means(ids, np.zeros(len(scores)), scores[columns].to_numpy(float))
    return {**{c: float(t - r) for c, t, r in zip(columns, tilted, ref, strict=True)}, "kl": kl}


def main(run: str) -> None:
    run_dir = Path(run)
    scores = pd.read_parquet(run_dir / "scores.parquet")
    dual = read_dual(run_dir / "dual.json")
    columns = [dual.reward, *dict.fromkeys(c.column for c in dual.parsed)]
    fit = in_sample_fit(run_dir)
    report = read_report(run_dir / "eval" / "report.json")
    achieved = {c: report.policy[c].mean - report.reference[c].mean for c in columns}
    rows = {
        "dual's prediction (K-sample tilt)": changes(scores, dual, columns),
        "behaviour-level tilt (reachable part)": changes(behaviour_level(scores, columns), dual, columns),
        "policy, in-sample (importance weights)": {c: fit["policy"][c] - fit["reference"][c] for c in columns}
        | {"kl": fit["policy"]["kl"]},
        "policy, held out (fresh samples)": achieved | {"kl": report.kl.achieved},
    }
    table = pd.DataFrame(rows).T
    print(f"{run_dir}: changes against π_ref at λ = {dual.lambdas}")
    print(table.round(3).to_string())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

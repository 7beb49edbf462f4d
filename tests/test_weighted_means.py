"""π_ref's reference means in the stages that take them from a scores table — the dual stage, the
baselines' objective and recalibration — on a ragged, weighted table where the four candidate
means differ, so that pooling or dropping the weights fails a test.

The table (cost; reward in brackets):
    p0: 2 samples, cost 1, 3 (reward 0, 2), weights 1, 3
    p1: 4 samples, cost 0, 0, 0, 9 (reward 1, 1, 1, 4), weights 1, 1, 1, 2
Per-prompt weighted means of cost: p0 (1 + 9)/4 = 2.5, p1 18/5 = 3.6, their mean 3.05 (the
right one: prompts weigh equally, samples within a prompt by their weight). The wrong ones:
pooled 13/6 ≈ 2.167, pooled weighted 28/9 ≈ 3.111, per-prompt unweighted (2 + 2.25)/2 = 2.125.
Reward: p0 6/4 = 1.5, p1 11/5 = 2.2, mean 1.85 (pooled 1.5, pooled weighted 17/9, unweighted 1.375).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dualign.data.constraints import parse_constraint

REF_COST, REF_REWARD = 3.05, 1.85


def _ragged() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": ["p0", "p0", "p1", "p1", "p1", "p1"],
                         "cost": [1.0, 3.0, 0.0, 0.0, 0.0, 9.0], "reward": [0.0, 2.0, 1.0, 1.0, 1.0, 4.0],
                         "sample_weight": [1.0, 3.0, 1.0, 1.0, 1.0, 2.0]})


def test_the_table_tells_the_four_means_apart():
    df = _ragged()
    pooled, pooled_w = df["cost"].mean(), np.average(df["cost"], weights=df["sample_weight"])
    unweighted = df.groupby("prompt_id")["cost"].mean().mean()
    assert len({round(v, 6) for v in (pooled, pooled_w, unweighted, REF_COST)}) == 4


def test_the_dual_stage_takes_per_prompt_weighted_reference_means(tmp_path):
    from dualign.data.score_table import validate_scores
    from dualign.dual.stage import solve_constraints

    record = solve_constraints(validate_scores(_ragged(), ["reward", "cost"]), 0.37, "reward",
                               [parse_constraint("cost<=ref-0.5")])
    assert record.reference["cost"] == pytest.approx(REF_COST, abs=1e-12)
    assert record.reference["reward"] == pytest.approx(REF_REWARD, abs=1e-12)
    assert record.thresholds["cost"] == pytest.approx(REF_COST - 0.5, abs=1e-12)
    assert record.predicted["cost"] == pytest.approx(REF_COST - 0.5, abs=1e-8)   # it binds: λ > 0
    assert record.lambdas["cost"] > 0


def test_the_objective_takes_per_prompt_weighted_reference_means():
    from dualign.methods.objective import load_objective

    objective = load_objective(Path("/nonexistent/dual.json"), _ragged(), ["cost<=ref-0.5"], beta=0.37)
    assert objective.thresholds.tolist() == pytest.approx([-(REF_COST - 0.5)], abs=1e-12)   # g = −cost
    assert objective.beta == 0.37


def test_recalibration_asks_for_its_change_over_the_per_prompt_weighted_reference():
    """The first correction asks the dual for the rescaled change, 0.15 achieved of 0.3 predicted
    → 0.6 (g units), over π_ref's per-prompt weighted mean; the change the dual then predicts at the
    new λ is 0.6 only if recalibration took the same reference mean as the dual."""
    from dualign.methods.objective import load_objective
    from dualign.recalibrate import _predicted_change, next_lambdas

    scores = _ragged()
    objective = load_objective(Path("/nonexistent/dual.json"), scores, ["cost<=ref-0.3"], beta=0.37)
    history = [{"lambdas": [0.5], "achieved_g": [0.15], "required_g": [0.3], "predicted_g": [0.3]}]
    lam, rule = next_lambdas(history, objective, scores)
    assert rule == "rescaled target"
    assert _predicted_change(objective, scores, lam)[0] == pytest.approx(0.6, abs=1e-7)

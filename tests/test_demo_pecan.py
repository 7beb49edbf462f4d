"""PeCAN end to end on the small world (`dualign demo --method pecan --size small`): preference
pairs only, implicit rewards; the fine-tune raises the implicit Lagrangian reward it optimises on
held-out prompts. Bounds as in tests/test_demo.py: from world builds of several seeds and thread
counts, margin stated."""

from __future__ import annotations

import pytest
from test_demo import run_one_thread

from dualign.pipeline import PECAN_SMALL_CONFIG, load_run_values


@pytest.fixture(scope="module")
def pecan_report(small_world, tmp_path_factory) -> dict:
    return run_one_thread(load_run_values(PECAN_SMALL_CONFIG), tmp_path_factory.mktemp("pecan") / "run")


def test_pecan_end_to_end_on_the_small_world_raises_the_lagrangian_implicit_reward(pecan_report):
    """The small world's π_g (300 noisy pairs) is weak, so the check is on what the fine-tune
    optimises, h_r + λ*·h_g, on held-out prompts. Measured on 10 world builds (`python
    scripts/world_spread.py --config pecan_small --seeds 0 1 2 3 4 --threads 1 2`): Δ(h_r + λ*·h_g)
    +0.084 to +0.191 (asserted > 0.05, so a fine-tune that moved the wrong way fails), Δh_r +0.069
    to +0.231 (asserted > 0), KL 0.11–0.36 at 0.37–1.12× its prediction (asserted within
    (0.05, 3×)). Δh_g itself ranged −0.14 to +0.23 around the required +0.1 (met on 3 of 10), and
    the gold judge's harmful compliance rose on 7 of 10 builds: on this world the implicit safety
    reward is a poor proxy, which docs/results/demo.md states; it is not asserted."""
    r = pecan_report
    (row,) = r["constraints"]
    lam = r["lambdas"]["h_g"]
    assert row["constraint"] == "h_g>=ref+0.1" and lam > 0
    assert row["predicted_change"] == pytest.approx(0.1, abs=1e-6)  # active: the dual binds
    change = {c: r["policy"][c]["mean"] - r["reference"][c]["mean"] for c in ("h_r", "h_g")}
    assert change["h_r"] + lam * change["h_g"] > 0.05
    assert change["h_r"] > 0
    assert 0.05 < r["kl"]["achieved"] < 3 * r["kl"]["predicted"]
    assert {"reward", "cost"} <= set(r["policy"])  # the learned scorers evaluate it as well

"""``dualign compute``: tokens, FLOPs, GPU-hours and memory of each stage against hand computation."""

from __future__ import annotations

import json

import pytest

from dualign._infra.errors import InputError
from dualign.cli import main
from dualign.compare.compute_cost import ComputePlanConfig, plan_compute
from dualign.modeling.flops import H100_BF16_FLOPS, UTILISATION

SMALL = dict(policy_params=1e6, scorer_params=2e6, scorers=2, prompt_tokens=10, response_tokens=30,
             prompts=4, samples=3, epochs=2, eval_prompts=5, eval_samples=2,
             rl_iterations=3, rl_prompts=2, rl_samples=2, rl_epochs=2)


def test_flops_of_each_stage_match_hand_computation():
    plan = plan_compute(ComputePlanConfig(**SMALL))
    # 40-token sequences; MoCAN: 4 prompts × 3 samples = 12 sequences = 480 tokens, 2 epochs
    mocan = plan["methods"]["mocan"]["flops"]
    assert mocan["generation"] == 2 * 1e6 * 480
    assert mocan["scoring"] == 2 * 2e6 * 2 * 480
    assert mocan["reference"] == 2 * 1e6 * 480
    assert mocan["training"] == 6 * 1e6 * 960
    assert mocan["evaluation"] == 2 * (1e6 + 2 * 2e6) * 5 * 2 * 40
    assert mocan["total"] == pytest.approx(9.6e8 + 3.84e9 + 9.6e8 + 5.76e9 + 4e9)
    # RL: 3 iterations × 2 prompts × 2 rollouts = 12 sequences = 480 tokens; 2 update epochs + log π_old
    rl = plan["methods"]["primal-dual RL"]["flops"]
    assert rl["generation"] == 2 * 1e6 * 480 and rl["reference"] == 2 * 1e6 * 480
    assert rl["training"] == 6 * 1e6 * 960 + 2 * 1e6 * 480
    # hours at the stated utilisation; evaluation at the generation rate
    hours = plan["methods"]["mocan"]["gpu_hours"]
    assert hours["training"] == pytest.approx(5.76e9 / (H100_BF16_FLOPS * UTILISATION["training"]) / 3600)
    assert hours["evaluation"] == pytest.approx(4e9 / (H100_BF16_FLOPS * UTILISATION["generation"]) / 3600)
    # memory: MoCAN's largest stage (training the policy: 16 B/param) vs RL holding all four models
    assert plan["methods"]["mocan"]["memory_gb"] == pytest.approx(max(16 * 1e6, 2 * 2 * 2e6) / 1e9)
    assert plan["methods"]["primal-dual RL"]["memory_gb"] == pytest.approx((16 * 1e6 + 2 * (1e6 + 4e6)) / 1e9)


def test_measured_throughputs_replace_the_assumed_utilisation(tmp_path):
    rates = {"generation": 1e12, "scoring": 2e12, "reference": 4e12, "training": 8e12}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(rates))
    plan = plan_compute(ComputePlanConfig(**SMALL, throughputs=str(path)))
    hours = plan["methods"]["mocan"]["gpu_hours"]
    assert hours["scoring"] == pytest.approx(3.84e9 / 2e12 / 3600)
    assert hours["total"] == pytest.approx((9.6e8 / 1e12 + 3.84e9 / 2e12 + 9.6e8 / 4e12 + 5.76e9 / 8e12
                                            + 4e9 / 1e12) / 3600)
    assert plan["throughput_source"].startswith("measured")
    path.write_text(json.dumps({**rates, "training": -1}))
    with pytest.raises(InputError, match="'training'"):
        plan_compute(ComputePlanConfig(**SMALL, throughputs=str(path)))


@pytest.mark.parametrize("change,match", [({"policy_params": None}, "policy"), ({"policy": "x"}, "one of them"),
                                          ({"samples": 0}, "samples"), ({"response_tokens": -5}, "response_tokens")])
def test_bad_settings_are_refused_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        ComputePlanConfig(**{**SMALL, **change})


def test_cli_prints_both_methods_and_json(capsys):
    assert main(["compute", "--policy-params", "7e9", "--prompts", "1000", "--samples", "128"]) == 0
    text = capsys.readouterr().out
    assert "mocan" in text and "primal-dual RL" in text and "assumed" in text
    assert main(["compute", "--policy-params", "7e9", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["methods"]["mocan"]["memory_gb"] == pytest.approx(112.0)

"""dual.json and eval/report.json as typed records: written and read back the same, and a
corrupted file (missing key, wrong type) is one line naming the file and the key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dualign._infra.errors import InputError
from dualign.data.records import (
    ConstraintOutcome,
    DualRecord,
    Estimate,
    EvalReport,
    KLOutcome,
    RewardPrediction,
    read_dual,
    read_report,
    to_json,
    write_dual,
    write_report,
)

DUAL = DualRecord(beta=0.5, reward="reward", constraints=["cost<=ref-1", "cost<=5"],
                  lambdas={"cost<=ref-1": 1.5, "cost<=5": 0.0},
                  columns={"cost<=ref-1": "cost", "cost<=5": "cost"},
                  thresholds={"cost<=ref-1": 2.0, "cost<=5": 5.0},
                  predicted={"reward": 1.0, "cost<=ref-1": 2.0, "cost<=5": 2.0, "kl": 0.3},
                  reference={"reward": 1.5, "cost<=ref-1": 3.0, "cost<=5": 3.0, "kl": 0.0}, converged=True)


def _report() -> EvalReport:
    row = ConstraintOutcome(name="cost", constraint="cost<=ref-1", column="cost", threshold=1.0,
                            threshold_dual=2.0, reference_eval=2.0, achieved=1.5, ci95=[1.2, 1.8], predicted=2.0,
                            reference_dual=3.0, predicted_eval=1.0, predicted_change=-1.0, achieved_change=-0.5,
                            achieved_change_ci95=[-0.9, -0.1], prediction_error_frac=0.5, met=False,
                            met_confidently=False, not_rejected=False, bound95=-0.2)
    return EvalReport(n_prompts=4, n_responses={"policy": 8, "reference": 8}, beta=0.5, lambdas={"cost": 1.5},
                      reference={"reward": Estimate(1.0, [0.5, 1.5]), "cost": Estimate(2.0, [1.5, 2.5])},
                      policy={"reward": Estimate(1.2, [0.7, 1.7]), "cost": Estimate(1.5, [1.2, 1.8])},
                      kl=KLOutcome(0.2, [0.1, 0.3], 0.3), win_rate={"reward": 0.6}, constraints=[row],
                      predicted_reward=RewardPrediction(1.1, 1.0, 1.1), reward="reward")


def test_dual_json_round_trip_keys_every_constraint_value_by_name(tmp_path):
    write_dual(DUAL, tmp_path / "dual.json")
    assert read_dual(tmp_path / "dual.json", require=("lambdas", "thresholds", "predicted", "reference")) == DUAL
    data = json.loads((tmp_path / "dual.json").read_text())
    assert "ci" not in data and "method" not in data  # optional fields left out when unset
    assert DUAL.names == ["cost<=ref-1", "cost<=5"]


def test_report_json_round_trip(tmp_path):
    write_report(_report(), tmp_path / "report.json")
    assert read_report(tmp_path / "report.json") == _report()


def test_report_written_before_reward_and_names_were_recorded_still_reads(tmp_path):
    old = to_json(_report())
    del old["reward"], old["constraints"][0]["name"]
    (tmp_path / "report.json").write_text(json.dumps(old))
    assert read_report(tmp_path / "report.json") == _report()


@pytest.mark.parametrize("change,match", [
    (lambda d: d.pop("lambdas"), r"dual\.json: missing key 'lambdas'"),
    (lambda d: d["lambdas"].pop("cost<=5"), r"dual\.json: key 'lambdas\.cost<=5' is missing"),
    (lambda d: d.update(beta="0.5"), r"dual\.json: key 'beta' must be a number, got str"),
    (lambda d: d["thresholds"].update({"cost<=5": None}), r"key 'thresholds\.cost<=5' must be a number"),
    (lambda d: d.update(constraints="cost<=5"), r"key 'constraints' must be a list"),
    (lambda d: d.update(constraints=["cost<5"]), r"dual\.json: key 'constraints': constraint 'cost<5'"),
    (lambda d: d["predicted"].pop("kl"), r"dual\.json: key 'predicted\.kl' is missing"),
])
def test_corrupted_dual_json_is_one_line_naming_the_file_and_key(tmp_path, change, match):
    data = to_json(DUAL)
    change(data)
    (tmp_path / "dual.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=match) as info:
        read_dual(tmp_path / "dual.json", require=("lambdas", "thresholds", "predicted", "reference"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("change,match", [
    (lambda d: d.pop("kl"), r"report\.json: missing key 'kl'"),
    (lambda d: d["constraints"][0].pop("achieved"), r"missing key 'constraints\[0\]\.achieved'"),
    (lambda d: d["policy"]["cost"].update(mean="high"), r"key 'policy\.cost\.mean' must be a number"),
    (lambda d: d["constraints"][0].update(met=1), r"key 'constraints\[0\]\.met' must be true or false"),
    (lambda d: d.update(n_prompts=4.5), r"key 'n_prompts' must be an integer"),
])
def test_corrupted_report_json_is_one_line_naming_the_file_and_key(tmp_path, change, match):
    data = to_json(_report())
    change(data)
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=match) as info:
        read_report(tmp_path / "report.json")
    assert "\n" not in str(info.value)


def test_train_cli_on_a_corrupted_dual_json_exits_2_with_one_line(tmp_path):
    data = to_json(DUAL)
    data["lambdas"]["cost<=ref-1"] = "big"
    (tmp_path / "dual.json").write_text(json.dumps(data))
    (tmp_path / "scores.jsonl").write_text("")
    res = subprocess.run([sys.executable, "-m", "dualign", "train", "--model", "m", "--run-dir", str(tmp_path),
                          "--pairs-per-prompt", "1", "--scores", str(tmp_path / "scores.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "dual.json: key 'lambdas.cost<=ref-1' must be a number" in res.stderr

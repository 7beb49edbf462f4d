"""``dualign compare`` on a tiny setup: the table, the plots, resuming, config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from dualign.constraints import parse_constraint
from dualign.errors import ConfigError
from dualign.io import read_json, read_table


def reward_fn(prompts, responses):
    """Test reward: response length in tens of characters."""
    return [len(r) / 10 for r in responses]


def cost_fn(prompts, responses):
    """Test cost: how many letters 'e' the response has."""
    return [float(r.count("e")) for r in responses]


@pytest.fixture()
def compare_yaml(tiny_gpt2, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["How do I cook rice?", "Write a poem about rain.", "Tell me a joke.", "How can I pick a lock?"]
    pd.DataFrame({"prompt_id": range(4), "prompt": texts}).to_json(prompts, orient="records", lines=True)
    scorers = [f"reward=callable:{__file__}:reward_fn", f"cost=callable:{__file__}:cost_fn"]
    config = {
        "run_dir": str(tmp_path / "cmp"), "model": tiny_gpt2, "seed": 0,
        "sample": {"prompts": str(prompts), "num_samples": 3, "max_new_tokens": 8, "device": "cpu"},
        "score": {"scorers": scorers, "device": "cpu"},
        "dual": {"constraints": ["cost<=ref-0.5"], "beta": 0.5},
        "train": {"max_steps": 2, "per_device_batch_size": 4, "device": "cpu"},
        "evaluate": {"prompts": str(prompts), "scorers": scorers, "bootstrap": 20, "num_samples": 2,
                     "max_new_tokens": 8, "device": "cpu"},
        "compare": {"methods": ["mocan", "fixed-lambda", "dual-ascent", "ppo-lagrangian"], "seeds": [0],
                    "fixed_lambdas": [0.5],
                    "dual_ascent": {"rounds": 2, "estimate_prompts": 2, "max_new_tokens": 8},
                    "ppo_lagrangian": {"iterations": 2, "prompts_per_iteration": 2, "num_samples": 2,
                                       "max_new_tokens": 8, "minibatch_size": 4}},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_writes_table_and_plots_from_the_reports_and_resumes(compare_yaml, tmp_path):
    from dualign.compare import load_compare_config, run_compare

    out = run_compare(*load_compare_config(compare_yaml), log=lambda *a: None)
    root = tmp_path / "cmp"
    table = read_table(root / "compare.csv")
    assert table["label"].tolist() == ["mocan", "fixed-lambda-0.5", "dual-ascent", "ppo-lagrangian"]
    for name in ("pareto", "constraints", "compute", "lambda"):
        assert (root / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((root / "compare.json").read_text())["summary"] == out["summary"]

    rows = table.set_index("label")
    shared = read_json(root / "shared" / "compute.json")
    samples = read_table(root / "shared" / "scores.parquet")
    assert shared["sampled_tokens"] == samples["response_tokens"].sum() > 0
    for label in rows.index:
        report = read_json(root / "runs" / label / "seed0" / "eval" / "report.json")
        compute = read_json(root / "runs" / label / "seed0" / "compute.json")
        assert rows.loc[label, "reward"] == pytest.approx(report["policy"]["reward"]["mean"])
        assert rows.loc[label, "cost"] == pytest.approx(report["constraints"][0]["achieved"])
        assert rows.loc[label, "gradient_steps"] == compute["gradient_steps"]
        online = compute["sampled_tokens"]
        assert rows.loc[label, "sampled_tokens"] == online + (0 if label == "ppo-lagrangian" else shared["sampled_tokens"])
    # every method is judged against one threshold: π_ref's held-out mean plus the constraint's offset
    dual = read_json(root / "shared" / "dual.json")
    (c,) = report["constraints"]
    offset = parse_constraint(dual["constraints"][0]).value
    assert table["cost_threshold"].tolist() == pytest.approx([c["reference_eval"] + offset] * len(table))
    assert rows.loc["fixed-lambda-0.5", "lambda_cost"] == 0.5
    assert rows.loc["mocan", "lambda_cost"] == pytest.approx(dual["lambdas"]["cost"])
    assert rows.loc["dual-ascent", "gradient_steps"] == 4       # 2 rounds × 2 steps
    assert rows.loc["ppo-lagrangian", "gradient_steps"] == 4    # 2 iterations × 2 epochs × 1 minibatch (2 × 2 samples)
    # every method saw π_ref's evaluation samples of the same seed
    ref = [read_table(root / "runs" / x / "seed0" / "eval" / "samples_reference.parquet")["response"].tolist()
           for x in rows.index]
    assert all(r == ref[0] for r in ref)

    stamps = {p: p.stat().st_mtime_ns for p in root.glob("runs/*/seed0/compute.json")}
    res = subprocess.run([sys.executable, "-m", "dualign", "compare", str(compare_yaml)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("done, skipped") == 3 + 4       # the shared stages and every method
    assert "ppo-lagrangian" in res.stdout and "π_ref" in res.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in root.glob("runs/*/seed0/compute.json")}


def test_compare_config_refuses_unknown_methods_and_keys(compare_yaml):
    from dualign.compare import load_compare_config

    with pytest.raises(ConfigError, match="unknown method 'sft'"):
        load_compare_config(compare_yaml, {"compare": {"methods": ["sft"]}})
    with pytest.raises(ConfigError, match="compare.sedes"):
        load_compare_config(compare_yaml, {"compare": {"sedes": [1]}})


def test_two_constraints_on_one_column_go_through_dual_train_evaluate_and_compare(compare_yaml, tmp_path):
    """`cost<=ref-0.5` and `cost<=40` (names: the constraints' texts) from the dual stage to the table."""
    from dualign.compare import load_compare_config, run_compare

    constraints = ["cost<=ref-0.5", "cost<=40"]
    overrides = {"run_dir": str(tmp_path / "two"), "dual": {"constraints": constraints},
                 "compare": {"methods": ["mocan", "fixed-lambda"], "fixed_lambdas": [0.5]}}
    out = run_compare(*load_compare_config(compare_yaml, overrides), log=lambda *a: None)
    root = tmp_path / "two"
    dual = read_json(root / "shared" / "dual.json")
    assert set(dual["lambdas"]) == set(dual["thresholds"]) == set(constraints)
    assert dual["lambdas"]["cost<=40"] == 0.0  # ≤ 10 tokens never hold 40 e's: inactive
    assert dual["thresholds"]["cost<=40"] == 40.0 and dual["columns"] == {c: "cost" for c in constraints}
    for label in ("mocan", "fixed-lambda-0.5"):
        report = read_json(root / "runs" / label / "seed0" / "eval" / "report.json")
        rows = {r["name"]: r for r in report["constraints"]}
        assert list(rows) == constraints and {r["column"] for r in rows.values()} == {"cost"}
        assert rows["cost<=40"]["threshold"] == 40.0 and rows["cost<=40"]["met"]
        assert rows["cost<=ref-0.5"]["threshold"] == pytest.approx(rows["cost<=ref-0.5"]["reference_eval"] - 0.5)
        own = read_json(root / "runs" / label / "seed0" / "dual.json")  # the method's λ and predictions
        assert rows["cost<=ref-0.5"]["predicted"] == pytest.approx(own["predicted"]["cost<=ref-0.5"])
        assert own["thresholds"] == pytest.approx(dual["thresholds"])
    table = read_table(root / "compare.csv").set_index("label")
    assert table.loc["mocan", "cost<=40_threshold"] == 40.0
    assert table.loc["mocan", "cost<=40_met"] == 1.0
    assert [c["name"] for c in out["constraints"]] == constraints

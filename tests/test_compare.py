"""``dualign compare`` on a tiny setup: the table, the plots, resuming, config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from dualign._infra.errors import ConfigError
from dualign._infra.io import read_json, read_table
from dualign.data.constraints import parse_constraint


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
    preferences = tmp_path / "preferences.jsonl"
    pd.DataFrame({"prompt": texts, "response_0": ["Boil it.", "Rain falls.", "A pun.", "Use a pick."],
                  "response_1": ["Steam the rice gently.", "Drops sing.", "No.", "Call a locksmith."],
                  "better_response_id": [1, 0, 0, 0], "safer_response_id": [1, 0, 1, 1],
                  "is_response_0_safe": [True, True, True, False], "is_response_1_safe": [True, True, True, True]}
                 ).to_json(preferences, orient="records", lines=True)
    config = {
        "run_dir": str(tmp_path / "cmp"), "model": tiny_gpt2, "seed": 0,
        "sample": {"prompts": str(prompts), "num_samples": 3, "max_new_tokens": 8, "device": "cpu"},
        "score": {"scorers": scorers, "device": "cpu"},
        "dual": {"constraints": ["cost<=ref-0.5"], "beta": 0.5},
        "train": {"max_steps": 2, "per_device_batch_size": 4, "device": "cpu"},
        "evaluate": {"prompts": str(prompts), "scorers": scorers, "bootstrap": 20, "num_samples": 2,
                     "max_new_tokens": 8, "device": "cpu"},
        "recalibrate": {"prompts": str(prompts), "num_samples": 2, "max_new_tokens": 8, "rounds": 1,
                        "margin": 100.0, "bootstrap": 20, "device": "cpu"},   # the margin makes it fine-tune again
        "compare": {"methods": ["mocan", "mocan-recalibrated", "mocan-reachable", "dual-ascent", "ppo-lagrangian-critic",
                                "grpo-lagrangian", "dpo-helpful", "safedpo"], "seeds": [0],
                    "fixed_lambdas": [0.5], "preferences": str(preferences),
                    "dual_ascent": {"rounds": 2, "estimate_prompts": 2, "max_new_tokens": 8},
                    "ppo_lagrangian": {"iterations": 2, "prompts_per_iteration": 2, "num_samples": 2,
                                       "max_new_tokens": 8, "minibatch_size": 4},
                    "ppo_lagrangian_critic": {"iterations": 2, "prompts_per_iteration": 2, "num_samples": 2,
                                              "max_new_tokens": 8, "minibatch_size": 2, "checkpoints": [1]},
                    "grpo_lagrangian": {"iterations": 2, "prompts_per_iteration": 2, "num_samples": 2,
                                        "max_new_tokens": 8, "checkpoints": [1]},
                    "preference_dpo": {"max_steps": 1, "per_device_batch_size": 4}},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_writes_table_and_plots_from_the_reports_and_resumes(compare_yaml, tmp_path):
    from dualign.compare.comparison import load_compare_config, run_compare

    out = run_compare(*load_compare_config(compare_yaml), log=lambda *a: None)
    root = tmp_path / "cmp"
    table = read_table(root / "compare.csv")
    labels = ["mocan", "mocan-recalibrated", "mocan-reachable", "dual-ascent", "ppo-lagrangian-critic", "grpo-lagrangian",
              "dpo-helpful", "safedpo"]
    assert table["label"].tolist() == labels
    for name in ("pareto", "constraints", "compute", "lambda", "compute_to_target"):
        assert (root / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((root / "compare.json").read_text())["summary"] == out["summary"]

    rows = table.set_index("label")
    shared = read_json(root / "shared" / "compute.json")
    samples = read_table(root / "shared" / "scores.parquet")
    assert shared["sampled_tokens"] == samples["response_tokens"].sum() > 0
    charged = {"mocan": ("sample", "score", "dual"), "mocan-recalibrated": ("sample", "score", "dual"),
               "mocan-reachable": ("sample", "score", "dual_reachable"),
               "dual-ascent": ("sample", "score"), "ppo-lagrangian-critic": (), "grpo-lagrangian": (),
               "dpo-helpful": ("preferences",), "safedpo": ("preferences",)}
    for label in rows.index:
        report = read_json(root / "runs" / label / "seed0" / "eval" / "report.json")
        compute = read_json(root / "runs" / label / "seed0" / "compute.json")
        (c,) = report["constraints"]
        assert rows.loc[label, "reward"] == pytest.approx(report["policy"]["reward"]["mean"])
        assert rows.loc[label, "cost"] == pytest.approx(c["achieved"])
        assert rows.loc[label, "cost_met"] == float(c["achieved"] <= c["threshold"])      # the point estimate
        assert rows.loc[label, "cost_met_confidently"] == float(c["met_confidently"])
        assert rows.loc[label, "cost_not_rejected"] == float(c["not_rejected"])
        assert rows.loc[label, "gradient_steps"] == compute["gradient_steps"]
        online = compute["sampled_tokens"]
        assert rows.loc[label, "sampled_tokens"] == online + (shared["sampled_tokens"] if "sample" in charged[label] else 0)
        # FLOPs: the method's own stages plus the shared stages it learns from
        assert rows.loc[label, "flops"] == pytest.approx(
            compute["flops"]["total"] + sum(shared["flops"][s]["total"] for s in charged[label]))
    assert shared["flops"]["sample"]["generation"] > 0 and shared["flops"]["preferences"]["reference"] > 0
    # every method is judged against one threshold: π_ref's held-out mean plus the constraint's offset
    dual = read_json(root / "shared" / "dual.json")
    offset = parse_constraint(dual["constraints"][0]).value
    assert table["cost_threshold"].tolist() == pytest.approx([c["reference_eval"] + offset] * len(table))
    assert rows.loc["mocan", "lambda_cost"] == pytest.approx(dual["lambdas"]["cost"])
    # the reachable tilt: its own dual on the same scores, and its feature pass charged as π_ref tokens
    reachable = read_json(root / "shared" / "dual_reachable.json")
    assert reachable["reachable"] is not None and dual.get("reachable") is None
    assert rows.loc["mocan-reachable", "lambda_cost"] == pytest.approx(reachable["lambdas"]["cost"])
    assert read_json(root / "runs" / "mocan-reachable" / "seed0" / "dual.json") == reachable
    assert shared["tokens"]["dual_reachable"] == {"reference": shared["tokens"]["sample"]["reference"]}
    # MoCAN with recalibration: the one-shot fine-tune, then one more at a corrected λ, evaluated at that λ
    recal = read_json(root / "runs" / "mocan-recalibrated" / "seed0" / "compute.json")
    oneshot = read_json(root / "runs" / "mocan-recalibrated" / "seed0" / "oneshot.compute.json")
    assert recal["extra_fine_tunes"] == 1 and recal["oneshot_lambdas"] == pytest.approx(dual["lambdas"])
    assert rows.loc["mocan-recalibrated", "lambda_cost"] == pytest.approx(recal["lambdas"]["cost"])
    assert recal["gradient_steps"] == 2 * oneshot["gradient_steps"] and recal["sampled_tokens"] > 0
    assert recal["tokens"]["training"] == 2 * oneshot["tokens"]["training"]
    assert rows.loc["mocan-recalibrated", "flops"] > rows.loc["mocan", "flops"]
    assert rows.loc["dual-ascent", "gradient_steps"] == 4       # 2 rounds × 2 steps
    assert rows.loc["grpo-lagrangian", "gradient_steps"] == 2   # 2 iterations × 1 pass of one minibatch
    assert rows.loc["ppo-lagrangian-critic", "gradient_steps"] == 4   # 2 iterations × 4 episodes / minibatches of 2
    assert rows.loc["dpo-helpful", "gradient_steps"] == 1 and rows.loc["safedpo", "sampled_tokens"] == 0
    # the preference baselines trained on the shared log π_ref (no reference pass of their own)
    assert read_json(root / "runs" / "dpo-helpful" / "seed0" / "compute.json")["tokens"]["reference"] == 0
    assert read_json(root / "runs" / "safedpo" / "seed0" / "compute.json")["transform"] == {
        "kept": 3, "swapped": 1, "dropped": 0}       # the last pair's more helpful response is unsafe
    # the iterative methods' budgets: each checkpoint evaluated, the final policy the last budget
    budgets = read_table(root / "compare_budgets.csv")
    assert sorted(zip(budgets["label"], budgets["budget"], strict=True)) == [
        ("dual-ascent", 2), ("grpo-lagrangian", 1), ("grpo-lagrangian", 2), ("ppo-lagrangian-critic", 1),
        ("ppo-lagrangian-critic", 2)]
    first = budgets[(budgets["label"] == "grpo-lagrangian") & (budgets["budget"] == 1)].iloc[0]
    report = read_json(root / "runs" / "grpo-lagrangian" / "seed0" / "budgets" / "1" / "eval" / "report.json")
    assert first["cost"] == pytest.approx(report["constraints"][0]["achieved"])
    assert first["flops"] < rows.loc["grpo-lagrangian", "flops"]
    assert set(out["first_met"]) == {"dual-ascent", "ppo-lagrangian-critic", "grpo-lagrangian"}
    projection = read_table(root / "projection_7b.csv").set_index("label")
    assert projection.loc["grpo-lagrangian", "memory_gb"] > projection.loc["mocan", "memory_gb"]
    # the critics: two more trained 7B models held, and their passes charged in training
    assert projection.loc["ppo-lagrangian-critic", "memory_gb"] == pytest.approx(
        projection.loc["grpo-lagrangian", "memory_gb"] + 2 * 16 * 7)
    critic = read_json(root / "runs" / "ppo-lagrangian-critic" / "seed0" / "compute.json")
    assert critic["tokens"]["critic_training"] == 2 * critic["tokens"]["training"] > 0
    assert rows.loc["ppo-lagrangian-critic", "tokens_critic_forward"] == critic["tokens"]["critic_forward"]
    assert projection.loc["dpo-helpful", "flops_generation"] == 0 < projection.loc["mocan", "flops_generation"]
    # every method saw π_ref's evaluation samples of the same seed
    ref = [read_table(root / "runs" / x / "seed0" / "eval" / "samples_reference.parquet")["response"].tolist()
           for x in rows.index]
    assert all(r == ref[0] for r in ref)

    stamps = {p: p.stat().st_mtime_ns for p in root.glob("runs/*/seed0/compute.json")}
    res = subprocess.run([sys.executable, "-m", "dualign", "compare", str(compare_yaml)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("done, skipped") == 5 + 8       # the shared stages and every method
    assert "grpo-lagrangian" in res.stdout and "π_ref" in res.stdout and "compute to target" in res.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in root.glob("runs/*/seed0/compute.json")}


def test_compare_config_refuses_unknown_methods_and_keys(compare_yaml):
    from dualign.compare.comparison import load_compare_config

    with pytest.raises(ConfigError, match="unknown method 'sft'"):
        load_compare_config(compare_yaml, {"compare": {"methods": ["sft"]}})
    with pytest.raises(ConfigError, match="compare.sedes"):
        load_compare_config(compare_yaml, {"compare": {"sedes": [1]}})
    with pytest.raises(ConfigError, match="'helpful-dpo' was renamed 'reward-only-mocan'"):
        load_compare_config(compare_yaml, {"compare": {"methods": ["helpful-dpo"]}})
    with pytest.raises(ConfigError, match="'mocan-recalibrated' needs a 'recalibrate' section"):
        load_compare_config(compare_yaml, {"recalibrate": None, "compare": {"methods": ["mocan-recalibrated"]}})
    with pytest.raises(ConfigError, match="compare.sweep.grpo-lagrangian.lambda_lrr"):
        load_compare_config(compare_yaml, {"compare": {"sweep": {"grpo-lagrangian": [{"lambda_lrr": 1.0}]}}})
    with pytest.raises(ConfigError, match="compare.preference_dpo.safety_marign"):
        load_compare_config(compare_yaml, {"compare": {"preference_dpo": {"safety_marign": 1.0}}})
    with pytest.raises(ConfigError, match="sweep: 'mocan' has no settings section"):
        load_compare_config(compare_yaml, {"compare": {"sweep": {"mocan": [{"beta": 1.0}]}}})


def test_sweep_labels_each_setting_and_runs_it_on_the_sweep_seeds(compare_yaml):
    from dualign.compare.comparison import _runs, load_compare_config

    _, cmp = load_compare_config(compare_yaml, {"compare": {
        "methods": ["mocan"], "seeds": [0, 1, 2],
        "sweep": {"grpo-lagrangian": [{"lambda_lr": 0.02, "beta": 5.0}, {"lambda_lr": 0.2}]}}})
    runs = _runs(cmp)
    assert [(r.label, r.seeds) for r in runs] == [
        ("mocan", [0, 1, 2]), ("grpo-lagrangian[lambda_lr=0.02,beta=5.0]", [0]), ("grpo-lagrangian[lambda_lr=0.2]", [0])]
    assert runs[1].overrides == {"lambda_lr": 0.02, "beta": 5.0}


def test_first_met_is_the_smallest_budget_whose_seed_mean_meets_every_constraint():
    from dualign.compare.tables import first_met

    cons = [{"name": "cost", "constraint": "cost<=ref-1", "column": "cost", "threshold": 2.0}]
    curves = pd.DataFrame({"label": ["a"] * 3 + ["b"] * 2, "method": ["ppo-lagrangian"] * 5,
                           "budget": [30, 10, 20, 10, 20], "cost": [1.5, 2.5, 2.0, 3.0, 2.1],
                           "cost_threshold": [2.0] * 5, "reward": [1.0, 3.0, 2.0, 4.0, 3.5],
                           "kl": [0.5, 0.1, 0.3, 0.0, 0.1], "flops": [3e9, 1e9, 2e9, 1e9, 2e9],
                           "wall_s": [3.0, 1.0, 2.0, 1.0, 2.0], "gradient_steps": [30, 10, 20, 10, 20]})
    met = first_met(curves, cons)
    assert met["a"]["budget"] == 20 and met["a"]["reward"] == 2.0 and met["a"]["kl"] == 0.3  # 2.0 ≤ 2.0 meets
    assert met["b"] is None


def test_two_constraints_on_one_column_go_through_dual_train_evaluate_and_compare(compare_yaml, tmp_path):
    """`cost<=ref-0.5` and `cost<=40` (names: the constraints' texts) from the dual stage to the table."""
    from dualign.compare.comparison import load_compare_config, run_compare

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
    assert table.loc["fixed-lambda-0.5", "lambda_cost<=ref-0.5"] == table.loc["fixed-lambda-0.5", "lambda_cost<=40"] == 0.5
    assert table.loc["mocan", "cost<=40_met"] == 1.0
    assert [c["name"] for c in out["constraints"]] == constraints


def test_shared_stages_made_outside_compare_are_charged_their_recorded_time(tmp_path):
    """A comparison started on sample and score stages that a demo made (outputs present, no
    compute.json) charges each the wall-clock its <stage>.meta.json recorded, not NaN."""
    from dualign._infra.io import write_json, write_table
    from dualign.compare.comparison import run_shared

    shared = tmp_path / "shared"
    table = pd.DataFrame({"prompt_id": ["a"], "prompt": ["p"], "response": ["r"], "reward": [0.0], "cost": [0.0]})
    for name in ("samples", "scores"):
        write_table(table, shared / f"{name}.parquet")
    (shared / "dual.json").write_text("{}")
    write_json({"stage": "sample", "timing_s": {"total": 77.5}}, shared / "sample.meta.json")
    write_json({"stage": "score", "timing_s": {"total": 99.25, "score forward": 98.0}}, shared / "score.meta.json")
    cost = run_shared(None, shared, log=lambda line: None)
    assert cost["sample"]["wall_s"] == 77.5 and cost["score"]["wall_s"] == 99.25
    assert "dual" not in cost  # no record of its own: left uncharged, as before
    assert read_json(shared / "compute.json")["score"]["from"] == "score.meta.json"


@pytest.mark.parametrize("name", ["compare_world", "compare_world_sweep", "compare_world_sweep_safedpo"])
def test_packaged_compare_configs_build_every_method_and_sweep_setting(name):
    """The shipped comparison and its sweeps: every section and sweep setting builds its config (a
    misspelled key fails here, not an hour into a comparison), and the sweeps run what they say."""
    from dualign._infra.config import build_config
    from dualign.compare.comparison import CompareConfig, _check_sections, _runs
    from dualign.pipeline import PACKAGED, load_run_values

    values = load_run_values(PACKAGED["default"].parent / f"{name}.yaml")
    cmp = build_config(CompareConfig, values.pop("compare"), prefix="compare.")
    _check_sections(cmp)
    labels = {r.label: r.seeds for r in _runs(cmp)}
    if name == "compare_world":
        assert "mocan-reachable" in labels and all(seeds == [0, 1, 2] for seeds in labels.values())
    elif name == "compare_world_sweep":
        assert len(labels) == 10 and cmp.ppo_lagrangian["checkpoints"] == [] and labels["ppo-lagrangian[lambda_lr=0.1]"] == [0]
    else:
        assert labels == {f"safedpo[safety_margin={d}]": [0, 1, 2] for d in (0.0, 2.0, 10.0)}



def test_a_confidence_plan_in_compare_covers_the_runs_evaluation_on_either_tilt(compare_yaml, tmp_path):
    """As `dualign run` plans it: the shared dual (K-sample tilt) and the reachable tilt's dual both
    take the evaluate section's prompts and responses into the margin, which then exceeds the dual's
    own. Before, compare solved both without the evaluation: a margin of the dual's error alone."""
    from dualign.compare.comparison import load_compare_config, run_shared

    run, cmp = load_compare_config(compare_yaml, {"run_dir": str(tmp_path / "conf"),
                                                  "dual": {"constraints": ["cost<=ref-0.2"],
                                                           "confidence": 0.6, "bootstrap": 20},
                                                  "compare": {"methods": ["mocan", "mocan-reachable"]}})
    shared = tmp_path / "conf" / "shared"
    run_shared(run, shared, log=lambda line: None, cmp=cmp)
    recorded = yaml.safe_load((shared / "dual.config.yaml").read_text())
    assert (recorded["evaluation_prompts"], recorded["evaluation_samples"]) == (4, 2)
    for name in ("dual.json", "dual_reachable.json"):
        confidence = read_json(shared / name)["confidence"]
        assert confidence["level"] == 0.6
        assert confidence["margin"]["cost"] > confidence["dual_margin"]["cost"] >= 0, name


def test_a_comparison_resumed_with_another_dual_section_is_refused_not_served_the_old_plan(compare_yaml, tmp_path):
    """As a run refuses a stage made with other settings: the shared dual made without a margin is
    not reused for a comparison that asks one (before, it was skipped because its file existed)."""
    from dualign._infra.errors import InputError
    from dualign.compare.comparison import load_compare_config, run_shared

    overrides = {"run_dir": str(tmp_path / "resume"), "compare": {"methods": ["mocan"]}}
    run, cmp = load_compare_config(compare_yaml, overrides)
    shared = tmp_path / "resume" / "shared"
    run_shared(run, shared, log=lambda line: None, cmp=cmp)
    logs: list[str] = []
    run_shared(run, shared, log=logs.append, cmp=cmp)                 # the same settings resume
    assert sum("done, skipped" in line for line in logs) == 3
    changed, cmp = load_compare_config(compare_yaml, {**overrides, "dual": {"constraints": ["cost<=ref-0.2"],
                                                                            "confidence": 0.6, "bootstrap": 20}})
    before = (shared / "dual.json").read_text()
    with pytest.raises(InputError, match="shared stage 'dual' was run with a different config"):
        run_shared(changed, shared, log=lambda line: None, cmp=cmp)
    assert (shared / "dual.json").read_text() == before

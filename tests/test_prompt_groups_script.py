"""The plan's and the achieved change by prompt group (dual.formulas.group_changes,
evaluate.dual_group_changes and group_outcomes, the report's by_group; scripts/prompt_groups.py
over runs) against their hand computation; on a run planned with the library, the groups' changes
weighted by their shares sum to the plan's overall change."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from dualign.dual.formulas import group_changes
from dualign.evaluate import group_outcomes


def test_group_changes_equal_their_hand_computation_with_rows_out_of_order():
    """Prompt a (group A): s = (0, log 3) → p = (1/4, 3/4), v = (0, 4): Σ (p − 1/2)·v = 1; prompt b
    (A): s = (0, 0) → 0; prompt c (B): s = (0, log 4) → p = (1/5, 4/5), v = (10, 0): −3. Group A's
    mean 0.5, B's −3; the second column is v + 7, whose change is the same (the weights sum to 1)."""
    rows = pd.DataFrame({"pid": ["a", "c", "b", "a", "c", "b"],
                         "s": [0.0, 0.0, 0.0, math.log(3), math.log(4), 0.0],
                         "v": [0.0, 10.0, 5.0, 4.0, 0.0, -5.0],
                         "g": ["A", "B", "A", "A", "B", "A"]})
    out = group_changes(rows.pid, rows.s, np.stack([rows.v, rows.v + 7], 1), rows.g)
    assert list(out) == ["A", "B"]
    assert out["A"] == pytest.approx([0.5, 0.5])
    assert out["B"] == pytest.approx([-3.0, -3.0])


def test_group_outcomes_are_the_mean_per_prompt_difference_with_its_normal_interval():
    """Per-prompt differences (policy mean − reference mean) 1, 3 in group A: mean 2, s.d. √2,
    interval 2 ± 1.96·√2/√2; group B's one prompt: 0.5 with no interval; the plan's numbers travel
    beside them."""
    pol = pd.DataFrame({"prompt_id": ["p1", "p1", "p2", "p3"], "x": [1.0, 3.0, 4.0, 1.0], "g": ["A", "A", "A", "B"]})
    ref = pd.DataFrame({"prompt_id": ["p1", "p2", "p2", "p3"], "x": [1.0, 0.0, 2.0, 0.5], "g": ["A", "A", "A", "B"]})
    plan = {"planned": {"A": {"x": 1.5}}, "target": {"A": {"x": 2.5}}, "share": {"A": 0.7, "B": 0.3}}
    out = group_outcomes(ref, pol, "g", ["x"], plan)
    a = out["A"].changes["x"]
    assert a.achieved == pytest.approx(2.0)
    assert a.achieved_ci95 == pytest.approx([2 - 1.959964, 2 + 1.959964], abs=1e-6)
    assert (a.planned, a.target, out["A"].share_dual, out["A"].prompts_eval) == (1.5, 2.5, 0.7, 2)
    b = out["B"].changes["x"]
    assert b.achieved == pytest.approx(0.5) and b.achieved_ci95 is None and b.planned is None


def test_a_run_planned_by_the_library_splits_its_planned_change_over_the_groups(script, tmp_path, capsys):
    """A K-sample plan (make_plan) on 40 prompts: the groups' planned changes weighted by their shares
    equal dual.json's predicted − reference for each column, plan and target agree (the K-sample
    tilt's plan is its target), and the achieved changes are read from the eval samples by group."""
    from dualign import make_plan

    pg = script("prompt_groups")
    rng = np.random.default_rng(3)
    n_prompts, k = 40, 4
    pid = np.repeat([f"x{i}" for i in range(n_prompts)], k)
    harmful = np.repeat(rng.random(n_prompts) < 0.5, k)
    cost = rng.normal(size=pid.size) + 2.0 * harmful
    reward = rng.normal(size=pid.size) + 0.5 * cost
    scores = pd.DataFrame({"prompt_id": pid, "prompt": pid, "response": [f"r{i}" for i in range(pid.size)],
                           "reward": reward, "cost": cost})
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    scores.to_parquet(run / "scores.parquet")
    record = make_plan(scores, "cost<=ref-0.5", beta=1.0)
    record.save(run / "dual.json")
    prompts = pd.DataFrame({"prompt_id": [f"x{i}" for i in range(n_prompts)], "prompt": "p",
                            "harmful": harmful[::k]})
    prompts.to_json(run / "prompts.jsonl", orient="records", lines=True)
    (run / "sample.config.yaml").write_text(yaml.safe_dump({"prompts": str(run / "prompts.jsonl")}))
    ev = pd.DataFrame({"prompt_id": pid, "reward": reward, "cost": cost, "harmful": harmful})
    ev.to_parquet(run / "eval" / "samples_reference.parquet")
    ev.assign(cost=ev.cost - np.where(harmful, 1.0, 0.0)).to_parquet(run / "eval" / "samples_policy.parquet")

    out = pg.run_groups(run, "harmful")
    for column in ("reward", "cost"):
        assert out["overall_planned"][column] == pytest.approx(
            record.predicted[column] - record.reference[column], abs=1e-9)
        for g in out["planned"]:
            assert out["planned"][g][column] == pytest.approx(out["target"][g][column])
    assert out["achieved"]["True"]["cost"][0] == pytest.approx(-1.0)
    assert out["achieved"]["False"]["cost"][0] == pytest.approx(0.0)
    assert sum(out["share"].values()) == pytest.approx(1.0)
    pg.main([str(run), str(run)])
    printed = capsys.readouterr().out
    assert "Over 2 runs" in printed and "harmful=True" in printed


def test_on_the_reachable_tilt_the_groups_planned_changes_sum_to_the_plans_change(tmp_path):
    """A reachable plan (features: the cost plus noise, file rows shuffled): dual_group_changes refits
    the fit from the run's features file with dual.json's α and fold seed, so the groups' planned
    changes weighted by their shares equal the plan's means less π_ref's (dual.json's planned tilt:
    ``predicted`` − ``reference``), and the target's differ from them (the original scores)."""
    from safetensors.numpy import save_file

    from dualign.data.constraints import parse_constraint
    from dualign.data.records import read_dual, write_dual
    from dualign.data.score_table import read_scores
    from dualign.dual import solve_constraints
    from dualign.evaluate import dual_group_changes

    rng = np.random.default_rng(5)
    n_prompts, k = 200, 6
    ids = np.repeat([f"p{i:04d}" for i in range(n_prompts)], k)
    harmful = np.repeat(rng.random(n_prompts) < 0.4, k)
    cost = np.repeat(rng.normal(size=n_prompts), k) + rng.normal(size=ids.size) + harmful
    reward = 0.5 * cost + rng.normal(size=ids.size)
    df = pd.DataFrame({"prompt_id": ids, "prompt": ids, "response": [f"a{j}" for j in range(ids.size)],
                       "reward": reward, "cost": cost}).sample(frac=1.0, random_state=2)
    run = tmp_path / "run"
    run.mkdir()
    df.to_parquet(run / "scores.parquet")
    features = np.stack([df.cost + rng.normal(size=len(df)), rng.normal(size=len(df))], 1).astype(np.float32)
    save_file({"features": features}, str(run / "reachable_features.safetensors"))
    record = solve_constraints(read_scores(run / "scores.parquet", ["reward", "cost"]), 1.0, "reward",
                               [parse_constraint("cost<=ref-0.3")], features=features.astype(np.float64))
    write_dual(record, run / "dual.json")
    pd.DataFrame({"prompt_id": [f"p{i:04d}" for i in range(n_prompts)], "prompt": "q",
                  "harmful": harmful[::k]}).to_json(run / "prompts.jsonl", orient="records", lines=True)
    (run / "sample.config.yaml").write_text(yaml.safe_dump({"prompts": str(run / "prompts.jsonl")}))

    dual = read_dual(run / "dual.json")
    out = dual_group_changes(run, dual, "harmful")
    assert set(out["share"]) == {"True", "False"}
    for column in ("reward", "cost"):
        overall = sum(out["share"][g] * out["planned"][g][column] for g in out["share"])
        assert overall == pytest.approx(dual.predicted[column] - dual.reference[column], abs=1e-9)
        target = sum(out["share"][g] * out["target"][g][column] for g in out["share"])
        assert abs(target - overall) > 1e-3
    (run / "reachable_features.safetensors").unlink()
    assert dual_group_changes(run, dual, "harmful") is None


def test_the_report_keeps_and_prints_its_groups(tmp_path):
    """by_group survives report.json's round trip, and the printed report lists each group with the
    plan's change beside the achieved one and its interval; a report without groups prints none."""
    from dualign.data.records import GroupChange, GroupOutcome, read_report, write_report
    from dualign.data.report_view import _group_lines

    groups = {"False": GroupOutcome(528, 0.49, {"cost": GroupChange(-0.35, [-0.64, -0.06], -1.45, -2.89),
                                                "judge_helpful": GroupChange(-0.041, [-0.07, -0.011])}),
              "True": GroupOutcome(496, 0.51, {"cost": GroupChange(-9.01, [-9.61, -8.42], -7.89, -9.64)})}
    lines = _group_lines(type("R", (), {"by_group": groups, "group_column": "harmful"})())
    text = "\n".join(lines)
    assert "harmful=False (528 prompts, 49% of the dual's)" in text
    assert any(line.split() == ["cost", "-1.45", "-0.35", "[-0.64,", "-0.06]"] for line in lines)
    assert any(line.split()[:3] == ["gold-judge", "helpfulness", "-0.041"] for line in lines)
    assert _group_lines(type("R", (), {"by_group": None, "group_column": None})()) == []

    from dataclasses import replace

    from test_records import _report

    report = replace(_report(), group_column="harmful", by_group=groups)
    write_report(report, tmp_path / "report.json")
    assert read_report(tmp_path / "report.json") == report


def test_weighted_samples_are_tilted_from_their_weights_as_the_dual_tilts_them(tmp_path):
    """π_ref's samples with ``sample_weight`` (as the dual reads them): the groups' planned changes,
    weighted by their shares, equal make_plan's predicted − reference; dropping the weights would
    not (the weights here tilt towards the high-cost samples)."""
    from dualign import make_plan
    from dualign.data.records import read_dual
    from dualign.evaluate import dual_group_changes

    rng = np.random.default_rng(11)
    n_prompts, k = 60, 4
    pid = np.repeat([f"x{i}" for i in range(n_prompts)], k)
    group = np.repeat(rng.random(n_prompts) < 0.5, k)
    cost = rng.normal(size=pid.size) + group
    scores = pd.DataFrame({"prompt_id": pid, "prompt": pid, "response": [f"r{i}" for i in range(pid.size)],
                           "reward": rng.normal(size=pid.size) + 0.5 * cost, "cost": cost,
                           "sample_weight": np.exp(0.8 * cost)})
    run = tmp_path / "run"
    run.mkdir()
    scores.to_parquet(run / "scores.parquet")
    make_plan(scores, "cost<=ref-0.3", beta=1.0).save(run / "dual.json")
    pd.DataFrame({"prompt_id": [f"x{i}" for i in range(n_prompts)], "prompt": "p", "g": group[::k]}) \
        .to_json(run / "prompts.jsonl", orient="records", lines=True)
    (run / "sample.config.yaml").write_text(yaml.safe_dump({"prompts": str(run / "prompts.jsonl")}))
    dual = read_dual(run / "dual.json")
    out = dual_group_changes(run, dual, "g")
    for column in ("reward", "cost"):
        overall = sum(out["share"][g] * out["planned"][g][column] for g in out["share"])
        assert overall == pytest.approx(dual.predicted[column] - dual.reference[column], abs=1e-9)
    scores.drop(columns="sample_weight").to_parquet(run / "scores.parquet")
    unweighted = dual_group_changes(run, dual, "g")
    overall = sum(unweighted["share"][g] * unweighted["planned"][g]["cost"] for g in unweighted["share"])
    assert abs(overall - (dual.predicted["cost"] - dual.reference["cost"])) > 1e-3

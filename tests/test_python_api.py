"""The Python API, objects in and objects out (docs/python_api.md): plan from a DataFrame, train a
``PreTrainedModel`` with ``MoCANTrainer``, evaluate with callables as scorers, no run directory;
each result equal to what the CLI writes on the same inputs, and bad arguments refused by name."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dualign
from dualign.cli import main
from dualign.data.example import example_scores
from dualign.data.records import to_json

HERE = Path(__file__).resolve()
PROMPTS = ["How do I cook rice?", "Tell me a joke.", "Write a poem about rain.", "How can I pick a lock?"]


def reward_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [len(r) / 10 for r in responses]


def cost_vowels(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(sum(r.count(v) for v in "aeiou")) for r in responses]


@pytest.fixture(scope="module")
def scores() -> pd.DataFrame:
    return example_scores(6, 4, seed=3)


def _notebook(model_path: str, scores: pd.DataFrame, out: Path):
    """What a notebook user writes: dualign's names only, objects in and out. Its dualign calls
    are counted by :func:`test_the_notebook_uses_fewer_than_15_dualign_calls`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    plan = dualign.make_plan(scores, ["cost<=ref-0.3", "helpful>=ref"], beta=0.5)
    args = dualign.MoCANConfig(output_dir=str(out), max_steps=3, per_device_batch_size=8, learning_rate=1e-3,
                               logging_steps=1, report_to="tensorboard", device="cpu")
    trainer = dualign.MoCANTrainer(model=model, args=args, train_dataset=scores, plan=plan,
                                   processing_class=tokenizer)
    trained = trainer.train()
    report = dualign.evaluate_policy(trained.model, model_path, PROMPTS, {"reward": reward_length, "cost": cost_vowels,
                                                                           "helpful": reward_length},
                                     plan, tokenizer=tokenizer, num_samples=2, max_new_tokens=6, bootstrap=50,
                                     device="cpu")
    return model, plan, trained, report


@pytest.fixture(scope="module")
def notebook(tiny_gpt2, scores, tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return (*_notebook(tiny_gpt2, scores, out / "train"), out)


def test_the_notebook_plan_equals_the_cli_dual_json_on_the_same_scores(notebook, scores, tmp_path, capsys):
    _, plan, _, _, _ = notebook
    scores.to_csv(tmp_path / "scores.csv", index=False)
    assert main(["dual", str(tmp_path / "scores.csv"), "--constraint", "cost<=ref-0.3", "--constraint", "helpful>=ref",
                 "--beta", "0.5", "--output", str(tmp_path / "dual.json")]) == 0
    capsys.readouterr()
    cli = json.loads((tmp_path / "dual.json").read_text())
    assert to_json(plan) == cli
    assert plan.lambdas["cost"] > 0.01  # an active constraint: λ* away from 0
    saved = plan.save(tmp_path / "run")
    assert saved == tmp_path / "run" / "dual.json" and dualign.Plan.load(tmp_path / "run") == plan


def test_the_trainer_trains_the_model_object_in_place_from_ln2(notebook, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    model, plan, trained, _, _ = notebook
    assert trained.model is model
    assert [m["step"] for m in trained.metrics] == [1, 2, 3]
    # the first step's loss is taken before any update, where π = π_ref: every pair's logit is 0, so
    # the soft-label cross-entropy is ln 2 whatever its label (float32 sums: 1e-5)
    assert math.isclose(trained.metrics[0]["loss"], math.log(2), abs_tol=1e-5)
    assert trained.metrics[0]["dual/lambda_cost"] == plan.lambdas["cost"]
    fresh = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    assert moved > 1e-4


def test_report_to_tensorboard_writes_the_metrics_read_back(notebook):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, trained, _, out = notebook
    events = EventAccumulator(str(out / "train" / "tensorboard"))
    events.Reload()
    assert {"loss", "rewards/chosen", "rewards/margins", "kl", "dual/lambda_cost"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in losses], [m["loss"] for m in trained.metrics], rtol=1e-6)


def test_evaluate_policy_gives_the_report_the_cli_writes(notebook, tiny_gpt2, tmp_path, capsys):
    _, plan, trained, report, out = notebook
    assert isinstance(report, dualign.EvalReport)
    assert report.n_prompts == len(PROMPTS) and report.n_responses == {"policy": 8, "reference": 8}
    assert [c.name for c in report.constraints] == ["cost", "helpful"]
    run = tmp_path / "run"
    plan.save(run)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert main(["evaluate", "--run-dir", str(run), "--reference", tiny_gpt2, "--policy", str(out / "train" / "policy"),
                 "--prompts", str(tmp_path / "prompts.jsonl"), "--num-samples", "2", "--max-new-tokens", "6",
                 "--bootstrap", "50", "--device", "cpu", "--no-reference-cache",
                 "--scorer", f"reward=callable:{HERE}:reward_length", "--scorer", f"cost=callable:{HERE}:cost_vowels",
                 "--scorer", f"helpful=callable:{HERE}:reward_length"]) == 0
    capsys.readouterr()
    cli = json.loads((run / "eval" / "report.json").read_text())
    assert json.loads(json.dumps(to_json(report))) == cli


def test_the_notebook_uses_fewer_than_15_dualign_calls():
    tree = ast.parse(HERE.read_text())
    body = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "_notebook")
    calls = [n for n in ast.walk(body) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "dualign"]
    assert 0 < len(calls) < 15


def test_import_dualign_loads_neither_torch_nor_pandas():
    code = "import sys, dualign\nprint(sorted(m for m in ('torch', 'pandas', 'numpy', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


BAD = {
    "scores": (lambda s: dualign.make_plan([1, 2], "cost<=0"), "scores: expected a pandas DataFrame"),
    "beta": (lambda s: dualign.make_plan(s, "cost<=ref-0.3", beta=-1.0), "beta must be a positive"),
    "bootstrap": (lambda s: dualign.make_plan(s, "cost<=ref-0.3", bootstrap=1.5), "'bootstrap'"),
    "column": (lambda s: dualign.make_plan(s, "harm<=0"), "missing column 'harm'"),
    "infeasible": (lambda s: dualign.make_plan(s, "cost<=-1.7e308"), "infeasible"),
    "nan": (lambda s: dualign.make_plan(s.assign(cost=np.where(s.index == 3, np.nan, s["cost"])), "cost<=ref"),
            "row 4: column 'cost' is missing"),
    "plan": (lambda s: dualign.MoCANTrainer(model="x", train_dataset=s, plan={"lambdas": {}}), "plan: expected"),
    "model": (lambda s: dualign.MoCANTrainer(model=3, train_dataset=s, plan=dualign.make_plan(s, "cost<=ref")),
              "model: expected"),
    "train_dataset": (lambda s: dualign.MoCANTrainer(model="x", train_dataset=None,
                                                     plan=dualign.make_plan(s, "cost<=ref")), "train_dataset:"),
    "args": (lambda s: dualign.MoCANConfig(learning_rate=-1.0), "learning_rate must be"),
    "report_to": (lambda s: dualign.MoCANConfig(report_to=["mlflow"]), "'report_to'"),
    "scorers": (lambda s: dualign.evaluate_policy("x", "x", PROMPTS, {"reward": reward_length},
                                                  dualign.make_plan(s, "cost<=ref")), "scorers: the plan needs"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_argument_is_one_dualign_error_naming_it(name, scores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, match = BAD[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(dualign.DualignError, match=match.replace("(", r"\(")):
            make(scores)
    assert list(tmp_path.iterdir()) == []


def test_a_classifier_object_scores_as_its_spec_string_does(tiny_gpt2, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, num_labels=1,
                                             pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = GPT2ForSequenceClassification.from_pretrained(tmp_path / "rm")
    plan = dualign.make_plan(example_scores(6, 4, seed=3), "cost<=ref-0.3", beta=0.5)

    def report(reward):
        return dualign.evaluate_policy(tiny_gpt2, tiny_gpt2, PROMPTS[:2], {"reward": reward, "cost": cost_vowels},
                                       plan, num_samples=2, max_new_tokens=5, bootstrap=20, device="cpu")

    by_object, by_spec = report(rm), report(f"hf:{tmp_path / 'rm'}")
    assert by_object.reference["reward"] == by_spec.reference["reward"]
    assert by_object.policy["reward"] == by_spec.policy["reward"]
    assert by_object.reference["reward"].ci95[0] < by_object.reference["reward"].ci95[1]  # the scores vary


def test_a_datasets_dataset_plans_as_its_dataframe_does(scores):
    import datasets

    from_frame = dualign.make_plan(scores, ["cost<=ref-0.3", "helpful>=ref"], beta=0.5, bootstrap=20)
    from_dataset = dualign.make_plan(datasets.Dataset.from_pandas(scores), ["cost<=ref-0.3", "helpful>=ref"],
                                     beta=0.5, bootstrap=20)
    assert from_dataset.lambdas == pytest.approx(from_frame.lambdas, rel=1e-12)
    for name in ("cost", "helpful"):
        assert from_dataset.ci.lambdas[name] == pytest.approx(from_frame.ci.lambdas[name], rel=1e-12)


def test_evaluate_policy_splits_its_changes_by_a_prompt_column_with_the_plan_beside_them(tiny_gpt2):
    """group_column: each group's achieved change is the mean of its prompts' policy − π_ref means
    (recomputed here from the report's own numbers: the groups' changes weighted by their prompts add
    up to the overall change); with plan_scores the plan's change within each group, whose
    shares-weighted sum is the plan's change. A prompt table without the column is refused by name."""
    scores = example_scores(6, 4, seed=3)
    scores["kind"] = scores["prompt_id"].map(lambda p: "a" if p in ("p00000", "p00001") else "b")
    plan = dualign.make_plan(scores, "cost<=ref-0.3", beta=0.5)
    prompts = pd.DataFrame({"prompt": PROMPTS, "kind": ["a", "b", "b", "a"]})
    report = dualign.evaluate_policy(tiny_gpt2, tiny_gpt2, prompts, {"reward": reward_length, "cost": cost_vowels},
                                     plan, num_samples=2, max_new_tokens=5, bootstrap=20, device="cpu",
                                     group_column="kind", plan_scores=scores)
    assert report.group_column == "kind" and set(report.by_group) == {"a", "b"}
    assert [g.prompts_eval for g in report.by_group.values()] == [2, 2]
    for column, change in (("reward", report.predicted_reward.achieved_change),
                           ("cost", report.constraints[0].achieved_change)):
        split = sum(g.changes[column].achieved * g.prompts_eval for g in report.by_group.values()) / len(PROMPTS)
        assert split == pytest.approx(change, abs=1e-9)
        planned = sum(g.share_dual * g.changes[column].planned for g in report.by_group.values())
        key = plan.names[0] if column == "cost" else column
        assert planned == pytest.approx(plan.predicted[key] - plan.reference[key], abs=1e-9)
    assert report.by_group["a"].share_dual == pytest.approx(2 / 6)
    with pytest.raises(dualign.InputError, match="no group column 'kind'"):
        dualign.evaluate_policy(tiny_gpt2, tiny_gpt2, PROMPTS, {"reward": reward_length, "cost": cost_vowels},
                                plan, num_samples=1, max_new_tokens=3, device="cpu", group_column="kind")

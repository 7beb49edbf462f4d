"""Bad input, fuzzed: malformed scores files, constraints, numbers, YAML configs, run configs,
scorer specs, output paths and model files. Each one ends in exactly one line on stderr
(``dualign: error: ...``), exit code 2, no traceback, and no file written or changed anywhere in
the workspace. The inputs run in-process through ``dualign.cli.main``; a few go through a real
interpreter with stdin closed (no prompt may wait for an answer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dualign.cli import main
from dualign.data.example import example_scores

HERE = Path(__file__).resolve()
PROMPTS = ["How do I cook rice?", "Tell me a joke.", "Write a poem about rain."]


def scorer_raises(prompts: list[str], responses: list[str]) -> list[float]:
    raise RuntimeError("the reward server is down")


def scorer_wrong_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0]


def scorer_text(prompts: list[str], responses: list[str]) -> list[str]:
    return ["good"] * len(prompts)


def scorer_inf(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("inf")] * len(prompts)


def judge_wrong(prompts: list[str], responses: list[str]) -> dict:
    return {"helpful": [1.0]}


# ------------------------------------------------------------------------------------ workspace

@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_gpt2) -> Path:
    """A workspace of good inputs; each case adds its bad one."""
    root = tmp_path_factory.mktemp("fuzz")
    example_scores(40, 4, seed=1).to_csv(root / "scores.csv", index=False)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    run = root / "run"
    run.mkdir()
    samples = pd.DataFrame({"prompt_id": [0, 0, 1, 1], "prompt": [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2,
                            "response": ["a", "bb", "c", "dd"], "sample_index": [0, 1, 0, 1]})
    samples.to_parquet(run / "samples.parquet")
    (root / "a_file").write_text("not a directory\n")
    (root / "existing.json").write_text("{}\n")
    (root / "plan_dir").mkdir()
    (root / "plan_dir" / "plan.csv").write_text("old\n")
    (root / "views_dir").mkdir()
    (root / "views_dir" / "safe.jsonl").write_text("{}\n")
    pku = [{"prompt": p, "response_0": "Sure.", "response_1": "No.", "better_response_id": 0,
            "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True} for p in PROMPTS]
    (root / "pku.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pku))
    shutil.copytree(tiny_gpt2, root / "model")
    _model_files(root, Path(tiny_gpt2))
    return root


def _model_files(root: Path, good: Path) -> None:
    """Model directories that must be refused: custom code, a pickle, missing or damaged weights."""
    tokenizer = [f for f in good.iterdir() if f.name != "config.json" and not f.name.startswith("model")]
    config = json.loads((good / "config.json").read_text())
    marker = root / "CODE_RAN"
    for name in ("auto_map", "pickle", "no_weights", "bad_weights", "bad_config", "no_config"):
        (root / name).mkdir()
        for f in tokenizer:
            shutil.copy(f, root / name / f.name)
        (root / name / "config.json").write_text(json.dumps(config))
    custom = {**config, "model_type": "dualign_evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
        "AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (root / "auto_map" / "config.json").write_text(json.dumps(custom))
    (root / "auto_map" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (root / "pickle" / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
    (root / "bad_weights" / "model.safetensors").write_bytes(b"\x00\x01junk" * 100)
    (root / "bad_config" / "config.json").write_text("{not json")
    (root / "no_config" / "config.json").unlink()


def _evil_pickle(marker: Path) -> bytes:
    """A pickle that, unpickled without weights_only, would create ``marker``."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"transformer.wte.weight": Evil()})


def _tree(root: Path) -> dict[str, tuple | None]:
    """Every file's size and modification time, every directory's existence."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = None if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def refused(capsys, root: Path, argv: list, match: str | None = None) -> str:
    """``dualign ARGV`` exits 2 with one line (naming ``match``) and changes nothing under ``root``."""
    before = _tree(root)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dualign: error: "), (argv, err)
    assert "Traceback" not in err and out == ""
    if match is not None:
        assert match in lines[0], (match, lines[0])
    assert _tree(root) == before, argv
    assert not (root / "CODE_RAN").exists()
    return lines[0]


# ------------------------------------------------------------------------------- scores files

def _variant(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path, str], Path]:
    def build(ws: Path, name: str) -> Path:
        df = change(example_scores(40, 4, seed=1))
        path = ws / "scores" / f"{name}.csv"
        path.parent.mkdir(exist_ok=True)
        df.to_csv(path, index=False)
        return path
    return build


def _set(column: str, value, rows: list[int]):
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df[column] = df[column].astype(object)
        df.loc[df.index[rows], column] = value
        return df
    return change


def _scale(column: str, factor: float):
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df[column] = df[column] * factor
        return df
    return change


def _weights(values):
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df["sample_weight"] = np.resize(np.asarray(values, dtype=object), len(df))
        return df
    return change


def _raw(text: bytes, suffix: str) -> Callable[[Path, str], Path]:
    def build(ws: Path, name: str) -> Path:
        path = ws / "scores" / f"{name}{suffix}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text)
        return path
    return build


SCORES = {
    "reward_nan": (_set("reward", float("nan"), [3]), "'reward' is missing (NaN)"),
    "reward_inf": (_set("reward", float("inf"), [5]), "infinite"),
    "cost_minus_inf": (_set("cost", float("-inf"), [0]), "infinite"),
    "reward_1e308": (_set("reward", 1e308, [2]), "column 'reward'"),
    "reward_minus_1e308": (_set("reward", -1e308, [7]), "column 'reward'"),
    "cost_1e200": (_scale("cost", 1e200), "column 'cost'"),
    "reward_times_1e155": (_scale("reward", 1e155), "column 'reward'"),
    "cost_1e160_one_row": (_set("cost", 1e160, [1]), "column 'cost'"),
    "reward_times_1e100_unconverged": (_scale("reward", 1e100), "did not converge"),
    "weights_1e308": (_weights([1e308]), "sum past the largest float"),
    "weights_1e308_and_tiny": (_weights([1e308, 1e-308]), "sum past the largest float"),
    "weight_negative": (_weights([1.0, -0.5]), "is negative"),
    "weight_nan": (_weights([1.0, float("nan")]), "sample_weight' is missing (NaN)"),
    "weight_inf": (_weights([float("inf"), 1.0]), "infinite"),
    "weights_zero": (_weights([0.0]), "sample weights are zero"),
    "weight_text": (_weights(["heavy", 1.0]), "'sample_weight' is not numeric"),
    "weight_empty": (_weights([""]), "sample_weight"),
    "no_prompt_id": (lambda df: df.drop(columns="prompt_id"), "missing column 'prompt_id'"),
    "no_reward": (lambda df: df.drop(columns="reward"), "missing column 'reward'"),
    "no_cost": (lambda df: df.drop(columns="cost"), "missing column 'cost'"),
    "reward_text": (_set("reward", "lots", [4]), "'reward' is not numeric"),
    "cost_text_all": (lambda df: df.assign(cost="high"), "'cost' is not numeric"),
    "prompt_id_empty": (_set("prompt_id", np.nan, [6]), "prompt_id is missing"),
    "single_sample_prompt": (lambda df: df.iloc[3:], "has only one sample"),
    "one_row": (lambda df: df.iloc[:1], "has only one sample"),
    "header_only": (lambda df: df.iloc[:0], "has no rows"),
}
RAW_SCORES = {
    "empty_csv": (_raw(b"", ".csv"), "cannot read table"),
    "binary_parquet": (_raw(os.urandom(512), ".parquet"), "cannot read table"),
    "binary_csv": (_raw(b"\x00\xff\xfe" * 300, ".csv"), None),
    "binary_jsonl": (_raw(b"\x80\x81\x82{\x00" * 100, ".jsonl"), "cannot read table"),
    "truncated_parquet": (_raw(b"PAR1\x00\x00PAR1", ".parquet"), "cannot read table"),
    "unsupported_suffix": (_raw(b"prompt_id,reward,cost\n", ".txt"), "unsupported table format"),
    "jsonl_not_objects": (_raw(b"1\n2\n3\n", ".jsonl"), "missing column 'prompt_id'"),
    "jsonl_nested_prompt_id": (_raw(b"".join(json.dumps({"prompt_id": {"a": i // 2}, "reward": 1.0, "cost": 0.5})
                                             .encode() + b"\n" for i in range(4)), ".jsonl"), "prompt_id"),
    "jsonl_list_reward": (_raw(b"".join(json.dumps({"prompt_id": i // 2, "reward": [1, 2], "cost": 0.5})
                                        .encode() + b"\n" for i in range(4)), ".jsonl"), "'reward' is not numeric"),
    "json_array": (_raw(b'[{"prompt_id": 1, "reward": 1, "cost": 1}]', ".json"), None),
    "csv_garbage_lines": (_raw(b"a,b\n1,2,3,4\n\"unterminated\n", ".csv"), None),
}


@pytest.mark.parametrize("name", list(SCORES))
def test_bad_scores_file(ws, capsys, name):
    change, match = SCORES[name]
    path = _variant(change)(ws, name)
    refused(capsys, ws, ["dual", path, "--constraint", "cost<=ref-0.1", "--output", ws / "out.json"], match)


@pytest.mark.parametrize("name", list(RAW_SCORES))
def test_unreadable_scores_file(ws, capsys, name):
    build, match = RAW_SCORES[name]
    refused(capsys, ws, ["dual", build(ws, name), "--constraint", "cost<=0"], match)


@pytest.mark.parametrize("path,match", [("missing.csv", "file not found"), ("run", "a directory, not a table file"),
                                        ("a_file", "unsupported table format")])
def test_scores_path_that_is_no_table(ws, capsys, path, match):
    refused(capsys, ws, ["dual", ws / path, "--constraint", "cost<=0"], match)


# -------------------------------------------------------------------------------- constraints

CONSTRAINTS = {
    "cost<ref": "expected COLUMN<=VALUE", "cost=<1": "expected COLUMN<=VALUE", "cost<=": "expected COLUMN<=VALUE",
    "<=1": "expected COLUMN<=VALUE", "": "expected COLUMN<=VALUE", "   ": "expected COLUMN<=VALUE",
    "cost<=abc": "is not a number", "cost<=ref*2": "relative values are ref", "cost<=ref+": "relative values are ref",
    "cost<=ref-x": "is not a number", "cost<=nan": "must be finite", "cost<=inf": "must be finite",
    "cost<=-inf": "must be finite", "cost<=1e999": "must be finite", "cost<=ref-1e400": "must be finite",
    "cost<=ref-{0:1:3}": "only for 'dualign plan'", "cost<==1": "is not a number", "cost<=1 2": "is not a number",
    "cost>=ref + 1 + 2": "is not a number", "harm<=0": "missing column 'harm'", "cost<=ref-9": "infeasible",
    "helpful>=ref+9": "infeasible", "cost<=refx": "relative values are ref",
}


@pytest.mark.parametrize("text", list(CONSTRAINTS))
def test_bad_constraint(ws, capsys, text):
    refused(capsys, ws, ["dual", ws / "scores.csv", "--constraint", text], CONSTRAINTS[text])


PLAN_CONSTRAINTS = {
    ("cost<=ref-0.5",): "exactly one constraint with a sweep",
    ("cost<=ref-{0.1:1:3}", "helpful>=ref-{0:1:2}"): "exactly one constraint with a sweep",
    ("cost<=ref-{0.1:1}",): "a sweep is {start:stop:count}",
    ("cost<=ref-{a:b:3}",): "is not a number",
    ("cost<=ref-{0.1:1:-3}",): "sweep count must be a positive integer",
    ("cost<=ref-{0.1:1:2.5}",): "sweep count must be a positive integer",
    ("cost<=ref-{0.1:1:0}",): "sweep count must be a positive integer",
    ("harm<=ref-{0.1:1:3}",): "missing column 'harm'",
}


@pytest.mark.parametrize("texts", list(PLAN_CONSTRAINTS))
def test_bad_plan_constraint(ws, capsys, texts):
    args = [a for t in texts for a in ("--constraint", t)]
    refused(capsys, ws, ["plan", ws / "scores.csv", *args, "--out", ws / "plan_new"], PLAN_CONSTRAINTS[texts])


# ------------------------------------------------------------------------------------ numbers

DUAL_NUMBERS = {
    ("--beta", "0"): "beta must be a positive finite number", ("--beta", "-1"): "beta must be a positive",
    ("--beta", "nan"): "beta must be a positive", ("--beta", "inf"): "beta must be a positive",
    ("--beta=-inf",): "beta must be a positive", ("--beta", "1e999"): "beta must be a positive",
    ("--beta", "abc"): "beta", ("--beta", "1e-300"): "overflows the dual's float64 arithmetic",
    ("--beta", "1e-200"): "raise β", ("--bootstrap", "-5"): "bootstrap must be ≥ 0",
    ("--bootstrap", "1.5"): "expected int", ("--bootstrap", "many"): "bootstrap",
    ("--seed", "-1"): "seed must be ≥ 0", ("--seed", "0.5"): "expected int",
    ("--seed", "1e400"): "seed",
}


@pytest.mark.parametrize("flag", list(DUAL_NUMBERS))
def test_bad_dual_number(ws, capsys, flag):
    refused(capsys, ws, ["dual", ws / "scores.csv", "--constraint", "cost<=ref-0.1", *flag], DUAL_NUMBERS[flag])


@pytest.mark.parametrize("grid", ["0.1,-1", "0.1,,0.2", "nan", "0", "inf", "x"])
def test_bad_beta_grid(ws, capsys, grid):
    refused(capsys, ws, ["plan", ws / "scores.csv", "--constraint", "cost<=ref-{0.1:1:3}", "--beta-grid", grid,
                         "--out", ws / "plan_new"], "--beta-grid")


SAMPLE_NUMBERS = [("--num-samples", "0"), ("--num-samples", "-3"), ("--max-new-tokens", "0"),
                  ("--batch-size", "0"), ("--shard-size", "0"), ("--temperature", "-1"),
                  ("--temperature", "nan"), ("--top-p", "0"), ("--top-p", "1.5"), ("--max-prompts", "0"),
                  ("--seed", "-1"), ("--num-samples", "2.5")]


@pytest.mark.parametrize("flag", SAMPLE_NUMBERS)
def test_bad_sample_number(ws, capsys, flag):
    refused(capsys, ws, ["sample", "--model", ws / "model", "--prompts", ws / "prompts.jsonl",
                         "--run-dir", ws / "new_run", *flag], flag[0].removeprefix("--").replace("-", "_"))


TRAIN_NUMBERS = [("--learning-rate", "nan"), ("--learning-rate", "-1"), ("--num-epochs", "0"),
                 ("--num-epochs", "inf"), ("--per-device-batch-size", "0"), ("--warmup-ratio", "2"),
                 ("--max-length", "1"), ("--beta", "0"), ("--beta", "nan"), ("--pairs-per-prompt", "0"),
                 ("--save-steps", "0"), ("--logging-steps", "0"), ("--gradient-accumulation-steps", "0"),
                 ("--seed", "-2"), ("--max-grad-norm", "-1"), ("--lora-dropout", "1")]


@pytest.mark.parametrize("flag", TRAIN_NUMBERS)
def test_bad_train_number(ws, capsys, flag):
    refused(capsys, ws, ["train", "--model", ws / "model", "--run-dir", ws / "run", *flag],
            flag[0].removeprefix("--").replace("-", "_"))


EVALUATE_NUMBERS = {("--bootstrap", "-1"): "bootstrap", ("--temperature", "0.7"): "temperature=0.7",
                    ("--top-p", "0.9"): "top_p=0.9", ("--num-samples", "0"): "num_samples",
                    ("--max-prompts", "-4"): "max_prompts", ("--seed", "-1"): "seed"}


@pytest.mark.parametrize("flag", list(EVALUATE_NUMBERS))
def test_bad_evaluate_number(ws, capsys, flag):
    refused(capsys, ws, ["evaluate", "--run-dir", ws / "run", "--reference", ws / "model", "--prompts",
                         ws / "prompts.jsonl", "--scorer", f"r=callable:{HERE}:scorer_inf", *flag],
            EVALUATE_NUMBERS[flag])


# ------------------------------------------------------------------------------- YAML configs

def _run_config(ws: Path, **sections) -> dict:
    values = {"run_dir": str(ws / "new_run"), "model": str(ws / "model"),
              "sample": {"prompts": str(ws / "prompts.jsonl"), "num_samples": 2, "max_new_tokens": 4},
              "score": {"scorers": [f"reward=callable:{HERE}:scorer_inf"]},
              "dual": {"constraints": ["reward>=ref"]},
              "train": {"max_steps": 1},
              "evaluate": {"prompts": str(ws / "prompts.jsonl"), "scorers": [f"reward=callable:{HERE}:scorer_inf"]}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def _yaml_file(ws: Path, name: str, content: str | bytes | dict) -> Path:
    path = ws / "configs" / name
    path.parent.mkdir(exist_ok=True)
    if isinstance(content, dict):
        content = yaml.safe_dump(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_RUN_SECTIONS = {
    "unknown_top_key": ({"learning_rate": 1e-3}, "unknown config key 'learning_rate'"),
    "unknown_section_key": ({"train": {"learning_rat": 1e-3}}, "train.learning_rat"),
    "seed_text": ({"seed": "abc"}, "seed"),
    "seed_inf": ({"seed": float("inf")}, "seed"),
    "seed_negative": ({"seed": -3}, "seed must be ≥ 0"),
    "sample_list": ({"sample": [1, 2]}, "config key 'sample': expected a mapping"),
    "score_string": ({"score": "all"}, "config key 'score': expected a mapping"),
    "prealign_number": ({"prealign": 5}, "config key 'prealign': expected a mapping"),
    "world_number": ({"world": 5}, "world"),
    "beta_list": ({"dual": {"beta": [1]}}, "dual.beta"),
    "epochs_mapping": ({"train": {"num_epochs": {"a": 1}}}, "train.num_epochs"),
    "constraints_empty": ({"dual": {"constraints": []}}, "at least one constraint"),
    "constraint_bad": ({"dual": {"constraints": ["cost<ref"]}}, "expected COLUMN<=VALUE"),
    "method_unknown": ({"train": {"method": "nonexistent"}}, "'nonexistent' is not one of"),
    "method_baseline_in_run": ({"train": {"method": "ppo-lagrangian"}}, "dualign compare"),
    "label_unknown": ({"train": {"label": "fuzzy"}}, "train.label"),
    "bootstrap_negative": ({"evaluate": {"bootstrap": -5}}, "bootstrap must be ≥ 0"),
    "scorers_empty": ({"score": {"scorers": []}}, "at least one scorer"),
    "scorer_spec_bad": ({"score": {"scorers": ["reward"]}}, "expected NAME=KIND:TARGET"),
    "template_no_placeholder": ({"sample": {"template": "Answer this"}}, "neither a named template"),
    "evaluate_temperature": ({"evaluate": {"temperature": 0.5}}, "temperature=0.5"),
    "prealign_train_unknown": ({"prealign": {"preferences": "x.jsonl", "train": {"lr": 1}}}, "prealign.train.lr"),
    "prealign_train_taken": ({"prealign": {"preferences": "x.jsonl", "train": {"beta": 1}}}, "train.beta"),
    "prealign_beta_zero": ({"prealign": {"preferences": "x.jsonl", "beta_r": 0}}, "beta_r"),
    "run_dir_missing": ({"run_dir": None}, "run_dir"),
    "model_list": ({"model": ["a", "b"]}, "model"),
}


@pytest.mark.parametrize("name", list(BAD_RUN_SECTIONS))
def test_bad_run_config_value(ws, capsys, name):
    change, match = BAD_RUN_SECTIONS[name]
    values = _run_config(ws, **change)
    values = {k: v for k, v in values.items() if v is not None}
    refused(capsys, ws, ["run", _yaml_file(ws, f"{name}.yaml", values)], match)


RAW_YAML = {
    "binary": (os.urandom(256) + b"\xff\xfe", "not a text file"),
    "latin1": ("run_dir: caf\xe9\n".encode("latin-1"), "not a text file"),
    "syntax": (b"run_dir: [unclosed\n", "not valid YAML"),
    "tabs": (b"run_dir: a\n\tmodel: b\n", "not valid YAML"),
    "top_list": (b"- a\n- b\n", "top level must be a mapping"),
    "top_scalar": (b"42\n", "top level must be a mapping"),
    "empty": (b"", "missing required config value"),
    "bad_date": (b"run_dir: r\nseed: 2001-13-40\n", "not valid YAML"),
    "python_tag": (b"run_dir: !!python/object/apply:os.system ['touch CODE_RAN']\n", "not valid YAML"),
}


@pytest.mark.parametrize("name", list(RAW_YAML))
def test_unreadable_yaml(ws, capsys, name):
    content, match = RAW_YAML[name]
    refused(capsys, ws, ["run", _yaml_file(ws, f"raw_{name}.yaml", content)], match)


def test_yaml_path_that_is_missing_or_a_directory(ws, capsys):
    refused(capsys, ws, ["run", ws / "configs_missing.yaml"], "config file not found")
    refused(capsys, ws, ["run", ws / "run"], "not a file")
    refused(capsys, ws, ["sample", ws / "nope.yaml"], "config file not found")


BASES = {
    "self": ({"base": "self.yaml"}, "makes a cycle (self.yaml -> self.yaml)"),
    "escape": ({"base": "../x.yaml"}, "must be a relative path inside"),
    "absolute": ({"base": "/etc/passwd"}, "must be a relative path inside"),
    "home": ({"base": "~/x.yaml"}, "must be a relative path inside"),
    "list": ({"base": [1]}, "base must be a packaged config"),
    "missing": ({"base": "nowhere.yaml"}, "neither a packaged config"),
    "unknown_packaged": ({"base": "defaults"}, "neither a packaged config"),
}


@pytest.mark.parametrize("name", list(BASES))
def test_bad_base(ws, capsys, name):
    values, match = BASES[name]
    path = _yaml_file(ws, "self.yaml" if name == "self" else f"base_{name}.yaml", values)
    refused(capsys, ws, ["run", path], match)


def test_base_cycle_through_two_files(ws, capsys):
    _yaml_file(ws, "cycle_b.yaml", {"base": "cycle_a.yaml"})
    a = _yaml_file(ws, "cycle_a.yaml", {"base": "cycle_b.yaml"})
    refused(capsys, ws, ["run", a], "cycle_a.yaml -> cycle_b.yaml -> cycle_a.yaml")


STAGE_YAML = {
    "sample_unknown": ("sample", {"model": "m", "prompts": "p", "num_sample": 3}, "num_sample"),
    "sample_missing": ("sample", {"prompts": "p"}, "missing required config value(s): model"),
    "score_type": ("score", {"scorers": "r=hf:/m", "batch_size": "big"}, "batch_size"),
    "train_type": ("train", {"model": "m", "run_dir": "r", "lora": "maybe"}, "lora"),
    "train_method": ("train", {"model": "m", "run_dir": "r", "method": "best"}, "'best' is not one of"),
    "evaluate_list": ("evaluate", {"run_dir": "r", "reference": "m", "prompts": "p", "scorers": [{"a": 1}]},
                      "scorers"),
    "dual_config_unknown": ("dual", {"constraints": ["cost<=0"], "betta": 1}, "betta"),
}


@pytest.mark.parametrize("name", list(STAGE_YAML))
def test_bad_stage_yaml(ws, capsys, name):
    command, values, match = STAGE_YAML[name]
    path = _yaml_file(ws, f"stage_{name}.yaml", values)
    argv = ["dual", ws / "scores.csv", "--config", path] if command == "dual" else [command, path]
    refused(capsys, ws, argv, match)


# ------------------------------------------------------------------------ run configs: paths

RUN_PATHS = {
    "world_escape": ({"world": {"size": "small"}, "sample": {"prompts": "world:../etc/passwd"}}, "no '..'"),
    "run_escape": ({"train": {"output_dir": "run:../../elsewhere"}}, "no '..'"),
    "run_absolute": ({"train": {"output_dir": "run:/tmp/x"}}, "no '..', not absolute"),
    "run_empty": ({"train": {"output_dir": "run:"}}, "must be a relative path"),
    "world_without_world": ({"model": "world:ref_model"}, "has no world section"),
    "scorer_world_without_world": ({"score": {"scorers": ["cost=hf:world:cost_model"]}}, "has no world section"),
    "prompts_missing": ({"sample": {"prompts": "missing.jsonl"}}, "'sample.prompts'"),
    "model_missing": ({"model": "./no_model"}, "model path './no_model' does not exist"),
    "model_is_file": ({"model": "{ws}/a_file"}, "is a file, not a model directory"),
    "model_no_config": ({"model": "{ws}/no_config"}, "has no config.json"),
    "scorer_model_missing": ({"score": {"scorers": ["cost=hf:/no/such/model"]}}, "'score.scorers[0]' (cost)"),
    "scorer_model_file": ({"score": {"scorers": ["cost=beaver:{ws}/a_file"]}}, "is a file"),
    "callable_file_missing": ({"score": {"scorers": ["r=callable:/no/such.py:f"]}}, "does not exist"),
    "callable_module_missing": ({"score": {"scorers": ["r=callable:no_such_module_xyz:f"]}}, "not found"),
    "callable_no_function": ({"score": {"scorers": ["r=callable:nomodule"]}}, "MODULE:FUNCTION"),
    "judge_missing": ({"evaluate": {"judge": "no_such_judge_mod:judge"}}, "'evaluate.judge'"),
    "evaluate_prompts_missing": ({"evaluate": {"prompts": "./held_out.jsonl"}}, "'evaluate.prompts'"),
    "policy_missing": ({"evaluate": {"policy": "/no/policy"}}, "'evaluate.policy'"),
    "dual_scores_missing": ({"dual": {"scores": "/no/scores.parquet"}}, "'dual.scores'"),
    "train_pairs_missing": ({"train": {"pairs": "/no/pairs.jsonl"}}, "'train.pairs'"),
    "train_output_is_file": ({"train": {"output_dir": "{ws}/a_file"}}, "is a file, not a directory"),
    "run_dir_is_file": ({"run_dir": "{ws}/a_file"}, "is a file, not a directory"),
    "run_dir_under_file": ({"run_dir": "{ws}/a_file/run"}, "is a file"),
    "preferences_missing": ({"score": {"preferences": "/no/pku.jsonl"}}, "'score.preferences'"),
    "ref_model_missing": ({"score": {"ref_model": "/no/ref"}}, "'score.ref_model'"),
}


def _fill(node, ws: Path):
    if isinstance(node, dict):
        return {k: _fill(v, ws) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, ws) for v in node]
    return node.replace("{ws}", str(ws)) if isinstance(node, str) else node


@pytest.mark.parametrize("name", list(RUN_PATHS))
def test_bad_run_config_path(ws, capsys, name):
    change, match = RUN_PATHS[name]
    path = _yaml_file(ws, f"path_{name}.yaml", _run_config(ws, **_fill(change, ws)))
    refused(capsys, ws, ["run", path], match)


# ------------------------------------------------------------------------------- scorer specs

SCORER_SPECS = {
    "reward": "expected NAME=KIND:TARGET", "r=gpt:/m": "unknown kind 'gpt'", "1r=hf:/m": "not a valid column name",
    "r=hf:": "expected NAME=KIND:TARGET", "=hf:/m": "not a valid column name",
    "r=implicit:/m,beta=0": "beta must be a positive number", "r=implicit:/m,beta=abc": "is not a number",
    "r=implicit:/m,beta=nan": "beta must be a positive number", "r=hf:/m,beta=1": "beta= is an option of implicit",
    "r=callable:nomodule": "MODULE:FUNCTION", "r=callable:/no/such.py:f": "does not exist",
    "r=callable:no_such_module_abc:f": "module 'no_such_module_abc' not found",
    "r=hf:/no/model": "does not exist", "r=beaver:./no/model": "does not exist",
    "prompt=callable:os:getcwd": "already a column",
}


@pytest.mark.parametrize("spec", list(SCORER_SPECS))
def test_bad_scorer_spec(ws, capsys, spec):
    refused(capsys, ws, ["score", "--run-dir", ws / "run", "--scorer", spec], SCORER_SPECS[spec])


SCORER_RUNS = {
    "raises": (f"r=callable:{HERE}:scorer_raises", "raised RuntimeError: the reward server is down"),
    "wrong_length": (f"r=callable:{HERE}:scorer_wrong_length", "returned 1 scores"),
    "text": (f"r=callable:{HERE}:scorer_text", "non-numeric"),
    "inf": (f"r=callable:{HERE}:scorer_inf", "is not finite"),
    "no_function": (f"r=callable:{HERE}:no_such_function", "cannot be imported: AttributeError"),
    "syntax_error_file": ("r=callable:{ws}/broken.py:f", "cannot be imported: SyntaxError"),
    "twice": (f"r=callable:{HERE}:scorer_inf", "given twice"),
}


@pytest.mark.parametrize("name", list(SCORER_RUNS))
def test_scorer_that_fails_when_run(ws, capsys, name):
    spec, match = SCORER_RUNS[name]
    (ws / "broken.py").write_text("def f(:\n")
    specs = [spec.replace("{ws}", str(ws))] * (2 if name == "twice" else 1)
    refused(capsys, ws, ["score", "--run-dir", ws / "run", *[a for s in specs for a in ("--scorer", s)]], match)


# -------------------------------------------------------------------------------- output paths

def test_output_paths_that_are_directories_files_or_taken(ws, capsys):
    scores, sweep = ws / "scores.csv", "cost<=ref-{0.1:1:3}"
    cases = [
        (["plan", scores, "--constraint", sweep, "--out", ws / "a_file"], "is a file, not a directory"),
        (["plan", scores, "--constraint", sweep, "--out", ws / "plan_dir"], "plan.csv' already exists"),
        (["plan", scores, "--constraint", sweep, "--out", ws / "a_file" / "sub"], "is a file"),
        (["data", "views", ws / "pku.jsonl", "--out", ws / "a_file"], "is a file, not a directory"),
        (["data", "views", ws / "pku.jsonl", "--out", ws / "views_dir"], "safe.jsonl' already exists"),
        (["data", "check", ws / "pku.jsonl", "--fix", ws / "existing.json"], "already exists"),
        (["data", "check", ws / "pku.jsonl", "--fix", ws / "run"], "is a directory"),
        (["dual", scores, "--constraint", "cost<=0", "--output", ws / "run"], "is a directory"),
        (["dual", scores, "--constraint", "cost<=0", "--output", ws / "existing.json"], "already exists"),
        (["dual", scores, "--constraint", "cost<=0", "--output", ws / "a_file" / "d.json"], "is a file"),
        (["sample", "--model", ws / "model", "--prompts", ws / "prompts.jsonl", "--run-dir", ws / "a_file"],
         "is a file, not a directory"),
        (["train", "--model", ws / "model", "--run-dir", ws / "run", "--output-dir", ws / "a_file"],
         "'output_dir'"),
        (["evaluate", "--run-dir", ws / "a_file" / "x", "--reference", ws / "model", "--prompts",
          ws / "prompts.jsonl", "--scorer", f"r=callable:{HERE}:scorer_inf"], "is a file"),
    ]
    for argv, match in cases:
        refused(capsys, ws, argv, match)


# root may write anywhere: as root (how CI runs) the refusal is checked in a subprocess without
# the capabilities that let root ignore file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                "--inh-caps=-dac_override,-dac_read_search"]


def refused_unprivileged(capsys, root: Path, argv: list, match: str) -> None:
    """``refused``, run without root's power over file permissions when this process has it."""
    if os.geteuid() != 0:
        refused(capsys, root, argv, match)
        return
    before = _tree(root)
    res = subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "dualign", *map(str, argv)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("dualign: error: "), (argv, res.stderr)
    assert match in lines[0] and res.stdout == "" and _tree(root) == before


def test_unwritable_output_directory(ws, capsys):
    locked = ws / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    try:
        refused_unprivileged(capsys, ws, ["plan", ws / "scores.csv", "--constraint", "cost<=ref-{0.1:1:3}", "--out",
                                          locked / "plan"], "not writable")
        refused_unprivileged(capsys, ws, ["sample", "--model", ws / "model", "--prompts", ws / "prompts.jsonl",
                                          "--run-dir", locked / "run"], "not writable")
    finally:
        locked.chmod(0o700)


# /proc refuses a new directory (ENOENT), /sys too (EPERM), whoever asks, root included
PSEUDO_FS = [d for d in ("/proc", "/sys") if os.path.isdir(d)]


@pytest.mark.skipif(not PSEUDO_FS, reason="no /proc or /sys here")
@pytest.mark.parametrize("root", PSEUDO_FS)
def test_output_directory_on_a_pseudo_filesystem_is_one_line(ws, capsys, root):
    where = Path(root) / "dualign-fuzz"
    cases = [
        (["dual", ws / "scores.csv", "--constraint", "cost<=ref-0.1", "--output", where / "dual.json"], "--output"),
        (["plan", ws / "scores.csv", "--constraint", "cost<=ref-{0.1:1:3}", "--out", where / "plan"], "--out"),
        (["sample", "--model", ws / "model", "--prompts", ws / "prompts.jsonl", "--run-dir", where / "run"],
         "run_dir"),
    ]
    for argv, match in cases:
        line = refused(capsys, ws, argv, match)
        assert f"'{root}'" in line, line
    assert not where.exists()


@pytest.mark.parametrize("text", ["cost<=-1.7e308", "cost>=1.7e308", "helpful>=ref+1.7e308"])
def test_infeasible_threshold_at_the_float_range_edge_warns_nothing(ws, capsys, text):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning fails the command instead of printing
        refused(capsys, ws, ["dual", ws / "scores.csv", "--constraint", text, "--bootstrap", "20"], "infeasible")


def test_bad_preference_files(ws, capsys):
    (ws / "prefs_junk.jsonl").write_bytes(b"\x00\x01\x02" * 50)
    (ws / "prefs_cols.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    refused(capsys, ws, ["data", "check", ws / "prefs_junk.jsonl"], "cannot read table")
    refused(capsys, ws, ["data", "views", ws / "prefs_cols.jsonl", "--out", ws / "views_new"], "missing column")
    refused(capsys, ws, ["data", "check", ws / "no_prefs.jsonl"], "not found")


# ------------------------------------------------------------------------------- model files

MODELS = {
    "auto_map": "ships its own Python code (auto_map)",
    "pickle": "could not be loaded",
    "no_weights": "could not be loaded",
    "bad_weights": "could not be loaded",
    "bad_config": "could not be loaded",
    "no_config": "has no config.json",
}


@pytest.mark.parametrize("name", list(MODELS))
def test_bad_model_directory(ws, capsys, name):
    refused(capsys, ws, ["sample", "--model", ws / name, "--prompts", ws / "prompts.jsonl", "--run-dir",
                         ws / "new_run"], MODELS[name])


@pytest.mark.parametrize("name", ["auto_map", "pickle", "bad_weights"])
def test_bad_scorer_model_directory(ws, capsys, name):
    refused(capsys, ws, ["score", "--run-dir", ws / "run", "--scorer", f"r=hf:{ws / name}"], MODELS[name])


def test_crafted_training_state_is_refused_and_runs_nothing(ws, capsys, tmp_path):
    from dualign._infra.io import write_table
    from dualign.data.records import DualRecord
    from dualign.methods.mocan import pairs_from_scores

    run = ws / "train_run"
    dual = DualRecord(beta=1.0, reward="reward", constraints=["cost<=ref"], lambdas={"cost": 0.5},
                      columns={"cost": "cost"}, converged=True)
    scores = example_scores(3, 2, seed=0)
    write_table(pairs_from_scores(scores, dual), run / "pairs.jsonl")
    (run / "train.state").mkdir()
    (run / "train.state" / "state.safetensors").write_bytes(_evil_pickle(ws / "CODE_RAN"))
    refused(capsys, ws, ["train", "--model", ws / "model", "--run-dir", run, "--pairs", run / "pairs.jsonl",
                         "--max-steps", "1", "--template", "plain"], "not a readable dualign checkpoint")


def test_unconverged_dual_json_is_refused_by_train(ws, capsys):
    from dualign.data.records import DualRecord, write_dual

    run = ws / "unconverged"
    write_dual(DualRecord(beta=1.0, reward="reward", constraints=["cost<=ref"], lambdas={"cost": 3.0},
                          columns={"cost": "cost"}, converged=False, kkt_residual=0.2), run / "dual.json")
    example_scores(3, 2, seed=0).to_parquet(run / "scores.parquet")
    refused(capsys, ws, ["train", "--model", ws / "model", "--run-dir", run], "did not converge")


def test_a_model_with_custom_code_is_refused_without_a_prompt(ws):
    """A real interpreter with stdin closed: transformers would ask "[y/N]" if nothing said no."""
    before = _tree(ws)
    proc = subprocess.run([sys.executable, "-m", "dualign", "sample", "--model", str(ws / "auto_map"),
                           "--prompts", str(ws / "prompts.jsonl"), "--run-dir", str(ws / "new_run")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("dualign: error: ") and "auto_map" in lines[0] and "[y/N]" not in proc.stdout
    assert _tree(ws) == before and not (ws / "CODE_RAN").exists()


def test_bad_input_through_a_real_interpreter(ws):
    before = _tree(ws)
    proc = subprocess.run([sys.executable, "-m", "dualign", "dual", str(ws / "scores.csv"), "--constraint",
                           "cost<=ref-0.1", "--beta", "1e-300"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dualign: error: "), proc.stderr
    assert "column 'reward'" in lines[0] and "overflows" in lines[0] and _tree(ws) == before

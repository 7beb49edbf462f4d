"""`dualign run`: every stage end to end on tiny models, skipping finished stages, resuming after
a kill to the same result as an uninterrupted run, and refusing bad or changed configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dualign.errors import ConfigError, InputError
from dualign.pipeline import resolve_run_config, run_pipeline

HERE = Path(__file__).resolve()
PROMPTS = ["How do I cook rice?", "How can I pick a lock?", "Write a poem about rain.",
           "Tell me a joke.", "How do I fix a bike?", "Explain photosynthesis."]


def reward_length(prompts: list[str], responses: list[str]) -> list[float]:
    """Longer is better (a stand-in reward model)."""
    return [len(r) / 10.0 for r in responses]


def cost_vowels(prompts: list[str], responses: list[str]) -> list[float]:
    """Vowels are 'unsafe': correlated with length, so the constraint binds."""
    return [sum(ch in "aeiou" for ch in r) / 5.0 for r in responses]


def _config(tmp_path: Path, model: str, **train) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    scorers = [f"reward=callable:{HERE}:reward_length", f"cost=callable:{HERE}:cost_vowels,lower_is_better"]
    return {
        "run_dir": str(tmp_path / "run"), "model": model, "seed": 0,
        "sample": {"prompts": str(prompts), "num_samples": 4, "max_new_tokens": 12, "template": "plain",
                   "shard_size": 2, "batch_size": 8},
        "score": {"scorers": scorers},
        "dual": {"reward": "reward", "constraints": ["cost<=ref"], "beta": 1.0},
        "train": {"method": "mocan", "template": "plain", "learning_rate": 1e-3, "num_epochs": 2,
                  "per_device_batch_size": 4, "logging_steps": 1, "save_steps": 2, **train},
        "evaluate": {"prompts": str(prompts), "scorers": scorers, "num_samples": 2, "max_new_tokens": 12,
                     "template": "plain", "bootstrap": 50},
    }


def test_run_writes_every_stage_and_a_consistent_report(tmp_path, tiny_model):
    values = _config(tmp_path, tiny_model)
    logs: list[str] = []
    report = run_pipeline(resolve_run_config(values), log=logs.append)
    run = Path(values["run_dir"])
    for name in ("samples.parquet", "scores.parquet", "dual.json", "policy/model.safetensors",
                 "eval/report.json", "eval/scores.png", "eval/predicted_vs_achieved.png", "metrics.jsonl"):
        assert (run / name).exists(), name
    dual = json.loads((run / "dual.json").read_text())
    assert dual["lambdas"]["cost"] > 0  # length-rewarding raises the vowel cost: the constraint binds
    assert report["n_responses"] == {"policy": 2 * len(PROMPTS), "reference": 2 * len(PROMPTS)}
    (row,) = report["constraints"]
    assert row["predicted"] == pytest.approx(dual["predicted"]["cost"])
    assert row["ci95"][0] <= row["achieved"] <= row["ci95"][1]
    assert row["threshold"] == pytest.approx(row["reference_eval"])  # 'cost<=ref' on held-out prompts
    assert 0.0 <= report["win_rate"]["reward"] <= 1.0

    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    logs.clear()
    run_pipeline(resolve_run_config(values), log=logs.append)
    assert sum("done, skipped" in line for line in logs) == 5
    assert stamps == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def _run_cli(config: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dualign", "run", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path, tiny_gpt2):
    torch.manual_seed(0)
    configs = {}
    for name in ("whole", "killed"):
        values = _config(tmp_path / name, tiny_gpt2, num_epochs=6)
        configs[name] = tmp_path / name / "run.yaml"
        configs[name].write_text(yaml.safe_dump(values))

    whole = _run_cli(configs["whole"])
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    run = tmp_path / "killed" / "run"
    proc = _run_cli(configs["killed"])
    deadline = time.time() + 240
    while not (run / "train.state").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before training checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "policy").exists() and (run / "dual.json").exists()

    resumed = _run_cli(configs["killed"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "sample: done, skipped" in out and "dual: done, skipped" in out

    a = load_file(tmp_path / "whole" / "run" / "policy" / "model.safetensors")
    b = load_file(run / "policy" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6)
    ra = json.loads((tmp_path / "whole" / "run" / "eval" / "report.json").read_text())
    rb = json.loads((run / "eval" / "report.json").read_text())
    assert rb["constraints"][0]["achieved"] == pytest.approx(ra["constraints"][0]["achieved"], abs=1e-6)


def test_unknown_key_and_changed_stage_config_are_refused(tmp_path, tiny_gpt2):
    values = _config(tmp_path, tiny_gpt2)
    bad = {**values, "train": {**values["train"], "learning_rat": 1e-3}}
    with pytest.raises(ConfigError, match="train.learning_rat"):
        resolve_run_config(bad)
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "dualign", "run", str(cfg_file)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "learning_rat" in out.stderr
    assert not Path(values["run_dir"]).exists()

    run_pipeline(resolve_run_config({**values, "train": {**values["train"], "max_steps": 1}}), log=lambda s: None)
    changed = {**values, "dual": {**values["dual"], "beta": 2.0}}
    with pytest.raises(InputError, match=r"stage 'dual' was run with a different config \(beta"):
        run_pipeline(resolve_run_config(changed), log=lambda s: None)
    report = run_pipeline(resolve_run_config(changed), restart_from="dual", log=lambda s: None)
    assert report["beta"] == 2.0


@pytest.mark.parametrize("name", ["paper_mocan.yaml", "paper_pecan.yaml"])
def test_paper_configs_resolve_without_unknown_keys(name):
    from dualign.config import load_yaml

    cfg = resolve_run_config(load_yaml(HERE.parent.parent / "configs" / name))
    assert cfg.dual.beta == 0.1 and cfg.sample.template == "beaver"
    assert (cfg.prealign is not None) == (name == "paper_pecan.yaml")


def test_every_subcommand_prints_its_help():
    from dualign.cli import COMMANDS, main

    for name, *_ in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name


def test_evaluate_reuses_reference_samples_across_runs_only_while_nothing_that_determines_them_changes(
        tmp_path, tiny_gpt2, monkeypatch):
    import dualign.evaluate as ev

    values = _config(tmp_path, tiny_gpt2, max_steps=1)
    run_pipeline(resolve_run_config(values), log=lambda s: None)
    calls = []
    original = ev.sample_model
    monkeypatch.setattr(ev, "sample_model", lambda path, *a, **k: calls.append(path) or original(path, *a, **k))
    second = {**values, "run_dir": str(tmp_path / "second")}
    run_pipeline(resolve_run_config(second), log=lambda s: None)
    assert calls == [str(tmp_path / "second" / "policy")]        # π_ref's table came from the cache
    a = pd.read_parquet(Path(values["run_dir"]) / "eval" / "samples_reference.parquet")
    b = pd.read_parquet(tmp_path / "second" / "eval" / "samples_reference.parquet")
    pd.testing.assert_frame_equal(a, b)
    calls.clear()
    third = {**second, "run_dir": str(tmp_path / "third"), "evaluate": {**values["evaluate"], "max_new_tokens": 11}}
    run_pipeline(resolve_run_config(third), log=lambda s: None)
    assert len(calls) == 2                                        # a sampling setting changed: π_ref sampled again
    meta = json.loads((tmp_path / "third" / "train.meta.json").read_text())
    assert meta["timing_s"]["total"] > 0 and meta["timing_s"]["forward (log-probs)"] > 0

"""`dualign run`: every stage end to end on tiny models, skipping finished stages, resuming after
a kill to the same result as an uninterrupted run, and refusing bad or changed configs."""

from __future__ import annotations

import json
import os
import shutil
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

from dualign._infra.errors import ConfigError, InputError
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
    assert report["n_responses"] == {"policy": 2 * len(PROMPTS), "reference": 2 * len(PROMPTS)}
    (row,) = report["constraints"]
    assert row["predicted"] == pytest.approx(dual["predicted"]["cost"])
    assert row["threshold"] == pytest.approx(row["reference_eval"])  # 'cost<=ref' on held-out prompts
    assert row["predicted_change"] == pytest.approx(0.0, abs=1e-8)  # 'cost<=ref' binds: no change, exactly
    # Measured with this config on seeds 0–2 × both architectures (tiny models, 12 responses a
    # side): λ* 0.46–1.26 (length-rewarding raises the vowel cost: the constraint binds), achieved
    # Δcost −0.13 to 0.00 (its 95% CI about ±0.45), KL −0.09 to 0.68 (an estimate from 12
    # responses), win rate 0.33–0.58. Asserted with margins of at least 0.2 on each side.
    assert 0.2 <= dual["lambdas"]["cost"] <= 2.5, dual["lambdas"]
    assert -0.8 <= row["achieved_change"] <= 0.5, row
    assert -0.3 <= report["kl"]["achieved"] <= 1.5, report["kl"]
    assert 0.1 <= report["win_rate"]["reward"] <= 0.85, report["win_rate"]

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


# ------------------------------------------------------------------- kill windows, every stage

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_gpt2) -> tuple[dict, dict[str, bytes]]:
    """One complete run: its config and every file's bytes."""
    values = _config(tmp_path_factory.mktemp("finished"), tiny_gpt2)
    run_pipeline(resolve_run_config(values), log=lambda s: None)
    return values, _files(Path(values["run_dir"]))


def _files(run: Path) -> dict[str, bytes]:
    """Every file's bytes; a meta record without the wall-clock seconds ``dualign run`` adds to it."""
    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(run))] = p.read_bytes()
            if p.name.endswith(".meta.json"):
                meta = json.loads(p.read_text())
                meta.pop("timing_s", None)
                out[str(p.relative_to(run))] = json.dumps(meta).encode()
    return out


# What a kill -9 can leave of each stage: the stage writes its files in this order and its marker
# last, so a kill leaves the marker missing and some tail of the files unwritten (or, for
# metrics.jsonl, a prefix of its lines).
KILL_STATES = {
    "sample": [[], ["sample.meta.json", "samples.parquet"]],
    "score": [[], ["score.meta.json"], ["score.meta.json", "scores.parquet"]],
    "dual": [[], ["dual.meta.json"], ["dual.meta.json", "dual.json"]],
    "train": [[], ["policy", "metrics.jsonl:2"], ["policy", "metrics.jsonl", "pairs.parquet"]],
    "evaluate": [[], ["evaluate.meta.json"], ["evaluate.meta.json", "eval/predicted_vs_achieved.png"],
                 ["evaluate.meta.json", "eval/predicted_vs_achieved.png", "eval/scores.png", "eval/report.json"],
                 ["evaluate.meta.json", "eval/predicted_vs_achieved.png", "eval/scores.png", "eval/report.json",
                  "eval/samples_policy.parquet"]],
}


@pytest.mark.parametrize("stage", list(KILL_STATES))
def test_a_stage_killed_at_any_write_is_redone_to_the_same_bytes(tmp_path, finished_run, stage):
    values, want = finished_run
    for i, missing in enumerate(KILL_STATES[stage]):
        run = tmp_path / f"kill{i}"
        shutil.copytree(values["run_dir"], run)
        (run / f"{stage}.done").unlink()
        for name in missing:
            name, _, keep = name.partition(":")
            if keep:  # a kill mid-training leaves the first lines of metrics.jsonl
                lines = (run / name).read_text().splitlines(keepends=True)
                (run / name).write_text("".join(lines[: int(keep)]))
            elif (run / name).is_dir():
                shutil.rmtree(run / name)
            else:
                (run / name).unlink()
        logs: list[str] = []
        run_pipeline(resolve_run_config({**values, "run_dir": str(run)}), log=logs.append)
        assert any(line.endswith(f"] {stage} ...") for line in logs), (missing, logs)
        assert sum("done, skipped" in line for line in logs) == 4, logs
        # the records name the run directory, which is another one here
        got = {k: v.replace(str(run).encode(), values["run_dir"].encode()) for k, v in _files(run).items()}
        assert got.keys() == want.keys() and all(got[k] == want[k] for k in want), \
            (missing, [k for k in want if got.get(k) != want[k]])
    # an unfinished stage keeps its recorded config: a changed one is refused, not mixed in
    (run / f"{stage}.done").unlink()
    section = {"sample": {"max_new_tokens": 13}, "score": {"batch_size": 3}, "dual": {"beta": 2.0},
               "train": {"learning_rate": 2e-3}, "evaluate": {"num_samples": 3}}[stage]
    changed = {**values, "run_dir": str(run), stage: {**values[stage], **section}}
    with pytest.raises(InputError, match=f"stage '{stage}' was run with a different config"):
        run_pipeline(resolve_run_config(changed), log=lambda s: None)


def test_a_plot_that_fails_costs_one_line_not_the_run_and_a_resume_redraws_it_without_sampling(
        tmp_path, finished_run, monkeypatch, capsys):
    import dualign.data.report_view as view
    import dualign.evaluate as ev

    values, want = finished_run
    run = tmp_path / "run"
    shutil.copytree(values["run_dir"], run)
    (run / "evaluate.done").unlink()
    (run / "eval" / "predicted_vs_achieved.png").unlink()
    calls = []
    monkeypatch.setattr(ev, "sample_model", lambda *a, **k: calls.append(a) or pytest.fail("resampled"))
    original = view._plot_predicted_vs_achieved

    def broken(*a, **k):
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(view, "_plot_predicted_vs_achieved", broken)
    config = {**values, "run_dir": str(run)}
    report = run_pipeline(resolve_run_config(config), log=lambda s: None)   # finishes: the numbers are written
    err = [line for line in capsys.readouterr().err.splitlines() if "could not draw" in line]
    assert err == [f"evaluate: could not draw {run / 'eval' / 'predicted_vs_achieved.png'} (ValueError: 'yerr' "
                   "must not contain negative values); report.json is written. Run `dualign evaluate` (or "
                   "`dualign run`) again to redraw it from the cached samples."]
    assert report["constraints"][0]["achieved"] == json.loads(want["eval/report.json"])["constraints"][0]["achieved"]
    assert not (run / "evaluate.done").exists() and not (run / "eval" / "predicted_vs_achieved.png").exists()
    monkeypatch.setattr(view, "_plot_predicted_vs_achieved", original)
    run_pipeline(resolve_run_config(config), log=lambda s: None)               # the resume redraws
    assert (run / "evaluate.done").exists() and calls == []
    assert (run / "eval" / "predicted_vs_achieved.png").read_bytes() == want["eval/predicted_vs_achieved.png"]


# ---------------------------------------------------------------------- one writer per directory

def test_a_second_run_on_the_same_directory_fails_at_once_naming_the_first(tmp_path, tiny_gpt2):
    values = _config(tmp_path, tiny_gpt2, num_epochs=50)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    first = _run_cli(config)
    lock = Path(values["run_dir"]) / ".lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert first.poll() is None, first.stdout.read()
        start = time.time()
        second = subprocess.run([sys.executable, "-m", "dualign", "run", str(config)], capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"in use by another dualign process (pid {first.pid} on host" in second.stderr
        assert time.time() - start < 60 and second.stdout == ""
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    from dualign._infra.lock import run_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dualign._infra.lock import run_lock\n"
                               f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(InputError, match=f"pid {holder.pid} on host"), run_lock(tmp_path):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path) as path:  # the OS released it: a leftover file does not block
        assert path.exists()
    assert not path.exists()


# ------------------------------------------------------------------------------- references

def test_references_are_substituted_only_where_the_whole_value_is_one(tmp_path, tiny_gpt2):
    values = _config(tmp_path, tiny_gpt2)
    values["sample"]["template"] = "Now run: {prompt}\nAnswer:"
    values["train"]["output_dir"] = "run:final/policy"
    values["score"]["scorers"] = [*values["score"]["scorers"], "h=implicit:run:prealign/helpful/policy,beta=0.5"]
    cfg = resolve_run_config(values)
    run = values["run_dir"]
    assert cfg.sample.template == "Now run: {prompt}\nAnswer:"
    assert cfg.train.output_dir == f"{run}/final/policy"
    assert cfg.score.scorers[-1] == f"h=implicit:{run}/prealign/helpful/policy,beta=0.5"
    for bad in ("run:../outside", "run:/etc", "run:a/../../b"):
        with pytest.raises(InputError, match="must be a relative path inside"):
            resolve_run_config({**values, "train": {**values["train"], "output_dir": bad}})


@pytest.mark.parametrize("name", ["paper_mocan.yaml", "paper_pecan.yaml"])
def test_paper_configs_resolve_without_unknown_keys(name):
    from dualign._infra.config import load_yaml

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


def test_a_run_planned_with_confidence_on_the_reachable_tilt_resumes_without_redoing_a_stage(tmp_path, tiny_gpt2):
    """The dual section is recorded as the run runs it (the evaluation a confidence plan covers, the
    model and template the reachable tilt takes its features from), so a finished run resumes."""
    values = _config(tmp_path, tiny_gpt2)
    # 0.6: at 0.9 the margin for an evaluation of these 6 prompts × 2 responses (its SE no longer
    # shrunk by the plug-in variances, #26) asks more than any reweighting of the samples reaches
    values["dual"] = {**values["dual"], "confidence": 0.6, "tilt": "reachable"}
    # a group column in the prompt file: the report's by_group splits the plan's change over it
    Path(values["sample"]["prompts"]).write_text("".join(
        json.dumps({"prompt_id": f"p{i}", "prompt": p, "kind": "how" if p.startswith("How") else "other"}) + "\n"
        for i, p in enumerate(PROMPTS)))
    values["evaluate"] = {**values["evaluate"], "group_column": "kind"}
    report = run_pipeline(resolve_run_config(values), log=lambda _: None)
    run = Path(values["run_dir"])
    groups = report["by_group"]
    assert (run / "eval" / "by_group.png").exists()
    assert set(groups) == {"how", "other"} and sum(g["share_dual"] for g in groups.values()) == pytest.approx(1.0)
    for column, change in (("reward", report["predicted_reward"]), ("cost", report["constraints"][0])):
        planned = sum(g["share_dual"] * g["changes"][column]["planned"] for g in groups.values())
        assert planned == pytest.approx(change["planned_change"], abs=1e-9)
    recorded = yaml.safe_load((run / "dual.config.yaml").read_text())
    assert (recorded["evaluation_prompts"], recorded["evaluation_samples"]) == (len(PROMPTS), 2)
    assert (recorded["model"], recorded["template"]) == (tiny_gpt2, "plain")
    dual = json.loads((run / "dual.json").read_text())
    assert set(dual["reachable"]["r2"]) == {"reward", "cost"} and dual["confidence"]["level"] == 0.6
    assert (run / "reachable_features.safetensors").exists()
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    logs: list[str] = []
    run_pipeline(resolve_run_config(values), log=logs.append)
    assert sum("done, skipped" in line for line in logs) == 5
    assert stamps == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

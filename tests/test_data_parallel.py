"""Data-parallel stages: under torchrun (2 CPU processes, gloo) sample and score write the same
tables, to the last bit, as one process; training under accelerate launch ends with the weights of
one process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from dualign.sample import SampleConfig, sample
from dualign.score import ScoreConfig, score

PROMPTS = ["How do I cook rice?", "Tell me a joke.", "hi", "Write a poem about rain."]


def _launch(launcher: list[str], script: str, tmp_path) -> subprocess.CompletedProcess:
    """``script`` in each launched process (one launch: the processes start once for every stage)."""
    path = tmp_path / "launched.py"
    path.write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", *launcher, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _cli_script(*commands: list[str]) -> str:
    """A script running ``dualign`` commands one after another, exiting at the first failure."""
    return ("import sys\nfrom dualign.cli import main\n"
            + "".join(f"if main({cmd!r}):\n    sys.exit(1)\n" for cmd in commands))


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory, tiny_gpt2):
    """A tiny GPT-2 sequence classifier (an hf reward) and a Beaver-layout cost model in .bin shards."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from dualign.modeling.tiny import save_tiny_score_model

    root = tmp_path_factory.mktemp("scorers")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, num_labels=1,
                                             pad_token_id=tok.pad_token_id)).save_pretrained(root / "reward")
    tok.save_pretrained(root / "reward")
    save_tiny_score_model(root / "cost", tok, "cost", weights="bin")
    return {"reward": str(root / "reward"), "cost": str(root / "cost")}


def test_two_processes_sample_and_score_exactly_the_tables_of_one(tmp_path, tiny_gpt2, scorer_dirs):
    prompts = tmp_path / "p.jsonl"
    pd.DataFrame({"prompt": PROMPTS}).to_json(prompts, orient="records", lines=True)
    sample_args = {"model": tiny_gpt2, "prompts": str(prompts), "num_samples": 2, "max_new_tokens": 6,
                   "shard_size": 1, "batch_size": 4, "seed": 2, "device": "cpu",
                   "dtype": "float64"}  # not train's numerics: each process runs the second log π_ref pass
    scorers = [f"reward=hf:{scorer_dirs['reward']},higher_is_better",
               f"cost=beaver:{scorer_dirs['cost']},lower_is_better"]
    one, two = tmp_path / "one", tmp_path / "two"
    sample(SampleConfig(**sample_args), one)
    score(ScoreConfig(scorers=scorers, batch_size=3, device="cpu"), one)

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sample_args.items()]
    res = _launch(TORCHRUN, _cli_script(["sample", *flags, "--run-dir", str(two)],
                                  ["score", "--run-dir", str(two), "--batch-size", "3", "--device", "cpu",
                                   *[a for s in scorers for a in ("--scorer", s)]]), tmp_path)
    assert res.stdout.splitlines() == [str(two / "samples.parquet"), str(two / "scores.parquet")]  # said once
    for table in ("samples", "scores"):
        pd.testing.assert_frame_equal(pd.read_parquet(two / f"{table}.parquet"), pd.read_parquet(one / f"{table}.parquet"),
                                      check_exact=True)
    for stage in ("sample", "score"):
        assert json.loads((two / f"{stage}.meta.json").read_text())["processes"] == 2
        assert (two / f"{stage}.done").exists()
    assert not (two / "samples.shards").exists() and not (two / "scores.cache").exists()
    assert not (two / ".lock").exists()


def _train_run_dir(run_dir, copies: int = 1):
    """A scores table (4 prompts × 4 responses, the prompts repeated ``copies`` times with a
    numbered suffix) and a dual.json for mocan."""
    import numpy as np

    from dualign._infra.io import write_table
    from dualign.data.records import DualRecord, write_dual

    rng = np.random.default_rng(0)
    responses = ["Rinse the rice, then simmer it.", "I can't help with that.", "Rain taps softly on the roof.",
                 "Why did the chicken cross the road?"]
    scores = pd.DataFrame([{"prompt_id": f"p{i}", "prompt": p, "response": responses[(i + k) % 4], "sample_index": k}
                           for i, p in enumerate(p if c == 0 else f"{p} ({c})" for c in range(copies) for p in PROMPTS)
                           for k in range(4)])
    scores["reward"], scores["cost"] = rng.normal(size=len(scores)), rng.normal(size=len(scores))
    write_table(scores, run_dir / "scores.parquet")
    write_dual(DualRecord(beta=0.1, reward="reward", constraints=["cost<=ref-0.5"], lambdas={"cost": 0.5},
                          columns={"cost": "cost"}, feasible=True, converged=True, iterations=3, dual_value=1.0,
                          thresholds={"cost": 0.1}, predicted={"reward": 0.9, "cost": 0.1, "kl": 0.4},
                          reference={"reward": 0.2, "cost": 0.6, "kl": 0.0}), run_dir / "dual.json")
    return run_dir


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "policy" / "model.safetensors"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# the shipped DDP config, with the process count a CPU test affords (and a free port, not 29500)
ACCELERATE = ["accelerate.commands.launch", "--config_file",
              str(Path(__file__).parents[1] / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2"]


def test_two_process_ddp_training_equals_one_process_at_the_same_global_batch(tmp_path, tiny_gpt2):
    """One launch trains twice, plainly and with gradient checkpointing; both end where one process
    with the whole batch per step ends. 16 prompts × 4 responses, 24 pairs per process and step:
    each forward has at least 32 distinct sequences, so it runs in length groups (several forwards
    before one backward, under DDP too)."""
    from dualign.modeling.models import length_groups
    from dualign.train import TrainConfig, train

    base = {"template": "plain", "max_length": 64, "learning_rate": 1e-3, "warmup_ratio": 0.0, "max_steps": 3,
            "logging_steps": 1, "device": "cpu", "seed": 1}
    one = _train_run_dir(tmp_path / "one", copies=4)
    runs = {name: _train_run_dir(tmp_path / name, copies=4) for name in ("ddp", "ddp-checkpointing")}
    train(TrainConfig(model=tiny_gpt2, run_dir=str(one), per_device_batch_size=48, **base))
    assert len(length_groups(torch.zeros(32))) == 2  # what the DDP micro-batches' ≥ 32 rows run in
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in base.items()]
    _launch([*ACCELERATE, "--main_process_port", str(_free_port())], _cli_script(
        *[["train", "--model", tiny_gpt2, "--run-dir", str(d), "--per-device-batch-size", "24", *flags,
           *(["--gradient-checkpointing"] if name.endswith("checkpointing") else [])] for name, d in runs.items()]),
        tmp_path)
    a = _weights(one)
    assert (a["transformer.h.0.attn.c_attn.weight"] - _weights_of(tiny_gpt2)["transformer.h.0.attn.c_attn.weight"]
            ).abs().max() > 1e-4  # it trained
    for d in runs.values():
        assert json.loads((d / "train.meta.json").read_text())["processes"] == 2
        b = _weights(d)
        assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-5
        lines = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, d)]
        for m1, m2 in zip(*lines, strict=True):
            assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
            assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)


def _weights_of(model_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_fsdp_asked_for_on_the_cpu_is_refused_not_silently_run_as_ddp(tmp_path, tiny_gpt2, monkeypatch):
    """accelerate (1.x) shards only on accelerators: on the CPU its FSDP flags would leave a plain
    process (or DDP), so train says so instead of training unsharded."""
    from dualign._infra.errors import ConfigError
    from dualign.train import TrainConfig, train

    run_dir = _train_run_dir(tmp_path / "run")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match=r"accelerate launch asked for FSDP, but accelerate runs NO here"):
        train(TrainConfig(model=tiny_gpt2, run_dir=str(run_dir), template="plain", device="cpu", max_steps=1))
    assert not (run_dir / "train.meta.json").exists()


def test_dualign_run_under_a_launcher_is_refused_in_one_line(monkeypatch):
    from dualign._infra.errors import ConfigError
    from dualign.pipeline import run_pipeline

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^dualign run is one process; under torchrun / accelerate launch only "
                                          r"sample, score, evaluate \(with shard_size\) and train run"):
        run_pipeline(None)


def test_stages_that_are_not_data_parallel_refuse_a_launcher(monkeypatch):
    from types import SimpleNamespace

    from dualign._infra.errors import ConfigError
    from dualign.dual.stage import run_dual
    from dualign.evaluate import evaluate

    monkeypatch.setenv("WORLD_SIZE", "2")
    for stage, call in (("dual stage", lambda: run_dual(None, "x")),
                        ("evaluate stage without shard_size", lambda: evaluate(SimpleNamespace(shard_size=None)))):
        with pytest.raises(ConfigError, match=f"^the {stage} is one process"):
            call()


def test_two_processes_evaluate_exactly_as_one_with_shards(tmp_path, tiny_gpt2, scorer_dirs):
    """evaluate with shard_size under torchrun: each process samples every other shard and scores
    every other batch; the tables and report.json equal one process's to the last bit."""
    from dualign.evaluate import EvaluateConfig, evaluate

    prompts = tmp_path / "p.jsonl"
    pd.DataFrame({"prompt": PROMPTS + ["Name a colour.", "Count to three."]}).to_json(prompts, orient="records",
                                                                                    lines=True)
    args = {"reference": tiny_gpt2, "policy": tiny_gpt2, "prompts": str(prompts), "num_samples": 2,
            "max_new_tokens": 6, "batch_size": 3, "shard_size": 2, "seed": 3, "device": "cpu", "bootstrap": 50,
            "reference_cache": False, "judge": "dualign.world.judge:judge"}
    scorers = [f"reward=hf:{scorer_dirs['reward']},higher_is_better",
               f"cost=beaver:{scorer_dirs['cost']},lower_is_better"]
    one, two = _train_run_dir(tmp_path / "one"), _train_run_dir(tmp_path / "two")
    # an interrupted run with other settings left a shard behind: it is not reused
    stale = one / "eval" / "shards_reference"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text(json.dumps({"seed": 99}))
    pd.DataFrame({"prompt_id": ["x"], "response": ["stale"]}).to_parquet(stale / "0.parquet")
    evaluate(EvaluateConfig(run_dir=str(one), scorers=scorers, **args))

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if k != "reference_cache"]
    _launch(TORCHRUN, _cli_script(["evaluate", *flags, "--no-reference-cache", "--run-dir", str(two),
                                   *[a for s in scorers for a in ("--scorer", s)]]), tmp_path)
    for name in ("reference", "policy"):
        pd.testing.assert_frame_equal(pd.read_parquet(two / "eval" / f"samples_{name}.parquet"),
                                      pd.read_parquet(one / "eval" / f"samples_{name}.parquet"), check_exact=True)
        assert not (two / "eval" / f"shards_{name}").exists()
    assert (json.loads((two / "eval" / "report.json").read_text())
            == json.loads((one / "eval" / "report.json").read_text()))
    assert (two / "evaluate.done").exists() and not (two / ".lock").exists()
    # without shard_size the stage is one random stream, one process: refused under the launcher
    three = _train_run_dir(tmp_path / "three")
    script = tmp_path / "unsharded.py"
    script.write_text(_cli_script(["evaluate", *[f for f in flags if not f.startswith("--shard-size")],
                                   "--no-reference-cache", "--run-dir", str(three),
                                   *[a for s in scorers for a in ("--scorer", s)]]))
    res = subprocess.run([sys.executable, "-m", *TORCHRUN, str(script)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode != 0 and "evaluate stage without shard_size is one process" in res.stderr
    assert not (three / "eval").exists()


def test_two_machines_form_samples_exactly_the_table_of_one(tmp_path, tiny_gpt2):
    """The several-machines command in its CPU form: two torchrun launches, node_rank 0 and 1, one
    process each, meeting at a c10d rendezvous (here both on localhost, as two machines would on a
    shared filesystem); the merged table equals one process's."""
    prompts = tmp_path / "p.jsonl"
    pd.DataFrame({"prompt": PROMPTS}).to_json(prompts, orient="records", lines=True)
    args = {"model": tiny_gpt2, "prompts": str(prompts), "num_samples": 2, "max_new_tokens": 6, "shard_size": 1,
            "batch_size": 4, "seed": 5, "device": "cpu"}
    one, two = tmp_path / "one", tmp_path / "two"
    sample(SampleConfig(**args), one)
    script = tmp_path / "nodes.py"
    script.write_text(_cli_script(["sample", *[f"--{k.replace('_', '-')}={v}" for k, v in args.items()],
                                   "--run-dir", str(two)]))
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--rdzv_backend", "c10d",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes", str(script)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    pd.testing.assert_frame_equal(pd.read_parquet(two / "samples.parquet"), pd.read_parquet(one / "samples.parquet"),
                                  check_exact=True)
    assert json.loads((two / "sample.meta.json").read_text())["processes"] == 2

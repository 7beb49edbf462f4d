"""Data-parallel stages: under torchrun (2 CPU processes, gloo) sample and score write the same
tables, to the last bit, as one process; training under accelerate launch ends with the weights of
one process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from dualign.sample import SampleConfig, sample
from dualign.score import ScoreConfig, score

PROMPTS = ["How do I cook rice?", "Tell me a joke.", "hi", "Write a poem about rain."]


def _launch(launcher: list[str], script: str, tmp_path) -> None:
    """``script`` in each launched process (one launch: the processes start once for every stage)."""
    path = tmp_path / "launched.py"
    path.write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", *launcher, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _cli_script(*commands: list[str]) -> str:
    """A script running ``dualign`` commands one after another, exiting at the first failure."""
    return ("import sys\nfrom dualign.cli import main\n"
            + "".join(f"if main({cmd!r}):\n    sys.exit(1)\n" for cmd in commands))


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory, tiny_gpt2):
    """A tiny GPT-2 sequence classifier (an hf reward) and a Beaver-layout cost model in .bin shards."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from dualign.tiny import save_tiny_score_model

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
                   "shard_size": 1, "batch_size": 4, "seed": 2, "device": "cpu"}
    scorers = [f"reward=hf:{scorer_dirs['reward']},higher_is_better",
               f"cost=beaver:{scorer_dirs['cost']},lower_is_better"]
    one, two = tmp_path / "one", tmp_path / "two"
    sample(SampleConfig(**sample_args), one)
    score(ScoreConfig(scorers=scorers, batch_size=3, device="cpu"), one)

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sample_args.items()]
    _launch(TORCHRUN, _cli_script(["sample", *flags, "--run-dir", str(two)],
                                  ["score", "--run-dir", str(two), "--batch-size", "3", "--device", "cpu",
                                   *[a for s in scorers for a in ("--scorer", s)]]), tmp_path)
    for table in ("samples", "scores"):
        pd.testing.assert_frame_equal(pd.read_parquet(two / f"{table}.parquet"), pd.read_parquet(one / f"{table}.parquet"),
                                      check_exact=True)
    for stage in ("sample", "score"):
        assert json.loads((two / f"{stage}.meta.json").read_text())["processes"] == 2
        assert (two / f"{stage}.done").exists()
    assert not (two / "samples.shards").exists() and not (two / "scores.cache").exists()
    assert not (two / ".lock").exists()

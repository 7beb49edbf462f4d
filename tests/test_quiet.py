"""Third-party noise on the command line: off by default, back with --verbose."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch


@pytest.fixture(scope="module")
def headless_classifier(tmp_path_factory, tiny_gpt2):
    """A BERT encoder saved without its classification head: loading it as a classifier makes
    transformers print a load report (classifier.weight MISSING) and a 'Loading weights' bar."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    root = tmp_path_factory.mktemp("headless")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _score(run_dir, model_dir, *flags: str) -> subprocess.CompletedProcess:
    run_dir.mkdir()
    pd.DataFrame({"prompt_id": ["a", "a"], "prompt": ["hi", "hi"], "response": [" hello", " no"],
                  "sample_index": [0, 1]}).to_parquet(run_dir / "samples.parquet")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRANSFORMERS_", "HF_HUB_DISABLE", "HF_DATASETS_", "DATASETS_"))}
    return subprocess.run([sys.executable, "-m", "dualign", *flags, "score", "--run-dir", str(run_dir),
                           "--scorer", f"r=hf:{model_dir}", "--device", "cpu"],
                          capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_a_model_load_prints_no_load_report_or_bars_unless_verbose(tmp_path, headless_classifier):
    quiet = _score(tmp_path / "quiet", headless_classifier)
    assert quiet.returncode == 0, quiet.stderr
    for noise in ("LOAD REPORT", "MISSING", "Loading weights", "\x1b["):
        assert noise not in quiet.stderr + quiet.stdout

    verbose = _score(tmp_path / "verbose", headless_classifier, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert "LOAD REPORT" in verbose.stderr and "MISSING" in verbose.stderr
    assert "Loading weights" in verbose.stderr

"""The score stage: scorer specs, HF classifiers, Safe-RLHF score models, callables, resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from dualign._infra.errors import ConfigError, InputError
from dualign.cli import main
from dualign.modeling import scoring as score_mod  # the scorers are loaded there
from dualign.modeling.scorers import ScorerSpec, load_scorer, parse_scorer
from dualign.score import ScoreConfig, score, score_table

PROMPTS = ["How do I cook rice?", "hi", "Tell me a joke.", "How can I pick a lock?"]
RESPONSES = [" Rinse it, then simmer.", " Why did the chicken cross the road? To get away.", "", " No."]

SCORER_FILE = '''
def length(prompts, responses):
    return [float(len(r)) - 0.5 * len(p) for p, r in zip(prompts, responses, strict=True)]

def with_nan(prompts, responses):
    return [float("nan") if r == " No." else 1.0 for r in responses]

def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)
'''


@pytest.fixture(scope="module")
def tok(tiny_gpt2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, tok):
    """Tiny one-label GPT-2 and BERT sequence classifiers saved with the tiny tokenizer."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    root = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    models = {
        "gpt2": GPT2ForSequenceClassification(GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, num_labels=1, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)),
        "bert": BertForSequenceClassification(BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)),
    }
    for name, model in models.items():
        model.eval().save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {name: (str(root / name), model) for name, model in models.items()}


def _save_beaver(path, tok, bias: bool, **config_extra):
    """A tiny random LLaMA in Safe-RLHF's LlamaForScore layout: model.* + score_head.*."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    backbone = LlamaModel(cfg).eval()
    head = torch.nn.Linear(32, 1, bias=bias)
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state.update({f"score_head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()})
    path.mkdir(parents=True)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = {**cfg.to_dict(), "architectures": ["LlamaForScore"], "score_dim": 1, "bias": bias,
              "score_type": "cost", **config_extra}
    (path / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(path)
    return backbone, head


def _beaver_by_hand(backbone, head, tok, prompt, response, eos: bool = True):
    """LlamaModel hidden state of the last token of the Beaver-formatted text + eos, @ score_head."""
    text = f"BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
    ids = tok(text)["input_ids"] + ([tok.eos_token_id] if eos else [])
    with torch.no_grad():
        h = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return float(h @ head.weight[0] + (head.bias[0] if head.bias is not None else 0.0))


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(SCORER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "my_scorers.py"


# ------------------------------------------------------------------------------------- specs
def test_parse_scorer_reads_name_kind_target_and_direction():
    assert parse_scorer("reward=hf:/m/rm") == ScorerSpec("reward", "hf", "/m/rm", None)
    assert parse_scorer("cost=beaver:/m/cm,lower_is_better") == ScorerSpec("cost", "beaver", "/m/cm", "lower_is_better")
    assert parse_scorer("u=callable:pkg.mod:fn,higher_is_better") == ScorerSpec("u", "callable", "pkg.mod:fn",
                                                                                "higher_is_better")
    for bad, msg in [("reward", "NAME=KIND:TARGET"), ("r=gpt:/m", "unknown kind 'gpt'"),
                     ("1r=hf:/m", "not a valid column name"), ("r=hf:", "NAME=KIND:TARGET")]:
        with pytest.raises(ConfigError, match=msg):
            parse_scorer(bad)


# ----------------------------------------------------------------------------------- scorers
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_hf_scorer_equals_direct_forward_on_text_pairs(classifiers, tok, arch):
    path, model = classifiers[arch]
    got = load_scorer(parse_scorer(f"r=hf:{path}"), device="cpu")(PROMPTS, RESPONSES)
    with torch.no_grad():
        want = [model(**tok(p, r, return_tensors="pt")).logits[0, 0].item() for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert got == pytest.approx(want, abs=1e-5)
    assert np.std(got) > 0


def test_hf_scorer_template_input_equals_direct_forward_on_templated_text(classifiers, tok):
    path, model = classifiers["gpt2"]
    fn = load_scorer(parse_scorer(f"r=hf:{path}"), device="cpu", hf_input="template", template="beaver")
    with torch.no_grad():
        want = [model(**tok(f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT:{r}", return_tensors="pt"))
                .logits[0, 0].item() for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert fn(PROMPTS, RESPONSES) == pytest.approx(want, abs=1e-5)


def test_hf_scorer_rejects_a_multi_label_classifier(tmp_path, tok):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=1,
                                             num_labels=2)).save_pretrained(tmp_path / "two")
    tok.save_pretrained(tmp_path / "two")
    with pytest.raises(InputError, match="has 2 labels"):
        load_scorer(parse_scorer(f"r=hf:{tmp_path / 'two'}"), device="cpu")


@pytest.mark.parametrize("bias", [True, False])
def test_beaver_scorer_equals_hand_computed_end_score(tmp_path, tok, bias):
    backbone, head = _save_beaver(tmp_path / "cost", tok, bias)
    got = load_scorer(parse_scorer(f"cost=beaver:{tmp_path / 'cost'}"), device="cpu")(PROMPTS, RESPONSES)
    want = [_beaver_by_hand(backbone, head, tok, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert got == pytest.approx(want, abs=1e-5)
    assert np.std(got) > 0


def test_truncated_responses_are_scored_without_an_eos(tmp_path, tok, tiny_gpt2):
    backbone, head = _save_beaver(tmp_path / "cost", tok, True)
    cut = [True, False, True, False]
    table = pd.DataFrame({"prompt": PROMPTS, "response": RESPONSES, "truncated": cut})
    got = score_table(table, [f"cost=beaver:{tmp_path / 'cost'}"], device="cpu", progress=False)["cost"]
    want = [_beaver_by_hand(backbone, head, tok, p, r, eos=not c) for p, r, c in zip(PROMPTS, RESPONSES, cut, strict=True)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    # an implicit reward of π_ref itself is 0 when log π and log π_ref agree on the (absent) eos
    from dualign.modeling.models import (
        load_causal_lm,
        load_tokenizer,
        sequence_logprobs,
        tokenize_pairs,
    )
    from dualign.modeling.templates import format_prompt

    gpt_tok = load_tokenizer(tiny_gpt2)
    enc = tokenize_pairs(gpt_tok, [format_prompt(p, "plain") for p in PROMPTS], RESPONSES, truncated=cut)
    with torch.no_grad():
        ref = sequence_logprobs(load_causal_lm(tiny_gpt2, device="cpu").eval(), **enc).numpy()
    h = score_table(table.assign(ref_logprob=ref), [f"h=implicit:{tiny_gpt2},beta=1"], device="cpu",
                    template="plain", progress=False)["h"]
    assert h.tolist() == pytest.approx([0.0] * 4, abs=1e-5)


def test_beaver_cost_scorer_scales_by_config_std_when_do_normalize(tmp_path, tok):
    backbone, head = _save_beaver(tmp_path / "cost", tok, True, do_normalize=True, mean=[3.0], var=[4.0])
    got = load_scorer(parse_scorer(f"cost=beaver:{tmp_path / 'cost'}"), device="cpu")(PROMPTS, RESPONSES)
    want = [_beaver_by_hand(backbone, head, tok, p, r) / 2.0 for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert got == pytest.approx(want, abs=1e-5)


def test_beaver_scorer_rejects_weights_without_score_head(tmp_path, tiny_llama):
    with pytest.raises(InputError, match="no score_head.weight"):
        load_scorer(parse_scorer(f"cost=beaver:{tiny_llama}"), device="cpu")


def test_score_table_adds_callable_scores_in_row_order_across_batches(scorer_module):
    df = pd.DataFrame({"prompt_id": [0, 0, 1, 1], "prompt": PROMPTS, "response": RESPONSES})
    out = score_table(df, ["len=callable:my_scorers:length", f"len2=callable:{scorer_module}:length"],
                      batch_size=3, progress=False)
    want = [len(r) - 0.5 * len(p) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert out["len"].tolist() == want and out["len2"].tolist() == want
    assert out.columns.tolist() == ["prompt_id", "prompt", "response", "len", "len2"]
    assert "len" not in df.columns


@pytest.mark.parametrize("func, message", [
    ("with_nan", r"scorer 'bad': score nan at row 3 is not finite"),
    ("too_few", r"scorer 'bad': returned 1 scores for a batch of 2 responses"),
])
def test_score_table_rejects_nonfinite_or_missing_scores_naming_scorer_and_row(scorer_module, func, message):
    df = pd.DataFrame({"prompt": PROMPTS, "response": RESPONSES})
    with pytest.raises(InputError, match=message):
        score_table(df, [f"bad=callable:my_scorers:{func}"], batch_size=2, progress=False)


# ----------------------------------------------------------------------------- stage + resume
def _samples(run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"prompt_id": ["a", "a", "b", "b"], "prompt": PROMPTS, "response": RESPONSES,
                       "sample_index": [0, 1, 0, 1], "ref_logprob": [-1.0, -2.0, -3.0, -4.0]})
    df.to_parquet(run_dir / "samples.parquet", index=False)
    return df


def test_score_resumes_without_redoing_finished_scorers(tmp_path, tok, classifiers, scorer_module, monkeypatch):
    samples = _samples(tmp_path)
    _save_beaver(tmp_path / "cost_model", tok, True)
    cfg = ScoreConfig(scorers=[f"reward=hf:{classifiers['bert'][0]},higher_is_better",
                               f"cost=beaver:{tmp_path / 'cost_model'}", "bad=callable:my_scorers:with_nan"],
                      device="cpu")
    loads = []
    real = score_mod.load_scorer
    monkeypatch.setattr(score_mod, "load_scorer", lambda spec, **kw: (loads.append(spec.name), real(spec, **kw))[1])
    with pytest.raises(InputError, match="scorer 'bad'"):
        score(cfg, tmp_path)
    assert not (tmp_path / "scores.parquet").exists()

    loads.clear()
    cfg.scorers[2] = "len=callable:my_scorers:length"
    out = pd.read_parquet(score(cfg, tmp_path))
    assert loads == ["len"]  # reward and cost came from the cache
    pd.testing.assert_frame_equal(out[samples.columns], samples)
    direct = score_table(samples, cfg.scorers, device="cpu", progress=False)
    for col in ("reward", "cost", "len"):
        assert out[col].to_numpy() == pytest.approx(direct[col].to_numpy(), abs=1e-6)
    meta = json.loads((tmp_path / "score.meta.json").read_text())
    assert meta["scorers"]["reward"]["direction"] == "higher_is_better"
    assert meta["scorers"]["cost"]["direction"] == "lower_is_better"  # from the model's score_type
    assert not (tmp_path / "scores.cache").exists()


def test_cli_score_writes_scores_and_rejects_bad_input_in_one_line(tmp_path, scorer_module, capsys):
    _samples(tmp_path / "run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{scorer_module.parent}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "dualign", "score", "--run-dir", str(tmp_path / "run"),
                          "--scorer", "len=callable:my_scorers:length", "--scorers",
                          f"u=callable:{scorer_module}:length,lower_is_better"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    assert out["len"].tolist() == out["u"].tolist() == [len(r) - 0.5 * len(p) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert (tmp_path / "run" / "score.config.yaml").exists()

    # in-process (a second interpreter start costs seconds); main() is what the console script runs
    _samples(tmp_path / "bad")
    code = main(["score", "--run-dir", str(tmp_path / "bad"), "--scorer", "bad=callable:my_scorers:with_nan"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "scorer 'bad'" in err
    assert not (tmp_path / "bad" / "scores.parquet").exists()


def _bert_heads(root, tok, n_heads: int, share: bool) -> list[str]:
    """Tiny BERT classifiers on one encoder (pooler and classifier of their own), or on different ones."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg)
    paths = []
    for i in range(n_heads):
        torch.manual_seed(10 + i)
        model = BertForSequenceClassification(cfg)
        if share:
            model.bert.embeddings.load_state_dict(base.bert.embeddings.state_dict())
            model.bert.encoder.load_state_dict(base.bert.encoder.state_dict())
        model.eval().save_pretrained(root / f"head{i}")
        tok.save_pretrained(root / f"head{i}")
        paths.append(str(root / f"head{i}"))
    return paths


@pytest.mark.parametrize("share", [True, False])
def test_hf_scorers_on_one_encoder_run_it_once_and_equal_each_scorer_alone(tmp_path, tok, share, monkeypatch):
    from dualign.modeling.scorers import SharedEncoderScorers

    paths = _bert_heads(tmp_path, tok, 3, share)
    specs = [f"s{i}=hf:{p}" for i, p in enumerate(paths)]
    alone = {f"s{i}": load_scorer(parse_scorer(s), device="cpu")(PROMPTS * 5, RESPONSES * 5)
             for i, s in enumerate(specs)}
    runs = []
    original = SharedEncoderScorers.__call__
    monkeypatch.setattr(SharedEncoderScorers, "__call__", lambda self, p, r: runs.append(len(p)) or original(self, p, r))
    table = score_table(pd.DataFrame({"prompt": PROMPTS * 5, "response": RESPONSES * 5}), specs, batch_size=8,
                        device="cpu", progress=False)
    for name, values in alone.items():
        np.testing.assert_allclose(table[name].to_numpy(), values, rtol=1e-5, atol=1e-6)
    assert (runs == [8, 8, 4]) == share       # one grouped call per batch only where the encoder is shared


def test_shared_trunk_is_the_largest_module_with_equal_weights(tmp_path, tok):
    from transformers import AutoModelForSequenceClassification

    from dualign.modeling.scorers import shared_trunk

    a, b = (AutoModelForSequenceClassification.from_pretrained(p) for p in _bert_heads(tmp_path, tok, 2, True))
    assert shared_trunk(a, b) == "bert.encoder"   # the pooler and classifier are each model's own
    c = AutoModelForSequenceClassification.from_pretrained(_bert_heads(tmp_path / "x", tok, 1, False)[0])
    assert shared_trunk(a, c) is None

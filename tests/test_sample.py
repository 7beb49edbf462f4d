"""The sample stage: prompt readers, generation, reference log-probs, resume, CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from dualign import sample as sample_mod
from dualign._infra.errors import InputError
from dualign.cli import main
from dualign.data.prompts import load_prompts
from dualign.modeling.models import (
    load_causal_lm,
    load_tokenizer,
    sequence_logprobs,
    tokenize_pairs,
)
from dualign.modeling.templates import format_prompt
from dualign.sample import SampleConfig, generate_responses, sample
from dualign.train import TrainConfig

PROMPTS = ["How do I cook rice?", "Tell me a joke.", "Write a poem about rain.", "hi", "How can I pick a lock?"]


def _write_jsonl(path, rows):
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return path


# ------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_load_prompts_reads_each_file_format_alike(tmp_path, suffix):
    df = pd.DataFrame({"pid": ["x1", "x2"], "text": ["first", "second"], "other": [1, 2]})
    path = tmp_path / f"p{suffix}"
    {".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(path), ".csv": lambda: df.to_csv(path, index=False)}[suffix]()
    out = load_prompts(path, prompt_column="text", id_column="pid")
    assert out.columns.tolist() == ["prompt_id", "prompt"]
    assert out["prompt_id"].tolist() == ["x1", "x2"]
    assert out["prompt"].tolist() == ["first", "second"]


def test_load_prompts_ids_default_to_prompt_id_column_else_row_number(tmp_path):
    with_ids = _write_jsonl(tmp_path / "a.jsonl", [{"prompt_id": 7, "prompt": "a"}, {"prompt_id": 3, "prompt": "b"}])
    assert load_prompts(with_ids)["prompt_id"].tolist() == [7, 3]
    no_ids = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": p} for p in PROMPTS])
    out = load_prompts(no_ids, max_prompts=2)
    assert out["prompt_id"].tolist() == [0, 1]
    assert out["prompt"].tolist() == PROMPTS[:2]


def test_load_prompts_reads_saved_dataset_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["t1", "t2"]}),
                               "test": datasets.Dataset.from_dict({"prompt": ["e1"]})})
    dd.save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds", split="test")["prompt"].tolist() == ["e1"]
    with pytest.raises(InputError, match="no split 'dev'.*train, test"):
        load_prompts(tmp_path / "ds", split="dev")


@pytest.mark.parametrize("rows, kwargs, message", [
    ([{"text": "a"}], {}, r"no prompt column 'prompt' \(columns present: text\)"),
    ([{"prompt": "a"}, {"prompt": "  "}], {}, "row 2: prompt column 'prompt' is empty"),
    ([{"prompt": "a"}, {"prompt": None}], {}, "row 2: prompt column 'prompt' is missing"),
    ([{"prompt": "a", "id": 1}, {"prompt": "b", "id": 2}, {"prompt": "c", "id": 1}], {"id_column": "id"},
     r"duplicate prompt id 1 \(rows 1 and 3\)"),
    ([{"prompt": "a"}], {"id_column": "key"}, "no id column 'key'"),
])
def test_load_prompts_rejects_bad_rows_naming_them(tmp_path, rows, kwargs, message):
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(InputError, match=message):
        load_prompts(path, **kwargs)


def test_load_prompts_rejects_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty"):
        load_prompts(tmp_path / "empty.jsonl")


# --------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def loaded(tiny_gpt2, tiny_llama):
    return {name: (load_causal_lm(path, device="cpu"), load_tokenizer(path))
            for name, path in (("gpt2", tiny_gpt2), ("llama", tiny_llama))}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_responses_shape_and_seed_determinism(loaded, arch):
    model, tok = loaded[arch]
    kw = {"max_new_tokens": 6, "batch_size": 4, "progress": False}
    a = generate_responses(model, tok, PROMPTS[:3], ["a", "b", "c"], 3, seed=1, **kw)
    b = generate_responses(model, tok, PROMPTS[:3], ["a", "b", "c"], 3, seed=1, **kw)
    c = generate_responses(model, tok, PROMPTS[:3], ["a", "b", "c"], 3, seed=2, **kw)
    assert a.columns.tolist() == ["prompt_id", "prompt", "response", "sample_index", "ref_logprob",
                                  "response_tokens", "truncated"]
    assert a["prompt_id"].tolist() == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert a["sample_index"].tolist() == [0, 1, 2] * 3
    assert a["prompt"].tolist() == [p for p in PROMPTS[:3] for _ in range(3)]
    pd.testing.assert_frame_equal(a, b)
    assert a["response"].tolist() != c["response"].tolist()
    assert a["response"].nunique() > 1  # K samples of one prompt differ


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ref_logprob_equals_direct_sequence_logprobs(loaded, arch):
    model, tok = loaded[arch]
    df = generate_responses(model, tok, PROMPTS, list(range(5)), 2, max_new_tokens=8, batch_size=3,
                            seed=0, progress=False)
    for row in df.itertuples():
        batch = tokenize_pairs(tok, [format_prompt(row.prompt, "auto", tok)], [row.response],
                               truncated=[row.truncated])
        with torch.no_grad():
            direct = sequence_logprobs(model, **batch).item()
        assert row.ref_logprob == pytest.approx(direct, abs=1e-4)
        eos = 0 if row.truncated else 1  # a response cut by max_new_tokens never sampled an eos
        assert row.response_tokens == len(tok(row.response, add_special_tokens=False)["input_ids"]) + eos


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_generation_equals_one_by_one_when_greedy(loaded, arch):
    model, tok = loaded[arch]
    kw = {"temperature": 0.0, "max_new_tokens": 8, "progress": False}
    batched = generate_responses(model, tok, PROMPTS, list(range(5)), 1, batch_size=5, **kw)
    single = generate_responses(model, tok, PROMPTS, list(range(5)), 1, batch_size=1, **kw)
    assert batched["response"].tolist() == single["response"].tolist()
    assert batched["ref_logprob"].to_numpy() == pytest.approx(single["ref_logprob"].to_numpy(), abs=1e-4)


def test_sampling_draws_from_the_full_distribution_not_top_k(loaded):
    # transformers' default top_k=50 would allow at most 50 distinct one-token responses; the tiny
    # model is close to uniform over 400 tokens, so 128 exact samples give about 110
    model, tok = loaded["gpt2"]
    df = generate_responses(model, tok, ["hi"], [0], 128, max_new_tokens=1, batch_size=128, progress=False)
    assert df["response"].nunique() > 60


def test_responses_stop_at_eos(tiny_gpt2):
    model, tok = load_causal_lm(tiny_gpt2, device="cpu"), load_tokenizer(tiny_gpt2)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 50.0  # eos is then all but certain at every step
    model.lm_head = head
    df = generate_responses(model, tok, PROMPTS[:2], [0, 1], 2, max_new_tokens=8, progress=False)
    assert df["response"].tolist() == [""] * 4
    assert df["response_tokens"].tolist() == [1] * 4
    assert df["ref_logprob"].to_numpy() == pytest.approx(0.0, abs=1e-6)


def _eos_biased(path: str, bias: float):
    """The tiny model with ``bias`` added to eos's logit at every step."""
    model, tok = load_causal_lm(path, device="cpu"), load_tokenizer(path)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = bias
    model.lm_head = head
    return model, tok


def test_truncated_responses_are_marked_and_scored_without_an_invented_eos(tiny_gpt2):
    from dualign.methods.pairs import validate_pairs
    from dualign.modeling.batches import encode_pairs, fill_ref_logps
    from dualign.train import _accelerator

    model, tok = _eos_biased(tiny_gpt2, 5.0)  # eos about a third of the time: some responses end, some are cut
    df = generate_responses(model, tok, PROMPTS, list(range(5)), 4, max_new_tokens=3, template="plain",
                            seed=0, progress=False)
    assert df["truncated"].any() and not df["truncated"].all()
    with_eos = tokenize_pairs(tok, [format_prompt(p, "plain") for p in df.prompt], list(df.response))
    assert (df["response_tokens"] == with_eos["response_mask"].sum(-1).numpy() - df["truncated"]).all()
    # train computes log π_ref of the same responses as sample did: eos only where one was sampled
    pairs = pd.DataFrame({"prompt_id": df.prompt_id, "prompt": df.prompt, "response_a": df.response,
                          "response_b": df.response, "target_margin": 0.0, "truncated_a": df.truncated,
                          "truncated_b": df.truncated})
    data = encode_pairs(validate_pairs(pairs), tok, "plain", max_length=64)
    fill_ref_logps(model, data, torch.arange(len(df)), tok.pad_token_id, 8, _accelerator(TrainConfig(
        model=tiny_gpt2, run_dir="unused", device="cpu")))
    assert data.ref_logps[:len(df)].numpy() == pytest.approx(df["ref_logprob"].to_numpy(), abs=1e-4)


# ----------------------------------------------------------------------------- stage + resume
def _cfg(model, prompts, **kw):
    base = {"num_samples": 2, "max_new_tokens": 6, "batch_size": 3, "shard_size": 2, "seed": 5}
    return SampleConfig(model=model, prompts=str(prompts), **{**base, **kw})


def test_sample_resumed_after_interruption_equals_uninterrupted_run(tmp_path, tiny_model, monkeypatch):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    cfg = _cfg(tiny_model, prompts)
    full = pd.read_parquet(sample(cfg, tmp_path / "full"))
    assert len(full) == 10 and full["prompt_id"].tolist() == [i for i in range(5) for _ in range(2)]

    calls = []
    real = sample_mod.generate_responses

    def dies_on_second_shard(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill after shard 0 was written
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_mod, "generate_responses", dies_on_second_shard)
    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        sample(cfg, run)
    assert (run / "samples.shards" / "0.parquet").exists()
    assert not (run / "samples.parquet").exists()
    calls.clear()
    monkeypatch.setattr(sample_mod, "generate_responses", lambda *a, **k: (calls.append(k["seed"]), real(*a, **k))[1])
    resumed = pd.read_parquet(sample(cfg, run))
    assert calls == [6, 7]  # shards 1 and 2 only, seeded seed + shard index
    pd.testing.assert_frame_equal(resumed, full)
    assert not (run / "samples.shards").exists()
    assert (run / "sample.meta.json").exists() and (run / "sample.config.yaml").exists()


def test_sample_refuses_to_resume_shards_of_another_config(tmp_path, tiny_gpt2, monkeypatch):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_mod, "generate_responses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample(_cfg(tiny_gpt2, prompts), tmp_path / "run")
    with pytest.raises(InputError, match="different config .*temperature"):
        sample(_cfg(tiny_gpt2, prompts, temperature=0.5), tmp_path / "run")


# ------------------------------------------------------------------------------------------ CLI
def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dualign", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_sample_writes_samples_and_rejects_bad_input_in_one_line(tmp_path, tiny_llama, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    cfg = tmp_path / "sample.yaml"
    cfg.write_text(f"model: {tiny_llama}\nprompts: {prompts}\nnum_samples: 2\n")
    res = _cli("sample", cfg, "--run-dir", tmp_path / "run", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    df = pd.read_parquet(tmp_path / "run" / "samples.parquet")
    assert len(df) == 6 and df["response_tokens"].between(1, 30).all()

    # in-process (a second interpreter start costs seconds); main() is what the console script runs
    code = main(["sample", str(cfg), "--run-dir", str(tmp_path / "bad"), "--prompts", str(tmp_path / "nope.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "nope.jsonl' does not exist" in err
    assert not (tmp_path / "bad").exists()

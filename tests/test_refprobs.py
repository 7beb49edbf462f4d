"""log π_ref on the trainer's numerics: the sample stage's column equals train's own forward pass
at step 0, its record says how it was computed, and train refuses or recomputes a differing one."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from dualign import sample as sample_mod
from dualign._infra.errors import InputError
from dualign._infra.io import write_table
from dualign.data.records import DualRecord, write_dual
from dualign.modeling.refprobs import mismatch, record, trainer_numerics
from dualign.sample import SampleConfig, sample
from dualign.train import TrainConfig, reference_logprobs, train

PROMPTS = ["How do I cook rice?", "Tell me a joke.", "Write a poem about rain."]
DUAL = DualRecord(beta=0.1, reward="reward", constraints=["cost<=ref-0.5"], lambdas={"cost": 0.5},
                  columns={"cost": "cost"}, feasible=True, converged=True, iterations=3, dual_value=1.0,
                  thresholds={"cost": 0.1}, predicted={"reward": 0.9, "cost": 0.1, "kl": 0.4},
                  reference={"reward": 0.2, "cost": 0.6, "kl": 0.0})


def _sample(tmp_path, model, run="run", **kw):
    prompts = tmp_path / "p.jsonl"
    pd.DataFrame({"prompt": PROMPTS}).to_json(prompts, orient="records", lines=True)
    cfg = SampleConfig(model=model, prompts=str(prompts), num_samples=2, max_new_tokens=8, batch_size=4,
                       shard_size=2, seed=3, template="plain", device="cpu", **kw)
    return pd.read_parquet(sample(cfg, tmp_path / run)), tmp_path / run


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sampled_ref_logprobs_equal_trains_forward_at_step_0_and_are_recorded(tmp_path, tiny_gpt2, dtype,
                                                                              monkeypatch):
    """float32 on the CPU is train's numerics, so log π_ref comes from the sampler's own pass; float64
    generation is not, so a second pass with a float32 copy of π_ref computes it. Either way it is
    what train computes."""
    second_pass = []
    real = sample_mod.reference_logprobs
    monkeypatch.setattr(sample_mod, "reference_logprobs", lambda *a, **k: (second_pass.append(1), real(*a, **k))[1])
    samples, run_dir = _sample(tmp_path, tiny_gpt2, dtype=dtype)
    assert bool(second_pass) == (dtype == "float64")
    assert samples["ref_logprob"].notna().all() and (samples["response_tokens"] > 0).all()
    pairs = pd.DataFrame({"prompt_id": samples["prompt_id"], "prompt": samples["prompt"],
                          "response_a": samples["response"], "response_b": samples["response"][::-1].to_numpy(),
                          "truncated_a": samples["truncated"], "truncated_b": samples["truncated"][::-1].to_numpy(),
                          "target_margin": 0.0})
    ref_a, _, _ = reference_logprobs(TrainConfig(model=tiny_gpt2, run_dir=str(run_dir), template="plain",
                                                 max_length=512, device="cpu"), pairs)
    np.testing.assert_allclose(samples["ref_logprob"].to_numpy(), ref_a, rtol=0, atol=1e-5)
    meta = json.loads((run_dir / "sample.meta.json").read_text())
    assert meta["ref_logprob"] == {"model": tiny_gpt2, "revision": None, "template": "plain", "dtype": "float32",
                                   "autocast": None, "quantization": None}
    assert not (run_dir / "samples.shards").exists()


def test_mismatch_names_the_first_differing_key():
    numerics = trainer_numerics("cpu")
    want = record("m", None, "plain", numerics)
    assert mismatch(want, want) is None
    assert mismatch({**want, "dtype": "bfloat16"}, want) == "dtype: 'bfloat16' -> 'float32'"
    assert mismatch({**want, "model": "other", "autocast": "bfloat16"}, want) == "model: 'other' -> 'm'"
    assert mismatch(None, want) == "no record of how they were computed"
    assert trainer_numerics("cpu", load_in_4bit=True)["quantization"] == "bnb-nf4"


def test_train_reuses_a_matching_record_recomputes_a_differing_one_and_reuse_refuses_it(tmp_path, tiny_gpt2):
    """The sampled column reused equals train computing it (the same run to 1e-6); then the column is
    perturbed per row so that reusing it shows in the weights."""
    samples, run_dir = _sample(tmp_path, tiny_gpt2)
    rng = np.random.default_rng(0)
    sampled = samples.assign(reward=rng.normal(size=len(samples)), cost=rng.normal(size=len(samples)))
    perturbed = sampled.assign(ref_logprob=samples["ref_logprob"] + rng.normal(scale=0.5, size=len(samples)))
    meta_path = run_dir / "sample.meta.json"
    meta = json.loads(meta_path.read_text())

    def run(name: str, ref_logprobs: str, recorded: dict | None, scores: pd.DataFrame = perturbed):
        d = tmp_path / name
        write_table(scores, d / "scores.parquet")
        write_dual(DUAL, d / "dual.json")
        (d / "sample.meta.json").write_text(json.dumps({**meta, "ref_logprob": recorded}))
        train(TrainConfig(model=tiny_gpt2, run_dir=str(d), template="plain", max_length=64, max_steps=2,
                          per_device_batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, device="cpu",
                          ref_logprobs=ref_logprobs))
        return load_file(str(d / "policy" / "model.safetensors"))

    def diff(a, b):
        return max((a[k].double() - b[k].double()).abs().max().item() for k in a)

    bf16 = {**meta["ref_logprob"], "dtype": "bfloat16"}
    computed = run("compute", "compute", meta["ref_logprob"])
    # Adam turns the ~1e-6 rounding of a differently batched forward into ~1e-5 on the weights
    assert diff(run("sampled", "auto", meta["ref_logprob"], sampled), computed) < 3e-5
    reused = run("reused", "auto", meta["ref_logprob"])
    recomputed = run("recomputed", "auto", bf16)
    assert diff(reused, computed) > 1e-3  # the perturbed column was used
    assert diff(recomputed, computed) < 1e-6  # it was not: log π_ref was computed again
    with pytest.raises(InputError, match=r"sample.meta.json: .*\(dtype: 'bfloat16' -> 'float32'\).*reuse refuses"):
        run("refused", "reuse", bf16)
    assert not (tmp_path / "refused" / "train.meta.json").exists()  # refused before train wrote anything


def test_load_in_4bit_is_refused_on_the_cpu_before_anything_is_written(tmp_path, tiny_gpt2):
    from dualign._infra.errors import ConfigError

    with pytest.raises(ValueError, match="needs lora: true and merge_lora: false"):
        TrainConfig(model=tiny_gpt2, run_dir=str(tmp_path), load_in_4bit=True)
    cfg = TrainConfig(model=tiny_gpt2, run_dir=str(tmp_path / "run"), load_in_4bit=True, lora=True,
                      merge_lora=False, device="cpu", template="plain")
    write_table(pd.DataFrame({"prompt_id": [0], "prompt": ["a"], "response_a": ["b"], "response_b": ["c"],
                              "target_margin": [1.0]}), tmp_path / "pairs.parquet")
    cfg.pairs = str(tmp_path / "pairs.parquet")
    with pytest.raises(ConfigError, match="load_in_4bit.*need a CUDA GPU"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_shards_with_log_probs_of_other_numerics_are_not_resumed(tmp_path, tiny_gpt2, monkeypatch):
    """A run directory moved from the CPU to a GPU mid-way would mix float32 and bf16-autocast
    log π_ref under one record: refused."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_mod, "generate_responses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _sample(tmp_path, tiny_gpt2)
    gpu = {"dtype": "float32", "autocast": "bfloat16", "quantization": None}
    monkeypatch.setattr(sample_mod, "trainer_numerics", lambda device: gpu)
    with pytest.raises(InputError, match=r"different config \(ref_logprob_numerics differ\)"):
        _sample(tmp_path, tiny_gpt2)

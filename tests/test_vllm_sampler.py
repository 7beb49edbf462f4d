"""The vLLM backend without vLLM: the up-front refusal, and the pure conversions (requests, seeds,
engine arguments, completions → samples table) on real token ids and a real PEFT adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from dualign._infra.errors import ConfigError
from dualign.modeling import vllm_sampler
from dualign.modeling.models import load_causal_lm, load_tokenizer
from dualign.modeling.vllm_sampler import (
    engine_args,
    outputs_to_table,
    prompt_token_ids,
    request_seeds,
    sampling_kwargs,
)
from dualign.sample import SampleConfig, generate_responses, sample

PROMPTS = ["How do I cook rice?", "Tell me a joke.", "hi"]


def _prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    pd.DataFrame({"prompt": PROMPTS}).to_json(path, orient="records", lines=True)
    return path


@pytest.mark.skipif(vllm_sampler.importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_is_refused_in_one_line_before_anything_is_written(tmp_path, tiny_gpt2,
                                                                                     monkeypatch):
    cfg = SampleConfig(model=tiny_gpt2, prompts=str(_prompts(tmp_path)), backend="vllm")
    with pytest.raises(ConfigError, match=r"^config key 'backend': vllm is not installed \(pip install "
                                          r"'dualign\[vllm\]'\)") as e:
        sample(cfg, tmp_path / "run")
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
    # installed but no GPU: the other line
    monkeypatch.setattr(vllm_sampler.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(vllm_sampler.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="vllm needs a CUDA GPU and none is visible"):
        sample(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(vllm_sampler.importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_cli_sample_backend_vllm_exits_2_with_one_line(tmp_path, tiny_gpt2):
    res = subprocess.run([sys.executable, "-m", "dualign", "sample", "--model", tiny_gpt2, "--prompts",
                          str(_prompts(tmp_path)), "--run-dir", str(tmp_path / "run"), "--backend", "vllm"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "vllm is not installed" in res.stderr


def test_tensor_parallel_needs_the_vllm_backend(tiny_gpt2):
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 needs backend: vllm"):
        SampleConfig(model=tiny_gpt2, prompts="p.jsonl", tensor_parallel_size=2)


def test_completions_decode_into_the_table_the_hf_backend_writes(tiny_gpt2):
    """HF generate's own token ids, converted as vLLM's would be, give the HF backend's table: the
    same prompt ids fed in, the same cut at eos, the same text and truncation flags."""
    tok = load_tokenizer(tiny_gpt2)
    model = load_causal_lm(tiny_gpt2, device="cpu")
    captured = []
    real = model.generate
    model.generate = lambda **kw: captured.append((kw, real(**kw))) or captured[-1][1]
    k = 3
    hf = generate_responses(model, tok, PROMPTS, ["a", "b", "c"], k, template="plain", max_new_tokens=6,
                            batch_size=len(PROMPTS) * k, seed=1, progress=False)
    (kw, out), = captured
    width = kw["input_ids"].shape[1]
    fed = [row[mask.bool()].tolist() for row, mask in zip(kw["input_ids"], kw["attention_mask"], strict=True)]
    assert fed == [ids for ids in prompt_token_ids(PROMPTS, "plain", tok) for _ in range(k)]
    stop = [tok.eos_token_id]
    completions = [[out[i * k + j, width:].tolist() for j in range(k)] for i in range(len(PROMPTS))]
    table = outputs_to_table(PROMPTS, ["a", "b", "c"], completions, stop, tok)
    cols = ["prompt_id", "prompt", "response", "sample_index", "truncated"]
    pd.testing.assert_frame_equal(table[cols], hf[cols])
    assert hf["truncated"].any() and table["ref_logprob"].isna().all() and (table["response_tokens"] == 0).all()


def test_request_seeds_depend_on_the_shard_seed_and_the_prompts_place_alone():
    seeds = request_seeds(5, 4)
    assert seeds[:3] == request_seeds(5, 3) and len(set(seeds)) == 4
    assert set(seeds).isdisjoint(request_seeds(6, 4))
    assert all(0 <= s < 2**31 for s in seeds)


def test_sampling_kwargs_draw_k_samples_from_pi_ref_and_stop_only_at_the_stop_ids():
    assert sampling_kwargs(8, 256, 1.0, 1.0, 7, [2, 32000]) == {
        "n": 8, "max_tokens": 256, "temperature": 1.0, "top_p": 1.0, "seed": 7, "stop_token_ids": [2, 32000],
        "detokenize": False}


def test_engine_args_serve_a_lora_adapter_as_its_base_model(tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plain, adapter = engine_args(tiny_llama, None, "auto", 3, 2, 0.5, False)
    assert adapter is None and "enable_lora" not in plain
    assert plain == {"model": tiny_llama, "tokenizer": tiny_llama, "revision": None, "dtype": "bfloat16", "seed": 3,
                     "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "trust_remote_code": False}
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(tmp_path / "policy")
    base = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())["base_model_name_or_path"]
    kwargs, adapter = engine_args(str(tmp_path / "policy"), None, "float16", 0, 1, 0.9, False, processes=2)
    assert base == tiny_llama and kwargs["model"] == tiny_llama and kwargs["dtype"] == "float16"
    assert kwargs["enable_lora"] and kwargs["max_lora_rank"] == 4 and kwargs["max_loras"] == 1
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert adapter == {"name": "policy", "path": str((tmp_path / "policy").resolve()), "rank": 4}

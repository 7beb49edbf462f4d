"""The sample stage's vLLM backend (``sample.backend: vllm``; ``pip install 'dualign[vllm]'``, a CUDA GPU).

The same templates, per-shard seeds and resumable shards as the HF backend: prompts are templated
and tokenized here exactly as :func:`dualign.sample.generate_responses` does and handed to vLLM as
token ids; each prompt is one request of ``n = K`` samples with its own seed, drawn from the shard's
seed and the prompt's place in the shard (:func:`request_seeds`), so a shard's responses do not
depend on how vLLM batches requests or which process runs the shard. The two engines draw
different samples for the same seed (different kernels and random streams), so a run directory
keeps one backend (it is part of the shards' resume key).

Each completion's token ids are cut at the first stop id and decoded as the HF backend decodes
them (:func:`completion_rows`); ``truncated`` means no stop id came within ``max_new_tokens``.
log π_ref is not taken from vLLM: the table leaves ``ref_logprob`` NaN and the sample stage's
second pass computes it on the trainer's numerics (:mod:`dualign.modeling.refprobs`).

A model directory holding a PEFT LoRA adapter (``adapter_config.json``) is served as its base model
with the adapter applied per request through vLLM's ``LoRARequest`` (:func:`engine_args`).
Tensor parallelism and the engine's share of GPU memory are vLLM's own ``tensor_parallel_size``
and ``gpu_memory_utilization``.

vllm is imported only inside :class:`VLLMSampler`; everything else here is plain Python, tested
without it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dualign._infra.errors import ConfigError, InputError
from dualign.modeling.models import stop_ids
from dualign.modeling.templates import format_prompt


def check_vllm() -> None:
    """Refuse ``backend: vllm`` in one line, before anything is loaded or written, when vllm is not
    installed or no CUDA GPU is visible."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("config key 'backend': vllm is not installed (pip install 'dualign[vllm]'); "
                          "backend: hf samples without it")
    if not torch.cuda.is_available():
        raise ConfigError("config key 'backend': vllm needs a CUDA GPU and none is visible; backend: hf "
                          "samples on the CPU")


def request_seeds(shard_seed: int, n: int) -> list[int]:
    """One 31-bit seed per prompt of a shard: SeedSequence([shard_seed, j]) for the j-th prompt, a
    function of the shard and the prompt's place in it alone."""
    return [int(np.random.SeedSequence([shard_seed, j]).generate_state(1)[0] >> 1) for j in range(n)]


def prompt_token_ids(prompts: list[str], template: str, tokenizer) -> list[list[int]]:
    """The templated prompts' token ids, as the HF backend feeds them to ``generate``."""
    return [tokenizer(format_prompt(p, template, tokenizer), add_special_tokens=True)["input_ids"]
            for p in prompts]


def completion_rows(token_ids: list[int], stop_ids: list[int], tokenizer) -> tuple[str, bool]:
    """(response text, truncated) of one completion: cut at the first stop id, decoded without
    special tokens; truncated when no stop id was sampled."""
    cut = next((j for j, t in enumerate(token_ids) if t in stop_ids), None)
    return tokenizer.decode(list(token_ids[:cut]), skip_special_tokens=True), cut is None


def outputs_to_table(prompts: list[str], prompt_ids: list, completions: list[list[list[int]]],
                     stop_ids: list[int], tokenizer) -> pd.DataFrame:
    """The long samples table (docs/formats.md, prompt-major, ``sample_index`` 0..K-1) of the K
    completions' token ids of each prompt; ``ref_logprob`` NaN and ``response_tokens`` 0 until the
    log π_ref pass fills them."""
    if not len(prompts) == len(prompt_ids) == len(completions):
        raise InputError(f"{len(prompts)} prompts, {len(prompt_ids)} prompt ids, {len(completions)} outputs")
    rows = [(i, k, *completion_rows(ids, stop_ids, tokenizer))
            for i, outs in enumerate(completions) for k, ids in enumerate(outs)]
    return pd.DataFrame({
        "prompt_id": [prompt_ids[i] for i, *_ in rows],
        "prompt": [prompts[i] for i, *_ in rows],
        "response": [text for *_, text, _ in rows],
        "sample_index": [k for _, k, *_ in rows],
        "ref_logprob": np.nan,
        "response_tokens": 0,
        "truncated": [cut for *_, cut in rows],
    })


def sampling_kwargs(num_samples: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                    stop_ids: list[int]) -> dict[str, Any]:
    """``SamplingParams`` of one prompt: K samples from π_ref itself (no top-k; nucleus only when
    ``top_p < 1``), stopping at the model's stop ids and nowhere else; token ids only (the text is
    decoded here, as the HF backend decodes it)."""
    return {"n": num_samples, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "seed": seed, "stop_token_ids": list(stop_ids), "detokenize": False}


def engine_args(model: str, revision: str | None, dtype: str, seed: int, tensor_parallel_size: int,
                gpu_memory_utilization: float, trust_remote_code: bool, processes: int = 1
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``vllm.LLM`` keyword arguments for ``model``, and the LoRA adapter to apply (``{"name",
    "path", "rank"}``) when ``model`` is a PEFT adapter directory (then the engine serves its base
    model with LoRA enabled). ``dtype: auto`` is bfloat16, as the HF backend on a GPU. Under a
    launcher (``processes`` > 1) each process's engine joins the launcher's process group
    (vLLM's ``external_launcher``, as TRL colocates its engines)."""
    adapter = None
    config = Path(model) / "adapter_config.json"
    if config.is_file():
        peft = json.loads(config.read_text())
        if "base_model_name_or_path" not in peft:
            raise InputError(f"{config}: no base_model_name_or_path, so the adapter's base model is unknown")
        adapter = {"name": Path(model).name or "adapter", "path": str(Path(model).resolve()),
                   "rank": int(peft.get("r", 16))}
        model = peft["base_model_name_or_path"]
    kwargs = {"model": model, "tokenizer": model, "revision": revision,
              "dtype": "bfloat16" if dtype == "auto" else dtype, "seed": seed,
              "tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
              "trust_remote_code": trust_remote_code}
    if adapter:
        kwargs.update(enable_lora=True, max_lora_rank=adapter["rank"], max_loras=1)
    if processes > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    return kwargs, adapter


class VLLMSampler:
    """``(prompts, prompt_ids, seed) -> samples table`` on a vLLM engine (one per process)."""

    def __init__(self, cfg, tokenizer, processes: int = 1) -> None:
        check_vllm()
        from transformers import GenerationConfig
        from vllm import LLM

        kwargs, self.adapter = engine_args(cfg.model, cfg.revision, cfg.dtype, cfg.seed, cfg.tensor_parallel_size,
                                           cfg.gpu_memory_utilization, cfg.trust_remote_code, processes)
        try:
            generation = GenerationConfig.from_pretrained(kwargs["model"], revision=cfg.revision)
        except OSError:  # no generation_config.json: the tokenizer's eos alone
            generation = None
        self.cfg, self.tokenizer, self.stop_ids = cfg, tokenizer, stop_ids(generation, tokenizer)
        self.llm = LLM(**kwargs)

    def __call__(self, prompts: list[str], prompt_ids: list, seed: int) -> pd.DataFrame:
        from vllm import SamplingParams

        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(self.adapter["name"], 1, self.adapter["path"])
        cfg = self.cfg
        params = [SamplingParams(**sampling_kwargs(cfg.num_samples, cfg.max_new_tokens, cfg.temperature,
                                                   cfg.top_p, s, self.stop_ids))
                  for s in request_seeds(seed, len(prompts))]
        requests = [{"prompt_token_ids": ids} for ids in prompt_token_ids(prompts, cfg.template, self.tokenizer)]
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=lora)
        completions = [[list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]
        return outputs_to_table(prompts, prompt_ids, completions, self.stop_ids, self.tokenizer)

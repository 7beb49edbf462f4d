"""The ``sample`` stage: draw K responses per prompt from π_ref and record log π_ref(y|x).

Output: ``<run_dir>/samples.parquet`` in the long format of docs/formats.md. Prompts are processed
in shards of ``shard_size``; each finished shard is written atomically to
``<run_dir>/samples.shards/<i>.parquet`` and seeded with ``seed + i``, so a run killed and started
again skips the finished shards and produces the same table as an uninterrupted run, and under
``torchrun`` / ``accelerate launch`` each process takes every n-th shard and the main process
merges them (:mod:`dualign._infra.distributed`): any number of processes gives the same table.

``backend`` picks the generation engine: ``hf`` (transformers ``generate``) or ``vllm``
(:mod:`dualign.modeling.vllm_sampler`). log π_ref is never the engine's: it is computed on the trainer's
numerical path (:mod:`dualign.modeling.refprobs`), in the same pass as generation where the sampler already
runs those numerics (HF in float32 on the CPU), else in a second pass over each shard with a float32
copy of π_ref once the engine is freed (responses wait in ``samples.shards/<i>.responses.parquet``).
"""

from __future__ import annotations

import gc
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from dualign._infra.config import config_to_dict
from dualign._infra.distributed import Ranks, gather_shards, ranks
from dualign._infra.errors import ConfigError, InputError
from dualign._infra.io import read_json, read_table, write_json, write_table
from dualign._infra.progress import Progress
from dualign._infra.provenance import mark_done, record_stage, unmark
from dualign.data.prompts import load_prompts
from dualign.modeling.generation import generate_responses
from dualign.modeling.models import (
    load_causal_lm,
    load_tokenizer,
    resolve_device,
)
from dualign.modeling.refprobs import load_reference, record, reference_logprobs, trainer_numerics
from dualign.modeling.templates import check_template

__all__ = ["SampleConfig", "generate_responses", "sample"]


@dataclass
class SampleConfig:
    model: str = field(metadata={"help": "π_ref: Hugging Face model id or local directory"})
    prompts: str = field(metadata={"help": "prompt file (JSONL/Parquet/CSV), saved dataset dir, or Hub dataset id"})
    run_dir: str | None = field(default=None, metadata={"help": "run directory (writes samples.parquet)"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt text"})
    id_column: str | None = field(default=None, metadata={
        "help": "column holding prompt ids (default: 'prompt_id' if present, else the row number)"})
    revision: str | None = field(default=None, metadata={"help": "model revision (commit, tag, branch)"})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision pin"})
    split: str = field(default="train", metadata={"help": "dataset split (saved or Hub datasets)"})
    max_prompts: int | None = field(default=None, metadata={"help": "keep only the first N prompts"})
    num_samples: int = field(default=4, metadata={"help": "K: responses per prompt"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest response, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 = sample from π_ref itself)"})
    batch_size: int = field(default=16, metadata={"help": "sequences generated per forward pass"})
    template: str = field(default="auto", metadata={
        "help": "prompt template: auto, chat, plain, beaver, none, or a string containing {prompt}"})
    seed: int = field(default=0, metadata={"help": "random seed (shard i uses seed + i)"})
    shard_size: int = field(default=64, metadata={"help": "prompts per resumable shard"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, cuda:1, ... (auto: cuda if available)"})
    dtype: str = field(default="auto", metadata={"help": "float32, bfloat16, float16 (auto: bf16 on GPU, fp32 on CPU)"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run Python code shipped with the model (its auto_map); off: such a model is refused"})
    backend: Literal["hf", "vllm"] = field(default="hf", metadata={
        "help": "generation engine: hf (transformers generate) or vllm (pip install 'dualign[vllm]', a CUDA "
                "GPU); log π_ref is computed by the trainer's forward pass either way"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "vllm: GPUs one engine splits the model over (vLLM's tensor parallelism)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "vllm: share of each GPU's memory the engine may take"})

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_new_tokens", "batch_size", "shard_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be ≥ 1, got {self.max_prompts}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {self.seed}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError("tensor_parallel_size > 1 needs backend: vllm (the hf backend runs one device per process)")
        check_template(self.template)


def sample(cfg: SampleConfig, run_dir: str | Path | None = None) -> Path:
    """Run the sample stage into ``run_dir`` (default ``cfg.run_dir``); return ``samples.parquet``'s path.

    Under a launcher each process samples its share of the shards; the main process merges them,
    records the stage and marks it done (the others wait for it).
    """
    if not (run_dir or cfg.run_dir):
        raise ConfigError("missing required config value(s): run_dir")
    run_dir = Path(run_dir or cfg.run_dir)
    if cfg.backend == "vllm":
        from dualign.modeling.vllm_sampler import check_vllm

        check_vllm()
    dp = ranks()
    prompts = load_prompts(cfg.prompts, cfg.prompt_column, cfg.id_column, cfg.split,
                           cfg.dataset_revision, cfg.max_prompts)
    device = resolve_device(dp.device(cfg.device))
    numerics = trainer_numerics(device)
    tokenizer = load_tokenizer(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    shard_dir = run_dir / "samples.shards"
    n_shards = math.ceil(len(prompts) / cfg.shard_size)
    shards = [i for i in dp.mine(n_shards) if not (shard_dir / f"{i}.parquet").exists()]
    inline = cfg.backend == "hf" and _hf_numerics(cfg.dtype, device) == numerics
    responses = {i: shard_dir / f"{i}.{'parquet' if inline else 'responses.parquet'}" for i in shards}
    # the engine is loaded before the first write: a model that cannot be loaded leaves nothing behind
    generate = _sampler(cfg, tokenizer, device, inline, dp.size) if any(not p.exists() for p in responses.values()) else None
    if dp.main:
        _check_shard_config(shard_dir, cfg, numerics)
        unmark(run_dir, "sample")
    dp.barrier()
    _generate_shards(cfg, prompts, responses, generate, dp)
    del generate  # the engine's memory is free before π_ref is loaded for the second pass
    _free()
    _add_reference_logprobs(cfg, [p for p in responses.values() if p.name.endswith(".responses.parquet")],
                            tokenizer, device, numerics)
    table = gather_shards(n_shards, shard_dir, dp)
    out = run_dir / "samples.parquet"
    if dp.main:
        write_table(table, out)
        record_stage(run_dir, "sample", cfg, seed=cfg.seed,
                     extra={"num_prompts": len(prompts), "num_rows": len(table), "processes": dp.size,
                            "ref_logprob": record(cfg.model, cfg.revision, cfg.template, numerics)})
        shutil.rmtree(shard_dir)
        mark_done(run_dir, "sample")
    dp.barrier()
    return out


def _generate_shards(cfg: SampleConfig, prompts: pd.DataFrame, responses: dict[int, Path], generate,
                     dp: Ranks) -> None:
    """Generate each shard ``i``'s responses into ``responses[i]`` where that file is missing."""
    total = sum(len(prompts.iloc[i * cfg.shard_size:(i + 1) * cfg.shard_size]) for i in responses) * cfg.num_samples
    with Progress(total=total, desc="sample", unit="responses", enabled=dp.main) as bar:
        for i, path in responses.items():
            part = prompts.iloc[i * cfg.shard_size:(i + 1) * cfg.shard_size]
            if not path.exists():
                write_table(generate(part["prompt"].tolist(), part["prompt_id"].tolist(), cfg.seed + i), path)
            bar.update(len(part) * cfg.num_samples)


def _add_reference_logprobs(cfg: SampleConfig, pending: list[Path], tokenizer, device: torch.device,
                            numerics: dict) -> None:
    """The second pass: each ``<i>.responses.parquet`` becomes shard ``<i>.parquet`` with log π_ref
    on the trainer's numerics (:mod:`dualign.modeling.refprobs`)."""
    if not pending:
        return
    reference = load_reference(cfg.model, device, cfg.revision, cfg.trust_remote_code)
    for path in pending:
        table = read_table(path)
        logps, tokens = reference_logprobs(reference, tokenizer, table["prompt"].tolist(), table["response"].tolist(),
                                           table["truncated"].tolist(), cfg.template, numerics, cfg.batch_size)
        write_table(table.assign(ref_logprob=logps, response_tokens=tokens),
                    path.parent / path.name.replace(".responses.parquet", ".parquet"))
        path.unlink()


def _hf_numerics(dtype: str, device: torch.device) -> dict:
    """The numerics of the HF sampler's own log-prob pass: its weights' dtype, no autocast."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return {"dtype": dtype, "autocast": None, "quantization": None}


def _sampler(cfg: SampleConfig, tokenizer, device: torch.device, logprobs: bool, processes: int = 1):
    """``(prompts, prompt_ids, seed) -> table`` of the configured engine."""
    if cfg.backend == "vllm":
        from dualign.modeling.vllm_sampler import VLLMSampler

        return VLLMSampler(cfg, tokenizer, processes)
    model = load_causal_lm(cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=device,
                           trust_remote_code=cfg.trust_remote_code)

    def generate(prompts: list[str], prompt_ids: list, seed: int) -> pd.DataFrame:
        return generate_responses(model, tokenizer, prompts, prompt_ids, cfg.num_samples, template=cfg.template,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  batch_size=cfg.batch_size, seed=seed, progress=False, logprobs=logprobs)

    return generate


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_shard_config(shard_dir: Path, cfg: SampleConfig, numerics: dict) -> None:
    """Resume only shards made with the same config and log π_ref numerics (the stage records one
    for all); anything else would mix two runs."""
    # device and dtype only change the sampler's numerics, and a run directory may be moved
    wanted = {k: v for k, v in config_to_dict(cfg).items()
              if k not in ("device", "dtype", "run_dir", "trust_remote_code", "tensor_parallel_size",
                           "gpu_memory_utilization")}
    wanted["ref_logprob_numerics"] = numerics
    key = shard_dir / "config.json"
    if key.exists():
        found = read_json(key)
        if found != wanted:
            diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise InputError(f"{shard_dir}: shards of an interrupted run with a different config "
                             f"({', '.join(diff)} differ); delete the directory or use the same config")
        print(f"dualign sample: resuming from {shard_dir}", file=sys.stderr)
        return
    write_json(wanted, key)


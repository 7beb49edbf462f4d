"""The ``sample`` stage: draw K responses per prompt from π_ref and record log π_ref(y|x).

Output: ``<run_dir>/samples.parquet`` in the long format of docs/formats.md. Prompts are processed
in shards of ``shard_size``; each finished shard is written atomically to
``<run_dir>/samples.shards/<i>.parquet`` and seeded with ``seed + i``, so a run killed and started
again skips the finished shards and produces the same table as an uninterrupted run.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dualign.config import config_to_dict
from dualign.data.prompts import load_prompts
from dualign.errors import ConfigError, InputError
from dualign.io import read_json, read_table, write_json, write_table
from dualign.models import load_causal_lm, load_tokenizer, sequence_logprobs, tokenize_pairs
from dualign.progress import Progress
from dualign.provenance import record_stage
from dualign.templates import format_prompt
from dualign.timing import timed


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

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_new_tokens", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def generate_responses(model, tokenizer, prompts: list[str], prompt_ids: list, num_samples: int, *,
                       template: str = "auto", max_new_tokens: int = 64, temperature: float = 1.0,
                       top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
                       progress: bool = True) -> pd.DataFrame:
    """Sample ``num_samples`` responses per prompt from ``model`` and score them under it.

    Returns the long-format table (one row per response, prompt-major): ``prompt_id``, ``prompt``,
    ``response`` (decoded without special tokens, cut at eos), ``sample_index``, ``ref_logprob`` =
    log π(response | templated prompt) computed by ``tokenize_pairs`` + ``sequence_logprobs`` on the
    decoded text (as ``train`` computes it), and ``response_tokens`` (response tokens + eos).
    Sampling is exact (no top-k) unless ``top_p < 1``; ``temperature=0`` is greedy decoding.
    """
    if len(prompts) != len(prompt_ids):
        raise InputError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt ids")
    texts = [format_prompt(p, template, tokenizer) for p in prompts]
    rows = [(i, k) for i in range(len(prompts)) for k in range(num_samples)]
    batches = [rows[s: s + batch_size] for s in range(0, len(rows), batch_size)]
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    responses, logprobs, n_tokens = [], [], []
    try:
        for batch in Progress(batches, desc="sample", unit="batches", enabled=progress):
            batch_texts = [texts[i] for i, _ in batch]
            out = _generate_batch(model, tokenizer, batch_texts, max_new_tokens, temperature, top_p)
            responses += out
            lp, nt = _ref_logprobs(model, tokenizer, batch_texts, out)
            logprobs += lp
            n_tokens += nt
    finally:
        model.train(was_training)
    return pd.DataFrame({
        "prompt_id": [prompt_ids[i] for i, _ in rows],
        "prompt": [prompts[i] for i, _ in rows],
        "response": responses,
        "sample_index": [k for _, k in rows],
        "ref_logprob": logprobs,
        "response_tokens": n_tokens,
    })


@timed("generate")
@torch.inference_mode()
def _generate_batch(model, tokenizer, texts: list[str], max_new_tokens: int, temperature: float,
                    top_p: float) -> list[str]:
    """Left-padded batched generation; each response is cut at its first eos and decoded."""
    device = next(model.parameters()).device
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, ids in enumerate(encoded):
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        attention[r, width - len(ids):] = 1
    eos_ids = _eos_ids(model, tokenizer)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
        if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos_ids,
                         **sampling)
    texts_out = []
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
        texts_out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts_out


def _eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus any extra stop ids of the model's generation config (chat models)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    if not ids:
        raise InputError("the tokenizer has no eos token, so responses could not stop")
    return ids


@torch.inference_mode()
def _ref_logprobs(model, tokenizer, prompt_texts: list[str], responses: list[str]) -> tuple[list[float], list[int]]:
    device = next(model.parameters()).device
    batch = tokenize_pairs(tokenizer, prompt_texts, responses)
    lp = sequence_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                           batch["response_mask"].to(device))
    return lp.cpu().tolist(), batch["response_mask"].sum(-1).tolist()


def sample(cfg: SampleConfig, run_dir: str | Path | None = None) -> Path:
    """Run the sample stage into ``run_dir`` (default ``cfg.run_dir``); return ``samples.parquet``'s path."""
    if not (run_dir or cfg.run_dir):
        raise ConfigError("missing required config value(s): run_dir")
    run_dir = Path(run_dir or cfg.run_dir)
    prompts = load_prompts(cfg.prompts, cfg.prompt_column, cfg.id_column, cfg.split,
                           cfg.dataset_revision, cfg.max_prompts)
    tokenizer = load_tokenizer(cfg.model, revision=cfg.revision)
    model = load_causal_lm(cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=cfg.device)
    shard_dir = run_dir / "samples.shards"
    _check_shard_config(shard_dir, cfg)
    starts = range(0, len(prompts), cfg.shard_size)
    with Progress(total=len(prompts) * cfg.num_samples, desc="sample", unit="responses") as bar:
        for i, start in enumerate(starts):
            path = shard_dir / f"{i}.parquet"
            part = prompts.iloc[start: start + cfg.shard_size]
            if not path.exists():
                table = generate_responses(
                    model, tokenizer, part["prompt"].tolist(), part["prompt_id"].tolist(), cfg.num_samples,
                    template=cfg.template, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed + i, progress=False)
                write_table(table, path)
            bar.update(len(part) * cfg.num_samples)
    table = pd.concat([read_table(shard_dir / f"{i}.parquet") for i in range(len(starts))],
                      ignore_index=True)
    out = run_dir / "samples.parquet"
    write_table(table, out)
    record_stage(run_dir, "sample", cfg, seed=cfg.seed,
                 extra={"num_prompts": len(prompts), "num_rows": len(table)})
    shutil.rmtree(shard_dir)
    return out


def _check_shard_config(shard_dir: Path, cfg: SampleConfig) -> None:
    """Resume only shards made with the same config; anything else would mix two runs."""
    # device and dtype only change the numerics, and a run directory may be moved
    wanted = {k: v for k, v in config_to_dict(cfg).items() if k not in ("device", "dtype", "run_dir")}
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


"""Generation from a Hugging Face causal LM: K responses per prompt, each cut at its first eos, with
log π(response | prompt) computed on the trainer's numerical path. The ``sample`` stage and the
``evaluate`` stage both draw through :func:`generate_responses`."""

from __future__ import annotations

import math

import pandas as pd
import torch

from dualign._infra.errors import InputError
from dualign._infra.progress import Progress
from dualign._infra.timing import timed
from dualign.modeling.models import sequence_logprobs, stop_ids, tokenize_pairs
from dualign.modeling.templates import format_prompt


def generate_responses(model, tokenizer, prompts: list[str], prompt_ids: list, num_samples: int, *,
                       template: str = "auto", max_new_tokens: int = 64, temperature: float = 1.0,
                       top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
                       progress: bool = True, logprobs: bool = True) -> pd.DataFrame:
    """Sample ``num_samples`` responses per prompt from ``model`` and score them under it.

    Returns the long-format table (one row per response, prompt-major): ``prompt_id``, ``prompt``,
    ``response`` (decoded without special tokens, cut at eos), ``sample_index``, ``ref_logprob`` =
    log π(response | templated prompt) computed by ``tokenize_pairs`` + ``sequence_logprobs`` on the
    decoded text (as ``train`` computes it), ``response_tokens`` (response tokens + eos) and
    ``truncated``: the response was cut by ``max_new_tokens`` before any eos, so its log-prob and
    token count have no eos.
    Sampling is exact (no top-k) unless ``top_p < 1``; ``temperature=0`` is greedy decoding.
    ``logprobs=False`` leaves ``ref_logprob`` NaN and ``response_tokens`` 0 (a later pass fills them).
    """
    if len(prompts) != len(prompt_ids):
        raise InputError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt ids")
    texts = [format_prompt(p, template, tokenizer) for p in prompts]
    rows = [(i, k) for i in range(len(prompts)) for k in range(num_samples)]
    batches = [rows[s: s + batch_size] for s in range(0, len(rows), batch_size)]
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    responses, logps, n_tokens, truncated = [], [], [], []
    try:
        for batch in Progress(batches, desc="sample", unit="batches", enabled=progress):
            batch_texts = [texts[i] for i, _ in batch]
            out, cut = _generate_batch(model, tokenizer, batch_texts, max_new_tokens, temperature, top_p)
            responses += out
            truncated += cut
            lp, nt = _ref_logprobs(model, tokenizer, batch_texts, out, cut) if logprobs else \
                ([math.nan] * len(out), [0] * len(out))
            logps += lp
            n_tokens += nt
    finally:
        model.train(was_training)
    return pd.DataFrame({
        "prompt_id": [prompt_ids[i] for i, _ in rows],
        "prompt": [prompts[i] for i, _ in rows],
        "response": responses,
        "sample_index": [k for _, k in rows],
        "ref_logprob": logps,
        "response_tokens": n_tokens,
        "truncated": truncated,
    })


@timed("generate")
@torch.inference_mode()
def _generate_batch(model, tokenizer, texts: list[str], max_new_tokens: int, temperature: float,
                    top_p: float) -> tuple[list[str], list[bool]]:
    """Left-padded batched generation; each response is cut at its first eos and decoded. Also
    whether each was truncated: it ran to ``max_new_tokens`` without an eos."""
    device = next(model.parameters()).device
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, ids in enumerate(encoded):
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        attention[r, width - len(ids):] = 1
    eos_ids = stop_ids(getattr(model, "generation_config", None), tokenizer)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
        if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos_ids,
                         **sampling)
    texts_out, truncated = [], []
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in eos_ids), None)
        texts_out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        truncated.append(cut is None)
    return texts_out, truncated


@torch.inference_mode()
def _ref_logprobs(model, tokenizer, prompt_texts: list[str], responses: list[str],
                  truncated: list[bool]) -> tuple[list[float], list[int]]:
    device = next(model.parameters()).device
    batch = tokenize_pairs(tokenizer, prompt_texts, responses, truncated=truncated)
    lp = sequence_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                           batch["response_mask"].to(device))
    return lp.cpu().tolist(), batch["response_mask"].sum(-1).tolist()

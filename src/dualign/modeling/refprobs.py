"""log π_ref of sampled responses, computed on the trainer's own numerical path.

``train`` holds its weights in float32 and runs its forward passes under bf16 autocast on a GPU
that supports bf16 (plain float32 on the CPU): :func:`trainer_numerics`. A sampling engine does
not (vLLM and HF ``generate`` run bf16 weights on a GPU), and its log-probs differ from the
trainer's by rounding; at step 0 the policy would then not equal π_ref, and β·Δlog π enters every
training target. So log π_ref is never taken from the engine: the sample stage computes it here,
with a float32 copy of π_ref under the trainer's autocast, on the decoded text tokenized as
``train`` tokenizes it (:func:`dualign.modeling.models.tokenize_pairs`), and records how
(:func:`record`: model, revision, template, weight dtype, autocast, quantization) in
``sample.meta.json`` under ``ref_logprob``. ``train`` reuses the column only when that record
equals its own (:func:`mismatch`); otherwise it computes log π_ref itself (``ref_logprobs:
auto``) or refuses (``reuse``). Token ids are not carried over from the engine: the text is
tokenized again, as ``train`` does, so that both sides see the same tokens.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from dualign._infra.progress import Progress
from dualign.modeling.models import (
    disable_dropout,
    load_causal_lm,
    sequence_logprobs,
    tokenize_pairs,
)
from dualign.modeling.templates import format_prompt

# the keys of a ref_logprob record that must agree for train to reuse recorded log-probs
RECORD_KEYS = ("model", "revision", "template", "dtype", "autocast", "quantization")


def trainer_numerics(device: torch.device | str, load_in_4bit: bool = False) -> dict[str, Any]:
    """The numerics of ``train``'s forward pass on ``device`` (one process, DDP or FSDP): float32
    weights, bf16 autocast on a GPU that supports bf16; with ``load_in_4bit`` the linear layers in
    bitsandbytes NF4 (QLoRA), which only train itself can then reproduce."""
    device = torch.device(device)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return {"dtype": "float32", "autocast": "bfloat16" if bf16 else None,
            "quantization": "bnb-nf4" if load_in_4bit else None}


def autocast(numerics: dict[str, Any], device: torch.device | str):
    """The autocast context of ``numerics`` on ``device`` (a null context without autocast)."""
    if not numerics.get("autocast"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, numerics["autocast"]))


def load_reference(model: str, device: torch.device | str, revision: str | None = None,
                   trust_remote_code: bool = False):
    """π_ref with the trainer's weights: float32, eval mode, dropout off."""
    ref = load_causal_lm(model, revision=revision, dtype="float32", device=torch.device(device),
                         trust_remote_code=trust_remote_code).eval()
    disable_dropout(ref)
    return ref


@torch.inference_mode()
def reference_logprobs(model, tokenizer, prompts: list[str], responses: list[str], truncated: list[bool],
                       template: str, numerics: dict[str, Any], batch_size: int = 16,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """log π(response | templated prompt) of every row and its response tokens (incl. eos unless
    ``truncated``), in batches of similar length, under ``numerics``' autocast."""
    device = next(model.parameters()).device
    texts = [format_prompt(p, template, tokenizer) for p in prompts]
    order = np.argsort([len(t) + len(r) for t, r in zip(texts, responses, strict=True)], kind="stable")
    logps, tokens = np.empty(len(texts)), np.empty(len(texts), dtype=np.int64)
    for start in Progress(range(0, len(order), batch_size), desc="reference log-probs", unit="batches",
                          enabled=progress):
        idx = order[start:start + batch_size]
        batch = tokenize_pairs(tokenizer, [texts[i] for i in idx], [responses[i] for i in idx],
                               truncated=[truncated[i] for i in idx])
        with autocast(numerics, device):
            lp = sequence_logprobs(model, **{k: v.to(device) for k, v in batch.items()})
        logps[idx] = lp.float().cpu().numpy()
        tokens[idx] = batch["response_mask"].sum(-1).numpy()
    return logps, tokens


def record(model: str, revision: str | None, template: str, numerics: dict[str, Any]) -> dict[str, Any]:
    """What a stage records of the log π_ref it wrote: which model, template and numerics."""
    return {"model": model, "revision": revision, "template": template, **numerics}


def mismatch(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> str | None:
    """The first key where a recorded ``ref_logprob`` record differs from the wanted one
    (``'key: recorded -> wanted'``), 'no record' when there is none, or None when they agree."""
    if not isinstance(recorded, dict):
        return "no record of how they were computed"
    for key in RECORD_KEYS:
        if recorded.get(key) != wanted.get(key):
            return f"{key}: {recorded.get(key)!r} -> {wanted.get(key)!r}"
    return None

"""The training pairs as tokens: every (templated prompt, response) tokenized once, batches
collated from them, and log π_ref of each response taken before the policy's first update.

A response shared by several pairs (all pairs of a prompt's K samples) keeps one canonical row,
so a batch runs it once (:func:`dualign.train.pair_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from dualign._infra.progress import Progress
from dualign._infra.segments import Segments
from dualign.modeling.models import sequence_logprobs, tokenize_pairs
from dualign.modeling.templates import format_prompt


@dataclass
class EncodedPairs:
    """Token ids of every pair (a rows then b rows, unpadded) and the tensors the losses need."""
    input_ids: list[torch.Tensor]       # 2N rows: pair i's a at i, its b at N + i
    response_mask: list[torch.Tensor]
    ref_logps: torch.Tensor             # [2N] float32, NaN where still unknown
    columns: dict[str, torch.Tensor]    # numeric pair columns, [N] float64
    truncated: torch.Tensor             # [2N] bool: may have been cut at max_length
    canonical: torch.Tensor             # [2N] long: the first row with the same prompt and response (and cut)
    groups: torch.Tensor                # [N] long: pair i's prompt, numbered 0.. in order of appearance

    def __len__(self) -> int:
        return len(self.columns["target_margin"])

    def distinct(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequences of pairs ``rows`` (a rows then b rows), the distinct ones among them (each
        response shared by several pairs run once) and where each sequence sits among those."""
        seq_rows = self.canonical[list(rows) + [len(self) + r for r in rows]]
        unique, where = torch.unique(seq_rows, return_inverse=True)
        return seq_rows, unique, where

    def tokens(self, rows: torch.Tensor | list[int]) -> int:
        """Tokens (prompt + response) of the given sequence rows."""
        return int(sum(len(self.input_ids[int(r)]) for r in rows))

    def collate(self, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        seqs = [self.input_ids[r] for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        response = torch.zeros_like(ids)
        for k, r in enumerate(rows):
            n = len(seqs[k])
            ids[k, :n], attention[k, :n], response[k, :n] = seqs[k], 1, self.response_mask[r]
        return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


def encode_pairs(pairs: pd.DataFrame, tokenizer, template: str, max_length: int,
                 chunk: int = 256) -> EncodedPairs:
    """Tokenize every distinct (templated prompt, response) once with
    :func:`dualign.modeling.models.tokenize_pairs`; rows repeating one (all pairs of K samples) share it."""
    texts = {p: format_prompt(p, template, tokenizer) for p in pairs["prompt"].unique()}
    prompts = [texts[p] for p in pairs["prompt"]] * 2
    responses = list(pairs["response_a"]) + list(pairs["response_b"])
    cut = [False] * len(prompts)  # a response cut by max_new_tokens is tokenized without eos
    if {"truncated_a", "truncated_b"} <= set(pairs.columns):
        cut = list(pairs["truncated_a"].astype(bool)) + list(pairs["truncated_b"].astype(bool))
    first: dict[tuple[str, str, bool], int] = {}
    canonical = [first.setdefault(key, k) for k, key in enumerate(zip(prompts, responses, cut, strict=True))]
    distinct = list(first.values())
    encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for start in Progress(range(0, len(distinct), chunk), desc="tokenize", unit="chunks"):
        rows = distinct[start:start + chunk]
        enc = tokenize_pairs(tokenizer, [prompts[k] for k in rows], [responses[k] for k in rows], max_length,
                             truncated=[cut[k] for k in rows])
        for k, row, att, resp in zip(rows, enc["input_ids"], enc["attention_mask"], enc["response_mask"],
                                     strict=True):
            n = int(att.sum())
            encoded[k] = (row[:n].clone(), resp[:n].clone())
    ids = [encoded[c][0] for c in canonical]
    masks = [encoded[c][1] for c in canonical]
    ref = np.concatenate([pairs["ref_logprob_a"].to_numpy(float), pairs["ref_logprob_b"].to_numpy(float)])
    numeric = [c for c in pairs.columns if c not in ("ref_logprob_a", "ref_logprob_b", "truncated_a", "truncated_b")
               and pd.api.types.is_numeric_dtype(pairs[c]) and c != "prompt_id"]
    return EncodedPairs(
        input_ids=ids, response_mask=masks, ref_logps=torch.tensor(ref, dtype=torch.float32),
        columns={c: torch.tensor(pairs[c].to_numpy(float)) for c in numeric},
        truncated=torch.tensor([len(x) >= max_length for x in ids]),
        canonical=torch.tensor(canonical, dtype=torch.long),
        groups=torch.tensor(Segments.of(pairs["prompt_id"].to_numpy()).codes(), dtype=torch.long))


@torch.no_grad()
def fill_ref_logps(model, data: EncodedPairs, rows: torch.Tensor, pad_id: int, batch_size: int,
                   accelerator) -> None:
    """log π_ref of the given sequence rows, with ``model`` still equal to π_ref, into ``data.ref_logps``."""
    was_training = model.training
    model.eval()
    todo = sorted(rows.tolist(), key=lambda r: len(data.input_ids[r]))  # similar lengths: less padding
    for start in Progress(range(0, len(todo), batch_size), desc="reference log-probs", unit="batches"):
        chunk = todo[start:start + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in data.collate(chunk, pad_id).items()}
        with accelerator.autocast():
            data.ref_logps[chunk] = sequence_logprobs(model, **batch).float().cpu()
    model.train(was_training)

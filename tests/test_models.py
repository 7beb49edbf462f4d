"""Sequence log-probabilities: the fast path (logsumexp, output layer on response positions only)
equals the naive full log-softmax over every position."""

from __future__ import annotations

import torch

from dualign.models import (
    load_causal_lm,
    load_tokenizer,
    sequence_logprobs,
    token_logprobs,
    tokenize_pairs,
)


def test_token_logprobs_equal_the_naive_log_softmax_gather():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 7, 11) * 5, torch.randint(0, 11, (3, 7))
    naive = torch.gather(logits[:, :-1].log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids), naive, rtol=1e-6, atol=1e-6)


def test_sequence_logprobs_on_response_positions_equal_the_full_forward(tiny_model):
    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model, device="cpu").eval()
    prompts = ["User: hi\nAssistant:", "User: How do I cook rice, step by step?\nAssistant:", "User: x\nAssistant:"]
    responses = [" Hello there.", " Rinse it.", ""]
    batch = tokenize_pairs(tok, prompts, responses)
    with torch.no_grad():
        fast = sequence_logprobs(model, **batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        naive = (torch.gather(logits[:, :-1].log_softmax(-1), 2, batch["input_ids"][:, 1:, None]).squeeze(-1)
                 * batch["response_mask"][:, 1:]).sum(-1)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)

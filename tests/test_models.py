"""Sequence log-probabilities: the fast path (logsumexp, output layer on response positions only)
equals the naive full log-softmax over every position."""

from __future__ import annotations

import torch

from dualign.modeling.models import (
    _padded_logprobs,
    length_groups,
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


def test_length_groups_cut_the_sorted_rows_into_groups_of_at_least_min_rows():
    lengths = torch.tensor([5, 1, 9, 3, 7, 2, 8, 4, 6, 0])
    groups = length_groups(lengths, min_rows=3, max_groups=4)
    assert [g.tolist() for g in groups] == [[9, 1, 5, 3], [7, 0, 8], [4, 6, 2]]  # k = min(4, 10 // 3) = 3
    assert [g.tolist() for g in length_groups(lengths, min_rows=6)] == [list(range(10))]  # 10 // 6 = 1: one group
    assert len(length_groups(torch.arange(100), min_rows=16, max_groups=4)) == 4


def test_grouped_log_probs_and_their_gradients_equal_one_padded_forward(tiny_model):
    """40 rows of mixed lengths run in 2 groups (min_rows 16), each trimmed to its own longest row:
    the log-probs and the weights' gradient equal those of one forward over the padded batch."""
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, device="cpu", dtype="float32").eval()
    words = "the cat sat on a warm mat near the old door and then slept for a very long time".split()
    prompts = [f"User: {' '.join(words[: 1 + i % 5])}\nAssistant:" for i in range(40)]
    responses = [" " + " ".join(words[: (7 * i) % 17]) for i in range(40)]
    batch = tokenize_pairs(tok, prompts, responses)
    lengths = batch["attention_mask"].sum(1)
    assert len(length_groups(lengths)) == 2 and int(lengths.min()) < int(lengths.max()) - 5

    def run(fn):
        model.zero_grad()
        lp = fn(model, **batch)
        (lp * torch.linspace(0.5, 1.5, len(lp))).sum().backward()
        return lp.detach(), [p.grad.clone() for p in model.parameters()]

    grouped, grads = run(sequence_logprobs)
    padded, grads_padded = run(_padded_logprobs)
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-5)
    for g, h in zip(grads, grads_padded, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)

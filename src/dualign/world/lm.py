"""π_ref of the world: a tiny GPT-2 trained by supervised fine-tuning on the world's corpus, and
plain sampling from it (used to measure what π_ref actually writes)."""

from __future__ import annotations

import math
import random

import torch

from dualign._infra.progress import Progress
from dualign.modeling.models import disable_dropout, tokenize_pairs
from dualign.modeling.templates import format_prompt
from dualign.modeling.tiny import tiny_causal_lm, train_bpe_tokenizer
from dualign.world.config import WorldConfig

TEMPLATE = "plain"


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens (incl. eos): −mean log π(y_t | x, y_<t).

    The output layer runs on the response positions alone: with a 2000-token vocabulary it is most
    of a tiny model's compute, and prompt positions carry no loss.
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    scored = batch["response_mask"][:, 1:].bool()
    logits = model.get_output_embeddings()(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][scored])


def _no_dropout(model) -> None:
    """Dropout off, in the saved config too: a tiny model memorises its small world faster without
    it, and later stages then compute the same log-probs in train and eval mode."""
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"):
        setattr(model.config, name, 0.0)
    disable_dropout(model)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train_ref_model(cfg: WorldConfig, corpus: list[dict], progress: bool = True):
    """Train the tokenizer and π_ref on (prompt, response) rows; returns (model, tokenizer, stats)."""
    prompts = [format_prompt(r["prompt"], TEMPLATE) for r in corpus]
    responses = [r["response"] for r in corpus]
    tok = train_bpe_tokenizer(sorted(set(prompts)) + responses, vocab_size=cfg.vocab_size)
    data = tokenize_pairs(tok, prompts, responses)
    lengths = data["attention_mask"].sum(1)
    model = tiny_causal_lm("gpt2", len(tok), hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                           max_positions=cfg.max_positions, seed=cfg.seed, tokenizer=tok)
    _no_dropout(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.98), weight_decay=0.01)
    n = len(corpus)
    steps_per_epoch = math.ceil(n / cfg.sft_batch_size)
    total = max(1, round(cfg.sft_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, max(1, total // 20)))
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses = []
    for _ in Progress(range(total), desc="world: π_ref SFT", unit="steps", enabled=progress):
        if len(order) < cfg.sft_batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[:cfg.sft_batch_size], order[cfg.sft_batch_size:]
        width = int(lengths[idx].max())
        batch = {k: v[idx, :width] for k, v in data.items()}
        loss = sft_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    stats = {"steps": total, "final_loss": sum(tail) / len(tail), "n_sequences": n,
             "max_tokens": int(lengths.max()), "parameters": sum(p.numel() for p in model.parameters())}
    return model, tok, stats


@torch.inference_mode()
def sample_responses(model, tok, prompts: list[str], n_samples: int, max_new_tokens: int = 48,
                     seed: int = 0, batch_size: int = 64, progress: bool = True) -> list[list[str]]:
    """``n_samples`` responses per prompt by ancestral sampling (temperature 1, no top-k/top-p)."""
    torch.manual_seed(seed)
    random.seed(seed)
    tok.padding_side = "left"
    out: list[list[str]] = []
    for i in Progress(range(0, len(prompts), batch_size), desc="world: sampling π_ref", unit="batches",
                      enabled=progress):
        chunk = [format_prompt(p, TEMPLATE) for p in prompts[i:i + batch_size]]
        enc = tok(chunk, return_tensors="pt", padding=True)
        gen = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             max_new_tokens=max_new_tokens, num_return_sequences=n_samples,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [texts[j:j + n_samples] for j in range(0, len(texts), n_samples)]
    tok.padding_side = "right"
    return out

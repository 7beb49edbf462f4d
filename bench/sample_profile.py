"""Where the sample stage's time goes, on a built world's π_ref and N of its dual prompts × K.

Prints, each measured in this run (a table of seconds and the ratios docs/benchmarks.md
quotes):

- bare ``generate`` (the stage's own ``_generate_batch``) at several batch sizes;
- the same with a static KV cache, and whether it draws the same samples;
- ``max_new_tokens`` 1 against the stage's length: the prefill and ``generate``'s setup;
- one batch under ``torch.profiler``: the share of the exponential draws of ``torch.multinomial``,
  of the KV cache's concatenation and of the model's matrix products;
- the log π_ref pass over the drawn responses, one padded forward per batch against
  ``sequence_logprobs``' length groups.

    .venv/bin/python bench/sample_profile.py                          # default world, 128 prompts × 8
    .venv/bin/python bench/sample_profile.py --world small --prompts 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from dualign.modeling.generation import _generate_batch
from dualign.modeling.models import (
    _padded_logprobs,
    load_causal_lm,
    load_tokenizer,
    sequence_logprobs,
    tokenize_pairs,
)
from dualign.modeling.templates import format_prompt
from dualign.pipeline import PACKAGED, load_run_values, resolve_run_config


def timed(fn) -> tuple:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def generate_all(model, tok, texts: list[str], batch_size: int, max_new_tokens: int,
                 cache: str | None = None) -> list[str]:
    """Every text's sampled continuation (seed 0), drawn as the stage draws them; ``cache``: the
    generation config's ``cache_implementation`` meanwhile (None: the default dynamic cache)."""
    torch.manual_seed(0)
    model.generation_config.cache_implementation = cache
    try:
        return [r for i in range(0, len(texts), batch_size)
                for r in _generate_batch(model, tok, texts[i:i + batch_size], max_new_tokens, 1.0, 1.0)[0]]
    finally:
        model.generation_config.cache_implementation = None


def profile_shares(model, tok, texts: list[str], max_new_tokens: int) -> dict[str, float]:
    """Shares of self CPU time in one ``generate`` call over ``texts``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate_all(model, tok, texts, len(texts), max_new_tokens)
    rows = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(rows.values())
    model_ops = ("aten::addmm", "aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::tanh",
                 "aten::mul", "aten::add", "aten::pow", "aten::native_layer_norm")
    return {"exponential draws (multinomial)": rows.get("aten::exponential_", 0) / total,
            "KV cache concatenation (cat)": rows.get("aten::cat", 0) / total,
            "the model's own ops": sum(rows.get(k, 0) for k in model_ops) / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=("small", "default"), default="default")
    ap.add_argument("--prompts", type=int, default=128, help="dual prompts to use")
    ap.add_argument("--samples", type=int, default=8, help="K responses per prompt")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_run_config({**load_run_values(PACKAGED[args.world]), "run_dir": "unused"})
    s = cfg.sample
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, dtype="float32", device="cpu").eval()
    prompts = pd.read_json(Path(cfg.model).parent / "prompts_dual.jsonl", lines=True)["prompt"].tolist()[:args.prompts]
    texts = [format_prompt(p, s.template, tok) for p in prompts for _ in range(args.samples)]
    n = len(texts)
    print(f"{args.world} world, {args.prompts} prompts x K={args.samples} ({n} responses), "
          f"{torch.get_num_threads()} threads, max_new_tokens {s.max_new_tokens}")

    generate_all(model, tok, texts[:s.batch_size], s.batch_size, s.max_new_tokens)  # warm-up
    rows = []
    responses, base_s = None, None
    for bs in args.batch_sizes:
        out, sec = timed(lambda bs=bs: generate_all(model, tok, texts, bs, s.max_new_tokens))
        if bs == s.batch_size:
            responses, base_s = out, sec
        rows.append((f"bare generate, batch {bs}", sec))
    base_s = base_s if base_s is not None else rows[0][1]
    static, sec = timed(lambda: generate_all(model, tok, texts, s.batch_size, s.max_new_tokens, cache="static"))
    same = sum(a == b for a, b in zip(static, responses or [], strict=False))
    rows.append((f"static KV cache, batch {s.batch_size} (same samples: {same}/{n})", sec))
    _, sec = timed(lambda: generate_all(model, tok, texts, s.batch_size, 1))
    rows.append((f"max_new_tokens 1, batch {s.batch_size}: prefill + setup", sec))

    if responses is not None:
        batches = [tokenize_pairs(tok, texts[i:i + s.batch_size], responses[i:i + s.batch_size])
                   for i in range(0, n, s.batch_size)]
        with torch.inference_mode():
            for name, fn in (("log π_ref pass, one padded forward a batch", _padded_logprobs),
                             ("log π_ref pass, length groups (sequence_logprobs)", sequence_logprobs)):
                rows.append((name, timed(lambda fn=fn: [fn(model, **b) for b in batches])[1]))

    print(f"{'':<62}{'seconds':>9}{'/ bare, batch ' + str(s.batch_size):>22}")
    for name, sec in rows:
        print(f"{name:<62}{sec:>9.2f}{sec / base_s:>22.2f}")
    shares = profile_shares(model, tok, texts[:512], s.max_new_tokens)
    print("one batch of", min(n, 512), "under torch.profiler, share of self CPU time: "
          + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))


if __name__ == "__main__":
    main()

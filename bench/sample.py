"""Generation throughput of ``generate_responses`` at several batch sizes.

A randomly initialised GPT-2 (built from a config, tokenizer trained here: no hub) samples the
same prompts × K responses at each batch size; tokens/s counts response tokens (incl. eos) over the
wall time of ``generate_responses`` (generation + the reference log-prob pass).

    .venv/bin/python bench/sample.py                      # CPU or the GPU if there is one
    .venv/bin/python bench/sample.py --threads 1          # CPU shared with other jobs
    .venv/bin/python bench/sample.py --hidden 768 --layers 12 --batch-sizes 1 4 16 64 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from dualign.modeling.models import resolve_device
from dualign.modeling.tiny import tiny_causal_lm, train_bpe_tokenizer
from dualign.sample import generate_responses

TEXTS = [
    "User: How do I cook rice?\nAssistant: Rinse the rice, then simmer it for fifteen minutes.",
    "User: How can I pick a lock?\nAssistant: I can't help with that, but a locksmith can.",
    "User: Write a poem about rain.\nAssistant: Rain taps softly on the roof at night.",
] * 30
PROMPTS = ["How do I cook rice?", "Tell me a joke.", "Write a poem about rain.", "How can I pick a lock?",
           "What is the capital of France?", "Explain photosynthesis briefly.", "hi",
           "Give me three tips for sleeping better at night."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prompts", type=int, default=16, help="prompts (cycled from a fixed list)")
    ap.add_argument("--num-samples", type=int, default=4, help="K responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (1 is steadier on a machine shared with other jobs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    tok = train_bpe_tokenizer(TEXTS, vocab_size=args.vocab)
    model = tiny_causal_lm("gpt2", len(tok), hidden=args.hidden, layers=args.layers, heads=args.heads,
                           tokenizer=tok).to(device).eval()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    ids = list(range(len(prompts)))
    kw = {"max_new_tokens": args.max_new_tokens, "progress": False}
    generate_responses(model, tok, prompts[:2], ids[:2], 2, batch_size=4, **kw)  # warm-up

    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads), GPT-2 {n_params / 1e6:.1f}M params, "
          f"{len(prompts)} prompts x K={args.num_samples}, max_new_tokens={args.max_new_tokens}")
    print(f"{'batch':>6} {'seconds':>9} {'tokens':>8} {'tokens/s':>10} {'vs batch 1':>11}")
    base = None
    for bs in args.batch_sizes:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        df = generate_responses(model, tok, prompts, ids, args.num_samples, batch_size=bs, seed=0, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = int(df["response_tokens"].sum())
        rate = tokens / seconds
        base = base or rate
        print(f"{bs:>6} {seconds:>9.2f} {tokens:>8} {rate:>10.1f} {rate / base:>10.2f}x")


if __name__ == "__main__":
    main()

"""Each pipeline stage's throughput beside its hardware floor, measured in the same run.

On a built world (cached; built first if missing) and N of its dual prompts × K samples:

- sample: new tokens/s of ``generate_responses`` (generation + the reference log-prob pass, as the
  stage runs it) against bare ``model.generate`` on the same prompts at its best batch size;
- score: responses/s of ``score_table`` with the world's reward and cost models against one bare
  encoder forward (MiniLM, length-sorted batches) over the same texts;
- train: pairs/s of ``train`` (the world config's settings, one epoch) against a bare
  forward + backward of the same batches' distinct responses;
- evaluate: responses/s of ``evaluate`` on N of the world's evaluation prompts (the policy just
  trained and π_ref both sampled: no π_ref cache) against bare ``generate`` of both models at the
  sample row's best batch size plus one bare encoder pass over their responses.

    .venv/bin/python bench/stages.py                       # small world, 128 prompts
    .venv/bin/python bench/stages.py --world default --prompts 256
    .venv/bin/python bench/stages.py --threads 1           # steadier on a shared machine

A ratio of 1.0 means the stage runs at the floor; the issue's target is ≤ 1.5 for sample and score.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dualign._infra.io import write_table
from dualign.data.constraints import parse_constraint
from dualign.data.records import write_dual
from dualign.data.score_table import validate_scores
from dualign.dual.stage import solve_constraints
from dualign.evaluate import evaluate
from dualign.modeling.batches import encode_pairs
from dualign.modeling.generation import _generate_batch, generate_responses
from dualign.modeling.models import load_causal_lm, load_tokenizer, sequence_logprobs
from dualign.modeling.templates import format_prompt
from dualign.pipeline import PACKAGED, load_run_values, resolve_run_config
from dualign.score import score_table
from dualign.train import train
from dualign.world.reward_models import load_encoder


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_sample(cfg, prompts: list[str], k: int, batch_sizes: list[int]) -> tuple[pd.DataFrame, list]:
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device="cpu").eval()
    s = cfg.sample
    df, stage_s = timed(lambda: generate_responses(model, tok, prompts, list(range(len(prompts))), k,
                                                   template=s.template, max_new_tokens=s.max_new_tokens,
                                                   batch_size=s.batch_size, progress=False))
    tokens = int(df["response_tokens"].sum())
    texts = [format_prompt(p, s.template, tok) for p in prompts for _ in range(k)]
    best = None
    for bs in batch_sizes:
        torch.manual_seed(0)
        _, bare_s = timed(lambda bs=bs: [_generate_batch(model, tok, texts[i:i + bs], s.max_new_tokens, 1.0, 1.0)
                                         for i in range(0, len(texts), bs)])
        if best is None or bare_s < best[1]:
            best = (bs, bare_s)
    rows = [("sample", f"{tokens / stage_s:.0f} tokens/s (batch {s.batch_size})",
             f"{tokens / best[1]:.0f} tokens/s (bare generate, batch {best[0]})", stage_s / best[1])]
    return df, rows, best[0]


def bench_score(cfg, df: pd.DataFrame) -> tuple[pd.DataFrame, list]:
    scored, stage_s = timed(lambda: score_table(df, cfg.score.scorers, batch_size=cfg.score.batch_size,
                                                device="cpu", progress=False))
    _, bare_s = timed(lambda: bare_encoder_pass(df["prompt"].tolist(), df["response"].tolist(),
                                                cfg.score.batch_size, cfg.score.max_length))
    n = len(df)
    return scored, [("score", f"{n / stage_s:.0f} responses/s ({len(cfg.score.scorers)} scorers)",
                     f"{n / bare_s:.0f} responses/s (one bare encoder pass)", stage_s / bare_s)]


@torch.inference_mode()
def bare_encoder_pass(prompts: list[str], responses: list[str], batch_size: int, max_length: int) -> None:
    """The world scorers' MiniLM over (prompt, response) pairs in length-sorted batches: scoring's floor."""
    tok, encoder = load_encoder()
    order = np.argsort([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], kind="stable")
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([prompts[j] for j in idx], [responses[j] for j in idx], padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")
        encoder(**enc)


def bench_train(cfg, scored: pd.DataFrame, work: Path) -> list:
    scored = scored.copy()
    write_table(scored, work / "scores.parquet")
    constraints = [parse_constraint(c) for c in cfg.dual.constraints]
    scores = validate_scores(scored, [cfg.dual.reward] + [c.column for c in constraints], "scores")
    write_dual(solve_constraints(scores, cfg.dual.beta, cfg.dual.reward, constraints), work / "dual.json")
    tcfg = dataclasses.replace(cfg.train, run_dir=str(work), output_dir=str(work / "policy"), num_epochs=1.0,
                               ref_logprobs="compute", save_steps=10**9, device="cpu")
    summary, stage_s = timed(lambda: train(tcfg))
    pairs = pd.read_parquet(work / "pairs.parquet")
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, dtype="float32", device="cpu").train()
    data = encode_pairs(pairs, tok, tcfg.template, tcfg.max_length)
    bs = tcfg.per_device_batch_size
    groups = data.groups.numpy()
    order = np.lexsort((np.arange(len(data)), groups)) if tcfg.group_by_prompt else np.arange(len(data))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)

    def bare():
        for i in range(0, len(order), bs):
            rows = order[i:i + bs].tolist()
            seqs = torch.unique(data.canonical[rows + [len(data) + r for r in rows]]).tolist()
            batch = data.collate(seqs, tok.pad_token_id)
            sequence_logprobs(model, **batch).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    _, bare_s = timed(bare)
    n = len(pairs)
    return [("train", f"{n / stage_s:.0f} pairs/s (whole stage: load, tokenize, π_ref log-probs, steps, save)",
             f"{n / bare_s:.0f} pairs/s (bare forward + backward + step)", stage_s / bare_s)]


def bench_evaluate(cfg, work: Path, n_prompts: int, batch_size: int) -> list:
    ecfg = dataclasses.replace(cfg.evaluate, run_dir=str(work), policy=str(work / "policy"), max_prompts=n_prompts,
                               reference_cache=False, device="cpu")
    _, stage_s = timed(lambda: evaluate(ecfg))
    sides = [pd.read_parquet(work / "eval" / f"samples_{side}.parquet") for side in ("policy", "reference")]
    prompts = sides[0].drop_duplicates("prompt_id")["prompt"].tolist()
    tok = load_tokenizer(cfg.model)
    texts = [format_prompt(p, ecfg.template, tok) for p in prompts for _ in range(ecfg.num_samples)]
    models = [load_causal_lm(str(work / "policy"), device="cpu").eval(), load_causal_lm(cfg.model, device="cpu").eval()]

    def bare():
        torch.manual_seed(0)
        for model in models:
            for i in range(0, len(texts), batch_size):
                _generate_batch(model, tok, texts[i:i + batch_size], ecfg.max_new_tokens, 1.0, 1.0)
        both = pd.concat(sides)
        bare_encoder_pass(both["prompt"].tolist(), both["response"].tolist(), ecfg.batch_size, cfg.score.max_length)

    _, bare_s = timed(bare)
    n = sum(len(side) for side in sides)
    return [("evaluate", f"{n / stage_s:.0f} responses/s (policy and π_ref: sample, score, judge, log-probs, report)",
             f"{n / bare_s:.0f} responses/s (bare generate, batch {batch_size}, + one encoder pass)",
             stage_s / bare_s)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=("small", "default"), default="small")
    ap.add_argument("--prompts", type=int, default=128, help="dual prompts to use")
    ap.add_argument("--samples", type=int, default=8, help="K responses per prompt")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512],
                    help="batch sizes tried for the bare-generate floor")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    values = load_run_values(PACKAGED[args.world])
    work = Path(tempfile.mkdtemp(prefix="dualign-bench-stages-"))
    values["run_dir"] = str(work)
    cfg = resolve_run_config(values)
    prompts = pd.read_json(Path(cfg.model).parent / "prompts_dual.jsonl", lines=True)["prompt"].tolist()[:args.prompts]
    try:
        df, rows, best_batch = bench_sample(cfg, prompts, args.samples, args.batch_sizes)
        df["prompt_id"] = np.repeat(np.arange(len(prompts)), args.samples)
        scored, more = bench_score(cfg, df)
        rows += more
        rows += bench_train(cfg, scored, work)
        rows += bench_evaluate(cfg, work, args.prompts, best_batch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.world} world, {len(prompts)} prompts x K={args.samples}, {torch.get_num_threads()} threads")
    print(f"{'stage':<9}{'stage throughput':<84}{'floor':<64}{'stage/floor':>11}")
    for name, stage, floor, ratio in rows:
        print(f"{name:<9}{stage:<84}{floor:<64}{ratio:>11.2f}")


if __name__ == "__main__":
    main()

"""The checks of bench/gpu.sh, one subcommand each; each prints its figures as ``name: value`` lines.

NOT RUN YET: it was written on a machine without a GPU, vLLM or bitsandbytes (the CPU mode,
``--cpu``, runs the parts a CPU can: model build, HF sampling, refprobs equality, train with and
without gradient checkpointing). Random-initialised models only; nothing is downloaded.

    python bench/gpu_check.py build DIR [--hidden 1024 --layers 24]   # a random LLaMA (~0.3B at these sizes)
    python bench/gpu_check.py sampling DIR                              # vLLM vs HF tokens/s, log π_ref agreement
    python bench/gpu_check.py train DIR                                 # pairs/s, peak memory: full, LoRA, checkpointing, QLoRA
    python bench/gpu_check.py compare RUN_A RUN_B                       # max |Δ weight| of two runs' policies
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PROMPTS = ["How do I cook rice?", "Tell me a joke.", "Write a poem about rain.", "How can I pick a lock?",
           "What is the capital of France?", "Explain photosynthesis briefly.", "hi",
           "Give me three tips for sleeping better at night."]
TEXTS = [f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT: Here is a short, careful answer." for p in PROMPTS] * 40


def build(args) -> None:
    from dualign.modeling.tiny import save_tiny_causal_lm

    path = save_tiny_causal_lm(Path(args.dir) / "model", "llama", TEXTS, vocab_size=args.vocab, hidden=args.hidden,
                               layers=args.layers, heads=args.heads, max_positions=1024)
    pd.DataFrame({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]}).to_json(
        Path(args.dir) / "prompts.jsonl", orient="records", lines=True)
    from transformers import AutoModelForCausalLM

    print(f"model: {path} ({AutoModelForCausalLM.from_pretrained(path).num_parameters() / 1e6:.2f}M parameters)")


def _sample_cfg(args, backend: str, dtype: str):
    from dualign.sample import SampleConfig

    return SampleConfig(model=str(Path(args.dir) / "model"), prompts=str(Path(args.dir) / "prompts.jsonl"),
                        num_samples=args.k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        template="beaver", backend=backend, dtype=dtype, shard_size=10**6, device=args.device)


def _params(work: str) -> int:
    """The built model's parameter count (from its safetensors, no model built)."""
    from safetensors import safe_open

    total = 0
    for path in (Path(work) / "model").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(int(np.prod(f.get_slice(key).get_shape())) for key in f.keys())
    return total


def sampling(args) -> None:
    """Generation tokens/s of each backend on the same prompts (log π_ref pass excluded), then the
    sample stage's log π_ref against train's own forward pass and against the engine's numerics."""
    from dualign.modeling.models import (
        load_causal_lm,
        load_tokenizer,
        sequence_logprobs,
        tokenize_pairs,
    )
    from dualign.modeling.templates import format_prompt
    from dualign.sample import generate_responses, sample
    from dualign.train import TrainConfig, reference_logprobs

    model_dir = str(Path(args.dir) / "model")
    tok = load_tokenizer(model_dir)
    prompts = pd.read_json(Path(args.dir) / "prompts.jsonl", lines=True)["prompt"].tolist()
    ids = list(range(len(prompts)))
    backends = ["hf"]
    if args.device != "cpu":
        if importlib.util.find_spec("vllm") is None:
            print("sampling/vllm: not installed (pip install 'dualign[vllm]'); vLLM figures skipped")
        else:
            backends.append("vllm")
    for backend in backends:
        cfg = _sample_cfg(args, backend, "auto")
        if backend == "hf":
            model = load_causal_lm(model_dir, dtype="auto", device=args.device)
            def run(model=model):
                return generate_responses(model, tok, prompts, ids, args.k, template="beaver",
                                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                          seed=0, progress=False, logprobs=False)
        else:
            from dualign.modeling.vllm_sampler import VLLMSampler

            engine = VLLMSampler(cfg, tok)

            def run(engine=engine):
                return engine(prompts, ids, 0)
        run()  # warm-up (CUDA graphs, kernels)
        if args.device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        table = run()
        if args.device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) + (not cut)
                     for r, cut in zip(table["response"], table["truncated"], strict=True))
        print(f"sampling/{backend}/tokens_per_s: {tokens / seconds:.0f} ({tokens} tokens, {seconds:.1f} s; "
              f"{2 * _params(args.dir) * tokens / seconds / 1e12:.3g} TFLOP/s as 2·N·T over new tokens)")
        del run
        if backend == "hf":
            del model
        else:
            del engine
        if args.device != "cpu":
            torch.cuda.empty_cache()

    for backend in backends:
        run_dir = Path(args.dir) / f"run_{backend}"
        samples = pd.read_parquet(sample(_sample_cfg(args, backend, "auto"), run_dir))
        meta = json.loads((run_dir / "sample.meta.json").read_text())["ref_logprob"]
        pairs = pd.DataFrame({"prompt_id": samples["prompt_id"], "prompt": samples["prompt"],
                              "response_a": samples["response"], "response_b": samples["response"],
                              "truncated_a": samples["truncated"], "truncated_b": samples["truncated"],
                              "target_margin": 0.0})
        trainer, _, _ = reference_logprobs(TrainConfig(model=model_dir, run_dir=str(run_dir), template="beaver",
                                                       max_length=4096, device=args.device), pairs)
        recorded = samples["ref_logprob"].to_numpy()
        # the engine's numerics for scale: bf16 weights, no autocast (what sampling-time log-probs were before)
        engine_model = load_causal_lm(model_dir, dtype="auto", device=args.device).eval()
        texts = [format_prompt(p, "beaver", tok) for p in samples["prompt"]]
        engine_lp = []
        with torch.inference_mode():
            for s in range(0, len(texts), args.batch_size):
                batch = tokenize_pairs(tok, texts[s:s + args.batch_size], samples["response"].tolist()[s:s + args.batch_size],
                                       truncated=samples["truncated"].tolist()[s:s + args.batch_size])
                engine_lp += sequence_logprobs(engine_model, **{k: v.to(args.device) for k, v in batch.items()}).float().cpu().tolist()
        del engine_model
        trainer_gap = float(np.abs(recorded - trainer).max())
        engine_gap = float(np.abs(np.array(engine_lp) - trainer).max())
        print(f"refprobs/{backend}/record: {meta}")
        print(f"refprobs/{backend}/max_abs_diff_vs_train: {trainer_gap:.3g} (engine numerics: {engine_gap:.3g})")
        if trainer_gap > max(1e-4, engine_gap):
            sys.exit(f"refprobs/{backend}: the recorded log π_ref are further from train's than the engine's numerics")


def train_check(args) -> None:
    """pairs/s and peak GPU memory of a few MoCAN steps: full, LoRA, each with and without gradient
    checkpointing, and QLoRA (4-bit) where bitsandbytes is installed."""
    from dualign._infra.io import write_table
    from dualign.data.records import DualRecord, write_dual
    from dualign.train import TrainConfig, train

    rng = np.random.default_rng(0)
    run_root = Path(args.dir) / "train"
    rows = [{"prompt_id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "sample_index": k,
             "response": " ".join(["word"] * int(rng.integers(20, 120)))} for i in range(64) for k in range(4)]
    scores = pd.DataFrame(rows).assign(reward=rng.normal(size=len(rows)), cost=rng.normal(size=len(rows)))
    dual = DualRecord(beta=0.1, reward="reward", constraints=["cost<=ref-0.1"], lambdas={"cost": 0.5},
                      columns={"cost": "cost"}, feasible=True, converged=True, iterations=1, dual_value=0.0,
                      thresholds={"cost": 0.0}, predicted={}, reference={})
    variants = {"full": {}, "full+checkpointing": {"gradient_checkpointing": True},
                "lora": {"lora": True, "lora_r": 8}, "lora+checkpointing": {"lora": True, "lora_r": 8,
                                                                           "gradient_checkpointing": True}}
    if args.device != "cpu":
        variants["qlora+checkpointing"] = {"lora": True, "lora_r": 8, "merge_lora": False, "load_in_4bit": True,
                                           "gradient_checkpointing": True}
    if args.device != "cpu":  # CUDA context, kernels and allocator warmed up before the first timed variant
        variants = {"warm-up": {}, **variants}
    for name, extra in variants.items():
        run_dir = run_root / name.replace("+", "_")
        write_table(scores, run_dir / "scores.parquet")
        write_dual(dual, run_dir / "dual.json")
        if args.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        try:
            out = train(TrainConfig(model=str(Path(args.dir) / "model"), run_dir=str(run_dir), template="beaver",
                                    max_steps=args.steps, per_device_batch_size=8, max_length=512, logging_steps=1,
                                    pairs_per_prompt=4, device=args.device, **extra))
        except Exception as e:  # noqa: BLE001 - one variant failing (e.g. no bitsandbytes) is a figure too
            print(f"train/{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        if name == "warm-up":
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device != "cpu" else float("nan")
        tokens_per_s = out["tokens"]["training"] / out["train_runtime"]
        print(f"train/{name}: {out['pairs_per_second']:.1f} pairs/s, peak {peak:.2f} GiB, {tokens_per_s:.0f} tokens/s, "
              f"{6 * _params(args.dir) * tokens_per_s / 1e12:.3g} TFLOP/s (6·N·T)")


def compare(args) -> None:
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(d) / "policy" / "model.safetensors")) for d in (args.dir, args.other))
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"weights/{Path(args.other).name}_vs_{Path(args.dir).name}/max_abs_diff: {diff:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=["build", "sampling", "train", "compare"])
    ap.add_argument("dir")
    ap.add_argument("other", nargs="?", help="compare: the second run directory")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    {"build": build, "sampling": sampling, "train": train_check, "compare": compare}[args.check](args)


if __name__ == "__main__":
    main()

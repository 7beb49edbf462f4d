"""Training throughput and peak memory: dualign's trainer vs TRL's DPOTrainer, same model and pairs.

Run: ``.venv/bin/python bench/train.py [--pairs 512] [--steps 0]``. Builds a GPT-2 (hidden 128,
4 layers) with a BPE tokenizer trained here and a set of random-word prompt/chosen/rejected pairs,
then trains each trainer in its own subprocess (so memory peaks do not mix) with DPO, β = 0.1,
batch 8, reference log-probs precomputed before the loop by both. Prints a table and the ratio.

Figures: ``loop pairs/s`` = pairs / time of the optimisation loop alone (ours: ``train_runtime``;
TRL: ``trainer.train()``, whose reference pass already ran in ``__init__``); ``total s`` = wall time
of the whole worker after imports (model load, tokenisation, reference pass, loop, save for ours);
``peak MiB``: torch.cuda.max_memory_allocated on a GPU, else the growth of the process's peak RSS
(ru_maxrss) from after the imports to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a rice lock rain poem joke cook simmer water road chicken safe help cannot please "
         "night roof soft tap answer question light dark quick slow red blue green friend story").split()


def _text(rng, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def build(workdir: Path, num_pairs: int) -> None:
    import numpy as np
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from dualign.modeling.tiny import train_bpe_tokenizer

    rng = np.random.default_rng(0)
    prompts = [_text(rng, 8, 20) + "?" for _ in range(num_pairs)]
    chosen = [_text(rng, 20, 60) for _ in range(num_pairs)]
    rejected = [_text(rng, 20, 60) for _ in range(num_pairs)]
    tok = train_bpe_tokenizer(prompts + chosen + rejected, vocab_size=2000)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=4, n_head=4, n_positions=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(workdir / "model")
    tok.save_pretrained(workdir / "model")
    pd.DataFrame({"prompt": prompts, "chosen": chosen, "rejected": rejected}).to_json(
        workdir / "prefs.jsonl", orient="records", lines=True)


def _peak_mib(base_rss_kib: int) -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss_kib) / 1024


def worker_ours(workdir: Path, args) -> dict:
    import accelerate  # noqa: F401 - imported before the clock starts, as TRL's worker imports it
    import transformers.optimization  # noqa: F401

    from dualign.train import TrainConfig, train

    base, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    cfg = TrainConfig(model=str(workdir / "model"), run_dir=str(workdir / "ours"), method="dpo",
                      preferences=str(workdir / "prefs.jsonl"), beta=0.1, template="none",
                      learning_rate=1e-5, num_epochs=1.0, max_steps=args.steps, per_device_batch_size=8,
                      max_length=256, warmup_ratio=0.0, logging_steps=10, save_steps=10**9)
    out = train(cfg)
    return {"loop_s": out["train_runtime"], "total_s": time.perf_counter() - t0, "steps": out["step"],
            "peak_mib": _peak_mib(base)}


def worker_trl(workdir: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    path = str(workdir / "model")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ref_model = AutoModelForCausalLM.from_pretrained(path)
    data = Dataset.from_json(str(workdir / "prefs.jsonl"))
    cuda = torch.cuda.is_available()
    cfg = DPOConfig(output_dir=str(workdir / "trl"), beta=0.1, learning_rate=1e-5, num_train_epochs=1,
                    max_steps=args.steps if args.steps > 0 else -1, per_device_train_batch_size=8,
                    max_length=256, warmup_steps=0, logging_steps=10, save_strategy="no", report_to="none",
                    precompute_ref_log_probs=True, use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=data, processing_class=tok)
    t1 = time.perf_counter()
    out = trainer.train()
    loop = time.perf_counter() - t1
    return {"loop_s": loop, "total_s": time.perf_counter() - t0, "steps": out.global_step, "peak_mib": _peak_mib(base)}


def _run_worker(name: str, workdir: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", workdir, "--pairs", str(args.pairs),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    # A fresh datasets cache per run: TRL caches its tokenisation and reference pass there.
    cache = tempfile.mkdtemp(dir=workdir, prefix=f"hf_cache_{name}_")
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_CACHE": cache})
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        sys.exit(f"{name} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer (alternating); the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (0: one epoch)")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        fn = worker_ours if args.worker == "ours" else worker_trl
        print("RESULT " + json.dumps(fn(Path(args.workdir), args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build(workdir, args.pairs)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for rep in range(args.repeats):
            for name in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):
                runs[name].append(_run_worker(name, tmp, args))
        results = {name: min(rs, key=lambda r: r["loop_s"]) for name, rs in runs.items()}
        for r in results.values():
            r["pairs_per_s"] = r["steps"] * 8 / r["loop_s"]

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({args.threads} thread(s))"
    print(f"GPT-2 hidden 128, 4 layers; {args.pairs} pairs, batch 8, DPO, β=0.1; device: {device}; "
          f"fastest of {args.repeats} runs each")
    print(f"{'trainer':<10}{'steps':>7}{'loop s':>9}{'loop pairs/s':>14}{'total s':>9}{'peak MiB':>10}")
    for name, r in results.items():
        print(f"{name:<10}{r['steps']:>7}{r['loop_s']:>9.2f}{r['pairs_per_s']:>14.1f}{r['total_s']:>9.2f}{r['peak_mib']:>10.1f}")
    ours, trl = results["ours"], results["trl"]
    print(f"throughput ours/TRL: {ours['pairs_per_s'] / trl['pairs_per_s']:.2f}x; "
          f"peak memory ours/TRL: {ours['peak_mib'] / max(trl['peak_mib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()

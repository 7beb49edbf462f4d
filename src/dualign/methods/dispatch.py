"""``dualign train --method NAME`` for every method: the config class and trainer of each
baseline, and :func:`run_method`, which trains any method and records what it cost
(``<run_dir>/compute.json``: wall-clock, gradient steps, sampled tokens, peak memory, λ).

MoCAN, PeCAN and DPO are the one loop (:func:`dualign.train.train`, chosen by ``method`` from
``LOSSES``); the baselines have their own files in :mod:`dualign.methods`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from dualign.errors import ConfigError
from dualign.io import write_json
from dualign.methods.dual_ascent import DualAscentConfig, train_dual_ascent
from dualign.methods.fixed_lambda import FixedLambdaConfig, train_fixed_lambda
from dualign.methods.objective import dual_file
from dualign.methods.ppo_lagrangian import PPOLagrangianConfig, train_ppo_lagrangian
from dualign.records import read_dual
from dualign.train import LOSSES, train

CONFIGS: dict[str, type] = {"ppo-lagrangian": PPOLagrangianConfig, "dual-ascent": DualAscentConfig,
                            "fixed-lambda": FixedLambdaConfig, "helpful-dpo": FixedLambdaConfig,
                            "safe-dpo": FixedLambdaConfig}
TRAINERS = {"ppo-lagrangian": train_ppo_lagrangian, "dual-ascent": train_dual_ascent,
            "fixed-lambda": train_fixed_lambda, "helpful-dpo": train_fixed_lambda,
            "safe-dpo": train_fixed_lambda}


def run_method(cfg: Any) -> dict[str, Any]:
    """Train with any method (a baseline config, or a TrainConfig for mocan/dpo/...), measuring it;
    write ``<run_dir>/compute.json``: wall_s, gradient_steps, sampled_tokens (online only), peak
    memory (MiB), final λ and, for the iterative methods, the λ trajectory."""
    with measure() as used:
        if cfg.method in TRAINERS:
            summary = TRAINERS[cfg.method](cfg)
        elif cfg.method in LOSSES:
            out = train(cfg)
            dual_path = dual_file(Path(cfg.run_dir), cfg.dual)
            lambdas = read_dual(dual_path).lambdas if dual_path.exists() else {}
            summary = {"gradient_steps": out["step"], "sampled_tokens": 0, "lambdas": lambdas,
                       "output_dir": out["output_dir"]}
        else:
            raise ConfigError(f"config key 'method': {cfg.method!r} is not one of "
                              f"{', '.join([*LOSSES, *TRAINERS])}")
    compute = {"method": cfg.method, **summary, **used}
    write_json(compute, Path(cfg.run_dir) / "compute.json")
    return compute


@contextlib.contextmanager
def measure() -> Iterator[dict[str, float]]:
    """Wall-clock seconds and peak memory (MiB) of the block: GPU peak allocation on CUDA, and the
    process's peak resident set size (polled every 50 ms)."""
    out: dict[str, float] = {}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["wall_s"] = time.perf_counter() - t0
        stop.set()
        thread.join()
        out["peak_rss_mb"] = max(peak[0], proc.memory_info().rss) / 2**20
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        out["peak_memory_mb"] = out["peak_gpu_mb"] if cuda else out["peak_rss_mb"]

"""``dualign train --method NAME`` for every method: the config class and trainer of each
baseline, and :func:`run_method`, which trains any method and records what it cost
(``<run_dir>/compute.json``: wall-clock, gradient steps, sampled tokens, peak memory, λ, and the
tokens and FLOPs of each stage, :mod:`dualign.modeling.flops`; the same FLOPs in each
``budgets/<n>/compute.json`` an iterative method wrote).

MoCAN, PeCAN and DPO are the one loop (:func:`dualign.train.train`, chosen by ``method`` from
``LOSSES``); the baselines have their own files in :mod:`dualign.baselines`.
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

from dualign._infra.errors import ConfigError
from dualign._infra.io import read_json, write_json
from dualign.baselines.dual_ascent import DualAscentConfig, train_dual_ascent
from dualign.baselines.fixed_lambda import FixedLambdaConfig, train_fixed_lambda
from dualign.baselines.grpo_lagrangian import GRPOLagrangianConfig, train_grpo_lagrangian
from dualign.baselines.ppo_lagrangian import PPOLagrangianConfig, train_ppo_lagrangian
from dualign.baselines.preference_dpo import PreferenceDPOConfig, train_preference_dpo
from dualign.baselines.safe_rlhf_ppo import SafeRLHFPPOConfig, train_safe_rlhf_ppo
from dualign.data.records import read_dual
from dualign.methods.objective import dual_file
from dualign.modeling.flops import model_forward_params, scorer_forward_params, stage_flops
from dualign.train import LOSSES, train

CONFIGS: dict[str, type] = {
    "ppo-lagrangian": PPOLagrangianConfig, "ppo-lagrangian-critic": SafeRLHFPPOConfig,
    "grpo-lagrangian": GRPOLagrangianConfig, "dual-ascent": DualAscentConfig, "fixed-lambda": FixedLambdaConfig, "reward-only-mocan": FixedLambdaConfig,
    "cost-only-mocan": FixedLambdaConfig, "dpo-helpful": PreferenceDPOConfig, "dpo-safe": PreferenceDPOConfig,
    "safedpo": PreferenceDPOConfig}
TRAINERS = {
    "ppo-lagrangian": train_ppo_lagrangian, "ppo-lagrangian-critic": train_safe_rlhf_ppo,
    "grpo-lagrangian": train_grpo_lagrangian, "dual-ascent": train_dual_ascent, "fixed-lambda": train_fixed_lambda, "reward-only-mocan": train_fixed_lambda,
    "cost-only-mocan": train_fixed_lambda, "dpo-helpful": train_preference_dpo, "dpo-safe": train_preference_dpo,
    "safedpo": train_preference_dpo}
# The scorer-margin baselines' old names, refused with the new one (an alias would sit next to the
# preference baselines dpo-helpful / dpo-safe and be mistaken for them).
RENAMED = {"helpful-dpo": "reward-only-mocan", "safe-dpo": "cost-only-mocan"}


def run_method(cfg: Any) -> dict[str, Any]:
    """Train with any method (a baseline config, or a TrainConfig for mocan/dpo/...), measuring it;
    write ``<run_dir>/compute.json``: wall_s, gradient_steps, sampled_tokens (online only), peak
    memory (MiB), final λ and, for the iterative methods, the λ trajectory."""
    check_method(cfg.method)
    where = run_settings(cfg)
    with measure() as used:
        if cfg.method in TRAINERS:
            summary = TRAINERS[cfg.method](cfg)
        else:
            out = train(cfg)
            dual_path = dual_file(Path(cfg.run_dir), cfg.dual)
            lambdas = read_dual(dual_path).lambdas if dual_path.exists() else {}
            summary = {"gradient_steps": out["step"], "sampled_tokens": 0, "lambdas": lambdas,
                       "output_dir": out["output_dir"], "tokens": out["tokens"]}
    compute = {"method": cfg.method, **summary, **used}
    flops = _flops_of(where.model, summary.get("scorers") or [], summary.get("critic_params") or 0)
    compute["flops"] = flops(compute.get("tokens"))
    write_json(compute, Path(where.run_dir) / "compute.json")
    for budget in sorted((Path(where.run_dir) / "budgets").glob("*/compute.json")):
        record = read_json(budget)
        write_json({**record, "flops": flops(record.get("tokens"))}, budget)
    return compute


def run_settings(cfg: Any) -> Any:
    """The part of a method's config that names its model and run directory: the loop's settings a
    baseline holds (``cfg.train``), else the config itself (the loop's own, PPO-/GRPO-Lagrangian's)."""
    return getattr(cfg, "train", cfg)


def check_method(method: str) -> None:
    """One line for an unknown method, naming the new name of a renamed one."""
    if method in RENAMED:
        raise ConfigError(f"method {method!r} was renamed {RENAMED[method]!r} (MoCAN's loss on scorer margins; "
                          "DPO on preference pairs is dpo-helpful / dpo-safe)")
    if method not in TRAINERS and method not in LOSSES:
        raise ConfigError(f"config key 'method': {method!r} is not one of {', '.join([*LOSSES, *TRAINERS])}")


def _flops_of(model: str, scorers: list[str], critic_params: float = 0):
    """tokens → FLOPs per stage (:func:`dualign.modeling.flops.stage_flops`) with the policy's, the online
    scorers' and each critic's parameter counts; None where the policy is not a local model directory."""
    n_policy = model_forward_params(model)
    n_scorers = [scorer_forward_params(s) for s in scorers]

    def flops(tokens: dict | None) -> dict | None:
        return stage_flops(tokens, n_policy, n_scorers, critic_params) if tokens is not None and n_policy else None
    return flops


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

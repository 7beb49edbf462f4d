"""The one training loop. Methods differ only by the loss function picked from ``LOSSES``, each
given only what it uses.

``train(cfg)`` reads a pairs table (built from ``scores.parquet`` + ``dual.json``, from a
preference file, or given ready-made; the builders live with their methods in
:mod:`dualign.methods`), takes log π_ref of every response once before the loop (from the
``ref_logprob`` columns when the sample stage's record says they are this run's numerics,
:mod:`dualign.modeling.refprobs`, else with the model itself before its first update, so no second model
stays in memory), then minimises the mean pair loss with AdamW and a linear warmup/decay
schedule. It runs plainly or under ``accelerate launch`` / ``torchrun`` (DDP tested on the CPU;
FSDP and DeepSpeed on GPUs only), full fine-tune, LoRA or QLoRA (``load_in_4bit``), with optional
gradient checkpointing, bf16 autocast on a GPU. A checkpoint ``<run_dir>/train.state/state.safetensors``
(:mod:`dualign.modeling.checkpoint`) is written every ``save_steps``; a killed run started again resumes
from it and ends with the same weights as an uninterrupted run (the data order is a function of
seed and epoch).

The config (one field per flag), the pair sources and the loop stay together so that one file
shows everything a step depends on; :class:`MoCANTrainer` (with :class:`MoCANConfig`) runs the same
loop on objects in memory, as TRL's trainers (docs/python_api.md); tokenized batches and the checkpoint live in
:mod:`dualign.modeling.batches` and :mod:`dualign.modeling.checkpoint`.

accelerate, transformers' scheduler and peft are imported where they are used: importing them
costs seconds that ``dualign train --help`` and the other stages should not pay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from dualign._infra.config import config_to_dict, dump_yaml
from dualign._infra.distributed import launched_ranks
from dualign._infra.errors import ConfigError, InputError
from dualign._infra.io import read_json, read_table, write_table
from dualign._infra.progress import Progress
from dualign._infra.provenance import mark_done, record_stage, unmark, versions
from dualign._infra.timing import part
from dualign._infra.tracking import Tracker, check_report_to
from dualign.data.records import DualRecord, read_dual, trained_target
from dualign.methods import dpo, mocan, pecan
from dualign.methods.losses import Diagnostics, kl_estimate, mocan_loss, pecan_loss, safedpo_loss
from dualign.methods.pairs import require_columns, validate_pairs
from dualign.modeling.batches import EncodedPairs, encode_pairs, fill_ref_logps
from dualign.modeling.checkpoint import (
    STATE_FILE,
    load_state,
    restore_state,
    save_state,
    truncate_metrics,
)
from dualign.modeling.models import (
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    save_model,
    sequence_logprobs,
)
from dualign.modeling.refprobs import mismatch, trainer_numerics
from dualign.modeling.refprobs import record as ref_record
from dualign.modeling.templates import check_template


@dataclass
class TrainConfig:
    model: str = field(metadata={"help": "π_ref (the initial policy): Hugging Face model id or local directory"})
    run_dir: str = field(metadata={"help": "run directory (reads scores.parquet, dual.json; writes policy/)"})
    method: str = field(default="mocan", metadata={
        "help": "loss: mocan, pecan, dpo, or safedpo (on a pairs table with unsafe_a/unsafe_b/safety_margin)"})
    beta: float | None = field(default=None, metadata={
        "help": "KL weight β (default: dual.json's beta, else 0.1)"})
    label: Literal["soft", "bernoulli", "regression", "absolute"] = field(default="soft", metadata={
        "help": "MoCAN/PeCAN label: soft (expected loss), bernoulli (sampled hard label), regression (squared "
                "margin error), absolute (regression + each response's log-ratio to the target's; pairs from scores)"})
    scores: str | None = field(default=None, metadata={"help": "scores table (default <run_dir>/scores.parquet)"})
    dual: str | None = field(default=None, metadata={"help": "dual.json with λ* (default <run_dir>/dual.json)"})
    preferences: str | None = field(default=None, metadata={
        "help": "preference file instead of scores: prompt/chosen/rejected, or prompt/response_0/response_1 + <score>_0/_1"})
    pairs: str | None = field(default=None, metadata={"help": "a ready pairs table (docs/formats.md), used as is"})
    pairs_from: Literal["auto", "scores", "preferences"] = field(default="auto", metadata={
        "help": "where pecan's pairs come from: preferences (the preference pairs scored with implicit rewards, "
                "as in the paper), scores (π_ref's samples, scored as for the dual: the pairs the dual's "
                "prediction is made on); auto: preferences for pecan, scores for mocan"})
    pairs_per_prompt: int | None = field(default=None, metadata={
        "help": "pairs drawn per prompt from scores (default: all K(K-1)/2)"})
    ref_logprobs: Literal["auto", "reuse", "compute"] = field(default="auto", metadata={
        "help": "log π_ref source: auto (reuse the scores' column when sample.meta.json's ref_logprob record names "
                "this model, revision, template and train's numerics, else compute), reuse (refused when that "
                "record differs), compute"})
    template: str = field(default="auto", metadata={"help": "prompt template (as for sample)"})
    revision: str | None = field(default=None, metadata={"help": "model revision"})
    reference: str | None = field(default=None, metadata={
        "help": "π_ref when the policy does not start from it (e.g. continuing from a trained policy): the "
                "model whose log-probs anchor the loss (default: model)"})
    max_length: int = field(default=512, metadata={"help": "longest prompt+response, in tokens (responses are cut)"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak AdamW learning rate"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the pairs"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps (overrides num_epochs when > 0)"})
    per_device_batch_size: int = field(default=8, metadata={"help": "pairs per forward pass and device"})
    group_by_prompt: bool = field(default=False, metadata={
        "help": "order each epoch by prompt (prompts shuffled, a prompt's pairs together), so that a batch "
                "holds whole prompts and each response runs once per step: the 28 pairs of K=8 samples "
                "cost 8 sequences, not 56"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "forward passes per optimizer step"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps with linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: none)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block's activations in the backward pass: less memory, ~30% more compute"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: hold the frozen base in 4-bit NF4 (bitsandbytes, a CUDA GPU; needs lora: true, "
                "merge_lora: false)"})
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "modules LoRA adapts (default: peft's choice for the architecture)"})
    merge_lora: bool = field(default=True, metadata={"help": "save the merged model (else the adapter)"})
    seed: int = field(default=0, metadata={"help": "seed: pair draw, data order, Bernoulli labels"})
    logging_steps: int = field(default=10, metadata={"help": "steps between metrics.jsonl lines"})
    report_to: list[Literal["none", "tensorboard", "wandb"]] = field(default_factory=lambda: ["none"], metadata={
        "help": "where metrics.jsonl's lines also go: none, tensorboard (<run_dir>/tensorboard), wandb "
                "(<run_dir>/wandb; WANDB_MODE=offline: no network), or several"})
    save_steps: int = field(default=500, metadata={"help": "steps between checkpoints in <run_dir>/train.state"})
    output_dir: str | None = field(default=None, metadata={"help": "where the policy goes (default <run_dir>/policy)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: cuda if available"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run Python code shipped with the model (its auto_map); off: such a model is refused"})

    def __post_init__(self) -> None:
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"beta must be a positive finite number, got {self.beta}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                     "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.pairs_per_prompt is not None and self.pairs_per_prompt < 1:
            raise ConfigError(f"pairs_per_prompt must be ≥ 1, got {self.pairs_per_prompt}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be ≥ 2 (a prompt token and a response token), got {self.max_length}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be a finite number ≥ 0, got {getattr(self, name)}")
        if not (math.isfinite(self.num_epochs) and self.num_epochs > 0):
            raise ConfigError(f"num_epochs must be a positive finite number, got {self.num_epochs}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.seed < 0:
            raise ConfigError(f"seed must be ≥ 0, got {self.seed}")
        if self.load_in_4bit and not (self.lora and not self.merge_lora):
            raise ConfigError("load_in_4bit trains a LoRA adapter on a frozen 4-bit base: it needs lora: true and "
                             "merge_lora: false (a 4-bit base cannot be merged back exactly)")
        check_template(self.template)
        check_report_to(self.report_to)


# A method's loss and, in order, what it takes after the sequence log-probs (policy a, policy b,
# reference a, reference b): pair columns of the batch by name (None where the table has none, as
# target_a/target_b of preference pairs), the config's ``beta`` and ``label``, the loop's ``generator``.
Loss = tuple[Callable[..., tuple[torch.Tensor, Diagnostics]], tuple[str, ...]]

LOSSES: dict[str, Loss] = {
    "mocan": (mocan_loss, ("target_margin", "beta", "label", "generator", "target_a", "target_b")),
    "pecan": (pecan_loss, ("target_margin", "beta", "label", "generator", "target_a", "target_b")),
    "dpo": (dpo.oriented_dpo_loss, ("target_margin", "beta")),
    "safedpo": (safedpo_loss, ("beta", "unsafe_a", "unsafe_b", "safety_margin")),
}


# ---------------------------------------------------------------- the loop

def train(cfg: TrainConfig, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train π from π_ref on the pairs; save ``<output_dir>``; return a summary.

    ``stop_at_step``: checkpoint and return after that optimizer step (pausing a job; the next
    call resumes), without saving the policy.
    """
    pairs, dual, hashes = load_pairs(cfg)
    return train_on_pairs(cfg, pairs, dual, hashes, stop_at_step=stop_at_step)[0]


def train_on_pairs(cfg: TrainConfig, pairs: pd.DataFrame, dual: DualRecord | None, hashes: dict[str, str], *,
                   model=None, tokenizer=None, reference=None,
                   stop_at_step: int | None = None) -> tuple[dict[str, Any], Any]:
    """:func:`train`'s loop on pairs already built: (the summary, the trained model).

    ``model``, ``tokenizer`` and ``reference`` (π_ref when the policy does not start from it):
    objects already loaded, used in place of loading ``cfg.model`` / ``cfg.reference``; the model
    is trained in place.
    """
    recorded, cfg = cfg, _resolve(cfg, dual)
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    run_dir = Path(cfg.run_dir)
    state_path = run_dir / "train.state" / STATE_FILE
    state = load_state(state_path, _resume_key(cfg)) if state_path.exists() else None
    torch.manual_seed(cfg.seed)
    # The policy starts as π_ref: log π_ref of every response is taken from it before its first update.
    # Loaded before the first write, so a model that cannot be loaded leaves nothing behind.
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if model is None:
        model = load_causal_lm(cfg.model, revision=cfg.revision, dtype="float32", device=accelerator.device,
                               trust_remote_code=cfg.trust_remote_code, load_in_4bit=cfg.load_in_4bit)
    else:
        model = model.to(accelerator.device)
    trusted = _recorded_logprobs_usable(cfg, trainer_numerics(accelerator.device, cfg.load_in_4bit),
                                        "preferences" not in hashes, main)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        unmark(run_dir, "train")
        record_stage(run_dir, "train", recorded, cfg.seed,
                     extra={"data_sha256": hashes, "processes": accelerator.num_processes})
        if cfg.pairs is None:
            write_table(pairs, run_dir / "pairs.parquet")
    disable_dropout(model)
    model.config.use_cache = False  # a KV cache is built and thrown away on every forward otherwise
    pad_id = tokenizer.pad_token_id
    data = encode_pairs(pairs, tokenizer, cfg.template, cfg.max_length)
    need = _reference_rows(data, trusted)
    if state is not None:
        data.ref_logps = state["ref_logps"]
    elif reference is not None:
        disable_dropout(reference)
        _reference_logps(reference.to(accelerator.device), data, need, cfg, pad_id, accelerator)
    elif cfg.reference and cfg.reference != cfg.model:
        reference = load_causal_lm(cfg.reference, dtype="float32", device=accelerator.device,
                                   trust_remote_code=cfg.trust_remote_code)
        disable_dropout(reference)
        _reference_logps(reference, data, need, cfg, pad_id, accelerator)
        del reference
    else:
        _reference_logps(model, data, need, cfg, pad_id, accelerator)

    model = _trainable(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    steps_per_epoch = math.ceil(len(data) / global_batch)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    scheduler = _schedule(optimizer, cfg, total)
    groups = data.groups.numpy() if cfg.group_by_prompt else None
    tokens = {"reference": data.tokens(torch.unique(data.canonical[need])),
              "training": _schedule_tokens(data, cfg, total, steps_per_epoch, global_batch, groups,
                                           accelerator.num_processes)}
    generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    start = restore_state(state, model, optimizer, scheduler, generator) if state is not None else 0
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaces them with sharded ones
    sharded = _sharded(accelerator)
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        truncate_metrics(metrics_path, start)
    tracker = Tracker(cfg.report_to, run_dir, config_to_dict(recorded), f"train {cfg.method}", enabled=main)

    loss = LOSSES[cfg.method]
    lambdas = {f"dual/lambda_{k}": v for k, v in (dual.lambdas if dual else {}).items()}
    window: dict[str, list] = {}
    progress = Progress(total=total, initial=start, desc=f"train {cfg.method}", unit="steps", enabled=main)
    t0, trained = time.perf_counter(), 0
    order, order_epoch = None, -1
    for step in range(start, total):
        epoch, batch_index = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(cfg.seed, epoch, len(data), groups), epoch
        rows = order[batch_index * global_batch:(batch_index + 1) * global_batch]
        trained += len(rows)
        step_metrics = _optimizer_step(model, optimizer, data, rows, loss, cfg, generator, pad_id,
                                       accelerator, params)
        scheduler.step()
        for k, v in step_metrics.items():
            window.setdefault(k, []).append(v)
        progress.update(1)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == total:
            line = _reduce_window(window, accelerator, cfg.beta)
            line.update(lambdas)
            line.update({"learning_rate": scheduler.get_last_lr()[0], "epoch": done / steps_per_epoch,
                         "step": done})
            window = {}
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
                tracker.log(line, done)
                progress.set_postfix(loss=f"{line['loss']:.4f}")
        if not sharded and done < total and (done % cfg.save_steps == 0 or done == stop_at_step):
            accelerator.wait_for_everyone()
            if main:
                save_state(state_path, done, accelerator.unwrap_model(model), optimizer, scheduler,
                           generator, data.ref_logps, _resume_key(cfg))
        if done == stop_at_step and done < total:
            progress.close()
            tracker.close()
            return {"step": done, "total_steps": total, "stopped": True}, accelerator.unwrap_model(model)
    progress.close()
    tracker.close()
    runtime = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(model) if sharded else None  # a collective: every process
    model = accelerator.unwrap_model(model)
    if main:
        model = _save_policy(model, tokenizer, cfg, dual, hashes, len(pairs), full_state)
        shutil.rmtree(state_path.parent, ignore_errors=True)
        mark_done(run_dir, "train")
    accelerator.wait_for_everyone()
    return {"step": total, "total_steps": total, "stopped": False, "output_dir": cfg.output_dir,
            "train_runtime": runtime, "pairs_per_second": trained / runtime, "tokens": tokens}, model


def epoch_order(seed: int, epoch: int, n: int, groups: np.ndarray | None = None) -> np.ndarray:
    """The pair order of one epoch, drawn from (seed, epoch) alone, so resume needs no state.

    Without ``groups``: a permutation of the n pairs. With ``groups`` (pair i's prompt number): the
    prompts in a random order, each prompt's pairs together in a random order within it.
    """
    rng = np.random.default_rng([seed, epoch])
    if groups is None:
        return rng.permutation(n)
    prompt_rank = np.argsort(rng.permutation(int(groups.max()) + 1))  # prompt g comes at position prompt_rank[g]
    return np.lexsort((rng.random(n), prompt_rank[groups]))


def _schedule_tokens(data: EncodedPairs, cfg: TrainConfig, total: int, steps_per_epoch: int, global_batch: int,
                     groups: np.ndarray | None, processes: int) -> int:
    """Tokens the whole schedule runs forward and backward (all processes): the distinct sequences
    of every micro-batch of every step, split as :func:`_optimizer_step` splits them. A function
    of the config alone, so a resumed run counts what an uninterrupted one does."""
    count = 0
    for step in range(total):
        epoch, batch_index = divmod(step, steps_per_epoch)
        if batch_index == 0:
            order = epoch_order(cfg.seed, epoch, len(data), groups)
        rows = order[batch_index * global_batch:(batch_index + 1) * global_batch]
        for share in np.array_split(rows, processes):
            for i in range(0, len(share), cfg.per_device_batch_size):
                count += data.tokens(data.distinct(share[i:i + cfg.per_device_batch_size].tolist())[1])
    return count


def pair_loss(model, data: EncodedPairs, rows: list[int], loss: Loss, cfg: TrainConfig,
              generator: torch.Generator, pad_id: int, accelerator) -> tuple[torch.Tensor, Diagnostics]:
    """Per-pair losses of ``rows``: one forward pass over their distinct responses (a and b together;
    a response shared by several pairs, as in all-pairs MoCAN batches, is run once), then the
    method's ``loss`` (an entry of ``LOSSES``) on what it takes."""
    seq_rows, unique, where = data.distinct(rows)
    batch = {k: v.to(accelerator.device) for k, v in data.collate(unique.tolist(), pad_id).items()}
    with accelerator.autocast():
        logps = sequence_logprobs(model, **batch).float()[where.to(accelerator.device)]
    ref = data.ref_logps[seq_rows].to(accelerator.device)
    lp = (logps[: len(rows)], logps[len(rows):], ref[: len(rows)], ref[len(rows):])
    inputs = {**{k: v[rows].to(accelerator.device) for k, v in data.columns.items()},
              "beta": cfg.beta, "label": cfg.label, "generator": generator}
    loss_fn, takes = loss
    return loss_fn(*lp, *(inputs.get(name) for name in takes))


def _optimizer_step(model, optimizer, data: EncodedPairs, rows: np.ndarray, loss: Loss,
                    cfg: TrainConfig, generator: torch.Generator, pad_id: int, accelerator,
                    params: list[torch.nn.Parameter]) -> dict[str, list | float]:
    """Accumulate gradients over this process's share of ``rows``, clip, step; return its metrics.

    Each pair's loss is weighted w_i/Σ_rows w (w_i the pairs table's ``weight``, else 1; times the
    process count, which DDP averages away), so the gradient is that of the weighted mean loss
    over the global batch whatever the micro-batch split.
    """
    share = np.array_split(rows, accelerator.num_processes)[accelerator.process_index].tolist()
    weight = 1.0
    if not share:  # a short last batch: join the collective ops with a zero-weight pair
        share, weight = [int(rows[0])], 0.0
    pair_weights = data.columns.get("weight")
    total = float(pair_weights[rows].sum()) if pair_weights is not None else float(len(rows))
    scale = weight * accelerator.num_processes / total if total > 0 else 0.0
    micro = [share[i:i + cfg.per_device_batch_size] for i in range(0, len(share), cfg.per_device_batch_size)]
    out: dict[str, list | float] = {"diag": []}
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1
        ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
        with ctx:
            losses, diag = pair_loss(model, data, mb, loss, cfg, generator, pad_id, accelerator)
            w = torch.ones_like(losses) if pair_weights is None else pair_weights[mb].to(losses)
            with part("backward"):
                accelerator.backward((losses * w).sum() * scale)
        if weight:
            out["diag"].append({"loss": losses.detach(), **diag, "_weight": w.detach()})
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    with part("optimizer"):
        out["grad_norm"] = float(accelerator.clip_grad_norm_(params, max_norm))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def _reduce_window(window: dict[str, list], accelerator, beta: float) -> dict[str, float]:
    """Means over every pair of the logging window and every process (weighted by the pairs'
    ``weight``, as the loss is); ``kl`` from the log-ratios."""
    diags = [d for step in window.get("diag", []) for d in step]
    keys = [k for k in diags[0] if k != "_weight"] if diags else []
    cat = {k: torch.cat([d[k].float().cpu() for d in diags]) for k in [*keys, "_weight"]} if diags else {}
    sums = torch.tensor([float((cat[k] * cat["_weight"]).sum()) for k in keys]
                        + [float(cat["_weight"].sum()) if keys else 0.0],
                        device=accelerator.device, dtype=torch.float64)
    logratios = torch.cat([cat["rewards/chosen"], cat["rewards/rejected"]]) / beta if keys else torch.zeros(1)
    extra = torch.tensor([float(kl_estimate(logratios)), float(np.mean(window.get("grad_norm", [0.0])))],
                         device=accelerator.device, dtype=torch.float64)
    sums = accelerator.reduce(sums, reduction="sum")
    extra = accelerator.reduce(extra, reduction="mean")
    count = float(sums[-1]) if float(sums[-1]) > 0 else 1.0
    line = {k: float(sums[i]) / count for i, k in enumerate(keys)}
    line["kl"], line["grad_norm"] = float(extra[0]), float(extra[1])
    return line


# ---------------------------------------------------------------- setup

def load_pairs(cfg: TrainConfig) -> tuple[pd.DataFrame, DualRecord | None, dict[str, str]]:
    """The training pairs, dual.json (None when not needed and absent) and the sha256 of the input files."""
    if cfg.method not in LOSSES:
        raise ConfigError(f"config key 'method': {cfg.method!r} is not one of {', '.join(LOSSES)}")
    if cfg.method == "pecan" and cfg.label in ("regression", "absolute") and cfg.pairs_from != "scores":
        raise ConfigError("config key 'label': pecan uses soft or bernoulli labels on preference pairs "
                          f"({cfg.label} needs pairs_from=scores)")
    if cfg.pairs_from == "preferences" and not (cfg.preferences or cfg.method == "pecan"):
        raise ConfigError("config key 'pairs_from': preferences needs 'preferences' (a preference file)")
    run_dir = Path(cfg.run_dir)
    dual_path = Path(cfg.dual) if cfg.dual else run_dir / "dual.json"
    preferences = cfg.preferences
    if cfg.pairs_from == "scores" and preferences:
        raise ConfigError("config keys 'pairs_from' and 'preferences': pairs_from=scores trains on the scores "
                          "table, drop 'preferences'")
    if cfg.method == "pecan" and not (preferences or cfg.pairs) and cfg.pairs_from != "scores":
        preferences = str(run_dir / "preference_scores.parquet")  # the score stage's, with implicit rewards
    files: dict[str, Path] = {}
    if cfg.pairs:
        files["pairs"] = Path(cfg.pairs)
        pairs = validate_pairs(read_table(cfg.pairs), str(cfg.pairs))
        dual = read_dual(dual_path) if dual_path.exists() else None
    elif preferences:
        files["preferences"] = Path(preferences)
        prefs = read_table(preferences)
        needs_dual = "chosen" not in prefs.columns or cfg.dual is not None
        dual = read_dual(dual_path) if needs_dual or dual_path.exists() else None
        build = pecan.pecan_pairs if cfg.method == "pecan" else dpo.pairs_from_preferences
        pairs = build(prefs, dual, str(preferences))
    else:
        scores_path = Path(cfg.scores) if cfg.scores else run_dir / "scores.parquet"
        files["scores"] = scores_path
        scores = read_table(scores_path)
        if not dual_path.exists():
            raise InputError(f"{dual_path}: file not found (run the dual stage first, or pass --dual)")
        dual = read_dual(dual_path)
        pairs = mocan.pairs_from_scores(scores, dual, cfg.pairs_per_prompt, cfg.seed, str(scores_path))
    if dual is not None:
        files["dual"] = dual_path
        if dual.converged is False and not dual.allow_unconverged:
            raise InputError(f"{dual_path}: λ* did not converge (KKT residual {dual.kkt_residual}), so π_λ* is not "
                             "the policy the dual predicts; solve again, or keep it with --allow-unconverged")
    if cfg.label == "absolute" and cfg.method in ("mocan", "pecan") and not {"target_a", "target_b"} <= set(pairs):
        raise ConfigError("config key 'label': absolute needs the target_a/target_b columns of pairs built from "
                          "a scores table (use regression with preference pairs)")
    if cfg.method == "safedpo":
        require_columns(pairs, ("unsafe_a", "unsafe_b", "safety_margin"), "pairs (safedpo)")
    if cfg.method == "mocan" and dual is None and np.isinf(pairs["target_margin"]).all():
        warnings.warn("mocan on hard labels only (target_margin = ±inf) is DPO", stacklevel=2)
    return pairs, dual, {k: _sha256(p) for k, p in files.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve(cfg: TrainConfig, dual: DualRecord | None) -> TrainConfig:
    beta = cfg.beta if cfg.beta is not None else dual.beta if dual else 0.1
    if dual is not None and cfg.beta is not None and not math.isclose(cfg.beta, dual.beta):
        warnings.warn(f"beta={cfg.beta} differs from dual.json's beta={dual.beta}: the trained policy "
                      "will not match the dual's predictions", stacklevel=3)
    output_dir = cfg.output_dir or str(Path(cfg.run_dir) / "policy")
    return dataclasses.replace(cfg, beta=beta, output_dir=output_dir)


def _accelerator(cfg: TrainConfig):
    """An Accelerator on the GPU when there is one (bf16 autocast where supported), else the CPU."""
    from accelerate import Accelerator

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device': cuda was asked for but no GPU is visible")
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if launched_ranks() == 1:
        # accelerate keeps one process-wide state; alone in the process, a training on the CPU after one
        # on the GPU (a notebook, a test session, compare) would otherwise be refused by it
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
    for kind in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() in ("1", "true") and \
                accelerator.distributed_type.name != kind:
            raise ConfigError(f"accelerate launch asked for {kind}, but accelerate runs "
                              f"{accelerator.distributed_type.name} here ({kind} needs GPUs; on the CPU launch "
                              "plain data parallel: accelerate launch --multi_gpu --num_processes N)")
    if _sharded(accelerator) and cfg.lora and cfg.merge_lora:
        raise ConfigError("config key 'merge_lora': a LoRA adapter trained under FSDP or DeepSpeed is saved as "
                          "an adapter; set merge_lora: false")
    return accelerator


def _sharded(accelerator) -> bool:
    """Whether the weights are sharded over the processes (FSDP, DeepSpeed): the full state is then
    gathered for saving, and no resume checkpoint is written (unverified on GPUs, see docs/guides/at-scale.md)."""
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")


def _recorded_logprobs_usable(cfg: TrainConfig, numerics: dict[str, Any], from_samples: bool,
                              announce: bool = True) -> bool:
    """Whether the pairs' ``ref_logprob`` columns are log π_ref as this run would compute them.

    Pairs built from the scores table (``from_samples``: by train, or by a method or recalibration
    round as a pairs table) carry the sample stage's column, and
    ``<run_dir>/sample.meta.json`` records how it was computed (:mod:`dualign.modeling.refprobs`): it is used
    when that record names this π_ref (``reference``, else ``model``), revision, template and
    ``numerics`` (:func:`dualign.modeling.refprobs.trainer_numerics`). With ``ref_logprobs: auto`` a
    differing or missing record means computing them here (one line says why); with ``reuse`` a
    differing record is refused. A preference file's columns have no record: ``auto`` computes
    them, ``reuse`` trusts them as asked.
    """
    if cfg.ref_logprobs == "compute":
        return False
    if not from_samples:
        return cfg.ref_logprobs == "reuse"
    path = Path(cfg.run_dir) / "sample.meta.json"
    recorded = read_json(path).get("ref_logprob") if path.exists() else None
    why = mismatch(recorded, ref_record(cfg.reference or cfg.model, cfg.revision, cfg.template, numerics))
    if cfg.ref_logprobs == "reuse":
        if recorded is not None and why:
            raise InputError(f"{path}: its log π_ref were computed otherwise than train computes them ({why}); "
                             "ref_logprobs: reuse refuses them (use auto or compute)")
        return True
    if why and path.exists() and announce:
        print(f"dualign train: computing log π_ref here, {path.name}'s differ ({why})", file=sys.stderr)
    return why is None


def reference_logprobs(cfg: TrainConfig, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """log π_ref(a|x) and log π_ref(b|x) of a pairs table, computed as :func:`train` computes them
    (``cfg``'s π_ref, ``reference`` else ``model``, template and max_length; the same tokens,
    batching and precision), so that
    several runs on the same pairs can share them (``ref_logprob_a/_b`` with ``ref_logprobs: reuse``);
    and the tokens run through π_ref (each distinct sequence once)."""
    accelerator = _accelerator(cfg)
    tokenizer = load_tokenizer(cfg.model, revision=cfg.revision)
    model = load_causal_lm(cfg.reference or cfg.model, revision=cfg.revision, dtype="float32",
                           device=accelerator.device)
    disable_dropout(model)
    data = encode_pairs(validate_pairs(pairs), tokenizer, cfg.template, cfg.max_length)
    rows = torch.unique(data.canonical)
    fill_ref_logps(model, data, rows, tokenizer.pad_token_id, 2 * cfg.per_device_batch_size, accelerator)
    ref = data.ref_logps[data.canonical].numpy().astype(float)
    return ref[:len(data)], ref[len(data):], data.tokens(rows)


def _reference_rows(data: EncodedPairs, trusted: bool) -> torch.Tensor:
    """The sequence rows whose log π_ref the pairs table does not give trustworthily
    (``trusted``: :func:`_recorded_logprobs_usable`)."""
    need = torch.isnan(data.ref_logps) | data.truncated | (not trusted)
    return need.nonzero().squeeze(1)


def _reference_logps(model, data: EncodedPairs, need: torch.Tensor, cfg: TrainConfig, pad_id: int,
                     accelerator) -> None:
    """log π_ref of the ``need`` rows (:func:`_reference_rows`), from ``model`` = π_ref (the policy
    before its first update, or the separate ``reference``)."""
    fill_ref_logps(model, data, torch.unique(data.canonical[need]), pad_id, 2 * cfg.per_device_batch_size,
                   accelerator)
    data.ref_logps[need] = data.ref_logps[data.canonical[need]]


def _trainable(model, cfg: TrainConfig):
    """The model in train mode, with gradient checkpointing and a LoRA adapter when asked."""
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # norms and head to float32, inputs requiring grads; checkpointing is set below, as without 4-bit
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        # non-reentrant: the recomputation sees the same autocast and needs no input that requires grad
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.lora:
        model = _wrap_lora(model, cfg)
    model.train()
    return model


def _wrap_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora_cfg)
    except ValueError as e:
        raise ConfigError(f"config key 'lora_target_modules': {str(e).splitlines()[0]}") from None


def _schedule(optimizer, cfg: TrainConfig, total: int):
    """Linear warmup over ``warmup_ratio`` of the steps, then linear decay to 0."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)


def _resume_key(cfg: TrainConfig) -> dict[str, Any]:
    """Config values a checkpoint must agree with to be resumed."""
    skip = ("logging_steps", "report_to", "save_steps", "output_dir", "device", "merge_lora", "trust_remote_code",
            "gradient_checkpointing")
    return {k: v for k, v in config_to_dict(cfg).items() if k not in skip}


# ---------------------------------------------------------------- output

def _save_policy(model, tokenizer, cfg: TrainConfig, dual: DualRecord | None, hashes: dict[str, str],
                 num_pairs: int, state_dict: dict[str, torch.Tensor] | None = None):
    """``<output_dir>``: HF model (LoRA merged unless merge_lora=false), tokenizer, config, model card;
    returns the model saved."""
    if cfg.lora and cfg.merge_lora:
        model = model.merge_and_unload()
    save_model(model, tokenizer, cfg.output_dir, {"dualign_train.yaml": dump_yaml(cfg),
                                                  "README.md": model_card(cfg, dual, hashes, num_pairs)},
               state_dict)
    return model


def model_card(cfg: TrainConfig, dual: DualRecord | None, hashes: dict[str, str], num_pairs: int) -> str:
    """Markdown model card: method, β, λ*, constraints, the dual's predictions, data hashes, versions."""
    dual = dual or DualRecord(beta=cfg.beta, reward="-", constraints=[], lambdas={})
    lines = [
        f"# {Path(cfg.output_dir).name}: {cfg.method} policy trained with dualign", "",
        f"- base model (π_ref): `{cfg.model}`" + (f" @ {cfg.revision}" if cfg.revision else ""),
        f"- method: {cfg.method}" + (f" (label: {cfg.label})" if cfg.method in ("mocan", "pecan") else ""),
        f"- beta (β): {cfg.beta}",
        f"- lambdas (λ*): {json.dumps(dual.lambdas)}",
        f"- constraints: {json.dumps(dual.constraints)}",
        f"- reward: {dual.reward}",
        *_card_predictions(dual),
        f"- reference values (dual.json): {json.dumps(dual.reference)}",
        f"- training pairs: {num_pairs}",
        f"- LoRA: {cfg.lora}" + (f" (r={cfg.lora_r}, alpha={cfg.lora_alpha}, merged={cfg.merge_lora})" if cfg.lora else ""),
        "", "## Data (sha256)", "",
        *[f"- {name}: `{digest}`" for name, digest in hashes.items()],
        "", "## Versions", "",
        *[f"- {name}: {v}" for name, v in versions().items()],
        "", "The resolved training config is in `dualign_train.yaml`.", "",
    ]
    return "\n".join(lines)


def _card_predictions(dual: DualRecord) -> list[str]:
    """The model card's predictions, as the evaluation report makes them (records.trained_target):
    on the K-sample tilt dual.json's predicted; on the reachable tilt the plan's means (less the
    fit's bias, where dual.json has it) and the trained target's KL, with both distributions named."""
    if dual.reachable is None:
        ci = dual.ci.predicted if dual.ci is not None else {}
        pilot = ([f"- predicted to deliver, each mean's change × the share a pilot fine-tune delivered "
                  f"(dual.json pilot, {json.dumps(dual.pilot.share)}): {json.dumps(trained_target(dual).values)}"]
                 if dual.pilot else [])
        return pilot + [f"- predicted under π_λ*, the target this fine-tune trained towards (dual.json): "
                f"{json.dumps(dual.predicted)}" + (f"; 95% CIs {json.dumps(ci)}" if ci else "")] + (
            ["- predicted to deliver, the KL past its K samples and calibrated by the fine-tune's KL measured "
             "on earlier runs (dual.json delivery"
             + ("; extrapolated past the KL_K range it was measured on" if dual.delivery.extrapolated else "")
             + f"): {json.dumps(trained_target(dual).values)}"] if dual.delivery else [])
    reach = dual.reachable
    bias = reach.fit_bias and dual.pilot is None
    how = ("the plan's means" + (" less the fit's bias" if bias else "")
           + (" × the share a pilot fine-tune delivered (dual.json pilot)" if dual.pilot else "")
           + ", the trained target's KL"
           + (" past its K samples" if dual.kl_extrapolated else "")
           + (", calibrated by the fine-tune's KL measured on earlier runs (dual.json delivery)" if dual.delivery else "")
           + (", extrapolating that calibration past the KL_K range it was measured on"
              if dual.delivery and dual.delivery.extrapolated else ""))
    return [f"- predicted to deliver ({how}): {json.dumps(trained_target(dual).values)}",
            f"- the target this fine-tune trained towards (the original scores tilted at λ*; dual.json "
            f"reachable.samples_predicted): {json.dumps(reach.samples_predicted)}"
            + (f"; 95% CIs {json.dumps(reach.samples_predicted_ci)}" if reach.samples_predicted_ci else ""),
            f"- planned (the fitted scores λ* was chosen on, dual.json predicted): {json.dumps(dual.predicted)}; "
            "a fine-tune moves the means about as far as the plan and pays at least the target's KL "
            "(docs/results/build_rates.md)"]


# ---------------------------------------------------------------- in memory, as TRL's trainers

@dataclass
class MoCANConfig(TrainConfig):
    """:class:`TrainConfig` for :class:`MoCANTrainer`, as TRL's configs: the trainer is given the model
    and the data, so ``model`` and ``run_dir`` are not set here; ``output_dir`` holds the run's files
    (metrics.jsonl, the checkpoint, tensorboard/wandb logs, the saved policy in ``<output_dir>/policy``),
    and when it is unset the trainer makes a temporary directory (``tempfile.mkdtemp``, kept: the
    policy is saved there; ``trainer.output_dir`` names it)."""

    model: str = field(default="", metadata={"help": "set by the trainer from its model"})
    run_dir: str = field(default="", metadata={"help": "set by the trainer: output_dir"})


@dataclass
class TrainOutput:
    """What :meth:`MoCANTrainer.train` returns: the trained model, the metrics.jsonl lines, the summary."""

    model: Any
    metrics: list[dict[str, float]]
    summary: dict[str, Any]


class MoCANTrainer:
    """MoCAN on scored samples of π_ref at a plan's λ*, with objects in and out.

    ``model``: a ``PreTrainedModel`` (trained in place) or an HF id / path; ``ref_model``: π_ref
    when the policy does not start from it (default: ``model`` before its first update);
    ``train_dataset``: a DataFrame or ``datasets.Dataset`` of scored samples (``prompt_id``,
    ``prompt``, ``response`` and the plan's score columns; the scores table of docs/formats.md);
    ``plan``: :func:`dualign.make_plan`'s result (or ``Plan.load``); ``processing_class``: the
    tokenizer (default: the model's own). ``train()`` runs :func:`train_on_pairs`, the loop
    ``dualign train`` runs. Bad arguments raise one :class:`InputError` naming the argument, before
    anything is written.
    """

    def __init__(self, model: Any, ref_model: Any = None, args: MoCANConfig | None = None,
                 train_dataset: Any = None, plan: DualRecord | None = None, processing_class: Any = None):
        from dualign.data.score_table import as_frame

        args = MoCANConfig() if args is None else args
        if not isinstance(args, TrainConfig):
            raise ConfigError(f"args: expected a MoCANConfig, got {type(args).__name__}")
        if args.method != "mocan":
            raise ConfigError(f"args.method: MoCANTrainer trains mocan, got {args.method!r} (use `dualign train`)")
        for name, value in (("model", model), ("ref_model", ref_model)):
            if not (value is None and name == "ref_model") and not isinstance(value, str | Path) \
                    and not isinstance(value, torch.nn.Module):
                raise InputError(f"{name}: expected a PreTrainedModel or a model id / path, got {type(value).__name__}")
        if not isinstance(plan, DualRecord):
            raise InputError(f"plan: expected the Plan of dualign.make_plan or Plan.load, got {type(plan).__name__}")
        if plan.converged is False and not plan.allow_unconverged:
            raise InputError("plan: λ* did not converge, so π_λ* is not the policy the dual predicts")
        if train_dataset is None:
            raise InputError("train_dataset: the scored samples of π_ref are needed")
        scores = as_frame(train_dataset, "train_dataset")
        self.args, self.plan, self.ref_model = args, plan, ref_model
        self.pairs = mocan.pairs_from_scores(scores, plan, args.pairs_per_prompt, args.seed, "train_dataset")
        self.hashes = {"train_dataset": hashlib.sha256(
            pd.util.hash_pandas_object(scores.astype(str), index=False).to_numpy().tobytes()).hexdigest()}
        self.model = model
        self.processing_class = processing_class
        self.output_dir: Path | None = None

    def train(self) -> TrainOutput:
        """Train; the trained model is also ``self.model``."""
        import tempfile

        model, ref = self.model, self.ref_model
        name = str(model) if isinstance(model, str | Path) else getattr(model.config, "_name_or_path", "") or "model"
        self.output_dir = Path(self.args.output_dir or tempfile.mkdtemp(prefix="dualign-train-"))
        values = {f.name: getattr(self.args, f.name) for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{**values, "model": name, "run_dir": str(self.output_dir), "scores": None, "dual": None,
                             "output_dir": str(self.output_dir / "policy"),
                             "reference": str(ref) if isinstance(ref, str | Path) else None})
        summary, trained = train_on_pairs(
            cfg, self.pairs, self.plan, self.hashes, model=None if isinstance(model, str | Path) else model,
            tokenizer=self.processing_class if self.processing_class is not None else
            load_tokenizer(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code),
            reference=None if ref is None or isinstance(ref, str | Path) else ref)
        self.model = trained
        lines = (self.output_dir / "metrics.jsonl").read_text().splitlines()
        return TrainOutput(trained, [json.loads(line) for line in lines], summary)

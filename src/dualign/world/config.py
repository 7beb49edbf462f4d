"""The world's configuration: sizes and training settings (:class:`WorldConfig`), the size presets,
and the cache key of a build (:func:`config_hash`).

A world build is repeatable on one machine: every random choice is drawn from ``seed`` and the
build runs with ``threads`` torch threads in deterministic mode. Float kernels still differ between
CPU types, so two machines can build slightly different π_ref, reward and cost models from the same
config; the tests assert only what holds across builds (see tests/test_demo.py and
scripts/world_spread.py). The cache key covers the config, :data:`WORLD_VERSION` and the versions
of the libraries whose numerics the build depends on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from dualign._infra.config import build_config
from dualign._infra.errors import InputError

# Bump when the world's text, judge or build procedure changes: it is part of the cache key.
WORLD_VERSION = 2
# Libraries whose numerics or tokenisation the built models depend on: part of the cache key.
NUMERIC_PACKAGES = ("torch", "transformers", "tokenizers", "numpy")


@dataclass
class WorldConfig:
    """Sizes and training settings of the synthetic world (defaults: the ``default`` preset)."""

    seed: int = field(default=0, metadata={"help": "seed of every random choice in the world"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads of the build (part of the cache key: float reductions depend on it)"})
    n_train_prompts: int = field(default=3000, metadata={"help": "prompts for π_ref's SFT and the preference pairs"})
    n_dual_prompts: int = field(default=1024, metadata={"help": "prompts for the dual / training stages"})
    n_eval_prompts: int = field(default=256, metadata={"help": "held-out prompts for evaluation"})
    n_calibration_prompts: int = field(default=256, metadata={
        "help": "held-out prompts on which the recalibrate stage measures the aligned policy"})
    harmful_fraction: float = field(default=0.5, metadata={"help": "fraction of harmful requests"})
    harmful_compliance: float = field(default=0.65, metadata={"help": "P(comply | harmful request) in π_ref's SFT corpus"})
    responses_per_prompt: int = field(default=2, metadata={"help": "SFT responses per train prompt"})
    vocab_size: int = field(default=2000, metadata={"help": "BPE vocabulary of π_ref"})
    hidden: int = field(default=128, metadata={"help": "π_ref hidden size"})
    layers: int = field(default=3, metadata={"help": "π_ref layers"})
    heads: int = field(default=4, metadata={"help": "π_ref attention heads"})
    max_positions: int = field(default=128, metadata={"help": "π_ref context length"})
    sft_epochs: float = field(default=5.0, metadata={"help": "passes over the SFT corpus"})
    sft_batch_size: int = field(default=64, metadata={"help": "SFT batch size"})
    sft_lr: float = field(default=5e-3, metadata={"help": "SFT peak learning rate"})
    n_preference_pairs: int = field(default=2000, metadata={"help": "preference pairs (train prompts) for the scorers"})
    n_test_pairs: int = field(default=500, metadata={"help": "held-out preference pairs (eval prompts)"})
    preference_noise: float = field(default=0.1, metadata={"help": "probability of a flipped preference label"})
    scorer_steps: int = field(default=400, metadata={"help": "full-batch optimizer steps per scorer head"})
    scorer_lr: float = field(default=3e-3, metadata={"help": "scorer head learning rate"})
    scorer_max_length: int = field(default=96, metadata={"help": "max tokens of a (prompt, response) pair"})
    eval_samples: int = field(default=4, metadata={"help": "π_ref samples per eval prompt for world.json"})
    max_new_tokens: int = field(default=64, metadata={"help": "max tokens of a sampled response"})

    def __post_init__(self) -> None:
        for name in ("threads", "n_train_prompts", "n_dual_prompts", "n_eval_prompts", "n_calibration_prompts",
                     "responses_per_prompt",
                     "n_preference_pairs", "n_test_pairs", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1")
        for name in ("harmful_fraction", "harmful_compliance", "preference_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "small": {"n_train_prompts": 2400, "n_dual_prompts": 64, "n_eval_prompts": 64,
              "n_calibration_prompts": 64, "hidden": 64,
              "layers": 2, "heads": 2, "sft_epochs": 6.0, "sft_batch_size": 32, "sft_lr": 8e-3,
              "n_preference_pairs": 300, "n_test_pairs": 100},
}


def world_config(size: str = "default", values: dict[str, Any] | None = None) -> WorldConfig:
    """The ``size`` preset overridden by ``values`` (unknown keys fail)."""
    if size not in PRESETS:
        raise InputError(f"unknown world size {size!r} (use one of {', '.join(PRESETS)})")
    return build_config(WorldConfig, {**PRESETS[size], **(values or {})})


def numeric_versions() -> dict[str, str | None]:
    """Installed versions of :data:`NUMERIC_PACKAGES` (None when absent)."""
    out: dict[str, str | None] = {}
    for name in NUMERIC_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def config_hash(cfg: WorldConfig) -> str:
    """The cache key: sha256 of the config, the world version and :func:`numeric_versions`."""
    blob = json.dumps({"world_version": WORLD_VERSION, **asdict(cfg), "versions": numeric_versions()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]

"""PeCAN's pre-alignment stage: DPO on the helpfulness view gives π_r, on the safety view π_g.

Step 1 of :mod:`dualign.methods.pecan`, in its own module because it runs the one loop
(:mod:`dualign.train`), which imports :mod:`dualign.methods.pecan` for its loss.
The rest of PeCAN reuses the other stages (docs/formats.md, "PeCAN"): ``score`` with
``implicit:`` scorers on π_r and π_g (and ``preferences``), ``dual`` with a relative constraint,
``train --method pecan``. Outputs, under ``<run_dir>/prealign/``::

    views/helpful.jsonl  views/safe.jsonl     # TRL pairs (chosen = better / safer response)
    helpful/policy/  safe/policy/             # π_r, π_g (HF model dirs; dualign_train.yaml records β)

A view whose DPO run is marked complete (``prealign/<view>/train.done``) is skipped, so a killed
stage resumes (each DPO run also resumes from its own checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualign._infra.config import build_config
from dualign._infra.distributed import one_process
from dualign._infra.errors import ConfigError
from dualign._infra.provenance import is_done, mark_done, record_stage, unmark
from dualign.data.preferences import write_views
from dualign.train import TrainConfig, train

VIEW_BETAS = {"helpful": "beta_r", "safe": "beta_g"}


@dataclass
class PrealignConfig:
    preferences: str = field(metadata={"help": "PKU-SafeRLHF pair file, saved dataset dir or Hub id"})
    model: str = field(metadata={"help": "π_ref: the model both DPO runs start from"})
    run_dir: str = field(metadata={"help": "run directory (writes prealign/)"})
    beta_r: float = field(default=0.1, metadata={"help": "DPO β of π_r (helpfulness view)"})
    beta_g: float = field(default=0.1, metadata={"help": "DPO β of π_g (safety view)"})
    split: str = field(default="train", metadata={"help": "dataset split (saved or Hub datasets)"})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision pin"})
    train: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "other TrainConfig keys of both DPO runs (learning_rate, num_epochs, lora, ...)"})

    def __post_init__(self) -> None:
        taken = {"model", "run_dir", "method", "beta", "preferences", "output_dir"} & set(self.train)
        if taken:
            raise ConfigError(f"config key 'train.{sorted(taken)[0]}' is set by the prealign stage itself")
        for key in VIEW_BETAS.values():
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"{key} must be a positive finite number, got {getattr(self, key)}")


def view_configs(cfg: PrealignConfig) -> dict[str, TrainConfig]:
    """The DPO run of each view (checked up front by ``dualign run``)."""
    root = Path(cfg.run_dir) / "prealign"
    return {view: build_config(TrainConfig, {**cfg.train, "model": cfg.model, "run_dir": str(root / view),
                                             "method": "dpo", "beta": getattr(cfg, beta_key),
                                             "preferences": str(root / "views" / f"{view}.jsonl")},
                               prefix="prealign.train.")
            for view, beta_key in VIEW_BETAS.items()}


def prealign(cfg: PrealignConfig) -> dict[str, Path]:
    """Train π_r and π_g with DPO from ``cfg.model``; return ``{"helpful": π_r dir, "safe": π_g dir}``."""
    one_process("the prealign stage")
    root = Path(cfg.run_dir) / "prealign"
    unmark(cfg.run_dir, "prealign")
    views = write_views(cfg.preferences, root / "views", cfg.split, cfg.revision)
    configs = view_configs(cfg)
    policies = {}
    for view in VIEW_BETAS:
        policies[view] = root / view / "policy"
        if not is_done(root / view, "train"):
            train(dataclasses.replace(configs[view], preferences=str(views[view])))
    record_stage(cfg.run_dir, "prealign", cfg)
    mark_done(cfg.run_dir, "prealign")
    return policies


def implicit_scorers(policies: dict[str, Path]) -> list[str]:
    """The score stage's scorer specs for π_r and π_g: ``h_r=implicit:<π_r>``, ``h_g=implicit:<π_g>``
    (β read back from each policy's ``dualign_train.yaml``)."""
    return [f"h_r=implicit:{policies['helpful']}", f"h_g=implicit:{policies['safe']}"]

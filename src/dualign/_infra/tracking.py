"""Experiment tracking: ``report_to`` as Hugging Face's Trainer has it.

``none`` (the default), ``tensorboard``, ``wandb``, or a list of them. Every line a loop appends
to ``metrics.jsonl`` goes to each tracker as well, under the same names (``loss``,
``rewards/chosen``, ``dual/lambda_<name>``, ``kl``, ...), at its ``step``. TensorBoard's event
files go to ``<log_dir>/tensorboard``; a W&B run to ``<log_dir>/wandb`` (its project from
``WANDB_PROJECT``, default ``dualign``; ``WANDB_MODE=offline`` keeps it on disk, no network). Both
are optional packages (``pip install 'dualign[tracking]'``): asking for one that is not installed
is a :class:`ConfigError` naming ``report_to``, raised before anything is written.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dualign._infra.errors import ConfigError

REPORT_TO = ("none", "tensorboard", "wandb")


def check_report_to(report_to: str | Sequence[str]) -> list[str]:
    """The trackers asked for, ``none`` dropped; an unknown name, ``none`` beside another, or a
    tracker whose package is missing is a ConfigError naming ``report_to``."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"config key 'report_to': {unknown[0]!r} is not one of {', '.join(REPORT_TO)}")
    chosen = list(dict.fromkeys(n for n in names if n != "none"))
    if chosen and "none" in names:
        raise ConfigError(f"config key 'report_to': none cannot go with {', '.join(chosen)}")
    for name in chosen:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"config key 'report_to': {name} needs the {name} package, which is not installed "
                              "(pip install 'dualign[tracking]')")
    return chosen


class Tracker:
    """The trackers of ``report_to`` for one run; ``enabled=False`` (a non-main process): none."""

    def __init__(self, report_to: str | Sequence[str], log_dir: str | Path, config: Mapping[str, Any],
                 name: str, enabled: bool = True):
        chosen = check_report_to(report_to)
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        log_dir = Path(log_dir)
        if "tensorboard" in chosen:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        if "wandb" in chosen:
            import wandb

            log_dir.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "dualign"), name=name,
                                    dir=str(log_dir), config=dict(config), reinit="create_new")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Every number of ``metrics`` but ``step`` itself, at ``step``."""
        scalars = {k: float(v) for k, v in metrics.items()
                   if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

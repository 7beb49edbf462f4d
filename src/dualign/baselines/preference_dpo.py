"""The preference baselines: DPO on a PKU-style preference file (prompt, response_0, response_1,
better_response_id, safer_response_id, is_response_<i>_safe), no reward or cost model, no sampling.

- ``dpo-helpful``: DPO on the helpfulness view (chosen = ``response_<better_response_id>``), the
  paper's DPO_h; the same pairs PeCAN pre-aligns π_r on.
- ``dpo-safe``: DPO on the safety view (chosen = ``response_<safer_response_id>``), the paper's
  DPO_s; PeCAN's π_g.
- ``safedpo``: SafeDPO (:mod:`dualign.methods.safedpo`), the helpfulness pairs transformed with the
  safety labels, DPO with a safety offset Δ.

Views come from :func:`dualign.data.preferences.preference_views`, training from the one loop
(:func:`dualign.train.train`, ``method`` dpo or safedpo on the pairs written here). β defaults to
0.1, the paper's DPO β, not the dual's (these methods do not target π_λ*). When the preference
table carries ``ref_logprob_0``/``ref_logprob_1`` (``dualign compare`` computes them once for all
these runs), they are the pairs' log π_ref.

Evaluation needs a dual.json beside the policy: when the run directory's objective is known (a
dual.json and a scores table), the method's dual.json holds λ = 0 and π_ref's values as its
"prediction": these methods make none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dualign._infra.errors import ConfigError
from dualign._infra.io import read_table, write_json, write_table
from dualign._infra.provenance import record_stage
from dualign.data.preferences import preference_views, read_preferences
from dualign.methods.dpo import pairs_from_preferences
from dualign.methods.objective import (
    dual_file,
    load_objective,
    method_dual,
    scores_file,
    write_method_dual,
)
from dualign.methods.safedpo import safedpo_pairs
from dualign.train import TrainConfig, train

VIEWS = {"dpo-helpful": "helpful", "dpo-safe": "safe"}
DPO_BETA = 0.1  # the paper's DPO β (and SafeDPO's)


@dataclass
class PreferenceDPOConfig:
    train: TrainConfig = field(metadata={
        "flat": True, "help": "the one loop's settings, their keys and flags beside this config's own"})
    method: str = field(default="dpo-helpful", metadata={
        "help": "dpo-helpful, dpo-safe or safedpo: from a PKU-style preference file (--preferences)"})
    safety_margin: float = field(default=10.0, metadata={
        "help": "safedpo: Δ, the logit offset safe-over-unsafe pairs must clear (10: the value secondary "
                "sources cite from the paper's App. B.1; any Δ ≥ 0 has the same optimum)"})


def train_preference_dpo(cfg: PreferenceDPOConfig) -> dict[str, Any]:
    """DPO (or SafeDPO) on the method's pairs from ``cfg.train.preferences``; writes pairs.parquet, the
    method's dual.json (when the objective is known) and the policy."""
    settings = cfg.train
    if not settings.preferences:
        raise ConfigError("missing required config value(s): preferences (a PKU-style preference file)")
    if cfg.method not in (*VIEWS, "safedpo"):
        raise ConfigError(f"config key 'method': {cfg.method!r} is not one of {', '.join([*VIEWS, 'safedpo'])}")
    run_dir = Path(settings.run_dir)
    source = str(settings.preferences)
    table = read_preferences(settings.preferences)
    extra: dict[str, Any] = {}
    if cfg.method == "safedpo":
        pairs, extra["transform"] = safedpo_pairs(table, cfg.safety_margin, source)
    else:
        pairs = pairs_from_preferences(preference_views(table, source)[VIEWS[cfg.method]], source=source)
    beta = settings.beta if settings.beta is not None else DPO_BETA
    run_dir.mkdir(parents=True, exist_ok=True)
    record_stage(run_dir, cfg.method, cfg, settings.seed)
    write_table(pairs, run_dir / "pairs.parquet")
    dual_path = _method_dual(cfg, run_dir, beta)
    summary = train(dataclasses.replace(settings, method="safedpo" if cfg.method == "safedpo" else "dpo",
                                        beta=beta, pairs=str(run_dir / "pairs.parquet"), preferences=None,
                                        dual=str(dual_path) if dual_path else None))
    if extra:
        write_json(extra, run_dir / "transform.json")
    return {"gradient_steps": summary["step"], "sampled_tokens": 0, "lambdas": {},
            "output_dir": summary["output_dir"], "tokens": summary["tokens"], **extra}


def _method_dual(cfg: PreferenceDPOConfig, run_dir: Path, beta: float) -> Path | None:
    """The method's dual.json for evaluation (λ = 0, "predicted" = π_ref's values), or None when
    the run directory has no objective (dual.json) or no scores table to take π_ref's values from."""
    dual_path, scores_path = dual_file(run_dir, cfg.train.dual), scores_file(run_dir, cfg.train.scores)
    if not (dual_path.exists() and scores_path.exists()):
        return None
    scores = read_table(scores_path)
    objective = dataclasses.replace(load_objective(dual_path, scores), beta=beta)
    lambdas = np.zeros(len(objective.constraints))
    return write_method_dual(run_dir, method_dual(objective, scores, lambdas, 0.0, cfg.method))

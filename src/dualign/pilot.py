"""The pilot stage (optional, beyond the paper): before the one fine-tune that counts, measure what
share of its plan a fine-tune delivers, and plan for it.

The dual predicts what π_λ* changes in every mean; a fine-tune of π_ref towards it delivers some
share ρ of that change on prompts it was not trained on, and ρ varies from one model (one world
build) to another: 0.76 to 1.1 of the cost change over builds 146–150 of the built-in world
(docs/results/build_rates.md). The pilot measures ρ without sampling anything new:

1. split the dual's prompts into two folds (``fraction`` of them, drawn per prompt with ``seed``);
2. fine-tune π_ref towards the first plan's λ* on the first fold only (the train section's loss,
   epochs and settings: the fine-tune that counts, on less data);
3. on the other fold's π_ref samples, take ℓ = log π_pilot − log π_ref and estimate the pilot's
   change of every column by self-normalised importance weights
   (:func:`dualign.dual.formulas.importance_changes`), the same estimator the plan's change is on
   those samples; ρ_j = measured / planned (:func:`~dualign.dual.formulas.delivered_shares`);
4. solve the dual again with each constraint asking its required change / ρ_j (the dual section
   as it was: its tilt, margin and KL line), and predict every mean as that plan's change × ρ.

``dual.json`` becomes the corrected plan, with the measurement in its ``pilot`` section; the first
plan stays in ``pilot/planned.json`` and the stage's summary in ``pilot/pilot.json``. The pilot's
weights are deleted unless ``keep_policy``. Cost: one fine-tune on ``fraction`` of the pairs and
one forward pass of π_ref and the pilot over the other fold's samples. Unlike the recalibrate
stage it samples nothing and reads no held-out prompt, so it still plans before the fine-tune that
counts; it is the fine-tune's own generalisation it measures, on prompts the pilot did not see.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dualign._infra.distributed import one_process
from dualign._infra.errors import ConfigError, InputError
from dualign._infra.io import read_table, write_json
from dualign._infra.provenance import mark_done, record_stage, unmark
from dualign._infra.segments import Segments
from dualign.data.constraints import _text
from dualign.data.records import DualRecord, PilotMeasure, read_dual, write_dual
from dualign.data.score_table import truncated_flags
from dualign.dual import formulas as F
from dualign.dual.reachable import FEATURES
from dualign.dual.stage import DualConfig, planning_scores, solve_config
from dualign.methods import mocan
from dualign.train import TrainConfig, train_on_pairs

PLANNED = "planned.json"  # the first plan, before the pilot


@dataclass
class PilotConfig:
    """The pilot stage (``pilot:`` in a run config; off unless present)."""

    run_dir: str = field(metadata={"help": "run directory (reads scores.parquet, dual.json; writes pilot/)"})
    model: str = field(metadata={"help": "π_ref: HF model id or local path"})
    fraction: float = field(default=0.5, metadata={
        "help": "share of the dual's prompts the pilot fine-tune trains on; the rest measure it"})
    seed: int = field(default=0, metadata={"help": "seed of the prompts' split into the two folds"})
    share_bounds: list[float] = field(default_factory=lambda: [0.7, 1.5], metadata={
        "help": "lo, hi: each measured share ρ is clipped to [lo, hi], so the plan asks at most 1/lo of each "
                "required change (the plan's curve flattens there, and λ and the KL grow fast)"})
    keep_policy: bool = field(default=False, metadata={"help": "keep the pilot's weights in pilot/policy"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass of the log-probs"})

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError(f"fraction must lie in (0, 1), got {self.fraction}")
        if len(self.share_bounds) != 2 or not 0 < self.share_bounds[0] <= 1 <= self.share_bounds[1]:
            raise ConfigError(f"share_bounds must be two numbers lo <= 1 <= hi with lo > 0, got {self.share_bounds}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}")


# ---------------------------------------------------------------------------------------------
# The pieces (objects in, objects out)
# ---------------------------------------------------------------------------------------------


def pilot_folds(prompt_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the rows whose prompt falls in the pilot's training fold: each prompt is drawn
    independently with probability ``fraction`` (numpy's default_rng(seed), prompts in order of
    first appearance), all its samples together."""
    seg = Segments.of(np.asarray(prompt_ids))
    drawn = np.random.default_rng(seed).random(seg.num) < fraction
    if drawn.all() or not drawn.any():
        raise InputError(f"pilot: {seg.num} prompts leave a fold empty at fraction {fraction}; "
                         "the pilot needs prompts to train on and prompts to measure on")
    return seg.ungroup(seg.expand(drawn))


def measure_pilot(policy, tokenizer, reference, scores: pd.DataFrame, planned: pd.DataFrame, dual: DualRecord,
                  measured_rows: np.ndarray, template: str, batch_size: int = 16) -> dict[str, Any]:
    """The pilot ``policy``'s change of every column on the ``measured_rows`` of ``scores`` (π_ref's
    samples; ``planned``: the same rows as the dual planned on them), by importance weights
    ℓ = log π_policy − log π_ref (``reference``: π_ref), against the plan's change there.
    Returns {"planned", "measured", "share_ci"} by key (reward column, constraint names) and "kl",
    "kl_target"."""
    from dualign.modeling.refprobs import reference_logprobs, trainer_numerics

    rows = scores[measured_rows].reset_index(drop=True)
    numerics = trainer_numerics(next(policy.parameters()).device)
    cut = truncated_flags(rows, "scores")
    args = (rows["prompt"].tolist(), rows["response"].tolist(),
            list(cut) if cut is not None else [False] * len(rows), template, numerics)
    logratio = (reference_logprobs(policy.eval(), tokenizer, *args, batch_size=batch_size)[0]
                - reference_logprobs(reference.eval(), tokenizer, *args, batch_size=batch_size)[0])
    keys = [dual.reward, *dual.names]
    columns = [dual.reward, *(c.column for c in dual.parsed)]
    weights = rows["sample_weight"].to_numpy(float) if "sample_weight" in rows else None
    ids, values = rows["prompt_id"].to_numpy(), rows[columns].to_numpy(float)
    measured, kl = F.importance_changes(ids, logratio, values, weights)
    plan_rows = planned[measured_rows].reset_index(drop=True)
    # the plan's per-prompt changes: their mean is its change on these prompts, their resamples the share's CI
    per_planned = F.prompt_changes(ids, mocan.lagrangian_reward(plan_rows, dual) / dual.beta,
                                   plan_rows[columns].to_numpy(float), weights)
    per_measured = F.prompt_changes(ids, logratio, values, weights)
    _, kl_target = F.tilted_means(ids, mocan.lagrangian_reward(rows, dual) / dual.beta, values, weights)
    return {"planned": dict(zip(keys, per_planned.mean(axis=1).tolist(), strict=True)),
            "measured": dict(zip(keys, measured.tolist(), strict=True)),
            "kl": float(kl), "kl_target": float(kl_target),
            "share_ci": dict(zip(keys, share_intervals(per_measured, per_planned).tolist(), strict=True))}


def share_intervals(measured: np.ndarray, planned: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Each share's 95% percentile interval [c, 2] over a bootstrap of the measured prompts: the
    ratio of the resampled means of the per-prompt changes ``measured`` and ``planned`` [c, N]
    (:func:`dualign.dual.formulas.prompt_changes`), unclipped."""
    n = measured.shape[1]
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = measured[:, idx].mean(axis=2) / planned[:, idx].mean(axis=2)   # [c, resamples]
    return np.nanpercentile(ratios, [2.5, 97.5], axis=1).T


def rescaled_constraints(dual: DualRecord, share: dict[str, float]) -> list[str]:
    """Each constraint asking its required change over π_ref / ρ, written relative to π_ref
    (``cost<=ref-4`` at ρ = 0.8 → ``cost<=ref-5``; an absolute threshold b as ref + (b − ref)/ρ)."""
    out = []
    for c, name in zip(dual.parsed, dual.names, strict=True):
        required = dual.thresholds[name] - dual.reference[name]
        out.append(_text(c.column, c.op, float(f"{required / share[name]:.6g}"), True))
    return out


def replan(dual_cfg: DualConfig, first: DualRecord, share: dict[str, float], scores_path: Path,
           features: Path | None) -> tuple[DualRecord, list[str]]:
    """The dual solved again with every constraint asking its required change / ρ (the section's
    tilt, margin and KL line as they were, less the margin's shift for the fit's bias); the record keeps the user's constraints and thresholds,
    which the evaluation judges."""
    texts = rescaled_constraints(first, share)
    # the margin's shift for the plan's optimism (the fit's bias) is left out: ρ was measured against
    # the plan itself, so it holds that optimism already
    record = solve_config(dataclasses.replace(dual_cfg, constraints=texts, scores=str(scores_path)), features,
                          shift_bias=False)
    return dataclasses.replace(record, constraints=list(first.constraints), thresholds=dict(first.thresholds)), texts


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def pilot(cfg: PilotConfig, train_cfg: TrainConfig, dual_cfg: DualConfig) -> DualRecord:
    """The pipeline's pilot stage (see the module docstring): writes ``pilot/`` and replaces
    ``dual.json`` by the plan corrected for the measured share."""
    one_process("the pilot stage")
    from dualign.modeling.models import load_causal_lm, load_tokenizer
    from dualign.modeling.refprobs import load_reference

    run_dir = Path(cfg.run_dir)
    root = run_dir / "pilot"
    scores_path = Path(dual_cfg.scores) if dual_cfg.scores else run_dir / "scores.parquet"
    if train_cfg.method != "mocan":
        raise ConfigError(f"config key 'pilot': the pilot trains on the scores' pairs (mocan), not {train_cfg.method}")
    unmark(run_dir, "pilot")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / PLANNED).exists():  # the first plan; a resumed stage finds it here, dual.json replaced or not
        write_dual(read_dual(run_dir / "dual.json"), root / PLANNED)
    first = read_dual(root / PLANNED)
    if len(set(first.names)) != len({c.column for c in first.parsed}):
        raise InputError("pilot: two constraints on one column cannot be rescaled one by one; run without the pilot")
    scores = read_table(scores_path)
    planned = planning_scores(run_dir, scores, first)
    trained = pilot_folds(scores["prompt_id"].to_numpy(), cfg.fraction, cfg.seed)
    pilot_cfg = dataclasses.replace(train_cfg, run_dir=str(root), output_dir=str(root / "policy"),
                                    dual=str(root / PLANNED), scores=str(scores_path), report_to=["none"])
    tokenizer = load_tokenizer(train_cfg.model, revision=train_cfg.revision, trust_remote_code=train_cfg.trust_remote_code)
    if (root / "train.done").exists() and (root / "policy").exists():
        import torch

        device = "cuda" if train_cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        policy = load_causal_lm(str(root / "policy"), dtype="float32", device=torch.device(device))
    else:
        pairs = mocan.pairs_from_scores(scores[trained].reset_index(drop=True), first, train_cfg.pairs_per_prompt,
                                        train_cfg.seed, str(scores_path))
        _, policy = train_on_pairs(pilot_cfg, pairs, first, {"scores": "pilot fold of " + str(scores_path)})
    reference = load_reference(train_cfg.model, next(policy.parameters()).device, train_cfg.revision,
                               train_cfg.trust_remote_code)
    measure = measure_pilot(policy, tokenizer, reference, scores, planned, first, ~trained, train_cfg.template,
                            cfg.batch_size)
    del policy, reference
    keys = list(measure["planned"])
    shares = F.delivered_shares([measure["measured"][k] for k in keys], [measure["planned"][k] for k in keys],
                                tuple(cfg.share_bounds))
    share = dict(zip(keys, shares.tolist(), strict=True))
    features = run_dir / FEATURES if first.reachable is not None else None
    record, texts = replan(dual_cfg, first, share, scores_path, features)
    n_trained = int(Segments.of(scores["prompt_id"].to_numpy()[trained]).num)
    n_measured = int(Segments.of(scores["prompt_id"].to_numpy()[~trained]).num)
    record.pilot = PilotMeasure(fraction=cfg.fraction, seed=cfg.seed, prompts_trained=n_trained,
                                prompts_measured=n_measured, planned=measure["planned"], measured=measure["measured"],
                                share=share, bounds=list(cfg.share_bounds), planned_constraints=texts,
                                kl=measure["kl"], kl_target=measure["kl_target"],
                                first_lambdas=dict(first.lambdas), first_predicted=dict(first.predicted),
                                share_ci=measure["share_ci"])
    write_json({"share": share, "planned_constraints": texts, "first_lambdas": first.lambdas,
                "lambdas": record.lambdas, **measure}, root / "pilot.json")
    if not cfg.keep_policy:
        shutil.rmtree(root / "policy", ignore_errors=True)
    write_dual(record, run_dir / "dual.json")
    record_stage(run_dir, "pilot", cfg, cfg.seed)
    mark_done(run_dir, "pilot")
    return record


def restore_first_plan(run_dir: Path) -> None:
    """Put the plan before the pilot back in ``dual.json`` (``--restart-from pilot``)."""
    first = Path(run_dir) / "pilot" / PLANNED
    if first.exists():
        write_dual(read_dual(first), Path(run_dir) / "dual.json")


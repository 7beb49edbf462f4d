"""The recalibrate stage (optional, beyond the paper): when the one-shot fine-tune misses a
constraint, measure what it achieved, correct λ, and fine-tune again.

One-shot dualization predicts, for every λ, the change Δp_j(λ) that π_λ makes over π_ref in each
constraint's column; the fine-tune towards π_λ* achieves some Δa_j. The stage samples the trained
policy and π_ref on held-out *calibration* prompts (not the evaluation prompts), scores both and
takes the paired change of every constraint. A round meets a constraint when its point estimate
lies ``margin`` or more beyond the threshold; where one does not, the next λ comes from the measured
(λ, Δa) pairs (all in g units, g = sign · column, so more λ means more g), aimed at the threshold
plus the margin (the same point the stopping rule asks for, so that a correction that lands where
it aims stops):

- first correction (one measured point): assume the fine-tune achieves a fixed share of what the
  dual predicts, Δa_j(λ) ≈ ρ_j·Δp_j(λ) with ρ_j = Δa_j(λ_0)/Δp_j(λ_0), and solve the dual for the
  predicted change t_j/ρ_j (:func:`rescaled_targets`), capped at 90% of the largest change any
  reweighting of the samples reaches;
- later corrections: a secant step per constraint through the last two measured points
  (:func:`secant_step`);
- where the secant is undefined (a flat or falling line), a projected dual step as in CAID
  (arXiv 2505.19387), λ ← max(0, λ − H⁻¹·(Δa − t)) with H = ∇²D(λ), the dual's own curvature
  (:func:`dual_step`).

Each round fine-tunes again, from π_ref with the corrected λ (``start: reference``, the dual's
theory) or continuing from the last policy (``start: policy``). Every round's λ, measured and
predicted changes and compute (sampled tokens, gradient steps, wall seconds) go to
``<run_dir>/recalibrate.json``; the final policy replaces ``<run_dir>/policy`` (the one-shot policy
stays in ``recalibrate/round0/policy``) and ``recalibrate/dual.json`` is the dual record of its λ,
which the evaluate stage then reads. On the reachable tilt (the run's dual.json has ``reachable``)
the corrections are planned on the fitted scores the dual planned on (:func:`planning_scores`), and
every dual.json written keeps ``reachable`` with what each round trains towards. A killed stage resumes: a round whose ``measure.json`` exists
is not redone, and training resumes from its own checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from dualign._infra.distributed import one_process
from dualign._infra.errors import InfeasibleConstraintError, InputError
from dualign._infra.io import read_json, read_table, write_json, write_table
from dualign._infra.provenance import mark_done, record_stage, unmark
from dualign._infra.segments import Segments
from dualign.data.prompts import load_prompts
from dualign.data.records import DualRecord, ReachableTilt, read_dual, write_dual
from dualign.dual import formulas as F
from dualign.dual import solve_dual_long
from dualign.dual.stage import planning_scores
from dualign.evaluate import Paired, percentile_ci, sample_model
from dualign.methods.objective import (
    Objective,
    lagrangian_pairs,
    link_sample_config,
    load_objective,
    method_dual,
)
from dualign.modeling.scoring import score_table
from dualign.train import TrainConfig, train

# ---------------------------------------------------------------------------------------------
# The λ updates (pure functions, g units)
# ---------------------------------------------------------------------------------------------


def shortfall(achieved: np.ndarray, target: np.ndarray) -> np.ndarray:
    """s_j = Δa_j − t_j in g units: ≥ 0 where the constraint is met by the point estimate."""
    return np.asarray(achieved, float) - np.asarray(target, float)


def rescaled_targets(achieved: np.ndarray, predicted: np.ndarray, target: np.ndarray,
                     max_factor: float = 4.0) -> np.ndarray:
    """t_j/ρ_j with ρ_j = Δa_j/Δp_j: the predicted change to ask the dual for so that a fine-tune
    achieving the same share ρ_j of it lands on t_j. ρ_j is clipped to [1/max_factor, max_factor]
    (a share near zero or negative says nothing about the scale)."""
    achieved, predicted = np.asarray(achieved, float), np.asarray(predicted, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(predicted != 0, achieved / predicted, 1.0)
    share = np.clip(np.nan_to_num(share, nan=1.0), 1.0 / max_factor, max_factor)
    return np.asarray(target, float) / share


def secant_step(lambdas: np.ndarray, achieved: np.ndarray, previous_lambdas: np.ndarray,
                previous_achieved: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(λ_next, defined): per constraint, the root of the line through the last two (λ, Δa) points,
    λ − (Δa − t)·(λ − λ')/(Δa − Δa'), projected on λ ≥ 0; ``defined`` is False where that line is
    flat or falls (Δa must rise with λ in g units), and λ_next is then λ itself."""
    lam, prev_lam = np.asarray(lambdas, float), np.asarray(previous_lambdas, float)
    a, prev_a = np.asarray(achieved, float), np.asarray(previous_achieved, float)
    d_lam, d_a = lam - prev_lam, a - prev_a
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = d_a / d_lam
    defined = (d_lam != 0) & np.isfinite(slope) & (slope > 0)
    step = np.where(defined, -shortfall(a, target) / np.where(defined, slope, 1.0), 0.0)
    return np.maximum(lam + step, 0.0), defined


def dual_step(lambdas: np.ndarray, achieved: np.ndarray, target: np.ndarray,
              curvature: np.ndarray) -> np.ndarray:
    """λ ← max(0, λ − H⁻¹·(Δa − t)): a projected dual (sub)gradient step whose step size is the
    inverse of the dual's Hessian H = ∇²D(λ) = Cov_{π_λ}(g)/β, i.e. the change of the predicted
    E[g] per unit of λ (a Newton step on the dual's model, taken with the measured slack)."""
    h = np.atleast_2d(np.asarray(curvature, float))
    s = shortfall(achieved, target)
    step = np.linalg.lstsq(h + 1e-12 * np.trace(h) * np.eye(len(h)), s, rcond=None)[0]
    return np.maximum(np.asarray(lambdas, float) - step, 0.0)


# A rescaled target is capped at this share of the largest change reweighting the samples reaches:
# beyond it λ* grows without bound (and the fine-tune's KL with it).
REACHABLE_SHARE = 0.9

# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@dataclass
class RecalibrateConfig:
    """The recalibrate stage (``recalibrate:`` in a run config; off unless present)."""

    run_dir: str = field(metadata={"help": "run directory (reads dual.json, scores.parquet, policy/)"})
    reference: str = field(metadata={"help": "π_ref: HF model id or local path"})
    prompts: str = field(metadata={
        "help": "calibration prompts, held out from the dual's and the evaluation's (the world's "
                "prompts_calibration.jsonl)"})
    scorers: list[str] = field(metadata={"help": "scorer specs, as in `dualign score` (default: the score stage's)"})
    rounds: int = field(default=2, metadata={"help": "at most this many extra fine-tunes"})
    margin: float = field(default=0.0, metadata={
        "help": "stop only when each constraint's calibration point estimate clears its threshold by "
                "this much (column units); a little margin makes a held-out evaluation meet it more often"})
    start: Literal["reference", "policy"] = field(default="reference", metadata={
        "help": "each extra fine-tune starts from π_ref with the corrected λ (reference) or continues "
                "from the last policy (policy)"})
    epochs: float | None = field(default=None, metadata={
        "help": "passes over the pairs in each extra fine-tune (default: the train stage's)"})
    max_prompts: int | None = field(default=None, metadata={"help": "use at most this many calibration prompts"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt text"})
    num_samples: int = field(default=4, metadata={"help": "responses per calibration prompt and model"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation length cap"})
    batch_size: int = field(default=64, metadata={"help": "generation and scoring batch size"})
    template: str = field(default="auto", metadata={"help": "prompt template (see `dualign sample`)"})
    bootstrap: int = field(default=1000, metadata={"help": "paired prompt-bootstrap resamples for the CIs"})
    seed: int = field(default=0, metadata={"help": "sampling and bootstrap seed"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be ≥ 0, got {self.rounds}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("num_samples and batch_size must be ≥ 1")


@dataclass
class _Sampling:
    """What evaluate's sampler reads of a config (the same sampling as the evaluate stage)."""

    num_samples: int
    template: str
    max_new_tokens: int
    batch_size: int
    device: str
    temperature: float = 1.0
    top_p: float = 1.0


def _measure(cfg: RecalibrateConfig, policy: str, prompts: pd.DataFrame, objective: Objective,
             round_dir: Path, seed: int) -> dict[str, Any]:
    """The policy's paired change over π_ref on the calibration prompts, per constraint (column
    units) and in g units; π_ref's samples are drawn once (``recalibrate/reference.parquet``)."""
    sampling = _Sampling(cfg.num_samples, cfg.template, cfg.max_new_tokens, cfg.batch_size, cfg.device)
    columns = objective.columns
    tables, tokens = {}, 0
    for side, model, path in (("reference", cfg.reference, round_dir.parent / "reference.parquet"),
                              ("policy", policy, round_dir / "samples.parquet")):
        if path.exists():
            tables[side] = read_table(path)
            continue
        df = sample_model(model, prompts, sampling, seed + (side == "policy"))
        tokens += int(df["response_tokens"].sum())
        tables[side] = score_table(df, cfg.scorers, batch_size=cfg.batch_size, device=cfg.device)
        write_table(tables[side], path)
    paired = Paired.of(tables["reference"], tables["policy"], columns, cfg.bootstrap, cfg.seed)
    change, ci = {}, {}
    for col in columns:
        point, draws = paired.change(col)
        change[col], ci[col] = point, percentile_ci(draws, point=point)
    reference = {col: float(paired.reference[col].mean()) for col in columns}
    return {"change": change, "change_ci95": ci, "reference": reference, "sampled_tokens": tokens}


def _targets(objective: Objective, measured: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(achieved, required) per constraint in g units on the calibration prompts: a relative
    constraint asks for its change over π_ref, an absolute one for its level (written as a change
    from π_ref's calibration mean)."""
    achieved, required = [], []
    for c, b in zip(objective.constraints, objective.thresholds, strict=True):
        achieved.append(c.sign * measured["change"][c.column])
        ref_g = c.sign * measured["reference"][c.column]
        required.append(c.sign * c.value if c.relative else b - ref_g)
    return np.array(achieved), np.array(required)


def _scores_arrays(scores: pd.DataFrame, objective: Objective):
    seg = Segments.of(scores["prompt_id"].to_numpy())
    weights = scores["sample_weight"].to_numpy(float) if "sample_weight" in scores else None
    r = scores[objective.reward].to_numpy(float)
    g = objective.utilities(scores)
    return seg, r, g, weights


def round_dual(objective: Objective, scores: pd.DataFrame, planned: pd.DataFrame, lambdas: np.ndarray,
               reachable: ReachableTilt | None) -> DualRecord:
    """A round's dual.json: the plan's predictions at λ, and on the reachable tilt the tilt of the
    original scores at λ (what the round's fine-tune trains towards) in ``reachable``, so the
    report keeps the run's tilt."""
    dual = method_dual(objective, planned, lambdas, 1.0, "recalibrate")
    if reachable is not None:
        target = method_dual(objective, scores, lambdas, 1.0, "recalibrate").predicted
        dual.reachable = dataclasses.replace(reachable, samples_predicted=target, samples_predicted_ci=None,
                                             samples_predicted_change_ci=None, fit_resampled=False)
    return dual


def _predicted_change(objective: Objective, scores: pd.DataFrame, lambdas: np.ndarray) -> np.ndarray:
    """Δp_j(λ) on the dual's samples in g units: what the dual predicts π_λ changes."""
    dual = method_dual(objective, scores, lambdas, 1.0, "recalibrate")
    return np.array([c.sign * (dual.predicted[n] - dual.reference[n])
                     for c, n in zip(objective.constraints, objective.names, strict=True)])


def next_lambdas(history: list[dict[str, Any]], objective: Objective, scores: pd.DataFrame,
                 margin: np.ndarray | float = 0.0) -> tuple[np.ndarray, str]:
    """The next λ from the measured rounds (see the module docstring) and the rule that gave it,
    aimed at t_j + margin_j in g units."""
    last = history[-1]
    lam, achieved, required = (np.array(last[k], float) for k in ("lambdas", "achieved_g", "required_g"))
    required = required + np.asarray(margin, float)
    seg, r, g, w = _scores_arrays(scores, objective)
    ids = scores["prompt_id"].to_numpy()
    if len(history) >= 2:
        prev = history[-2]
        nxt, defined = secant_step(lam, achieved, prev["lambdas"], prev["achieved_g"], required)
        if defined.all():
            return nxt, "secant"
    else:
        ref_g = F.reference_means(ids, g, w)
        reachable = seg.max(seg.group(g).T).mean(axis=-1) - ref_g  # the most any reweighting changes g
        ask = np.minimum(rescaled_targets(achieved, np.array(last["predicted_g"]), required),
                         REACHABLE_SHARE * reachable)
        try:
            res = solve_dual_long(ids, r, g, ref_g + ask, objective.beta, w, lambdas0=lam)
            return res.lambdas, "rescaled target"
        except InfeasibleConstraintError:  # jointly out of reach: fall back to the dual step
            pass
    hessian = F.dual_hessian(seg, seg.group(r), seg.group(g), lam, objective.beta,
                             None if w is None else seg.group(w))
    return dual_step(lam, achieved, required, hessian), "dual step"


def _train_round(cfg: RecalibrateConfig, train_cfg: TrainConfig, objective: Objective, scores_path: Path,
                 scores: pd.DataFrame, lambdas: np.ndarray, previous_policy: str, round_dir: Path,
                 dual: DualRecord) -> dict:
    """One extra fine-tune at λ into ``round_dir/policy`` (``dual``: the round's dual.json)."""
    write_dual(dual, round_dir / "dual.json")
    pairs = lagrangian_pairs(scores, objective, lambdas, 1.0, train_cfg.pairs_per_prompt, train_cfg.seed,
                             str(scores_path))
    write_table(pairs, round_dir / "pairs.parquet")
    continuing = cfg.start == "policy"
    changes = {"run_dir": str(round_dir), "pairs": str(round_dir / "pairs.parquet"), "dual": str(round_dir / "dual.json"),
               "output_dir": str(round_dir / "policy"), "beta": objective.beta, "preferences": None,
               "scores": str(scores_path), "model": previous_policy if continuing else cfg.reference,
               "reference": cfg.reference if continuing else None}
    if cfg.epochs is not None:
        changes["num_epochs"] = cfg.epochs
    train_cfg = dataclasses.replace(train_cfg, **changes)
    link_sample_config(scores_path, round_dir)  # train reuses the scores' log π_ref where they are its own
    return train(train_cfg)


def recalibrate(cfg: RecalibrateConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """Measure the trained policy on the calibration prompts; while a constraint misses, correct λ
    and fine-tune again (at most ``cfg.rounds`` times); write recalibrate.json (see module docstring)."""
    one_process("the recalibrate stage")
    run_dir = Path(cfg.run_dir)
    root = run_dir / "recalibrate"
    scores_path = run_dir / "scores.parquet"
    scores = read_table(scores_path)
    objective = load_objective(run_dir / "dual.json")
    dual = read_json(run_dir / "dual.json")
    record = read_dual(run_dir / "dual.json")
    planned = planning_scores(run_dir, scores, record)
    prompts = load_prompts(cfg.prompts, prompt_column=cfg.prompt_column, max_prompts=cfg.max_prompts)
    unmark(run_dir, "recalibrate")
    if not (root / "round0" / "policy").exists():  # the one-shot policy keeps its place in round 0
        (root / "round0").mkdir(parents=True, exist_ok=True)
        if not (run_dir / "policy").exists():
            raise InputError(f"{run_dir / 'policy'}: no trained policy (run the train stage first)")
        shutil.copytree(run_dir / "policy", root / "round0" / "policy")
    lambdas = np.array([dual["lambdas"][n] for n in objective.names], float)
    history: list[dict[str, Any]] = []
    rule = "one-shot λ*"
    for t in range(cfg.rounds + 1):
        round_dir = root / f"round{t}"
        done = round_dir / "measure.json"
        if not done.exists():
            start = time.perf_counter()
            steps = 0
            if t > 0:
                summary = _train_round(cfg, train_cfg, objective, scores_path, scores, lambdas,
                                       str(root / f"round{t - 1}" / "policy"), round_dir,
                                       round_dual(objective, scores, planned, lambdas, record.reachable))
                steps = summary["step"]
            measured = _measure(cfg, str(round_dir / "policy"), prompts, objective, round_dir, cfg.seed + 7919 * t)
            achieved, required = _targets(objective, measured)
            write_json({"round": t, "rule": rule, "lambdas": lambdas.tolist(),
                        "predicted_g": _predicted_change(objective, planned, lambdas).tolist(),
                        "achieved_g": achieved.tolist(), "required_g": required.tolist(), **measured,
                        "met": bool(np.all(achieved - required >= _margin_g(cfg, objective))),
                        "gradient_steps": steps, "wall_s": time.perf_counter() - start}, done)
        history.append(read_json(done))
        if history[-1]["met"] or t == cfg.rounds:
            break
        lambdas, rule = next_lambdas(history, objective, planned, _margin_g(cfg, objective))
    final = root / f"round{len(history) - 1}"
    write_dual(round_dual(objective, scores, planned, np.array(history[-1]["lambdas"]), record.reachable),
               root / "dual.json")
    _replace_policy(final / "policy", run_dir / "policy")
    out = {"rounds": history, "final_round": len(history) - 1, "met": history[-1]["met"],
           "extra_fine_tunes": len(history) - 1, "start": cfg.start, "margin": cfg.margin,
           "compute": {"sampled_tokens": sum(h["sampled_tokens"] for h in history),
                       "gradient_steps": sum(h["gradient_steps"] for h in history),
                       "wall_s": sum(h["wall_s"] for h in history)},
           "names": objective.names}
    write_json(out, run_dir / "recalibrate.json")
    record_stage(run_dir, "recalibrate", cfg, cfg.seed)
    mark_done(run_dir, "recalibrate")
    return out


def _margin_g(cfg: RecalibrateConfig, objective: Objective) -> np.ndarray:
    """``margin`` (column units, ≥ 0 means beyond the threshold) in g units: the same, since g's
    sign makes "beyond" positive for every constraint."""
    return np.full(len(objective.constraints), cfg.margin)


def _replace_policy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (via a temporary sibling, so nothing is half-copied)."""
    if src.resolve() == dst.resolve():
        return
    tmp = dst.parent / f".{dst.name}.recalibrated.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)

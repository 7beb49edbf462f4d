"""The dual stage: constraint strings on a scores table → λ*, predictions and CIs → dual.json.

Constraints are ``COLUMN<=VALUE`` / ``COLUMN>=VALUE`` (:mod:`dualign.data.constraints`); each becomes a
utility g_j = sign_j·column_j with threshold b_j, solved by :mod:`dualign.dual.solver` and reported
back in the columns' own units. ``run_dual`` is the pipeline's stage; ``format_report`` the table
``dualign dual`` prints.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from dualign._infra.config import build_config
from dualign._infra.distributed import one_process
from dualign._infra.errors import InfeasibleConstraintError, InputError
from dualign._infra.io import read_json
from dualign._infra.provenance import mark_done, record_stage, unmark
from dualign._infra.segments import Segments
from dualign._infra.text_table import FIXED, FIXED_NOTE, interval, num, text_table
from dualign.data.constraints import (
    Constraint,
    constraint_names,
    parse_constraint,
    utilities_and_thresholds,
)
from dualign.data.records import (
    ConfidencePlan,
    DualCI,
    DualRecord,
    ExtrapolatedKL,
    HalfSampleKL,
    ReachableTilt,
    delivery_calibration,
    write_dual,
)
from dualign.data.score_table import Scores, as_frame, read_scores, validate_scores
from dualign.dual.formulas import extrapolated_kl, half_sample_kl, reference_means
from dualign.dual.reachable import (
    FEATURES,
    ReachableFit,
    linearized_refit,
    reachable_columns,
    reference_features,
)
from dualign.dual.solver import DualResult, Refit, solve_dual_long


@dataclass
class DualConfig:
    """The dual stage: λ* for the constraints on <run_dir>/scores.parquet → <run_dir>/dual.json."""

    constraints: list[str] = field(metadata={
        "help": "COLUMN<=VALUE (cost) or COLUMN>=VALUE (utility); VALUE absolute or ref+X / ref-X"})
    scores: str | None = field(default=None, metadata={
        "help": "scores table (default: <run_dir>/scores.parquet)"})
    beta: float = field(default=0.1, metadata={"help": "KL coefficient β"})
    reward: str = field(default="reward", metadata={"help": "reward column"})
    bootstrap: int = field(default=0, metadata={
        "help": "bootstrap resamples over prompts for CIs (0: none)"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    confidence: float | None = field(default=None, metadata={
        "help": "plan with a margin: choose λ so that every constraint holds at this one-sided "
                "confidence bound (e.g. 0.95) of its predicted value under prompt resampling, "
                "not only at the point prediction; dual.json records the margin and what it costs"})
    evaluation_prompts: int | None = field(default=None, metadata={
        "help": "with --confidence: the held-out prompts of the evaluation the plan must survive; its "
                "noise joins the margin (in a run: the evaluate section's prompts; unset: the dual's own "
                "spread only)"})
    evaluation_samples: int = field(default=1, metadata={
        "help": "with --evaluation-prompts: responses per prompt and policy in that evaluation"})
    evaluation_bound: float | None = field(default=None, metadata={
        "help": "with --confidence and an evaluation: the one-sided level of the bound that evaluation's "
                "verdict rests on (0.95: the report's 'met confidently'); the margin then covers that bound "
                "too, so the evaluation reports the constraint met at it with probability ≈ --confidence "
                "(unset: its point estimate)"})
    delivery_spread: float | None = field(default=None, metadata={
        "help": "with --confidence: the fine-tune's own spread around the plan, as a fraction of each "
                "constraint's planned change from π_ref (fine-tunes towards one plan land about this far "
                "apart; π_ref's samples cannot show it); the margin covers it too, so the evaluation's verdict "
                "holds with probability ≈ --confidence where the fine-tune lands anywhere in it. The default "
                "demo uses 0.05, measured over world builds (docs/results/build_rates.md); unset: the "
                "fine-tune is taken to land on the plan"})
    kl_delivery: list[float] | None = field(default=None, metadata={
        "help": "a, b: the fine-tune's KL measured on earlier runs, log(achieved / predicted) = a + b·log KL_K "
                "(KL_K: the K-sample KL of what is trained, how hard its tilt pushes); the KL predicted is "
                "then × exp(a + b·log KL_K), the means as without it (scripts/kl_delivery.py --fit measures "
                "it; the default demo's, from world builds: docs/results/build_rates.md). Two more numbers, lo, hi: "
                "the KL_K range it was measured on; a plan outside it is reported as extrapolating the line. "
                "Unset: as the tilt predicts"})
    tilt: Literal["samples", "reachable"] = field(default="samples", metadata={
        "help": "samples: tilt π_ref's samples by their scores (the paper's dual); reachable: first "
                "replace each score by what π_ref's own features of the response predict of it "
                "(cross-fitted ridge), so the dual plans only on what a fine-tune can target: a larger "
                "λ*. The fine-tune still trains on the original scores at that λ*, so dual.json records "
                "their tilt at λ* too (reachable.samples_predicted, with CIs). The report predicts the "
                "plan's means less the fit's bias (reachable.fit_bias: refitted on prompt resamples, the "
                "fit's noise plans change no fine-tune reaches; a --confidence margin adds it) and that "
                "target's KL (a fine-tune pays at least that): docs/results/build_rates.md"})
    model: str | None = field(default=None, metadata={
        "help": "with tilt: reachable, π_ref (HF id or path) whose features are used; in a run: the run's model"})
    revision: str | None = field(default=None, metadata={"help": "with --model: its revision"})
    template: str = field(default="auto", metadata={
        "help": "with --model: the prompt template the samples were drawn with; in a run: the sample section's"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "with --model: allow code shipped with the model to run (off: such a model is refused)"})
    device: str = field(default="auto", metadata={"help": "with --model: cuda, cpu, cuda:1, ... (auto: cuda if available)"})
    ridge_alpha: float = field(default=1e-3, metadata={
        "help": "with tilt: reachable, the ridge penalty α, as a multiple of the mean diagonal of HᵀH"})
    allow_unconverged: bool = field(default=False, metadata={
        "help": "keep a λ* the solver did not converge to (recorded in dual.json, so train accepts it); "
                "off: an unconverged solve is an error"})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive finite number, got {self.beta}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be ≥ 0, got {self.bootstrap}")
        if self.seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {self.seed}")
        if not self.constraints:
            raise ValueError("at least one constraint is needed (COLUMN<=VALUE or COLUMN>=VALUE)")
        for text in self.constraints:
            parse_constraint(text)
        if self.confidence is not None and not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence must lie in [0.5, 1), got {self.confidence}")
        if self.evaluation_prompts is not None and self.evaluation_prompts < 1:
            raise ValueError(f"evaluation_prompts must be ≥ 1, got {self.evaluation_prompts}")
        if self.evaluation_samples < 1:
            raise ValueError(f"evaluation_samples must be ≥ 1, got {self.evaluation_samples}")
        if self.evaluation_bound is not None and not 0.5 <= self.evaluation_bound < 1:
            raise ValueError(f"evaluation_bound must lie in [0.5, 1), got {self.evaluation_bound}")
        if self.evaluation_bound is not None and self.confidence is None:
            raise ValueError("evaluation_bound needs confidence (the probability the bound clears)")
        if self.delivery_spread is not None and not (math.isfinite(self.delivery_spread)
                                                     and 0 <= self.delivery_spread < 1):
            raise ValueError(f"delivery_spread must lie in [0, 1), got {self.delivery_spread}")
        if self.delivery_spread is not None and self.confidence is None:
            raise ValueError("delivery_spread needs confidence (the probability the margin is planned for)")
        if self.kl_delivery is not None and (len(self.kl_delivery) not in (2, 4)
                                             or not all(math.isfinite(float(v)) for v in self.kl_delivery)
                                             or (len(self.kl_delivery) == 4
                                                 and not 0 < self.kl_delivery[2] <= self.kl_delivery[3])):
            raise ValueError("kl_delivery must be two finite numbers (intercept, slope on log KL_K), or four (and "
                             f"the KL_K range 0 < lo <= hi the line was measured on), got {self.kl_delivery}")
        if not (math.isfinite(self.ridge_alpha) and self.ridge_alpha > 0):
            raise ValueError(f"ridge_alpha must be a positive finite number, got {self.ridge_alpha}")

    def evaluation(self) -> tuple[int, int] | None:
        """(prompts, responses per prompt) of the evaluation a confidence plan covers, or None."""
        return None if self.evaluation_prompts is None else (self.evaluation_prompts, self.evaluation_samples)


def _column_infeasible(err: InfeasibleConstraintError,
                       constraints: Sequence[Constraint]) -> InfeasibleConstraintError:
    """Restate a g-unit infeasibility in the columns' own units (a cost's reachable minimum)."""
    def bound(j: int) -> str:
        c = constraints[j]
        word = "lowest" if c.sign < 0 else "highest"
        return f"the {word} mean {c.column} reachable by reweighting the samples is {c.sign * err.reachable[j]:.6g}"

    if err.joint:
        parts = "; ".join(f"'{constraints[j].text}' asks {constraints[j].column} {constraints[j].op} "
                          f"{constraints[j].sign * err.thresholds[j]:.6g} ({bound(j)})" for j in err.which)
        msg = f"constraints jointly infeasible (no reweighting meets them all at once): {parts}"
    else:
        j = err.which[0]
        c = constraints[j]
        msg = (f"constraint '{c.text}' is infeasible: it asks mean {c.column} {c.op} "
               f"{c.sign * err.thresholds[j]:.6g} but {bound(j)}")
    new = InfeasibleConstraintError(msg)
    new.__dict__.update(err.__dict__)
    return new


def _refuse_absolute_implicit(constraints: Sequence[Constraint], source: str) -> None:
    """An implicit reward β·log(π/π_ref) is defined only up to a per-prompt constant, so only a
    threshold relative to π_ref means anything; ``score.meta.json`` beside the scores says which
    columns are implicit."""
    meta = Path(source).parent / "score.meta.json"
    if not Path(source).is_file() or not meta.exists():
        return
    record = read_json(meta)
    scorers = record.get("scorers", {}) if isinstance(record, dict) else {}
    for c in constraints:
        if not c.relative and scorers.get(c.column, {}).get("kind") == "implicit":
            raise InputError(f"constraint {c.text!r}: '{c.column}' is an implicit reward (defined only up "
                             f"to a per-prompt constant), so its threshold must be relative to π_ref, "
                             f"e.g. '{c.column}{c.op}ref{'+' if c.op == '>=' else '-'}0.5'")


def _check_magnitudes(scores: Scores, columns: Sequence[str], beta: float) -> None:
    """The solver sums squares of the values and of value/β (means, covariances, the tilt's
    exponents) in float64: a column for which those overflow is refused by name, not solved into NaN."""
    for column in columns:
        x = scores.columns[column]
        with np.errstate(over="ignore", invalid="ignore"):
            ok = np.isfinite(np.sum(np.square(x))) and np.isfinite(np.sum(np.square(x / beta)))
        if not ok:
            raise InputError(f"{scores.source}: column {column!r} (values up to {np.max(np.abs(x)):.3g}) with "
                             f"β = {beta:g} overflows the dual's float64 arithmetic (sums of squares of "
                             "value/β); rescale the column" + (" or raise β" if beta < 1 else ""))


def _check_finite(record: DualRecord, source: str) -> None:
    """Every number of the solve must be finite (an overflow the magnitude check let through)."""
    values = {**{f"lambdas.{k}": v for k, v in record.lambdas.items()},
              **{f"predicted.{k}": v for k, v in record.predicted.items()}, "dual_value": record.dual_value}
    bad = [k for k, v in values.items() if v is None or not math.isfinite(v)]
    if bad:
        raise InputError(f"{source}: the dual's arithmetic overflowed ({bad[0]} = {values[bad[0]]}); rescale "
                         f"the columns {', '.join(dict.fromkeys(record.columns.values()))} or change β")


def require_converged(record: DualRecord, allow: bool) -> DualRecord:
    """An unconverged λ* is an error unless ``allow``; then dual.json records that it was accepted."""
    if record.converged is False:
        if not allow:
            raise InputError(f"the dual did not converge in {record.iterations} Newton steps (KKT residual "
                             f"{record.kkt_residual:.2g}): λ* and its predictions are unreliable; rescale the "
                             "score columns or change β, or keep them with --allow-unconverged")
        record.allow_unconverged = True
    return record


def solve_constraints(scores: Scores, beta: float, reward: str, constraints: Sequence[Constraint], *,
                      bootstrap: int = 0, seed: int = 0, lambdas0=None,
                      confidence: float | None = None,
                      evaluation: tuple[int, int] | None = None,
                      features: np.ndarray | None = None, ridge_alpha: float = 1e-3,
                      fit: ReachableFit | None = None, evaluation_bound: float | None = None,
                      delivery_spread: float | None = None, shift_bias: bool = True) -> DualRecord:
    """Solve the dual for parsed constraints on a scores table; return the dual.json record.

    With ``features`` [n, d] (π_ref's features of each row, in the table's file order) the dual is
    solved on the reachable tilt (:mod:`dualign.dual.reachable`): every score column replaced by
    its cross-fitted prediction from the features (:func:`reachable_fit`; or ``fit``, that fit made
    once for several solves on the same table); the record keeps each column's R² and what the
    plain K-sample tilt predicts at the chosen λ. Columns whose arithmetic would overflow are
    refused by name, and so is a result that is not finite; whether it converged is the caller's
    to judge (:func:`require_converged`).
    """
    if not constraints:
        raise InputError("at least one --constraint is needed")
    _refuse_absolute_implicit(constraints, scores.source)
    columns = list(dict.fromkeys([reward] + [c.column for c in constraints]))
    _check_magnitudes(scores, columns, beta)
    original = scores
    if fit is None and features is not None:
        fit = reachable_fit(scores, columns, features, ridge_alpha, seed)
    target = refit = None
    if fit is not None:
        scores = dataclasses.replace(scores, columns={**scores.columns, **{c: fit.columns[c] for c in columns}})
        target = (original.columns[reward], np.stack([c.sign * original.columns[c.column] for c in constraints], 1))
        if fit.h_within is not None and (bootstrap or confidence is not None):
            refit = _refit(fit, Segments.of(scores.prompt_index), reward, constraints)
    refs = reference_means(scores.prompt_index, np.stack([scores.columns[c] for c in columns], axis=1),
                           scores.sample_weights)
    ref = dict(zip(columns, refs.tolist(), strict=True))
    g, b = utilities_and_thresholds(constraints, scores.columns, ref)
    names = constraint_names(constraints)
    try:
        res = solve_dual_long(scores.prompt_index, scores.columns[reward], g, b, beta,
                              scores.sample_weights, names=names, bootstrap=bootstrap, seed=seed,
                              lambdas0=lambdas0, relative=[c.relative for c in constraints],
                              confidence=confidence, evaluation=evaluation,
                              residual_variance=None if fit is None else
                              [fit.residual_variance[c.column] for c in constraints],
                              target=target, refit=refit, evaluation_bound=evaluation_bound,
                              delivery=delivery_spread, shift_bias=shift_bias)
    except InfeasibleConstraintError as e:
        raise _column_infeasible(e, constraints) from None
    record = _record(res, reward, constraints, ref)
    _check_finite(record, scores.source)
    halves = half_sample_kl(scores.prompt_index, scores.columns[reward], g, res.lambdas, beta,
                            scores.sample_weights)
    if halves is not None:
        record.kl_half_samples = HalfSampleKL(*halves)
    if fit is not None:
        record.reachable = _reachable_record(fit, res, reward, constraints, refit is not None)
    record.kl_extrapolated = _extrapolated(record, scores, target or (scores.columns[reward], g), res.lambdas, beta)
    return record


def _extrapolated(record: DualRecord, scores: Scores, trained: tuple[np.ndarray, np.ndarray], lambdas: np.ndarray,
                  beta: float) -> ExtrapolatedKL | None:
    """The KL of what is trained (``trained`` = its rewards and utilities: the original scores)
    past its K samples, its CI the K-sample one's scaled alike (:class:`ExtrapolatedKL`)."""
    out = extrapolated_kl(scores.prompt_index, trained[0], trained[1], lambdas, beta, scores.sample_weights)
    if out is None or not out[0] > 0:
        return None
    reach = record.reachable
    ci = (reach.samples_predicted_ci or {}).get("kl") if reach else (record.ci.predicted.get("kl") if record.ci else None)
    scale = out[2] / out[0]
    return ExtrapolatedKL(*out, ci=[float(c * scale) for c in ci] if ci else None)


def _refit(fit: ReachableFit, seg: Segments, reward: str, constraints: Sequence[Constraint]) -> Refit:
    """The solver's refit (:data:`~dualign.dual.solver.Refit`): the reward and each g_j = sign_j·s̃_j
    with the ridge refitted on a prompt resample (:func:`linearized_refit`)."""
    index = {c: i for i, c in enumerate(fit.columns)}
    if fit.linearized is None:  # made once per fit: a sweep (dualign plan) solves on one fit many times
        fit.linearized = linearized_refit(seg, fit)
    fitted = fit.linearized
    memo: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    room = (1 << 28) // max(seg.size * 8 * (len(constraints) + 1), 1)  # resamples kept: 256 MiB

    def refit(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # the margin's rounds and the bootstrap draw the same resamples from one seed
        key = np.asarray(counts).tobytes()
        if key not in memo:
            s = fitted(counts)
            out = s[:, index[reward]], np.stack([c.sign * s[:, index[c.column]] for c in constraints], 1)
            if len(memo) >= room:
                return out
            memo[key] = out
        return memo[key]

    return refit


def reachable_fit(scores: Scores, columns: Sequence[str], features: np.ndarray, ridge_alpha: float = 1e-3,
                  seed: int = 0) -> ReachableFit:
    """The reachable tilt's cross-fitted columns (:func:`~dualign.dual.reachable.reachable_columns`)
    of a scores table, from π_ref's ``features`` [n, d] of its rows in the table's file order."""
    if len(features) != scores.num_samples:
        raise InputError(f"{scores.source}: {len(features)} feature rows for {scores.num_samples} samples")
    return reachable_columns(Segments.of(scores.prompt_index), {c: scores.columns[c] for c in columns},
                             np.asarray(features, dtype=np.float64)[scores.rows - 1], alpha=ridge_alpha, seed=seed)


def planning_scores(run_dir: Path, scores: pd.DataFrame, dual: DualRecord) -> pd.DataFrame:
    """The scores the run's dual planned on: on the reachable tilt (dual.json's ``reachable``) each
    planned column replaced by its fit from π_ref's features (the dual stage's cache, refitted with
    the recorded α and folds), else ``scores`` itself; ``scores`` is the run's scores.parquet, as read.
    Recalibration plans its corrections on these,
    as the dual did, and trains on the original scores, as the one-shot fine-tune did; the report's
    ``by_group`` splits the plan's change over prompt groups on them."""
    reach = dual.reachable
    if reach is None:
        return scores
    path = run_dir / FEATURES
    if not path.exists():
        raise InputError(f"{path}: the run planned on the reachable tilt, but π_ref's features are missing "
                         "(run the dual stage again)")
    from safetensors.numpy import load_file

    columns = list(dict.fromkeys([dual.reward, *dual.columns.values()]))
    table = validate_scores(scores, columns, str(run_dir / "scores.parquet"))   # the run's table, already read
    fit = reachable_fit(table, columns, load_file(str(path))["features"],
                        reach.ridge_alpha if reach.ridge_alpha is not None else 1e-3, reach.fold_seed or 0)
    planned = scores.copy()
    for column in columns:
        values = planned[column].to_numpy(float).copy()
        values[table.rows - 1] = fit.columns[column]
        planned[column] = values
    return planned


def _reachable_record(fit: ReachableFit, res: DualResult, reward: str,
                      constraints: Sequence[Constraint], refitted: bool) -> ReachableTilt:
    """The reachable fit (R², residual s.d. per column) and the K-sample tilt of the original scores
    at λ (the fine-tune's target), with its bootstrap CIs, in the columns' own units."""
    names = constraint_names(constraints)
    signs = np.array([c.sign for c in constraints], dtype=np.float64)

    def in_columns(t: dict, change: bool) -> dict:
        u = np.asarray(t["utility_changes" if change else "utilities"])
        u = u * signs.reshape((-1,) + (1,) * (u.ndim - 1))  # g_j = sign_j·column_j
        out = {reward: t["reward_change" if change else "reward"], **dict(zip(names, u, strict=True))}
        return out if change else {**out, "kl": t["kl"]}

    def as_interval(v) -> list[float]:
        return sorted(float(x) for x in np.asarray(v).ravel())

    predicted = {k: float(v) for k, v in in_columns(res.target, False).items()}
    ci = change_ci = None
    if res.ci is not None and "target" in res.ci:
        ci = {k: as_interval(v) for k, v in in_columns(res.ci["target"], False).items()}
        change_ci = {k: as_interval(v) for k, v in in_columns(res.ci["target"], True).items()}
    bias = None
    if res.fit_bias is not None:  # [Δreward, Δg (m), KL] → column units
        b = np.asarray(res.fit_bias, dtype=np.float64)
        bias = {reward: float(b[0]), **{n: float(s * v) for n, s, v in zip(names, signs, b[1:-1], strict=True)},
                "kl": float(b[-1])}
    return ReachableTilt(r2=dict(fit.r2), residual_sd={c: math.sqrt(v) for c, v in fit.residual_variance.items()},
                         samples_predicted=predicted, samples_predicted_ci=ci, samples_predicted_change_ci=change_ci,
                         fit_resampled=refitted and (res.bootstrap > 0 or res.confidence is not None),
                         ridge_alpha=fit.alpha, fold_seed=fit.seed, fit_bias=bias)


def _in_columns(res: DualResult, reward: str, constraints: Sequence[Constraint]) -> dict[str, float]:
    """π_λ's predicted reward, constraint values (column units, by name) and KL."""
    out = {reward: res.predicted_reward}
    for j, (name, c) in enumerate(zip(res.names, constraints, strict=True)):
        out[name] = c.sign * float(res.predicted_utilities[j])
    out["kl"] = res.kl
    return out


def _record(res: DualResult, reward: str, constraints: Sequence[Constraint],
            ref: dict[str, float]) -> DualRecord:
    """The solver's result in the columns' own units (a cost's value is −g), keyed by constraint name."""
    names = res.names
    predicted = _in_columns(res, reward, constraints)
    reference = {reward: res.reference_reward, **{n: ref[c.column] for n, c in zip(names, constraints, strict=True)},
                 "kl": 0.0}
    ci = None
    if res.ci is not None:
        pred_ci = {reward: res.ci["predicted_reward"].tolist(), "kl": res.ci["kl"].tolist()}
        change_ci = {reward: res.ci["predicted_reward_change"].tolist()}
        fixed = [n for n, f in zip(names, res.change_fixed, strict=True) if f]
        for j, (name, c) in enumerate(zip(names, constraints, strict=True)):
            pred_ci[name] = sorted((c.sign * res.ci["predicted_utilities"][j]).tolist())
            if name not in fixed:
                change_ci[name] = sorted((c.sign * res.ci["predicted_utility_changes"][j]).tolist())
        ci = DualCI(res.ci_level, res.bootstrap, res.bootstrap_failed,
                    {n: res.ci["lambdas"][j].tolist() for j, n in enumerate(names)}, pred_ci, change_ci, fixed)
    elif res.bootstrap:  # every resample failed: the counts, no intervals
        ci = DualCI(res.ci_level, res.bootstrap, res.bootstrap_failed, {}, {})
    margin = res.confidence_margin if res.confidence_margin is not None else np.zeros(len(names))
    plan = None
    if res.plain is not None:
        dual_part, eval_part, delivery_part, bias_part = res.confidence_parts
        plan = ConfidencePlan(res.confidence, {n: float(s) for n, s in zip(names, margin, strict=True)},
                              dict(zip(names, res.plain.lambdas.tolist(), strict=True)),
                              _in_columns(res.plain, reward, constraints),
                              dual_margin={n: float(s) for n, s in zip(names, dual_part, strict=True)},
                              bias_margin={n: float(s) for n, s in zip(names, bias_part, strict=True)},
                              evaluation=None if eval_part is None else {
                                  "prompts": res.confidence_evaluation[0],
                                  "samples": res.confidence_evaluation[1],
                                  "bound": res.confidence_bound,
                                  "margin": {n: float(s) for n, s in zip(names, eval_part, strict=True)}},
                              delivery=None if delivery_part is None else {
                                  "spread": res.confidence_delivery,
                                  "margin": {n: float(s) for n, s in zip(names, delivery_part, strict=True)}})
    return DualRecord(
        beta=res.beta, reward=reward, constraints=[c.text for c in constraints],
        lambdas=dict(zip(names, res.lambdas.tolist(), strict=True)),
        columns={n: c.column for n, c in zip(names, constraints, strict=True)},
        thresholds={n: c.sign * float(b - s) for n, c, b, s in zip(names, constraints, res.thresholds, margin,
                                                                     strict=True)},
        predicted=predicted, reference=reference, feasible=True, converged=res.converged,
        iterations=res.iterations, dual_value=res.dual_value, kkt_residual=res.kkt_residual,
        num_prompts=res.num_prompts, num_samples=res.num_samples, ci=ci, confidence=plan)


def format_report(record: DualRecord) -> str:
    """The human table printed by ``dualign dual``: per constraint λ* with its bootstrap CI, the
    threshold, π_ref's mean and π_λ*'s predicted value, and the predicted change with its CI; then
    reward and KL; then what the half-sample KL and a confidence plan say."""
    ci = record.ci
    status = "converged" if record.converged else "NOT converged"
    per_prompt = record.num_samples / max(record.num_prompts, 1)
    lines = [f"The dual on {record.num_prompts} prompts × {per_prompt:.3g} samples of π_ref, β = {record.beta:g}: "
             f"{status} ({record.iterations} Newton steps, KKT residual {record.kkt_residual:.1e}).",
             "π_λ* is the policy the fine-tune aims at; its values are predicted from π_ref's samples, before "
             "any training.", ""]
    level = f"{round(100 * ci.level)}% CI" if ci and ci.level else "CI"

    def interval_of(group: str, key: str, sign: bool = False) -> str:
        if ci and group == "predicted_change" and key in ci.fixed:
            return FIXED
        return interval(getattr(ci, group).get(key) if ci else None, sign, digits=4)

    rows = []
    for text, name in zip(record.constraints, record.names, strict=True):
        rows.append([text, num(record.lambdas[name], digits=4), interval_of("lambdas", name),
                     num(record.thresholds[name], digits=4), num(record.reference[name], digits=4),
                     num(record.predicted[name], digits=4),
                     num(record.predicted[name] - record.reference[name], sign=True, digits=4),
                     interval_of("predicted_change", name, sign=True)])
    reward = record.reward
    rows.append([f"{reward} (the reward)" if reward != "reward" else reward, "", "", "",
                 num(record.reference[reward], digits=4), num(record.predicted[reward], digits=4),
                 num(record.predicted[reward] - record.reference[reward], sign=True, digits=4),
                 interval_of("predicted_change", reward, sign=True)])
    rows.append(["KL(π_λ* ‖ π_ref), nats", "", "", "", "0", num(record.predicted["kl"], digits=4), "",
                 interval_of("predicted", "kl")])
    lines += text_table(["", "λ*", f"λ* {level}", "threshold", "π_ref", "π_λ*", "change", f"change {level}"], rows)
    notes = [FIXED_NOTE] if ci and ci.fixed else []
    halves = record.kl_half_samples
    if halves:
        notes.append(f"KL estimated from half of each prompt's samples: {halves.half:.3g}; from all of them: "
                     f"{halves.all:.3g}. An estimate that still grows with the number of samples means π_λ*'s "
                     "true KL is larger than predicted: sample more responses per prompt.")
    reach = record.reachable
    if reach:
        fits = ", ".join(f"{c} {r2:.2f}" for c, r2 in reach.r2.items())
        asked = ", ".join(f"{n} {reach.samples_predicted[n] - record.reference[n]:+.4g}"
                          for n in [reward, *record.names])
        notes.append(f"Planned on the reachable tilt: every score replaced by what π_ref's own features of the "
                     f"response predict of it (cross-fitted within-prompt R²: {fits}), so λ* buys only "
                     f"changes a fine-tune can target. The fine-tune trains on the original scores at this λ*, "
                     f"whose K-sample tilt (what is trained towards) has changes of {asked} and KL "
                     f"{reach.samples_predicted['kl']:.3g}"
                     + (f" (95% CI {interval(reach.samples_predicted_ci['kl'], digits=3)})"
                        if reach.samples_predicted_ci else "")
                     + (". The CIs and margins refit the ridge on every prompt resample, so they carry the "
                        "fit's own error." if reach.fit_resampled else ".")
                     + (" A fine-tune moves the means about as far as planned (π_λ* above) and pays at least "
                        "the target's KL: the evaluation compares with those." if not reach.fit_bias else
                        " A fine-tune moves the means about as far as planned (π_λ* above) less the fit's bias, "
                        "and pays at least the target's KL: the evaluation compares with those. The fit's bias "
                        "(what the refitted resamples' plans overstate, which the plan is taken to overstate "
                        "alike: the ridge's noise turns into change no fine-tune reaches) is "
                        + ", ".join(f"{n} {reach.fit_bias[n]:+.3g}" for n in [reward, *record.names]
                                    if n in reach.fit_bias)
                        + ", so a fine-tune is predicted to change "
                        + ", ".join(f"{n} by {record.predicted[n] - record.reference[n] - reach.fit_bias[n]:+.4g}"
                                    for n in [reward, *record.names] if n in reach.fit_bias) + "."))
    plan = record.confidence
    if plan:
        names = ", ".join(f"{n} by {plan.margin[n]:.3g}" for n in record.names)
        pct = round(100 * plan.level)
        if plan.evaluation:
            ev = plan.evaluation
            dv = plan.delivery
            parts = "; ".join(f"{n}: {plan.dual_margin[n]:.3g} for the dual's prompt sampling, "
                              f"{ev['margin'][n]:.3g} for the evaluation's noise"
                              + (f", {dv['margin'][n]:.3g} for the fine-tune's spread ({100 * dv['spread']:.3g}% "
                                 "of the planned change)" if dv else "") for n in record.names)
            what = ("point estimate" if ev.get("bound") is None
                    else f"one-sided {round(100 * ev['bound'])}% bound")
            where = ("wherever the fine-tune lands in its spread around π_λ*" if dv
                     else "if the fine-tune lands on π_λ*")
            why = (f"an evaluation of {ev['prompts']} held-out prompts × {ev['samples']} responses finds the "
                   f"{what} past the threshold with probability ≈ {pct}% {where} (the parts added in "
                   f"quadrature: {parts})")
            if plan.bias_margin and any(abs(v) >= 5e-4 for v in plan.bias_margin.values()):
                why += (", and the resamples' bias added on top (" + "; ".join(
                    f"{n}: {plan.bias_margin[n]:.3g}" for n in record.names) + ": the plan's own prediction "
                        "overstates by that much)")
        else:
            why = f"the one-sided {pct}% bound under prompt resampling meets it"
            if plan.delivery:
                why += (" wherever the fine-tune lands in its spread around π_λ* ("
                        + "; ".join(f"{n}: {plan.dual_margin[n]:.3g} for the dual's prompt sampling, "
                                    f"{plan.delivery['margin'][n]:.3g} for the fine-tune's spread" for n in record.names)
                        + ")")
        notes.append(f"Planned with a {pct}% margin: π_λ* clears each threshold ({names}) so that "
                     f"{why}. Against the "
                     f"plain solution (λ* {', '.join(f'{v:.4g}' for v in plan.plain_lambdas.values())}) the margin "
                     f"costs {plan.plain_predicted[reward] - record.predicted[reward]:.3g} {reward} and adds "
                     f"{record.predicted['kl'] - plan.plain_predicted['kl']:.3g} KL.")
    for note in notes:
        lines += ["", *textwrap.wrap(note, 100)]
    return "\n".join(lines)


def make_plan(scores: Any, constraints: str | Sequence[str], *, beta: float = 0.1, reward: str = "reward",
              bootstrap: int = 0, seed: int = 0, confidence: float | None = None,
              evaluation_prompts: int | None = None, evaluation_samples: int = 1,
              evaluation_bound: float | None = None, delivery_spread: float | None = None,
              kl_delivery: Sequence[float] | None = None, allow_unconverged: bool = False) -> DualRecord:
    """λ* and π_λ*'s predictions for ``constraints`` on scored samples of π_ref held in memory.

    ``scores``: a DataFrame or ``datasets.Dataset`` in the scores table's layout (``prompt_id``, the
    reward and constraint columns, optionally ``sample_weight``; docs/formats.md). ``constraints``
    are written in the columns' own units, ``"cost<=ref-4"`` or ``"helpful>=0.2"``, a cost lower
    being better. The result is what ``dualign dual`` writes to dual.json on the same table
    (:meth:`DualRecord.save`); the keyword arguments are :class:`DualConfig`'s fields, and a bad
    one is a :class:`~dualign._infra.errors.ConfigError` naming it.
    """
    cfg = build_config(DualConfig, {
        "constraints": constraints, "beta": beta, "reward": reward, "bootstrap": bootstrap, "seed": seed,
        "confidence": confidence, "evaluation_prompts": evaluation_prompts,
        "evaluation_samples": evaluation_samples, "evaluation_bound": evaluation_bound,
        "delivery_spread": delivery_spread, "allow_unconverged": allow_unconverged,
        "kl_delivery": None if kl_delivery is None else list(kl_delivery)})
    return solve_config(cfg, table=as_frame(scores, "scores"))


def solve_config(cfg: DualConfig, cache: Path | None = None, table: pd.DataFrame | None = None,
                 shift_bias: bool = True) -> DualRecord:
    """The dual of a DualConfig on its scores table (``table`` in memory, else the file ``cfg.scores``),
    converged or refused (``shift_bias``: see :func:`dualign.dual.solver.solve_dual_long`)."""
    if cfg.tilt == "reachable" and (cfg.model is None or table is not None):
        raise InputError("tilt: reachable needs π_ref's features of a scores file: give --model (in a run, the "
                         "run's model is used)")
    constraints = [parse_constraint(c) for c in cfg.constraints]
    columns = [cfg.reward] + [c.column for c in constraints]
    scores = read_scores(cfg.scores, columns) if table is None else validate_scores(table, columns, "scores")
    features = None
    if cfg.tilt == "reachable":
        features = reference_features(cfg.model, cfg.scores, cache, revision=cfg.revision, template=cfg.template,
                                      trust_remote_code=cfg.trust_remote_code, device=cfg.device)
    record = solve_constraints(scores, cfg.beta, cfg.reward, constraints, bootstrap=cfg.bootstrap,
                               confidence=cfg.confidence, evaluation=cfg.evaluation(), seed=cfg.seed,
                               features=features, ridge_alpha=cfg.ridge_alpha, evaluation_bound=cfg.evaluation_bound,
                               delivery_spread=cfg.delivery_spread, shift_bias=shift_bias)
    if cfg.kl_delivery is not None:
        if record.kl_extrapolated is None:
            raise InputError("kl_delivery calibrates by the K-sample KL of what is trained, which needs two "
                             "samples or more of some prompt")
        record.delivery = delivery_calibration(record.kl_extrapolated.samples, cfg.kl_delivery)
    return require_converged(record, cfg.allow_unconverged)


def run_dual(cfg: DualConfig, run_dir: str | Path) -> DualRecord:
    """The pipeline's dual stage: read scores (cfg.scores or <run_dir>/scores.parquet), write dual.json
    (and, with tilt: reachable, π_ref's features of the samples to reachable_features.safetensors)."""
    one_process("the dual stage")
    run_dir = Path(run_dir)
    path = Path(cfg.scores) if cfg.scores else run_dir / "scores.parquet"
    record = solve_config(dataclasses.replace(cfg, scores=str(path)), run_dir / FEATURES)
    unmark(run_dir, "dual")
    write_dual(record, run_dir / "dual.json")
    record_stage(run_dir, "dual", cfg, seed=cfg.seed)
    mark_done(run_dir, "dual")
    return record

"""The stage files other stages read back, as typed records: ``dual.json`` (the dual stage's λ*
and predictions, or a baseline's λ) and ``eval/report.json`` (the evaluate stage's before/after).

They are written and read here only (layouts in docs/formats.md). One keying rule: a value that
belongs to a constraint is keyed by the constraint's name, its column or, when two constraints
share a column, its text (:func:`dualign.data.constraints.constraint_names`), never by the column
alone. Reading validates every key and type: a missing key or a wrong type is one
:class:`~dualign._infra.errors.InputError` naming the file and the key (``dual.json: key 'lambdas.cost'
...``). Keys a reader does not know are ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualign._infra.errors import InputError
from dualign._infra.io import read_json, write_json
from dualign.data.constraints import Constraint, constraint_names, parse_constraint

# ------------------------------------------------------------------------------------ dual.json


@dataclass
class DualCI:
    """Bootstrap percentile intervals over prompts ([lo, hi]); empty when every resample failed."""

    level: float
    bootstrap: int
    failed: int
    lambdas: dict[str, list[float]]  # by constraint name
    predicted: dict[str, list[float]]  # reward column, constraint names, "kl"
    # the change π_λ makes over π_ref on the same resample (reward column, constraint names): a
    # relative threshold's reference level is re-estimated on every resample
    predicted_change: dict[str, list[float]] = field(default_factory=dict)
    # constraint names whose predicted change is fixed by construction (a relative constraint
    # binding on every resample: the change equals its margin); they have no predicted_change CI
    fixed: list[str] = field(default_factory=list)


@dataclass
class ConfidencePlan:
    """``dual --confidence``: λ chosen so that each constraint holds at its one-sided ``level``
    bound under prompt resampling (and, with ``evaluation``, the noise of an evaluation of that
    size, added in quadrature); ``margin`` (column units, by constraint name) is how far past
    its threshold the point prediction was pushed, ``plain`` the solution without the margin."""

    level: float
    margin: dict[str, float]
    plain_lambdas: dict[str, float]
    plain_predicted: dict[str, float]  # reward column, constraint names, "kl"
    dual_margin: dict[str, float] | None = None  # the part for the dual's own prompt sampling
    evaluation: dict | None = None  # {"prompts", "samples", "margin": {name: part}}: the evaluation covered
    delivery: dict | None = None  # {"spread": δ, "margin": {name: part}}: the fine-tune's spread covered
    # the part for the resamples' bias (solver.slack_bias, g units; added outside the quadrature):
    # ≈ 0 on the K-sample tilt, the refitted fit's optimism on the reachable tilt
    bias_margin: dict[str, float] | None = None


@dataclass
class ReachableTilt:
    """``dual --tilt reachable``: the dual was solved on each score's prediction from π_ref's own
    features of the response (:mod:`dualign.dual.reachable`). ``r2`` and ``residual_sd`` per score
    column: the cross-fitted within-prompt R² and the s.d. of what the features leave out;
    ``samples_predicted`` what the plain K-sample tilt of the original scores predicts at the same
    λ (reward column, constraint names, "kl"): the distribution the fine-tune is trained towards,
    since it trains on the original scores at λ; ``predicted`` (the plan, on the fitted scores) is
    what λ was chosen on. Their bootstrap CIs are in ``samples_predicted_ci`` (values) and
    ``samples_predicted_change_ci`` (changes over π_ref); ``fit_resampled``: the bootstrap and the
    confidence margin refit the ridge on every prompt resample, so the fit's own error is in them."""

    r2: dict[str, float]
    residual_sd: dict[str, float]
    samples_predicted: dict[str, float]
    samples_predicted_ci: dict[str, list[float]] | None = None
    samples_predicted_change_ci: dict[str, list[float]] | None = None
    fit_resampled: bool = False
    ridge_alpha: float | None = None  # the fit's α and fold seed, so a later stage (recalibrate) refits it alike
    fold_seed: int | None = None
    # the refit bootstrap's bias of the plan's changes at λ* (reward column, constraint names: changes in
    # column units; "kl"): how far the plan overstates what its tilt reaches past the fit's own noise
    # (solver.fit_bias); the delivered prediction subtracts it. None: not refitted (or dual.json before 0.4)
    fit_bias: dict[str, float] | None = None


@dataclass
class HalfSampleKL:
    """The KL of π_λ* estimated on the first K/2 samples of each prompt and on all K."""

    half: float
    all: float


@dataclass
class ExtrapolatedKL:
    """The KL of what is trained, past its K samples (:func:`dualign.dual.formulas.extrapolated_kl`):
    the K-sample estimate (``samples``), the mean of it on each half of every prompt's samples
    (``half``) and the Richardson extrapolation 2·samples − half (``value``), with ``ci`` the
    K-sample estimate's bootstrap CI scaled by value / samples. Of the target a fine-tune trains
    towards: on the reachable tilt the original scores at λ*, on the K-sample tilt the plan."""

    samples: float
    half: float
    value: float
    ci: list[float] | None = None


@dataclass
class DeliveryCalibration:
    """The fine-tune's KL measured on earlier runs against how hard the trained tilt pushes,
    x = log KL_K (``kl_extrapolated.samples``, the K-sample KL of what is trained): a fine-tune is
    predicted to spend the KL prediction × exp(kl[0] + kl[1]·x) (:func:`calibrated`;
    ``scripts/kl_delivery.py --fit`` fits the line on evaluated runs). ``x`` and ``kl_factor``: what
    this dual applied. ``kl_k_range``: the KL_K from which to which the line was measured (where the
    setting gives it, ``kl[2:4]``); ``extrapolated``: this plan's KL_K lies outside it, so the factor
    is the line extrapolated (a line fitted on KL_K 0.76–0.97 missed by 1.7–2.0× at 0.61 on the
    built-in world)."""

    kl: list[float]
    x: float
    kl_factor: float
    kl_k_range: list[float] | None = None
    extrapolated: bool = False


@dataclass
class PilotMeasure:
    """The pilot stage (:mod:`dualign.pilot`): a fine-tune towards the first plan on
    ``prompts_trained`` of the dual's prompts, measured on the other ``prompts_measured`` prompts'
    π_ref samples by importance weights (no sampling). By key (reward column, constraint names;
    column units): ``planned``, the first plan's change on the measured prompts; ``measured``, the
    pilot's; ``share``, their ratio ρ (clipped to ``bounds``), the share of a plan that a fine-tune
    delivers on prompts it was not trained on. λ was then solved so that the plan changes each
    constraint by its required change / ρ (``planned_constraints``), and the predictions are the
    plan's changes × ρ. ``kl``: the pilot's importance-weighted KL on the measured prompts and the
    first plan's trained target's K-sample KL there (``kl_target``). ``first_lambdas`` and
    ``first_predicted``: the plan before the pilot (kept in ``pilot/planned.json``)."""

    fraction: float
    seed: int
    prompts_trained: int
    prompts_measured: int
    planned: dict[str, float]
    measured: dict[str, float]
    share: dict[str, float]
    bounds: list[float]
    planned_constraints: list[str]
    kl: float
    kl_target: float
    first_lambdas: dict[str, float]
    first_predicted: dict[str, float]
    # each share's 95% interval over a bootstrap of the measured prompts (the measure's own noise)
    share_ci: dict[str, list[float]] | None = None


def delivery_calibration(kl_k: float, kl: Sequence[float]) -> DeliveryCalibration:
    """The calibration at x = log ``kl_k``: kl_factor = exp(kl[0] + kl[1]·x); with ``kl[2:4]`` = (lo,
    hi), the KL_K range the line was measured on, ``extrapolated`` = kl_k ∉ [lo, hi]."""
    if not (math.isfinite(kl_k) and kl_k > 0):
        raise InputError(f"a KL delivery calibration needs a positive K-sample KL of what is trained, got {kl_k}")
    x = math.log(kl_k)
    span = [float(v) for v in kl[2:4]] if len(kl) == 4 else None
    return DeliveryCalibration(kl=[float(v) for v in kl[:2]], x=x, kl_factor=math.exp(kl[0] + kl[1] * x),
                               kl_k_range=span, extrapolated=span is not None and not span[0] <= kl_k <= span[1])


@dataclass
class DualRecord:
    """dual.json: λ for each constraint and what π_λ is predicted to reach on π_ref's samples.

    ``predicted`` and ``reference`` hold the reward column, each constraint's name (the mean of
    its column, in the column's units) and ``kl``; ``thresholds`` each constraint's threshold in
    its column's units. The baselines write ``method``, ``reward_weight`` and (iterative ones)
    ``lambda_trajectory`` as well; the dual stage the solver's diagnostics.
    """

    beta: float
    reward: str
    constraints: list[str]
    lambdas: dict[str, float]
    columns: dict[str, str] = field(default_factory=dict)  # constraint name -> column
    thresholds: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    feasible: bool | None = None
    converged: bool | None = None
    iterations: int | None = None
    dual_value: float | None = None
    kkt_residual: float | None = None
    num_prompts: int | None = None
    num_samples: int | None = None
    ci: DualCI | None = None
    kl_half_samples: HalfSampleKL | None = None
    kl_extrapolated: ExtrapolatedKL | None = None  # the KL of what is trained, past K samples
    confidence: ConfidencePlan | None = None
    reachable: ReachableTilt | None = None
    delivery: DeliveryCalibration | None = None  # the fine-tune's measured KL, applied to the KL predicted
    pilot: PilotMeasure | None = None  # a pilot fine-tune's delivered share, applied to the means predicted
    allow_unconverged: bool | None = None  # true: the dual stage was told to keep an unconverged λ*
    method: str | None = None
    reward_weight: float | None = None
    lambda_trajectory: list[list[float]] | None = None

    @property
    def parsed(self) -> list[Constraint]:
        return [parse_constraint(c) for c in self.constraints]

    @property
    def names(self) -> list[str]:
        """Each constraint's key in every per-constraint mapping, in order."""
        return constraint_names(self.parsed)

    def save(self, path: str | Path) -> Path:
        """Write this record as ``dual.json``: to ``path``, or into it when it is a directory or
        has no ``.json`` suffix (as a run directory); returns the file written."""
        target = _dual_path(path)
        write_dual(self, target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> DualRecord:
        """A ``dual.json`` (or the one in a directory), validated as :func:`read_dual` does."""
        return read_dual(_dual_path(path))


def _dual_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "dual.json" if path.is_dir() or path.suffix != ".json" else path


def read_dual(path: str | Path, require: tuple[str, ...] = ("lambdas",)) -> DualRecord:
    """dual.json, validated: the constraints parse, and each per-constraint mapping in ``require``
    (``lambdas``, ``thresholds``, ``predicted``, ``reference``) has every constraint's name (and
    ``predicted`` / ``reference`` the reward and ``kl``); λ must be finite."""
    record = _read(DualRecord, path)
    try:
        names = record.names
    except InputError as e:
        raise InputError(f"{path}: key 'constraints': {e}") from None
    for group in require:
        keys = names + ([record.reward, "kl"] if group in ("predicted", "reference") else [])
        for key in keys:
            value = getattr(record, group).get(key)
            if value is None or (group == "lambdas" and not math.isfinite(value)):
                raise InputError(f"{path}: key '{group}.{key}' is missing"
                                 + (" or not a finite number" if group == "lambdas" else ""))
    return record


def write_dual(record: DualRecord, path: str | Path) -> None:
    write_json(to_json(record), path)


@dataclass
class TrainedTarget:
    """The prediction the report judges a fine-tune by, by key (reward column, constraint names,
    "kl"): predicted values, their changes over π_ref's (on the dual's samples) and the changes'
    bootstrap CIs ("kl": the value's CI). On the reachable tilt, also the two distributions it is
    drawn from: ``planned`` (the plan: the fitted scores tilted at λ*, what λ* was chosen on) and
    ``target`` (the original scores tilted at λ*, what the fine-tune trains towards), each as
    changes with CIs; both None on the K-sample tilt, where the plan is the target."""

    values: dict[str, float]
    changes: dict[str, float]
    change_ci: dict[str, list[float]]
    planned: dict[str, float] | None = None
    planned_ci: dict[str, list[float]] | None = None
    target: dict[str, float] | None = None
    target_ci: dict[str, list[float]] | None = None


def delivered(plan: dict[str, float], target: dict[str, float], bias: dict[str, float] | None = None) -> dict[str, float]:
    """What a fine-tune towards the reachable tilt's target is predicted to deliver: every mean
    (reward, constraints) from the plan less the fit's bias (``bias``, :class:`ReachableTilt`'s
    ``fit_bias``: the plan's fitted scores carry the ridge's estimation noise, which the tilt turns
    into change that no fine-tune reaches), the KL from the target.

    The fine-tune trains on the original scores s at λ*, but what it moves of each mean is about
    the part of s that π_ref's own features reach, the fitted s̃ the plan tilts (measured: the
    plan's changes lie inside the achieved changes' 95% CIs on 8 to 10 of 10 build × seed runs,
    the target's on 1 or 2; docs/results/build_rates.md). The rest of s it fits on the training
    samples without moving the held-out means, and that still costs KL: the target's KL, not
    the plan's, is the lower figure a fine-tune pays (achieved / plan 1.2 to 2.3×). Used on values
    and on their CIs alike: a key missing on its side (a CI not computed) stays missing."""
    def less_bias(k: str, v):
        shift = (bias or {}).get(k, 0.0)
        return [x - shift for x in v] if isinstance(v, list) else v - shift

    return ({k: less_bias(k, v) for k, v in plan.items() if k != "kl"}
            | ({"kl": target["kl"]} if "kl" in target else {}))


def trained_target(dual: DualRecord) -> TrainedTarget:
    """The prediction a fine-tune is judged by (see :func:`delivered`). On the K-sample tilt the
    plan is what is trained: ``dual.predicted``. On the reachable tilt the means are the plan's
    (``dual.predicted``) less the fit's bias (``reachable.fit_bias``, where recorded) and the KL the target's (``reachable.samples_predicted``, the K-sample
    tilt of the original scores at λ*), each with its own bootstrap CI; both distributions are
    kept, as ``planned`` and ``target``."""
    keys = [dual.reward, *dual.names]

    def changes(values: dict[str, float]) -> dict[str, float]:
        return {k: values[k] - dual.reference[k] for k in keys} | {"kl": values["kl"]}

    ext = dual.kl_extrapolated

    def past_k(values: dict, ci: dict) -> tuple[dict, dict]:
        """The KL of what is trained past its K samples, where dual.json has it (0.2 and later)."""
        if ext is None:
            return values, ci
        return {**values, "kl": ext.value}, ({**ci, "kl": ext.ci} if ext.ci else
                                             {k: v for k, v in ci.items() if k != "kl"})

    ci = dual.ci
    plan_ci = {**(ci.predicted_change if ci else {}), **({"kl": ci.predicted["kl"]} if ci and "kl" in ci.predicted else {})}
    reach = dual.reachable
    if reach is None:
        values, _ = past_k(dict(dual.predicted), {})
        return calibrated(TrainedTarget(values, *past_k(changes(dual.predicted), plan_ci)), dual)
    target_ci = {**(reach.samples_predicted_change_ci or {}),
                 **({"kl": reach.samples_predicted_ci["kl"]} if reach.samples_predicted_ci else {})}
    plan, target = changes(dual.predicted), changes(reach.samples_predicted)
    # its "kl" unused: delivered takes the KL from the target; after a pilot its share, measured against
    # the plan itself, takes the place of the fit's bias
    bias = {} if dual.pilot is not None else reach.fit_bias or {}
    values, _ = past_k(delivered(dual.predicted, reach.samples_predicted, bias), {})
    # the resamples' percentile interval is centred near plan + bias; the corrected value is plan − bias
    delivered_changes, delivered_ci = past_k(delivered(plan, target, bias),
                                             delivered(plan_ci, target_ci, {k: 2 * v for k, v in bias.items()}))
    return calibrated(TrainedTarget(values, delivered_changes, delivered_ci, plan, plan_ci, target, target_ci), dual)


def calibrated(target: TrainedTarget, dual: DualRecord) -> TrainedTarget:
    """``target``'s prediction with dual.json's delivery calibrations applied (none recorded: as
    is): after a pilot (``dual.pilot``) each mean's change and its CI × the pilot's share ρ (the
    value π_ref's mean + that change); with a KL line (``dual.delivery``) the KL's value, change and
    CI × ``kl_factor``. The plan and the target it is drawn from stay as they are."""
    if dual.pilot is not None:
        share = dual.pilot.share

        def scaled(d: dict, ci: bool = False) -> dict:
            return {k: ([x * share[k] for x in v] if ci else v * share[k]) if k in share and v is not None else v
                    for k, v in d.items()}

        changes = scaled(target.changes)
        values = {k: dual.reference[k] + changes[k] if k in share and k in dual.reference else v
                  for k, v in target.values.items()}
        target = dataclasses.replace(target, values=values, changes=changes,
                                     change_ci=scaled(target.change_ci, ci=True))
    cal = dual.delivery
    if cal is None:
        return target

    def apply(d: dict, ci: bool = False) -> dict:
        if d.get("kl") is None:
            return d
        return {**d, "kl": [v * cal.kl_factor for v in d["kl"]] if ci else d["kl"] * cal.kl_factor}

    return dataclasses.replace(target, values=apply(target.values), changes=apply(target.changes),
                               change_ci=apply(target.change_ci, ci=True))


# ------------------------------------------------------------------------------ eval/report.json


@dataclass
class Estimate:
    """A mean over held-out responses and its 95% prompt-bootstrap interval [lo, hi]."""

    mean: float
    ci95: list[float]


@dataclass
class KLOutcome:
    achieved: float  # mean_x log π(y|x)/π_ref(y|x) on the policy's samples
    ci95: list[float]
    predicted: float | None  # the KL the report predicts (EvalReport.prediction: on the reachable tilt the target's)
    predicted_ci95: list[float] | None = None  # the dual's bootstrap CI of it
    prediction_in_ci: bool | None = None  # predicted inside ci95, the achieved KL's own interval
    planned: float | None = None  # the plan's KL, where it differs from predicted (the reachable tilt)
    planned_ci95: list[float] | None = None
    samples: float | None = None  # what is trained's KL on its K samples, before the extrapolation past them


@dataclass
class ConstraintOutcome:
    """One constraint on held-out prompts: achieved against its threshold and against the dual's
    predicted change. Changes are the policy's mean minus π_ref's on the same prompts, with a
    paired prompt bootstrap (a relative threshold's reference level re-estimated on each resample).

    Verdicts: ``met`` — the point estimate is on the right side of the threshold; ``met_confidently``
    — the one-sided 95% bound is; ``not_rejected`` — the two-sided 95% CI reaches it.
    """

    name: str
    constraint: str
    column: str
    threshold: float  # on the held-out prompts (a relative one from π_ref's held-out mean)
    threshold_dual: float  # on the dual's samples
    reference_eval: float
    achieved: float
    ci95: list[float]  # of the policy's mean
    predicted: float  # dual.json: predicted on the dual's samples
    reference_dual: float
    predicted_eval: float  # π_ref's held-out mean + the predicted change
    predicted_change: float
    achieved_change: float
    achieved_change_ci95: list[float] | None  # paired bootstrap (None: a report from before it)
    prediction_error_frac: float
    met: bool
    met_confidently: bool | None
    not_rejected: bool | None
    bound95: float | None  # the one-sided 95% bound met_confidently is judged on (value or change)
    predicted_change_ci95: list[float] | None = None  # the dual's bootstrap CI
    predicted_change_fixed: bool = False  # dual.json ci.fixed: the change is the margin by construction, no CI
    prediction_in_achieved_ci: bool | None = None  # predicted_change inside achieved_change_ci95
    planned_change: float | None = None  # the plan's change, where it differs (the reachable tilt)
    planned_change_ci95: list[float] | None = None
    target_change: float | None = None  # the change the fine-tune trains towards (the reachable tilt)
    target_change_ci95: list[float] | None = None


@dataclass
class RewardPrediction:
    predicted: float
    reference_dual: float
    predicted_eval: float
    predicted_change: float | None = None
    predicted_change_ci95: list[float] | None = None  # the dual's bootstrap CI
    achieved_change: float | None = None
    achieved_change_ci95: list[float] | None = None  # paired bootstrap on held-out prompts
    prediction_in_achieved_ci: bool | None = None  # predicted_change inside achieved_change_ci95
    planned_change: float | None = None  # the plan's change, where it differs (the reachable tilt)
    planned_change_ci95: list[float] | None = None
    target_change: float | None = None  # the change the fine-tune trains towards (the reachable tilt)
    target_change_ci95: list[float] | None = None


@dataclass
class JudgeSummary:
    judge_helpful: Estimate
    judge_harmful: Estimate
    n: int


@dataclass
class GroupChange:
    """One column's change within one group of prompts (eval/report.json ``by_group``)."""

    achieved: float  # mean over the group's held-out prompts of the policy's mean less π_ref's
    achieved_ci95: list[float] | None  # mean ± 1.96·s.d./√n of those per-prompt differences
    planned: float | None = None  # the plan's change within the group (the tilt λ* was solved on)
    target: float | None = None  # the trained target's (the original scores at λ*), where it differs


@dataclass
class GroupOutcome:
    """One group of prompts: how many held-out prompts it has, its share of the dual's prompts and
    each score column's change (:class:`GroupChange`)."""

    prompts_eval: int
    share_dual: float | None = None
    changes: dict[str, GroupChange] = field(default_factory=dict)


@dataclass
class EvalReport:
    """eval/report.json: π_ref and the policy on held-out prompts, against the dual's prediction.

    ``reference`` and ``policy`` summarise every score column (the reward first); ``constraints``
    lists the constraints in dual.json's order; ``judge`` (with a gold judge) maps side → group →
    summary.
    """

    n_prompts: int
    n_responses: dict[str, int]
    beta: float
    lambdas: dict[str, float]
    reference: dict[str, Estimate]
    policy: dict[str, Estimate]
    kl: KLOutcome
    win_rate: dict[str, float]
    constraints: list[ConstraintOutcome]
    predicted_reward: RewardPrediction
    reward: str
    judge: dict[str, dict[str, JudgeSummary]] | None = None
    recalibration: dict[str, Any] | None = None  # recalibrate.json's rounds and compute, when it ran
    tilt: str = "samples"  # the dual's tilt (dual.json's ``reachable`` set: "reachable")
    # what every ``predicted`` is of: "delivered", on the reachable tilt, the plan's means and the
    # KL of the target the fine-tune trains towards (records.delivered; both kept, as ``planned_*``
    # and ``target_*``); "plan" where the plan is the target (the K-sample tilt), or in a report from
    # before the key; "target" in reports of release 0.1 (every value the target's)
    prediction: str = "plan"
    # dual.json's delivery calibration, where the prediction applied one (DeliveryCalibration)
    delivery: DeliveryCalibration | None = None
    pilot: PilotMeasure | None = None  # dual.json's pilot: the share its predictions were scaled by
    # with evaluate's group_column: each group's changes, planned and achieved (GroupOutcome)
    group_column: str | None = None
    by_group: dict[str, GroupOutcome] | None = None


def read_report(path: str | Path) -> EvalReport:
    """eval/report.json, validated (reports written before ``reward`` and the constraints'
    ``name`` were recorded get them from the policy's first column and the constraints' texts)."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("policy"), dict) and isinstance(data.get("constraints"), list):
        data = dict(data)
        data.setdefault("reward", next(iter(data["policy"]), None))
        rows = [r for r in data["constraints"] if isinstance(r, dict)]
        if all(isinstance(r.get("constraint"), str) for r in rows) and any("name" not in r for r in rows):
            try:
                names = constraint_names([parse_constraint(r["constraint"]) for r in rows])
            except InputError as e:
                raise InputError(f"{path}: key 'constraints': {e}") from None
            data["constraints"] = [{"name": n, **r} for n, r in zip(names, rows, strict=True)]
        data["constraints"] = [_old_verdicts(r) if isinstance(r, dict) else r for r in data["constraints"]]
    return _convert(EvalReport, data, "", str(path))


def _old_verdicts(row: dict) -> dict:
    """A constraint row of a report written before the paired verdicts: ``satisfied_point`` is
    ``met``, ``satisfied_within_ci`` is ``not_rejected``; what was not recorded stays unknown."""
    if "met" in row or "satisfied_point" not in row:
        return row
    out = {k: v for k, v in row.items() if k not in ("satisfied_point", "satisfied_within_ci")}
    return {**out, "met": row["satisfied_point"], "met_confidently": None,
            "not_rejected": row.get("satisfied_within_ci"), "bound95": None, "achieved_change_ci95": None}


def write_report(report: EvalReport, path: str | Path) -> None:
    write_json(to_json(report), path)


# ------------------------------------------------------------------------------------ conversion


def to_json(record: Any) -> Any:
    """A record as JSON-ready dicts and lists; optional fields that are None are left out."""
    if dataclasses.is_dataclass(record):
        return {f.name: to_json(getattr(record, f.name)) for f in dataclasses.fields(record)
                if not (getattr(record, f.name) is None and f.default is None)}
    if isinstance(record, dict):
        return {k: to_json(v) for k, v in record.items()}
    if isinstance(record, list | tuple):
        return [to_json(v) for v in record]
    return record


def _read(cls: type, path: str | Path) -> Any:
    return _convert(cls, read_json(path), "", str(path))


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """``value`` (parsed JSON) checked against the type hint ``tp``; dataclasses built field by field."""
    def wrong(what: str) -> InputError:
        where = f"key '{key}'" if key else "the file"
        return InputError(f"{source}: {where} must be {what}, got {type(value).__name__} {value!r:.60}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):  # X | None
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong("an object")
        hints = typing.get_type_hints(tp)
        out = {}
        for f in dataclasses.fields(tp):
            sub = f"{key}.{f.name}" if key else f.name
            if f.name in value:
                out[f.name] = _convert(hints[f.name], value[f.name], sub, source)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InputError(f"{source}: missing key '{sub}'")
        return tp(**out)
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong("an object")
        return {k: _convert(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise wrong("a list")
        return [_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if tp in (str, bool) and not isinstance(value, tp):
        raise wrong("a string" if tp is str else "true or false")
    return value

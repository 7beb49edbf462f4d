"""Evaluate stage: sample from the trained policy and from π_ref on held-out prompts, score
both, and report achieved vs predicted.

Outputs in ``<run_dir>/eval/``: ``samples_policy.parquet``, ``samples_reference.parquet``,
``report.json``, ``scores.png`` (score distributions before/after) and
``predicted_vs_achieved.png`` (predicted against achieved changes, with CIs). The table a run
ends with and the plots are drawn by :mod:`dualign.data.report_view`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dualign._infra.config import build_config, load_yaml
from dualign._infra.distributed import Ranks, gather_shards, one_process, ranks
from dualign._infra.errors import DualignError, InputError, first_line
from dualign._infra.io import (
    cache_root,
    fingerprint,
    read_json,
    read_table,
    write_json,
    write_table,
)
from dualign._infra.provenance import mark_done, record_stage, unmark, versions
from dualign._infra.segments import Segments
from dualign.data.prompts import load_prompts
from dualign.data.records import (
    ConstraintOutcome,
    DualRecord,
    Estimate,
    EvalReport,
    GroupChange,
    GroupOutcome,
    JudgeSummary,
    KLOutcome,
    RewardPrediction,
    read_dual,
    trained_target,
    write_report,
)
from dualign.data.report_view import plot_report
from dualign.data.score_table import WEIGHT_COLUMN, as_frame
from dualign.dual.formulas import group_changes, tilt_logits
from dualign.dual.stage import planning_scores
from dualign.modeling.generation import generate_responses
from dualign.modeling.models import (
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    sequence_logprobs,
    tokenize_pairs,
)
from dualign.modeling.scorers import parse_scorer
from dualign.modeling.scoring import score_table
from dualign.modeling.templates import check_template, format_prompt


@dataclass
class EvaluateConfig:
    run_dir: str = field(metadata={"help": "run directory (reads dual.json and policy/, writes eval/)"})
    reference: str = field(metadata={"help": "π_ref: HF model id or local path"})
    prompts: str = field(metadata={"help": "held-out prompts: JSONL/Parquet/CSV, a saved datasets dir or a Hub id"})
    scorers: list[str] = field(metadata={"help": "scorer specs NAME=KIND:PATH, as in `dualign score`"})
    policy: str | None = field(default=None, metadata={"help": "trained policy (default: <run_dir>/policy)"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt text"})
    split: str = field(default="train", metadata={"help": "dataset split (saved or Hub datasets)"})
    group_column: str | None = field(default=None, metadata={
        "help": "prompt column to break results down by (e.g. harmful): the judge's rates and each score's change, planned "
                "and achieved, per group (report.json by_group)"})
    max_prompts: int | None = field(default=None, metadata={"help": "use at most this many prompts"})
    num_samples: int = field(default=1, metadata={"help": "responses per prompt and model"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation length cap"})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature: 1 (the KL estimate log π − log π_ref needs samples of π itself)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass: 1, as for temperature"})
    batch_size: int = field(default=32, metadata={"help": "generation and scoring batch size"})
    template: str = field(default="auto", metadata={"help": "prompt template (see `dualign sample`)"})
    judge: str | None = field(default=None, metadata={"help": "gold judge module:function -> {'helpful': [...], 'harmful': [...]}"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples over prompts for the 95% CIs"})
    reference_cache: bool = field(default=True, metadata={
        "help": "reuse π_ref's held-out samples, scores and verdicts from $DUALIGN_CACHE/eval-reference when "
                "every setting that determines them (models, prompts, sampling, scorers, judge, seed) is unchanged"})
    seed: int = field(default=0, metadata={"help": "sampling and bootstrap seed"})
    shard_size: int | None = field(default=None, metadata={
        "help": "prompts per shard, shard i sampled with its own seed (seed + i); set it to run evaluate under "
                "torchrun / accelerate launch, each process taking every n-th shard (any number of processes "
                "gives the same tables); unset: one random stream over all prompts, one process"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run Python code shipped with π_ref, the policy or a scorer model (auto_map); off: refused"})

    def __post_init__(self) -> None:
        if self.shard_size is not None and self.shard_size < 1:
            raise ValueError(f"shard_size must be ≥ 1, got {self.shard_size}")
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be ≥ 1, got {self.max_prompts}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be ≥ 0, got {self.bootstrap}")
        if self.seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {self.seed}")
        # KL(π‖π_ref) is estimated as the mean of log π − log π_ref over the policy's own samples,
        # which holds only when they are drawn from π itself (and the dual predicts that π)
        if self.temperature != 1 or self.top_p != 1:
            raise ValueError(f"temperature={self.temperature:g}, top_p={self.top_p:g}: evaluation samples π "
                             "itself (temperature 1, top_p 1), the policy whose KL and scores the dual predicts")
        for spec in self.scorers:
            parse_scorer(spec)
        check_template(self.template)


# ---------------------------------------------------------------------------------- statistics
def cluster_bootstrap_ci(values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and a percentile CI from resampling whole groups (prompts) with replacement.

    mean = Σ_i v_i / n;  a bootstrap replicate draws G groups with replacement and takes the mean
    of all their values (responses of one prompt are correlated, so prompts are the unit). The
    interval is widened to contain the mean where rounding or skew would leave it outside.
    """
    seg = Segments.of(groups)
    sums = seg.sum(seg.group(np.asarray(values, dtype=float)))
    counts = seg.counts.astype(float)
    mean = float(sums.sum() / counts.sum())
    if n_boot <= 0 or len(sums) < 2:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    reps = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(min(lo, mean)), float(max(hi, mean))


def win_rate(policy_scores: np.ndarray, reference_scores: np.ndarray) -> float:
    """P(s_policy > s_ref) + ½·P(tie) over matched (prompt, sample index) pairs."""
    p, r = np.asarray(policy_scores, float), np.asarray(reference_scores, float)
    return float(np.mean((p > r) + 0.5 * (p == r)))


@dataclass
class Paired:
    """Per-prompt means of the policy's and π_ref's responses on the prompts both answered, and the
    prompt indices of every bootstrap resample (one draw shared by every column, so a resample is a
    coherent re-run of the evaluation on another prompt set)."""

    policy: pd.DataFrame  # [N prompts, columns]
    reference: pd.DataFrame
    draws: np.ndarray  # [B, N]

    @classmethod
    def of(cls, ref: pd.DataFrame, pol: pd.DataFrame, columns: list[str], n_boot: int, seed: int) -> Paired:
        """Both sides' prompt means (prompts in π_ref's order) and ``n_boot`` resamples of the prompts."""
        means = {}
        for side, df in (("reference", ref), ("policy", pol)):
            seg = Segments.of(df["prompt_id"].astype(str).to_numpy())
            values = seg.group(df[columns].to_numpy(float)).T  # [c, n]
            means[side] = pd.DataFrame((seg.sum(values) / seg.counts).T, index=seg.labels, columns=columns)
        prompts = means["reference"].index.intersection(means["policy"].index, sort=False)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(prompts), size=(max(n_boot, 0), len(prompts)))
        return cls(means["policy"].loc[prompts], means["reference"].loc[prompts], draws)

    def change(self, column: str) -> tuple[float, np.ndarray]:
        """(Δ = mean_x [m_pol(x) − m_ref(x)], its value on every resample)."""
        d = (self.policy[column] - self.reference[column]).to_numpy()
        return float(d.mean()), d[self.draws].mean(axis=1)

    def level(self, column: str, side: str = "policy") -> tuple[float, np.ndarray]:
        """(mean_x m(x) of one side, its value on every resample)."""
        v = getattr(self, side)[column].to_numpy()
        return float(v.mean()), v[self.draws].mean(axis=1)


def percentile_ci(draws: np.ndarray, level: float = 0.95, point: float | None = None) -> list[float]:
    """The two-sided percentile interval of bootstrap draws ([nan, nan] without draws), widened to
    contain ``point`` (the estimate the draws resample) when it is given."""
    if draws.size < 2:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]).tolist()
    return [lo, hi] if point is None else containing([lo, hi], point)


def containing(ci: list[float] | None, point: float | None) -> list[float] | None:
    """``ci`` widened to contain ``point``: a point is never outside its own interval (a zero-width
    interval of a value fixed by construction can miss it by a rounding error)."""
    if ci is None or point is None or not np.isfinite(point) or any(np.isnan(v) for v in ci):
        return ci
    return [min(ci[0], point), max(ci[1], point)]


def verdicts(point: float, draws: np.ndarray, bound: float, op: str, level: float = 0.95) -> dict:
    """Whether ``point`` (a mean or a change, with its bootstrap ``draws``) satisfies ``op bound``:
    ``met`` by the point estimate, ``met_confidently`` by the one-sided ``level`` bound (the
    ``level`` quantile for ≤, the 1 − ``level`` one for ≥), ``not_rejected`` when the two-sided
    ``level`` CI reaches it. The bound and the CI are widened to contain ``point``, so met
    confidently ⇒ met ⇒ not rejected; without draws the two interval verdicts are unknown (None)."""
    below = op == "<="
    holds = (lambda v: v <= bound) if below else (lambda v: v >= bound)
    if draws.size < 2:
        return {"met": bool(holds(point)), "met_confidently": None, "not_rejected": None, "bound95": None}
    one_sided = float(np.quantile(draws, level if below else 1 - level))
    one_sided = max(one_sided, point) if below else min(one_sided, point)
    lo, hi = percentile_ci(draws, level, point)
    return {"met": bool(holds(point)), "met_confidently": bool(holds(one_sided)),
            "not_rejected": bool(holds(lo if below else hi)), "bound95": one_sided}


def prediction_error(achieved_change: float, predicted_change: float) -> float:
    """|Δ_achieved − Δ_predicted| / |Δ_predicted|: the miss as a fraction of the predicted change.

    Changes are taken against π_ref on each set (the dual's samples for the prediction, the
    held-out prompts for the achieved value), so a shift between the two prompt sets cancels.
    """
    return float(abs(achieved_change - predicted_change) / abs(predicted_change)) if predicted_change else float("nan")


# ---------------------------------------------------------------------------------- the stage
def _judge(spec: str, df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The gold judge ``module:function`` (the user's code) on every response: helpful and harmful
    scores; anything it raises or returns amiss is one line naming it."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise InputError(f"judge {spec!r}: expected module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
        verdict = fn(df["prompt"].tolist(), df["response"].tolist())
        out = {k: np.asarray(verdict[k], dtype=float) for k in ("helpful", "harmful")}
    except DualignError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's judge failed: one line naming it
        raise InputError(f"judge {spec!r} failed ({type(e).__name__}: {first_line(e)}); it must return "
                         "{'helpful': [float], 'harmful': [float]}, one per response") from None
    for k, v in out.items():
        if v.shape != (len(df),):
            raise InputError(f"judge {spec!r}: '{k}' has {v.size} values for {len(df)} responses")
    return out


def sample_model(model_path: str, prompts: pd.DataFrame, cfg: EvaluateConfig, seed: int,
                  ref_model=None, ref_tokenizer=None) -> pd.DataFrame:
    """Generate from ``model_path`` with ``cfg``'s sampling settings (num_samples, template,
    max_new_tokens, temperature, top_p, batch_size, device; trust_remote_code where it has one); add
    ``logprob`` (own) and ``ref_logprob`` (under ``ref_model`` when given, else its own)."""
    trust = getattr(cfg, "trust_remote_code", False)
    tok = load_tokenizer(model_path, trust_remote_code=trust)
    model = load_causal_lm(model_path, device=cfg.device, trust_remote_code=trust).eval()
    df = _generate(model, tok, prompts, cfg, seed, ref_model, ref_tokenizer)
    del model
    return df


def _generate(model, tok, prompts: pd.DataFrame, cfg, seed: int, ref_model, ref_tokenizer) -> pd.DataFrame:
    """:func:`sample_model`'s generation with a loaded model."""
    df = generate_responses(model, tok, prompts["prompt"].tolist(), prompts["prompt_id"].tolist(),
                            cfg.num_samples, template=cfg.template, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                            seed=seed)
    df = df.rename(columns={"ref_logprob": "logprob"})
    if ref_model is None:
        df["ref_logprob"] = df["logprob"]
    else:
        df["ref_logprob"] = _logprobs(ref_model, ref_tokenizer, df, cfg)
    return df


def _sample_shards(path: str, prompts: pd.DataFrame, cfg: EvaluateConfig, seed: int, ref_model, ref_tokenizer,
                   shard_dir: Path, dp: Ranks) -> pd.DataFrame:
    """Every shard of ``cfg.shard_size`` prompts sampled with seed + its index, this process taking
    every n-th one (a finished shard file is kept, so a killed run resumes); every process returns
    the whole table, in prompt order, once all shards exist."""
    n_shards = math.ceil(len(prompts) / cfg.shard_size)
    key = {"model": fingerprint(path), "seed": seed, "prompts": prompts["prompt_id"].astype(str).tolist(),
           **{k: getattr(cfg, k) for k in ("shard_size", "num_samples", "max_new_tokens", "template", "batch_size",
                                           "device")}}
    if dp.main and (shard_dir / "config.json").exists() and read_json(shard_dir / "config.json") != key:
        shutil.rmtree(shard_dir)  # shards of an interrupted run with other settings: not this run's
    if dp.main and not (shard_dir / "config.json").exists():
        write_json(key, shard_dir / "config.json")
    dp.barrier()
    mine = [i for i in dp.mine(n_shards) if not (shard_dir / f"{i}.parquet").exists()]
    if mine:
        tok = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
        model = load_causal_lm(path, device=dp.device(cfg.device), trust_remote_code=cfg.trust_remote_code).eval()
        for i in mine:
            part = prompts.iloc[i * cfg.shard_size:(i + 1) * cfg.shard_size]
            write_table(_generate(model, tok, part, cfg, seed + i, ref_model, ref_tokenizer),
                        shard_dir / f"{i}.parquet")
        del model
    return gather_shards(n_shards, shard_dir, dp, everywhere=True)


def _logprobs(model, tokenizer, df: pd.DataFrame, cfg: EvaluateConfig) -> np.ndarray:
    out = []
    texts = [format_prompt(p, cfg.template, tokenizer) for p in df["prompt"]]
    responses, cut = df["response"].tolist(), df["truncated"].tolist()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(df), cfg.batch_size):
            rows = slice(i, i + cfg.batch_size)
            batch = tokenize_pairs(tokenizer, texts[rows], responses[rows], truncated=cut[rows])
            out.append(sequence_logprobs(model, **{k: v.to(device) for k, v in batch.items()}).cpu().numpy())
    return np.concatenate(out)


def _estimate(df: pd.DataFrame, column: str, cfg: EvaluateConfig) -> Estimate:
    mean, lo, hi = cluster_bootstrap_ci(df[column].to_numpy(float), df["prompt_id"].to_numpy(),
                                        cfg.bootstrap, cfg.seed)
    return Estimate(mean, [lo, hi])


def _judge_summary(df: pd.DataFrame, cfg: EvaluateConfig) -> dict[str, JudgeSummary]:
    groups = [("all", df)]
    if cfg.group_column and cfg.group_column in df:
        groups += [(f"{cfg.group_column}={g}", sub) for g, sub in df.groupby(cfg.group_column)]
    return {name: JudgeSummary(_estimate(sub, "judge_helpful", cfg), _estimate(sub, "judge_harmful", cfg),
                               len(sub)) for name, sub in groups}


def evaluate(cfg: EvaluateConfig) -> Path:
    """Run the evaluate stage; returns the path of ``eval/report.json``.

    With ``shard_size`` it runs data-parallel under a launcher: each process samples its shards of
    the prompts, every process scores its share of the batches one process would form (summed back,
    :func:`dualign.modeling.scorers.score_columns`), and the main process judges, reports and writes."""
    if cfg.shard_size is None:
        one_process("the evaluate stage without shard_size")
    dp = ranks()
    run_dir = Path(cfg.run_dir)
    policy = cfg.policy or str(run_dir / "policy")
    if not Path(policy).exists() and (policy.startswith((".", "/")) or os.sep in policy):
        raise InputError(f"policy '{policy}' does not exist (run `dualign train` first)")
    # after recalibration the policy was trained at recalibrate/dual.json's λ, not at λ*
    recalibrated = run_dir / "recalibrate" / "dual.json"
    dual = read_dual(recalibrated if recalibrated.exists() else run_dir / "dual.json",
                     require=("lambdas", "thresholds", "predicted", "reference"))

    prompts = load_prompts(cfg.prompts, prompt_column=cfg.prompt_column, split=cfg.split,
                           max_prompts=cfg.max_prompts)
    extra = _prompt_metadata(cfg)
    ref_tok = load_tokenizer(cfg.reference, trust_remote_code=cfg.trust_remote_code)
    ref_model = load_causal_lm(cfg.reference, device=dp.device(cfg.device),
                               trust_remote_code=cfg.trust_remote_code).eval()

    out_dir = run_dir / "eval"
    if dp.main:
        unmark(run_dir, "evaluate")
    tables = {}
    shared = cache_root() / "eval-reference" / f"{reference_key(cfg)}.parquet" if cfg.reference_cache else None
    for name, path, seed in (("reference", cfg.reference, cfg.seed), ("policy", policy, cfg.seed + 1)):
        cache = out_dir / f"samples_{name}.parquet"
        if dp.main and name == "reference" and shared is not None and shared.exists() and not cache.exists():
            write_table(read_table(shared), cache)
        dp.barrier()
        if cache.exists():
            tables[name] = pd.read_parquet(cache)
            continue
        other = None if name == "reference" else ref_model
        if cfg.shard_size is None:
            df = sample_model(path, prompts, cfg, seed, other, ref_tok)
        else:
            df = _sample_shards(path, prompts, cfg, seed, other, ref_tok, out_dir / f"shards_{name}", dp)
        df = score_table(df, cfg.scorers, batch_size=cfg.batch_size, device=dp.device(cfg.device),
                         trust_remote_code=cfg.trust_remote_code, dp=dp)
        if not dp.main:
            continue
        if cfg.judge:
            verdict = _judge(cfg.judge, df)
            df["judge_helpful"], df["judge_harmful"] = verdict["helpful"], verdict["harmful"]
        if extra is not None:
            df = df.assign(prompt_id=df["prompt_id"].astype(str)).merge(extra, on="prompt_id", how="left")
        write_table(df, cache)
        shutil.rmtree(out_dir / f"shards_{name}", ignore_errors=True)
        if name == "reference" and shared is not None:
            write_table(df, shared)
        tables[name] = df
    dp.barrier()
    if not dp.main:
        return out_dir / "report.json"

    report = build_report(tables["reference"], tables["policy"], dual, cfg)
    if cfg.group_column and cfg.group_column in tables["policy"]:
        planned = None if recalibrated.exists() else dual_group_changes(run_dir, dual, cfg.group_column)
        report.group_column = cfg.group_column
        report.by_group = group_outcomes(tables["reference"], tables["policy"], cfg.group_column,
                                         [dual.reward, *dict.fromkeys(c.column for c in dual.parsed)], planned)
    if (run_dir / "recalibrate.json").exists():
        report.recalibration = recalibration_summary(read_json(run_dir / "recalibrate.json"))
    write_report(report, out_dir / "report.json")
    failed = plot_report(tables["reference"], tables["policy"], report, out_dir)
    record_stage(run_dir, "evaluate", cfg, cfg.seed)
    for name, error in failed.items():
        print(f"evaluate: could not draw {out_dir / name} ({error}); report.json is written. Run `dualign "
              "evaluate` (or `dualign run`) again to redraw it from the cached samples.", file=sys.stderr)
    if not failed:  # left undone, a resume redraws the plots from eval/samples_*.parquet
        mark_done(run_dir, "evaluate")
    return out_dir / "report.json"


def reference_key(cfg: EvaluateConfig) -> str:
    """The cache key of π_ref's evaluation table: everything that determines its rows — the model's
    and every scorer's files, the prompts, the sampling settings and seed, the judge, the device type
    and the library versions (``dualign._infra.io.fingerprint``)."""
    parts = {"reference": fingerprint(cfg.reference), "prompts": fingerprint(cfg.prompts),
             "scorers": [[spec, fingerprint(parse_scorer(spec).target)] for spec in cfg.scorers],
             "device": resolve_device(cfg.device).type,
             "versions": versions(),
             **{k: getattr(cfg, k) for k in ("prompt_column", "split", "max_prompts", "num_samples", "max_new_tokens",
                                             "temperature", "top_p", "batch_size", "template", "judge",
                                             "group_column", "seed")},
             **({"shard_size": cfg.shard_size} if cfg.shard_size is not None else {})}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recalibration_summary(record: dict) -> dict:
    """What the report keeps of recalibrate.json: each round's λ, measured change and verdict, and
    the compute the extra fine-tunes cost."""
    rounds = [{"round": r["round"], "rule": r["rule"], "lambdas": dict(zip(record["names"], r["lambdas"], strict=True)),
               "change": r["change"], "met": r["met"], "gradient_steps": r["gradient_steps"],
               "sampled_tokens": r["sampled_tokens"], "wall_s": r["wall_s"]} for r in record["rounds"]]
    return {"extra_fine_tunes": record["extra_fine_tunes"], "met_on_calibration": record["met"],
            "rounds": rounds, "compute": record["compute"]}


def _prompt_metadata(cfg: EvaluateConfig) -> pd.DataFrame | None:
    return _prompt_groups(cfg.prompts, cfg.group_column) if cfg.group_column else None


def _prompt_groups(path: str, group_column: str, id_column: str = "prompt_id") -> pd.DataFrame:
    """``prompt_id`` (as text, from ``id_column``) and ``group_column`` of a prompt file; an
    InputError where the file or either column is missing."""
    raw = read_table(path)
    if group_column not in raw or id_column not in raw:
        raise InputError(f"{path}: group column '{group_column}' (and {id_column}) not found")
    meta = raw[[id_column, group_column]].rename(columns={id_column: "prompt_id"})
    meta["prompt_id"] = meta["prompt_id"].astype(str)
    return meta


def dual_group_changes(run_dir: Path, dual: DualRecord, group_column: str,
                       extra: Callable[[pd.DataFrame], dict[str, np.ndarray]] | None = None) -> dict | None:
    """The plan's and the trained target's change of the reward and constraint columns within each
    group of the dual's prompts (:func:`dualign.dual.formulas.group_changes` at λ*), and each
    group's share of those prompts (π_ref's samples weighted by ``sample_weight`` where the table
    has it, as in the dual): ``{"planned": {group: {column: change}}, "target": ...,
    "share": {group: share}}``. The groups are the ``group_column`` of the sample stage's prompt
    file (``sample.config.yaml``); on the reachable tilt the plan's scores are the fit refitted from
    ``reachable_features.safetensors`` with dual.json's α and fold seed, so the groups' planned
    changes weighted by their shares sum to the report's ``planned_change``. ``extra`` (scores
    table → {name: a value per row}, e.g. a judge's verdicts) adds columns tilted alike. None where
    the run lacks any of these files or the prompt file the column."""
    sample_cfg, scores_path = run_dir / "sample.config.yaml", run_dir / "scores.parquet"
    if not (sample_cfg.exists() and scores_path.exists()):
        return None
    cfg = load_yaml(sample_cfg)
    try:
        meta = _prompt_groups(cfg["prompts"], group_column, cfg.get("id_column") or "prompt_id")
    except (KeyError, TypeError, ValueError, OSError, DualignError):
        return None
    label = meta.set_index("prompt_id")[group_column]
    scores = read_table(scores_path)
    pids = scores["prompt_id"].astype(str).to_numpy()
    groups = label.reindex(pids).to_numpy()
    if pd.isna(groups).any():
        return None
    fitted = None
    if dual.reachable is not None:
        try:
            planned = planning_scores(run_dir, scores, dual)
        except InputError:  # π_ref's features are gone
            return None
        fitted = {c: planned[c].to_numpy(np.float64) for c in dict.fromkeys([dual.reward, *dual.columns.values()])}
    return plan_group_changes(scores, groups, dual, fitted, extra(scores) if extra else None)


def plan_group_changes(scores: pd.DataFrame, groups, dual: DualRecord, fitted: dict[str, np.ndarray] | None = None,
                       extra: dict[str, np.ndarray] | None = None) -> dict:
    """The plan's change of the reward and constraint columns (and ``extra``'s, values per row)
    within each group of the scores table's prompts at dual's λ (``groups``: a label per row), the
    trained target's where ``fitted`` (the scores the plan was solved on, per column) differs from
    the table's, and each group's share of the prompts: ``{"planned": {group: {column: change}},
    "target": ... or None, "share": {group: share}}`` (:func:`dualign.dual.formulas.group_changes`;
    π_ref's samples weighted by ``sample_weight`` where the table has it, as in the dual)."""
    columns = list(dict.fromkeys([dual.reward] + [c.column for c in dual.parsed]))
    missing = [c for c in columns if c not in scores]
    if missing:
        raise InputError(f"plan scores: missing score column(s) {', '.join(missing)}")
    pids = scores["prompt_id"].astype(str).to_numpy()
    groups = np.asarray(groups, dtype=object)
    original = {c: scores[c].to_numpy(np.float64) for c in columns}
    lambdas = np.array([dual.lambdas[n] for n in dual.names])
    weights = scores[WEIGHT_COLUMN].to_numpy(np.float64) if WEIGHT_COLUMN in scores else None
    more = {k: np.asarray(v, dtype=np.float64) for k, v in (extra or {}).items()}
    names = columns + list(more)

    def changes(cols: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        g = np.stack([c.sign * cols[c.column] for c in dual.parsed], axis=1)
        by_group = group_changes(pids, tilt_logits(cols[dual.reward], g, lambdas, dual.beta),
                                 np.stack([cols[c] for c in columns] + list(more.values()), 1), groups, weights)
        return {k: dict(zip(names, map(float, v), strict=True)) for k, v in by_group.items()}

    share = pd.Series(groups, index=pids).groupby(level=0).first().astype(str).value_counts(normalize=True)
    return {"planned": changes(fitted or original), "target": changes(original) if fitted else None,
            "share": {str(k): float(v) for k, v in share.items()}}


def group_outcomes(ref: pd.DataFrame, pol: pd.DataFrame, group_column: str, columns: list[str],
                   planned: dict | None = None) -> dict[str, GroupOutcome]:
    """Each group's held-out prompts, and each column's achieved change within it: the mean over
    the group's prompts of the policy's mean less π_ref's, with mean ± 1.96·s.d./√n of those
    per-prompt differences; beside it the plan's (and target's) change from
    :func:`dual_group_changes` where given. The judge's columns join the score columns."""
    columns = [c for c in [*columns, "judge_helpful", "judge_harmful"] if c in pol and c in ref]
    diff = (pol.groupby("prompt_id")[columns].mean() - ref.groupby("prompt_id")[columns].mean()).dropna()
    label = pol.groupby("prompt_id")[group_column].first().reindex(diff.index).astype(str)
    planned = planned or {}
    out = {}
    for g in sorted(label.unique()):
        part = diff[label == g]
        n = len(part)
        plan, target = planned.get("planned", {}).get(g, {}), (planned.get("target") or {}).get(g, {})
        changes = {}
        for c in columns:
            mean = float(part[c].mean())
            half = 1.959964 * float(part[c].std(ddof=1)) / math.sqrt(n) if n > 1 else None
            changes[c] = GroupChange(mean, None if half is None else [mean - half, mean + half],
                                     plan.get(c), target.get(c))
        out[g] = GroupOutcome(n, planned.get("share", {}).get(g), changes)
    return out


def _inside(value: float, ci: list[float] | None) -> bool | None:
    return None if ci is None or any(v is None or v != v for v in ci) else bool(ci[0] <= value <= ci[1])


def build_report(ref: pd.DataFrame, pol: pd.DataFrame, dual: DualRecord, cfg: EvaluateConfig) -> EvalReport:
    """Before/after means with CIs, win rates, achieved vs predicted (per constraint, by name), KL.

    Changes against π_ref are paired by prompt (the same held-out prompts, one bootstrap draw of
    prompts for both sides), so a relative threshold's reference level is re-estimated on every
    resample; an absolute threshold is judged on the policy's own mean. Every ``predicted`` is
    :func:`trained_target`'s (on the reachable tilt the plan's means and the trained target's KL;
    both distributions kept as ``planned_*`` and ``target_*``), and is compared with the achieved
    change through the achieved change's own 95% CI (``prediction_in_achieved_ci``).
    """
    reward = dual.reward
    columns = list(dict.fromkeys([reward] + [c.column for c in dual.parsed]))
    columns += [name for name in (spec.split("=", 1)[0].strip() for spec in cfg.scorers)
                if name not in columns and name in pol]
    ref_sum = {c: _estimate(ref, c, cfg) for c in columns}
    pol_sum = {c: _estimate(pol, c, cfg) for c in columns}
    paired = Paired.of(ref, pol, columns, cfg.bootstrap, cfg.seed)
    kl_mean, kl_lo, kl_hi = cluster_bootstrap_ci((pol["logprob"] - pol["ref_logprob"]).to_numpy(),
                                                 pol["prompt_id"].to_numpy(), cfg.bootstrap, cfg.seed)
    target = trained_target(dual)
    planned = target.planned or {}
    planned_ci = target.planned_ci or {}
    trained, trained_ci = target.target or {}, target.target_ci or {}
    # a change fixed by construction (a binding relative constraint) is the plan's, which is what
    # a mean's prediction is on either tilt
    fixed = set(dual.ci.fixed) if dual.ci is not None else set()
    key = ["prompt_id", "sample_index"]
    matched = ref[key + [reward]].merge(pol[key + [reward]], on=key, suffixes=("_ref", "_pol"))
    rows = []
    for name, c in zip(dual.names, dual.parsed, strict=True):
        achieved, (lo, hi) = pol_sum[c.column].mean, pol_sum[c.column].ci95
        ref_eval = ref_sum[c.column].mean
        predicted, ref_dual = target.values[name], dual.reference[name]
        change, change_draws = paired.change(c.column)
        achieved_ci = percentile_ci(change_draws, point=change)
        if c.relative:  # judged on the change against π_ref on the same prompts
            verdict = verdicts(change, change_draws, c.value, c.op)
        else:
            verdict = verdicts(*paired.level(c.column), c.value, c.op)
        rows.append(ConstraintOutcome(
            name=name, constraint=c.text, column=c.column, threshold=c.threshold(ref_eval),
            threshold_dual=dual.thresholds[name], reference_eval=ref_eval, achieved=achieved, ci95=[lo, hi],
            predicted=predicted, reference_dual=ref_dual, predicted_eval=ref_eval + predicted - ref_dual,
            predicted_change=predicted - ref_dual, achieved_change=change,
            achieved_change_ci95=achieved_ci,
            prediction_error_frac=prediction_error(change, predicted - ref_dual),
            predicted_change_ci95=containing(target.change_ci.get(name), predicted - ref_dual),
            predicted_change_fixed=name in fixed, **verdict,
            prediction_in_achieved_ci=_inside(predicted - ref_dual, achieved_ci),
            planned_change=planned.get(name), planned_change_ci95=planned_ci.get(name) if planned else None,
            target_change=trained.get(name), target_change_ci95=trained_ci.get(name) if trained else None))
    pred_r, ref_r = target.values[reward], dual.reference[reward]
    r_change, r_draws = paired.change(reward)
    r_ci = percentile_ci(r_draws, point=r_change)
    kl_pred = target.values.get("kl")
    report = EvalReport(
        n_prompts=int(pol["prompt_id"].nunique()), n_responses={"policy": len(pol), "reference": len(ref)},
        beta=dual.beta, lambdas=dual.lambdas, reference=ref_sum, policy=pol_sum,
        kl=KLOutcome(kl_mean, [kl_lo, kl_hi], kl_pred, containing(target.change_ci.get("kl"), kl_pred),
                     None if kl_pred is None else _inside(kl_pred, [kl_lo, kl_hi]),
                     planned.get("kl"), planned_ci.get("kl") if planned else None,
                     dual.kl_extrapolated.samples if dual.kl_extrapolated else None),
        win_rate={reward: win_rate(matched[f"{reward}_pol"], matched[f"{reward}_ref"])},
        constraints=rows,
        predicted_reward=RewardPrediction(
            pred_r, ref_r, ref_sum[reward].mean + pred_r - ref_r, pred_r - ref_r,
            containing(target.change_ci.get(reward), pred_r - ref_r),
            r_change, r_ci, _inside(pred_r - ref_r, r_ci), planned.get(reward),
            planned_ci.get(reward) if planned else None, trained.get(reward),
            trained_ci.get(reward) if trained else None),
        reward=reward, tilt="reachable" if dual.reachable is not None else "samples",
        prediction="delivered" if target.planned is not None else "plan", delivery=dual.delivery,
        pilot=dual.pilot)
    if "judge_harmful" in pol:
        report.judge = {"reference": _judge_summary(ref, cfg), "policy": _judge_summary(pol, cfg)}
        report.win_rate["judge_helpful"] = win_rate(
            *ref[key + ["judge_helpful"]].merge(pol[key + ["judge_helpful"]], on=key, suffixes=("_ref", "_pol"))
            [["judge_helpful_pol", "judge_helpful_ref"]].to_numpy().T)
    return report


# ---------------------------------------------------------------------------------- in memory

def evaluate_policy(policy: Any, reference: Any, prompts: Any, scorers: Mapping[str, Any] | Sequence[str],
                    plan: DualRecord, *, tokenizer: Any = None,
                    num_samples: int = 1, max_new_tokens: int = 64, batch_size: int = 32, template: str = "auto",
                    bootstrap: int = 1000, seed: int = 0, device: str = "auto", group_column: str | None = None,
                    plan_scores: Any = None) -> EvalReport:
    """The policy against π_ref on held-out prompts, with objects in: the :class:`EvalReport` that
    ``dualign evaluate`` writes to eval/report.json, sampled and reported by the same functions.

    ``policy`` and ``reference``: ``PreTrainedModel`` objects or HF ids / paths; ``tokenizer``
    (default: each model's own); ``prompts``: a list of strings, a DataFrame or ``datasets.Dataset``
    with a ``prompt`` column (and optionally ``prompt_id``), or a prompt file; ``scorers``: a mapping
    from score column to a callable ``(prompts, responses) -> scores``, a one-label sequence
    classifier (``PreTrainedModel``) or a scorer spec ``KIND:PATH`` (as after ``NAME=`` in
    ``dualign score``), or a list of full specs ``NAME=KIND:PATH``; they must give the plan's reward
    and constraint columns. ``plan``: the :func:`dualign.make_plan` result the policy was trained
    on. The keyword arguments are :class:`EvaluateConfig`'s fields; a bad one is a ConfigError
    naming it. With ``group_column`` (a column of ``prompts``) the report has ``by_group``: each
    group's achieved changes, and with ``plan_scores`` (the scores table the plan was made from,
    holding the same column) the plan's change within each group beside them. Nothing is written.
    """
    if not isinstance(plan, DualRecord):
        raise InputError(f"plan: expected the Plan of dualign.make_plan or Plan.load, got {type(plan).__name__}")
    named = _scorer_objects(scorers)
    specs = [f"{name}={s}" for name, s in named.items() if isinstance(s, str)]
    cfg = build_config(EvaluateConfig, {
        "run_dir": "", "reference": "", "prompts": "", "scorers": specs, "num_samples": num_samples,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size, "template": template,
        "bootstrap": bootstrap, "seed": seed, "device": device, "group_column": group_column})
    missing = [c for c in dict.fromkeys([plan.reward, *(c.column for c in plan.parsed)]) if c not in named]
    if missing:
        raise InputError(f"scorers: the plan needs the score column(s) {', '.join(missing)}; scorers give "
                         f"{', '.join(named) or 'none'}")
    table = pd.DataFrame({"prompt": prompts}) if isinstance(prompts, list) else \
        prompts if isinstance(prompts, str | Path) else as_frame(prompts, "prompts")
    prompt_table = load_prompts(table)
    planned, labels = None, None
    if group_column:
        raw = read_table(table) if isinstance(table, str | Path) else table
        if group_column not in raw:
            raise InputError(f"prompts: no group column {group_column!r} (columns: {', '.join(map(str, raw.columns))})")
        labels = dict(zip(prompt_table["prompt_id"], raw[group_column].to_numpy()[:len(prompt_table)], strict=True))
        if plan_scores is not None:
            scores = as_frame(plan_scores, "plan_scores")
            if group_column not in scores:
                raise InputError(f"plan_scores: no group column {group_column!r}")
            planned = plan_group_changes(scores, scores[group_column].to_numpy(), plan)
    ref_model, ref_tok = _model_object(reference, tokenizer, cfg, "reference")
    pol_model, pol_tok = _model_object(policy, tokenizer, cfg, "policy")
    tables = {}
    for name, model, tok, seed_, other in (("reference", ref_model, ref_tok, cfg.seed, None),
                                           ("policy", pol_model, pol_tok, cfg.seed + 1, ref_model)):
        df = _generate(model, tok, prompt_table, cfg, seed_, other, ref_tok)
        tables[name] = _score_objects(df, named, cfg)
    report = build_report(tables["reference"], tables["policy"], plan, cfg)
    if labels is not None:
        for df in tables.values():
            df[group_column] = df["prompt_id"].map(labels)
        report.group_column = group_column
        report.by_group = group_outcomes(tables["reference"], tables["policy"], group_column,
                                         [plan.reward, *dict.fromkeys(c.column for c in plan.parsed)], planned)
    return report


def _scorer_objects(scorers: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """``scorers`` as {column: callable | model | "KIND:PATH"}."""
    if isinstance(scorers, list | tuple):
        out = {}
        for spec in scorers:
            if not isinstance(spec, str):
                raise InputError(f"scorers: a list holds specs NAME=KIND:PATH, got {type(spec).__name__}")
            parsed = parse_scorer(spec)
            out[parsed.name] = spec.split("=", 1)[1].strip()
        return out
    if not isinstance(scorers, Mapping) or not scorers:
        raise InputError(f"scorers: expected a mapping from score column to a scorer, got {type(scorers).__name__}")
    for name, scorer in scorers.items():
        if not (isinstance(scorer, str) or callable(scorer)):
            raise InputError(f"scorers[{name!r}]: expected a callable, a sequence classifier or a spec KIND:PATH, "
                             f"got {type(scorer).__name__}")
    return dict(scorers)


def _model_object(model: Any, tokenizer: Any, cfg: EvaluateConfig, name: str) -> tuple[Any, Any]:
    """(model in eval mode, its tokenizer) of a ``PreTrainedModel`` or an id / path."""
    if isinstance(model, str | Path):
        tok = tokenizer or load_tokenizer(str(model), trust_remote_code=cfg.trust_remote_code)
        return load_causal_lm(str(model), device=cfg.device, trust_remote_code=cfg.trust_remote_code).eval(), tok
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{name}: expected a PreTrainedModel or a model id / path, got {type(model).__name__}")
    return model.eval(), tokenizer or load_tokenizer(model.config._name_or_path)


def _score_objects(df: pd.DataFrame, scorers: dict[str, Any], cfg: EvaluateConfig) -> pd.DataFrame:
    """``df`` plus one column per scorer: spec strings through :func:`score_table`, as the stage
    scores; callables and classifier models called on the prompts and responses."""
    from dualign.modeling.scorers import HFClassifierScorer, score_column

    specs = [f"{name}={s}" for name, s in scorers.items() if isinstance(s, str)]
    out = score_table(df, specs, batch_size=cfg.batch_size, device=cfg.device, progress=False) if specs else df.copy()
    for name, scorer in scorers.items():
        if isinstance(scorer, str):
            continue
        if isinstance(scorer, torch.nn.Module):
            scorer = HFClassifierScorer.from_model(scorer, load_tokenizer(scorer.config._name_or_path))
        out[name] = score_column(scorer, name, out["prompt"].tolist(), out["response"].tolist(), cfg.batch_size,
                                 progress=False)
    return out

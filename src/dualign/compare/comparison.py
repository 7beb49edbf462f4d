"""``dualign compare CONFIG.yaml``: MoCAN and the baselines on the same data, several seeds, one table.

The config is a ``dualign run`` config (``run_dir``, ``model``, ``world``, ``sample``, ``score``,
``dual``, ``train``, ``evaluate``) plus a ``compare`` section (:class:`CompareConfig`). The sample,
score and dual stages run once into ``<run_dir>/shared`` (and, for the preference baselines, log
π_ref of the preference pairs, ``shared/preferences.parquet``); every method then trains from
π_ref into ``<run_dir>/runs/<label>/seed<s>`` and is evaluated by the ``evaluate`` stage with seed
s, on the same held-out prompts, with π_ref's evaluation samples drawn once per seed. The
evaluation's size (so its CI width) is the ``evaluate`` section's ``max_prompts`` × ``num_samples``.
``mocan-recalibrated`` runs MoCAN's one-shot fine-tune and then the recalibrate stage (the run
config's ``recalibrate`` section) on it, a second point beside MoCAN on the compute axis.
``mocan-reachable`` is MoCAN's one fine-tune at the λ* of the reachable tilt
(:mod:`dualign.dual.reachable`), solved once on the shared samples into ``shared/dual_reachable.json``.
An iterative method with ``checkpoints`` in its section is also evaluated at each of those budgets
(``runs/<label>/seed<s>/budgets/<n>``). ``sweep`` runs extra settings of a method on
``sweep_seeds`` (labels ``method[key=value,...]``). Whatever has its ``eval/report.json`` is
skipped, so an interrupted comparison resumes.

Outputs in ``<run_dir>``: ``compare.csv`` (one row per label: means and standard deviations over
seeds), ``compare_runs.csv`` (one row per label and seed), ``compare_budgets.csv`` (one row per
label, budget and seed), ``projection_7b.csv`` (:func:`~dualign.compare.tables.projection_table`), ``compare.json`` (all of
them, the shared stages' cost, the first budget meeting the constraints) and ``plots/``
(:mod:`dualign.compare.plots`).

The tables (verdicts ``met``, ``met_confidently``, ``not_rejected``; compute charged with the
shared stages) are :mod:`dualign.compare.tables`'s, the plots :mod:`dualign.compare.plots`'.

Compute accounting: the methods that learn from π_ref's samples are charged the shared sample and
score stages (and MoCAN the dual stage), the preference baselines the shared log π_ref of the
pairs: their ``wall_s``, ``sampled_tokens``, ``tokens_*`` and ``flops*`` include them;
``train_wall_s`` is the training alone. FLOPs: :mod:`dualign.modeling.flops`.

This module is the orchestration of every method over seeds, budgets and the shared stages; the
tables and plots are :mod:`dualign.compare.tables` and :mod:`dualign.compare.plots`.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dualign._infra.config import build_config, merge
from dualign._infra.errors import ConfigError, InputError
from dualign._infra.io import read_json, read_table, write_json, write_table
from dualign.baselines.dispatch import RENAMED, measure, run_method
from dualign.baselines.dual_ascent import DualAscentConfig
from dualign.baselines.fixed_lambda import FixedLambdaConfig
from dualign.baselines.grpo_lagrangian import GRPOLagrangianConfig
from dualign.baselines.ppo_lagrangian import PPOLagrangianConfig
from dualign.baselines.preference_dpo import PreferenceDPOConfig
from dualign.baselines.safe_rlhf_ppo import SafeRLHFPPOConfig
from dualign.compare.plots import plot_compare
from dualign.compare.tables import (
    ITERATIVE,
    first_met,
    format_table,
    projection_table,
    records,
    summarise,
    table_row,
)
from dualign.data.preferences import read_preferences
from dualign.data.records import EvalReport, read_dual, read_report, to_json, write_dual
from dualign.dual import run_dual
from dualign.dual.reachable import FEATURES
from dualign.dual.stage import DualConfig, solve_config
from dualign.evaluate import evaluate
from dualign.methods.objective import link_sample_config, sequence_tokens
from dualign.modeling.flops import (
    add_counts,
    model_forward_params,
    scorer_forward_params,
    stage_flops,
)
from dualign.modeling.models import load_tokenizer
from dualign.pipeline import (
    covering_evaluation,
    features_from_samples,
    load_run_values,
    resolve_run_config,
    stage_config_changed,
)
from dualign.recalibrate import recalibrate
from dualign.sample import sample
from dualign.score import score
from dualign.train import reference_logprobs
from dualign.world import build_world, world_config

METHODS = ("mocan", "mocan-recalibrated", "mocan-reachable", "fixed-lambda", "reward-only-mocan", "cost-only-mocan", "dpo-helpful",
           "dpo-safe", "safedpo", "dual-ascent", "ppo-lagrangian", "ppo-lagrangian-critic", "grpo-lagrangian")
ONLINE = ("ppo-lagrangian", "ppo-lagrangian-critic", "grpo-lagrangian")
PREFERENCE = ("dpo-helpful", "dpo-safe", "safedpo")
SECTIONS = {"dual-ascent": "dual_ascent", "ppo-lagrangian": "ppo_lagrangian",
            "ppo-lagrangian-critic": "ppo_lagrangian_critic", "grpo-lagrangian": "grpo_lagrangian",
            **{m: "preference_dpo" for m in PREFERENCE}}
SHARED_STAGES = (("sample", "samples.parquet"), ("score", "scores.parquet"), ("dual", "dual.json"))
REACHABLE_DUAL = "dual_reachable.json"


@dataclass
class CompareConfig:
    methods: list[str] = field(default_factory=lambda: [m for m in METHODS if m != "mocan-recalibrated"], metadata={
        "help": f"methods to run: {', '.join(METHODS)}"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "training/evaluation seeds"})
    fixed_lambdas: list[float] = field(default_factory=lambda: [0.5, 2.0], metadata={
        "help": "fixed-lambda: one run per value (the same λ for every constraint)"})
    dual_ascent: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "DualAscentConfig keys on top of the train section (rounds, lambda_lr, checkpoints, ...)"})
    ppo_lagrangian: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "PPOLagrangianConfig keys (iterations, num_samples, lambda_lr, checkpoints, ...)"})
    ppo_lagrangian_critic: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "SafeRLHFPPOConfig keys of Safe-RLHF's critic-ful PPO-Lagrangian (iterations, critic_learning_rate, "
                "gae_lambda, lambda_lr, checkpoints, ...)"})
    grpo_lagrangian: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "GRPOLagrangianConfig keys (iterations, num_samples, lambda_lr, lambda_max, checkpoints, ...)"})
    preference_dpo: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "PreferenceDPOConfig keys of dpo-helpful, dpo-safe and safedpo (beta, learning_rate, num_epochs, "
                "safety_margin, ...): their own training settings, not the train section's"})
    preferences: str | None = field(default=None, metadata={
        "help": "PKU-style preference file of dpo-helpful, dpo-safe, safedpo (world:NAME allowed; default: the "
                "prealign section's)"})
    sweep: dict[str, list[dict[str, Any]]] = field(default_factory=dict, metadata={
        "help": "extra settings per method, run on sweep_seeds: {method: [{key: value, ...}, ...]} on top of the "
                "method's section (e.g. lambda_lr and beta, the KL coefficient)"})
    sweep_seeds: list[int] | None = field(default=None, metadata={"help": "seeds of the sweep (default: the first)"})
    projection_params: float = field(default=7e9, metadata={
        "help": "parameters of the policy, reward and cost models of the FLOPs projection"})

    def __post_init__(self) -> None:
        for method in [*self.methods, *self.sweep]:
            if method in RENAMED:
                raise ValueError(f"method {method!r} was renamed {RENAMED[method]!r}")
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r} (methods: {', '.join(METHODS)})")
        unswept = [m for m in self.sweep if m not in SECTIONS]
        if unswept:
            raise ValueError(f"sweep: {unswept[0]!r} has no settings section to sweep ({', '.join(SECTIONS)})")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not self.methods and not any(self.sweep.values()):
            raise ValueError("methods and sweep are both empty: nothing to compare")


@dataclass
class Run:
    """One line of the table: a label, its method and what it adds to the method's section."""
    label: str
    method: str
    seeds: list[int]
    lam: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def load_compare_config(path: str | Path, overrides: dict[str, Any] | None = None):
    """(RunConfig, CompareConfig) from a YAML file and overrides (e.g. ``{"run_dir": ...}``)."""
    values = merge(load_run_values(path), overrides or {})
    compare = build_config(CompareConfig, values.pop("compare", None) or {}, prefix="compare.")
    _check_sections(compare)
    run = resolve_run_config(values)
    if "mocan-recalibrated" in compare.methods and getattr(run, "recalibrate", None) is None:
        raise ConfigError("compare method 'mocan-recalibrated' needs a 'recalibrate' section (the recalibrate "
                          "stage) in the run config")
    if any(m in PREFERENCE for m in compare.methods + list(compare.sweep)):
        compare.preferences = _preference_source(run, compare.preferences)
    return run, compare


def _check_sections(cmp: CompareConfig) -> None:
    """Every method section and sweep setting builds its config, so a misspelled key fails before any work."""
    classes = {"dual_ascent": DualAscentConfig, "ppo_lagrangian": PPOLagrangianConfig,
               "ppo_lagrangian_critic": SafeRLHFPPOConfig, "grpo_lagrangian": GRPOLagrangianConfig,
               "preference_dpo": PreferenceDPOConfig}
    for section, cls in classes.items():
        build_config(cls, {"model": "-", "run_dir": "-", **getattr(cmp, section)}, prefix=f"compare.{section}.")
    for method, settings in cmp.sweep.items():
        section = SECTIONS[method]
        for extra in settings:
            build_config(classes[section], {"model": "-", "run_dir": "-", **getattr(cmp, section), **extra},
                         prefix=f"compare.sweep.{method}.")


def _preference_source(run, given: str | None) -> str:
    """The preference file: ``compare.preferences`` (``world:NAME`` inside the built world), else prealign's."""
    source = given or (run.prealign.preferences if run.prealign is not None else None)
    if source is None:
        raise ConfigError("missing required config value(s): compare.preferences (a PKU-style preference file "
                          "for dpo-helpful, dpo-safe, safedpo)")
    if source.startswith("world:"):
        if run.world is None:
            raise ConfigError(f"compare.preferences: {source!r} needs a world section")
        world = dict(run.world)
        source = str(Path(build_world(world_config(world.pop("size", "default"), world))) / source[len("world:"):])
    return source


def _runs(cmp: CompareConfig) -> list[Run]:
    """Every line of the table, sweep entries last."""
    out = []
    for method in cmp.methods:
        if method == "fixed-lambda":
            out += [Run(f"fixed-lambda-{lam:g}", method, cmp.seeds, lam) for lam in cmp.fixed_lambdas]
        else:
            out.append(Run(method, method, cmp.seeds))
    for method, settings in cmp.sweep.items():
        for extra in settings:
            label = f"{method}[{','.join(f'{k}={v}' for k, v in extra.items())}]"
            out.append(Run(label, method, cmp.sweep_seeds or cmp.seeds[:1], overrides=dict(extra)))
    return out


def _run_stage(fn, cfg, run_dir: Path) -> None:
    """A pipeline stage into ``run_dir``, whether it takes the directory in its config or as an argument."""
    if any(f.name == "run_dir" for f in dataclasses.fields(cfg)):
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    if "run_dir" in inspect.signature(fn).parameters:
        fn(cfg, run_dir)
    else:
        fn(cfg)


def run_shared(run, shared: Path, log=print, cmp: CompareConfig | None = None) -> dict[str, Any]:
    """Sample, score and solve the dual once (skipping finished stages; a confidence plan covers the
    run's evaluation, as in a run), and log π_ref of the preference pairs when a preference baseline
    runs; their cost in ``compute.json``."""
    funcs = {"sample": sample, "score": score, "dual": run_dual}
    shared.mkdir(parents=True, exist_ok=True)
    cost_path = shared / "compute.json"
    cost = read_json(cost_path) if cost_path.exists() else {}
    ran = False
    dual = None if run is None else covering_evaluation(run.dual, run.evaluate)  # the dual section as a run runs it
    for stage, output in SHARED_STAGES:
        cfg = dual if stage == "dual" else getattr(run, stage, None)
        changed = stage_config_changed(shared, stage, cfg) if cfg is not None else None
        if changed:  # as a run refuses: a shared stage made with other settings is not this comparison's
            raise InputError(f"{shared}: shared stage '{stage}' was run with a different config ({changed}); "
                             "use another --run-dir")
        if (shared / output).exists():
            log(f"shared {stage}: done, skipped")
            meta = shared / f"{stage}.meta.json"
            if stage not in cost and meta.exists():  # made outside compare: the stage's own record of its time
                timing = read_json(meta).get("timing_s") or {}
                if "total" in timing:
                    cost[stage] = {"wall_s": float(timing["total"]), "from": f"{stage}.meta.json"}
            continue
        log(f"shared {stage} ...")
        with measure() as used:
            _run_stage(funcs[stage], cfg, shared)
        cost[stage], ran = used, True
        write_json(cost, cost_path)
    if ran or "flops" not in cost:  # counted once: it loads the tokenizer and the models' configs
        samples = read_table(shared / "scores.parquet")
        cost["sampled_tokens"] = int(samples["response_tokens"].sum()) if "response_tokens" in samples else 0
        cost["tokens"], cost["flops"] = _shared_counts(run, samples)
    if cmp is not None and any(r.method == "mocan-reachable" for r in _runs(cmp)):
        if (shared / REACHABLE_DUAL).exists() and "dual_reachable" in cost:
            log("shared dual on the reachable tilt: done, skipped")
        else:
            log("shared dual on the reachable tilt ...")
            with measure() as used:
                tokens = _reachable_dual(run, dual, shared)
            cost["dual_reachable"] = {**used, "tokens": {"reference": tokens}}
            cost["tokens"]["dual_reachable"] = cost["dual_reachable"]["tokens"]
            cost["flops"]["dual_reachable"] = stage_flops(cost["dual_reachable"]["tokens"],
                                                          model_forward_params(run.sample.model) or 0, [])
    if cmp is not None and any(r.method in PREFERENCE for r in _runs(cmp)):
        if (shared / "preferences.parquet").exists() and "preferences" in cost:
            log("shared log π_ref of the preference pairs: done, skipped")
        else:
            log("shared log π_ref of the preference pairs ...")
            with measure() as used:
                tokens = _preference_reference(run, cmp, shared / "preferences.parquet")
            cost["preferences"] = {**used, "tokens": {"reference": tokens}}
            cost["tokens"]["preferences"] = cost["preferences"]["tokens"]
            cost["flops"]["preferences"] = stage_flops(cost["preferences"]["tokens"],
                                                       model_forward_params(run.train.model) or 0, [])
    write_json(cost, cost_path)
    return cost


def _shared_counts(run, samples: pd.DataFrame) -> tuple[dict, dict]:
    """Tokens and FLOPs of the shared sample and score stages (the dual's arithmetic: ≈ 0). The
    sampler's log-prob pass is π_ref's log-probs of the samples, the pair methods' reference."""
    if "response_tokens" not in samples:
        return {}, {}
    n = sequence_tokens(samples, load_tokenizer(run.sample.model, revision=run.sample.revision), run.sample.template)
    tokens = {"sample": {"generation": n, "reference": n}, "score": {"scored": n}, "dual": {}}
    n_policy = model_forward_params(run.sample.model) or 0
    n_scorers = [scorer_forward_params(s) for s in run.score.scorers]
    return tokens, {stage: stage_flops(t, n_policy, n_scorers) for stage, t in tokens.items()}


def _reachable_dual(run, dual: DualConfig, shared: Path) -> int:
    """The run's dual section as a run runs it (``dual``: a confidence margin covering the run's
    evaluation) on the reachable tilt, π_ref's features from the model and template the shared
    samples were drawn with, solved on the shared scores into ``shared/dual_reachable.json``;
    returns the tokens run through π_ref for the features."""
    cfg = features_from_samples(dataclasses.replace(dual, tilt="reachable", scores=str(shared / "scores.parquet")),
                                run.sample)
    write_dual(solve_config(cfg, shared / FEATURES), shared / REACHABLE_DUAL)
    return sequence_tokens(read_table(shared / "scores.parquet"), load_tokenizer(cfg.model, revision=cfg.revision),
                           cfg.template)


def _preference_reference(run, cmp: CompareConfig, out: Path) -> int:
    """The preference table with ``ref_logprob_0/_1`` (as the preference baselines' training takes
    them), written to ``out``; returns the tokens run through π_ref."""
    cfg = _preference_config(run, cmp, "dpo-helpful", out.parent, out.parent, 0, {})
    table = read_preferences(cmp.preferences)
    pairs = pd.DataFrame({"prompt_id": np.arange(len(table)), "prompt": table["prompt"].to_numpy(),
                          "response_a": table["response_0"].to_numpy(), "response_b": table["response_1"].to_numpy(),
                          "target_margin": np.inf})
    ref_0, ref_1, tokens = reference_logprobs(cfg.train, pairs)
    write_table(table.assign(ref_logprob_0=ref_0, ref_logprob_1=ref_1), out)
    return tokens


def _preference_config(run, cmp: CompareConfig, method: str, sub: Path, shared: Path, seed: int,
                       overrides: dict) -> PreferenceDPOConfig:
    """dpo-helpful / dpo-safe / safedpo: the model's settings of the train section, their own section."""
    base = {k: getattr(run.train, k) for k in ("model", "template", "revision", "device", "max_length")}
    prefs = shared / "preferences.parquet"
    base.update({"run_dir": str(sub), "scores": str(shared / "scores.parquet"), "dual": str(shared / "dual.json"),
                 "seed": seed, "method": method, "preferences": str(prefs) if prefs.exists() else cmp.preferences,
                 "ref_logprobs": "reuse" if prefs.exists() else "compute"})
    return build_config(PreferenceDPOConfig, {**base, **cmp.preference_dpo, **overrides},
                        prefix="compare.preference_dpo.")


def method_config(run, cmp: CompareConfig, r: Run, sub: Path, shared: Path, seed: int):
    """The training config of one method run: its section (and sweep settings) on its base."""
    common = {"run_dir": str(sub), "scores": str(shared / "scores.parquet"), "seed": seed, "output_dir": None}
    if r.method in ONLINE:
        cls = {"ppo-lagrangian": PPOLagrangianConfig, "ppo-lagrangian-critic": SafeRLHFPPOConfig,
               "grpo-lagrangian": GRPOLagrangianConfig}[r.method]
        base = {"model": run.train.model, "template": run.train.template, "revision": run.train.revision,
                "device": run.train.device, "beta": run.train.beta, "dual": str(shared / "dual.json"), **common}
        section = getattr(cmp, SECTIONS[r.method])
        return build_config(cls, {**base, **section, **r.overrides}, prefix=f"compare.{SECTIONS[r.method]}.")
    if r.method in PREFERENCE:
        return _preference_config(run, cmp, r.method, sub, shared, seed, r.overrides)
    if r.method in ("mocan", "mocan-reachable"):
        shutil.copyfile(shared / ("dual.json" if r.method == "mocan" else REACHABLE_DUAL), sub / "dual.json")
        link_sample_config(shared / "scores.parquet", sub)
        return dataclasses.replace(run.train, **common, dual=str(sub / "dual.json"))
    train = {**dataclasses.asdict(run.train), **common, "dual": str(shared / "dual.json")}
    if r.method == "dual-ascent":
        return build_config(DualAscentConfig, {**train, "method": r.method, **cmp.dual_ascent, **r.overrides},
                            prefix="compare.dual_ascent.")
    return build_config(FixedLambdaConfig, {**train, "method": r.method,
                                            "lambdas": [r.lam] if r.lam is not None else None})


def _run_recalibrated(run, cmp: CompareConfig, sub: Path, shared: Path, seed: int) -> None:
    """MoCAN with recalibration: MoCAN's one-shot fine-tune (as the ``mocan`` method), then the
    recalibrate stage with the run config's section on it, in ``sub``. compute.json: the one-shot's
    cost plus the stage's (its wall-clock, gradient steps and sampled tokens; tokens: each round's
    calibration samples of the policy and π_ref's once, sampled, self-scored and scored, and each
    extra fine-tune the one-shot's training tokens, scaled by its epochs: the same pairs on the
    same schedule)."""
    oneshot_path = sub / "oneshot.compute.json"
    train_cfg = method_config(run, cmp, Run("mocan", "mocan", [seed]), sub, shared, seed)
    if not oneshot_path.exists():
        run_method(train_cfg)
        (sub / "compute.json").rename(oneshot_path)
    shutil.copyfile(shared / "scores.parquet", sub / "scores.parquet")  # the stage reads <run_dir>/scores.parquet
    oneshot = read_json(oneshot_path)
    rcfg = dataclasses.replace(run.recalibrate, run_dir=str(sub), seed=seed)
    with measure() as used:
        out = recalibrate(rcfg, train_cfg)
    tok = load_tokenizer(train_cfg.model, revision=train_cfg.revision)
    calibration = [read_table(p) for p in sorted((sub / "recalibrate").glob("**/*.parquet"))
                   if p.name in ("samples.parquet", "reference.parquet")]
    n = sum(sequence_tokens(t, tok, rcfg.template) for t in calibration)
    epochs = (rcfg.epochs / train_cfg.num_epochs) if rcfg.epochs is not None and train_cfg.max_steps <= 0 else 1.0
    extra = {"generation": n, "forward": n, "scored": n,
             "training": oneshot["tokens"]["training"] * epochs * out["extra_fine_tunes"]}
    tokens = add_counts(oneshot["tokens"], extra)
    n_policy = model_forward_params(train_cfg.model) or 0
    write_json({"method": "mocan-recalibrated", "gradient_steps": oneshot["gradient_steps"] + out["compute"]["gradient_steps"],
                "sampled_tokens": out["compute"]["sampled_tokens"],
                "lambdas": read_dual(sub / "recalibrate" / "dual.json").lambdas,
                "oneshot_lambdas": oneshot["lambdas"], "extra_fine_tunes": out["extra_fine_tunes"],
                "wall_s": oneshot["wall_s"] + used["wall_s"],
                "peak_memory_mb": max(oneshot["peak_memory_mb"], used["peak_memory_mb"]), "tokens": tokens,
                "flops": stage_flops(tokens, n_policy, [scorer_forward_params(s) for s in rcfg.scorers])},
               sub / "compute.json")


def _evaluate(run, run_dir: Path, shared: Path, seed: int, policy: str | None = None) -> EvalReport:
    """The evaluate stage on one policy; π_ref's evaluation samples are made once per seed."""
    cached = shared / "eval_reference" / f"seed{seed}.parquet"
    mine = run_dir / "eval" / "samples_reference.parquet"
    if cached.exists() and not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, mine)
    report = evaluate(dataclasses.replace(run.evaluate, run_dir=str(run_dir), seed=seed, policy=policy))
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mine, cached)
    return read_report(report)


def _train_and_evaluate(run, cmp: CompareConfig, r: Run, seed: int, root: Path, shared: Path, log) -> Path:
    """One method run (skipping what is done): train, evaluate, evaluate each budget."""
    sub = root / "runs" / r.label / f"seed{seed}"
    report_path = sub / "eval" / "report.json"
    if report_path.exists():
        log(f"{r.label} seed {seed}: done, skipped")
        return sub
    sub.mkdir(parents=True, exist_ok=True)
    if not ((sub / "compute.json").exists() and (sub / "policy").exists()):
        log(f"{r.label} seed {seed}: training ...")
        if r.method == "mocan-recalibrated":
            _run_recalibrated(run, cmp, sub, shared, seed)
        else:
            run_method(method_config(run, cmp, r, sub, shared, seed))
    for budget in _budget_dirs(sub):
        if not (budget / "eval" / "report.json").exists():
            log(f"{r.label} seed {seed}: evaluating budget {budget.name} ...")
            _evaluate(run, budget, shared, seed, read_json(budget / "compute.json").get("policy"))
    log(f"{r.label} seed {seed}: evaluating ...")
    _evaluate(run, sub, shared, seed)
    return sub


def _budget_dirs(sub: Path) -> list[Path]:
    return sorted((p.parent for p in (sub / "budgets").glob("*/compute.json")), key=lambda p: int(p.name))


def run_compare(run, cmp: CompareConfig, log=print) -> dict[str, Any]:
    """Every method × seed (resuming), then the tables and plots; returns ``compare.json``'s content."""
    root = Path(run.run_dir)
    shared = root / "shared"
    shared_cost = run_shared(run, shared, log, cmp)
    rows, budget_rows = [], []
    for r in _runs(cmp):
        for seed in r.seeds:
            sub = _train_and_evaluate(run, cmp, r, seed, root, shared, log)
            compute = read_json(sub / "compute.json")
            final = table_row(r.label, r.method, seed, read_report(sub / "eval" / "report.json"), compute,
                              shared_cost)
            rows.append(final)
            for budget in _budget_dirs(sub):
                budget_rows.append(table_row(r.label, r.method, seed, read_report(budget / "eval" / "report.json"),
                                             read_json(budget / "compute.json"), shared_cost))
            if r.method in ITERATIVE:
                budget_rows.append(final)
    runs = pd.DataFrame(rows)
    summary = summarise(runs)
    budgets = pd.DataFrame(budget_rows)
    curves = summarise(budgets, ["label", "budget"]) if len(budgets) else pd.DataFrame()
    reference = read_report(root / "runs" / rows[0]["label"] / f"seed{rows[0]['seed']}" / "eval" / "report.json")
    cons = [{"name": c.name, "constraint": c.constraint, "column": c.column, "threshold": c.threshold}
            for c in reference.constraints]
    projection = projection_table(summary, curves, cons, cmp.projection_params)
    out = {"summary": records(summary), "runs": records(runs), "budgets": records(budgets),
           "curves": records(curves), "first_met": first_met(curves, cons), "projection": records(projection),
           "shared": shared_cost, "dual": to_json(read_dual(shared / "dual.json")),
           "reference": to_json(reference.reference), "constraints": cons}
    write_table(summary, root / "compare.csv")
    write_table(runs, root / "compare_runs.csv")
    if len(budgets):
        write_table(budgets, root / "compare_budgets.csv")
    write_table(projection, root / "projection_7b.csv")
    write_json(out, root / "compare.json")
    plot_compare(out, root, log)
    log(format_table(out))
    return out

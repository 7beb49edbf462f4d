"""``dualign run``: every stage in order into one run directory, resuming where it stopped.

Every stage's config is built and checked before the first one runs (and before the world is
built): types, numbers, methods, constraints, scorer specs, the files and models it needs, the
output paths. A stage marked complete (``<stage>.done``, its last write) is skipped; any other is
run, resuming from its own shards/checkpoints, so a kill at any point costs at most the unfinished
stage. A stage's config is recorded when it starts, and re-running a run directory with a changed
config is refused rather than silently mixing results. One process at a time writes a run
directory (:mod:`dualign._infra.lock`).

The run config has one section per stage (``sample``, ``score``, ``dual``, ``train``,
``evaluate``), each mirroring that stage's dataclass, plus shared keys: ``run_dir``, ``model``
(π_ref, filled into the stages that need it) and ``seed``. An optional ``world`` section builds
(or loads from the cache) the built-in synthetic world; a string value ``world:NAME`` is then
replaced by the path ``<world_dir>/NAME``, and ``run:NAME`` by ``<run_dir>/NAME``, where the whole
value is the reference or a scorer spec's target is (``cost=hf:world:cost_model``); NAME must
stay inside its directory. An optional ``prealign`` section (PeCAN) trains π_r and π_g by DPO
after sampling and before scoring, so the score stage can use ``implicit:run:prealign/helpful/policy``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dualign._infra import timing
from dualign._infra.config import build_config, config_to_dict, load_yaml, merge
from dualign._infra.distributed import one_process
from dualign._infra.errors import ConfigError, InputError
from dualign._infra.io import read_json, write_json
from dualign._infra.lock import run_lock
from dualign._infra.provenance import done_marker, is_done, record_config
from dualign.data.prompts import load_prompts
from dualign.data.records import read_report, to_json
from dualign.data.report_view import format_outputs, format_report
from dualign.dual import DualConfig, run_dual
from dualign.evaluate import EvaluateConfig, evaluate
from dualign.modeling import checks
from dualign.pilot import PilotConfig, pilot, restore_first_plan
from dualign.prealign import PrealignConfig, prealign, view_configs
from dualign.recalibrate import RecalibrateConfig, recalibrate
from dualign.sample import SampleConfig, sample
from dualign.score import ScoreConfig, score
from dualign.train import LOSSES, TrainConfig, train
from dualign.world import build_world, default_world_dir, is_complete, world_config

STAGES = ("sample", "prealign", "score", "dual", "pilot", "train", "recalibrate", "evaluate")
OUTPUTS = {"sample": "samples.parquet", "prealign": "prealign/safe/policy", "score": "scores.parquet",
           "dual": "dual.json", "pilot": "pilot/pilot.json", "train": "policy", "recalibrate": "recalibrate.json",
           "evaluate": "eval/report.json"}
# Everything a stage leaves in the run directory (final output, resume state, side files).
PRODUCTS = {"sample": ("samples.parquet", "samples.shards"), "prealign": ("prealign",),
            "score": ("scores.parquet", "scores.cache", "preference_scores.parquet"),
            "dual": ("dual.json",), "pilot": ("pilot",), "train": ("policy", "train.state", "pairs.parquet", "metrics.jsonl"),
            "recalibrate": ("recalibrate", "recalibrate.json"), "evaluate": ("eval",)}
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
FULL_CONFIG = Path(__file__).parent / "configs" / "full.yaml"
SMALL_CONFIG = Path(__file__).parent / "configs" / "small.yaml"
PECAN_CONFIG = Path(__file__).parent / "configs" / "pecan.yaml"
PECAN_SMALL_CONFIG = Path(__file__).parent / "configs" / "pecan_small.yaml"
RECALIBRATE_CONFIG = Path(__file__).parent / "configs" / "recalibrate.yaml"
PACKAGED = {"default": DEFAULT_CONFIG, "full": FULL_CONFIG, "small": SMALL_CONFIG, "pecan": PECAN_CONFIG, "pecan_small": PECAN_SMALL_CONFIG,
            "recalibrate": RECALIBRATE_CONFIG}


@dataclass
class RunConfig:
    run_dir: str = field(metadata={"help": "run directory (all stage outputs)"})
    model: str = field(metadata={"help": "π_ref: HF model id or local path (or world:ref_model)"})
    sample: SampleConfig
    score: ScoreConfig
    dual: DualConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    seed: int = field(default=0, metadata={"help": "seed shared by every stage"})
    prealign: PrealignConfig | None = field(default=None, metadata={"help": "PeCAN's DPO pre-alignment"})
    pilot: PilotConfig | None = field(default=None, metadata={
        "help": "before the fine-tune: a pilot fine-tune on part of the dual's prompts measures the share of the "
                "plan a fine-tune delivers on the rest, and the dual plans for it"})
    recalibrate: RecalibrateConfig | None = field(default=None, metadata={
        "help": "measure the trained policy on calibration prompts and correct λ while a constraint misses"})
    world: dict | None = field(default=None, metadata={
        "help": "built-in world: {size: default|small, <WorldConfig key>: value, ...}"})


# Keys each stage inherits from the top level of the run config unless its section sets them.
_SHARED = {
    "sample": {"run_dir": "run_dir", "model": "model", "seed": "seed"},
    "prealign": {"run_dir": "run_dir", "model": "model"},
    "score": {"run_dir": "run_dir"},
    "dual": {"seed": "seed"},
    "pilot": {"run_dir": "run_dir", "model": "model", "seed": "seed"},
    "train": {"run_dir": "run_dir", "model": "model", "seed": "seed"},
    "recalibrate": {"run_dir": "run_dir", "reference": "model", "seed": "seed"},
    "evaluate": {"run_dir": "run_dir", "reference": "model", "seed": "seed"},
}
# Keys the recalibrate stage takes from other sections unless its own sets them: it samples and
# scores as the evaluate stage does.
_FROM_SECTIONS = {"recalibrate": {"scorers": ("evaluate", "scorers"), "template": ("evaluate", "template"),
                                  "max_new_tokens": ("evaluate", "max_new_tokens"),
                                  "batch_size": ("evaluate", "batch_size"), "device": ("evaluate", "device")}}


def load_run_values(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A run YAML; ``base: NAME`` (a packaged config: default, full, small, pecan, pecan_small) or ``base: FILE``
    (a path inside this file's directory) is loaded first and this file's keys are merged over it."""
    path = Path(path)
    values = load_yaml(path)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a packaged config ({', '.join(PACKAGED)}) or a YAML path, "
                          f"got {base!r}")
    base_path = PACKAGED.get(base) or _inside_dir(path.parent, base, f"{path}: base")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {base!r} is neither a packaged config "
                          f"({', '.join(PACKAGED)}) nor an existing file")
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, base_path.resolve()))
        raise ConfigError(f"{path}: base {base!r} makes a cycle ({cycle})")
    return merge(load_run_values(base_path, chain), values)


def _inside_dir(root: Path, name: str, what: str) -> Path:
    """``root/name`` for a relative ``name`` that stays inside ``root`` (no '..', not absolute)."""
    rel = Path(name)
    if not name or rel.is_absolute() or name.startswith("~") or ".." in rel.parts:
        raise InputError(f"{what}: '{name}' must be a relative path inside {root} (no '..', not absolute)")
    return root / rel


def resolve_run_config(values: dict[str, Any]) -> RunConfig:
    """Fill shared keys into the stage sections, build the world if asked, and validate.

    Keys are checked before the world is built, so a typo fails in a second, not after minutes.
    """
    values = dict(values)
    for stage, shared in _SHARED.items():
        section = values.get(stage)
        if stage in ("prealign", "pilot", "recalibrate") and section is None:
            continue
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"config key '{stage}': expected a mapping of {stage} keys, got {section!r:.60}")
        section = dict(section or {})
        for key, top in shared.items():
            if top in values and key not in section:
                section[key] = values[top]
        for key, (other, name) in _FROM_SECTIONS.get(stage, {}).items():
            if key not in section and isinstance(values.get(other), dict) and name in values[other]:
                section[key] = values[other][name]
        values[stage] = section
    cfg = build_config(RunConfig, values)  # every key and value checked before any path is touched
    values = _replace_refs(values, "run:", Path(cfg.run_dir), must_exist=False)
    cfg = build_config(RunConfig, values)
    check_run(cfg)
    # world: references are checked before the build (a reference outside the world, or no world)
    _replace_refs(values, "world:", None if cfg.world is None else Path("world"), must_exist=False)
    if cfg.world is None:
        return cfg
    world = dict(cfg.world)
    world_cfg = world_config(world.pop("size", "default"), world)
    if not is_complete(default_world_dir(world_cfg), world_cfg):
        print(f"building the built-in world once (minutes; cached in {default_world_dir(world_cfg)}) ...",
              file=sys.stderr, flush=True)
    world_dir = build_world(world_cfg)
    cfg = build_config(RunConfig, _replace_refs(values, "world:", Path(world_dir)))
    check_run(cfg)
    return cfg


def check_run(cfg: RunConfig) -> None:
    """Everything about a run config that can be checked before its first stage (:mod:`dualign.modeling.checks`);
    ``world:`` references wait for the world."""
    if cfg.train.method not in LOSSES:
        raise ConfigError(f"config key 'train.method': {cfg.train.method!r} is not one of {', '.join(LOSSES)} "
                          "(baselines run with `dualign train --method` or `dualign compare`)")
    if cfg.prealign is not None:
        view_configs(cfg.prealign)
    for stage in STAGES:
        if getattr(cfg, stage) is not None:
            checks.stage_inputs(getattr(cfg, stage), cfg.run_dir, prefix=f"{stage}.")


# a scorer spec's head, NAME=KIND:, before a reference target
_SPEC_HEAD = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*=[A-Za-z]+:)(.*)", re.S)


def _replace_refs(node: Any, prefix: str, base: Path | None, must_exist: bool = True) -> Any:
    if isinstance(node, dict):
        return {k: (v if k == "world" else _replace_refs(v, prefix, base, must_exist)) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_refs(v, prefix, base, must_exist) for v in node]
    if isinstance(node, str):
        return _substitute(node, prefix, base, must_exist)
    return node


def _substitute(text: str, prefix: str, base: Path | None, must_exist: bool) -> str:
    """``world:NAME`` → ``<base>/NAME`` where the whole value is the reference, or a scorer spec's
    target is (``cost=hf:world:cost_model,lower_is_better``); other text is left as it is."""
    head, rest = "", text
    spec = _SPEC_HEAD.fullmatch(text)
    if spec and spec.group(2).startswith(prefix):
        head, rest = spec.group(1), spec.group(2)
    if not rest.startswith(prefix):
        return text
    name, comma, options = rest[len(prefix):], "", ""
    if head:  # a spec's options follow its target
        name, comma, options = name.partition(",")
    if base is None:
        raise ConfigError(f"config refers to '{prefix}{name}' but has no {prefix.rstrip(':')} section to build it from")
    path = _inside_dir(base, name, f"config reference '{prefix}{name}'")
    if must_exist and not path.exists():
        raise InputError(f"config refers to '{prefix}{name}' but {path} does not exist")
    return head + str(path) + comma + options


def stage_config_changed(run_dir: Path, stage: str, cfg: Any) -> str | None:
    """Name the first key whose recorded value differs from ``cfg``, or None when they agree (a key
    added to dualign since the record was written agrees when it has its default)."""
    recorded = run_dir / f"{stage}.config.yaml"
    if not recorded.exists():
        return None
    try:
        old = yaml.safe_load(recorded.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict):
        raise InputError(f"{recorded}: not a stage config record; delete it or use --restart-from {stage}")
    new = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    for key in sorted((set(old) | set(new)) - {"run_dir"}):  # a moved run directory still resumes
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


def run_pipeline(cfg: RunConfig, restart_from: str | None = None, log=print) -> dict:
    """Run the stages in order, skipping complete ones; returns eval/report.json's content.

    Holds the run directory's lock throughout; a second process on the same directory fails at once.
    """
    one_process("dualign run")
    if restart_from is not None and restart_from not in STAGES:
        raise ConfigError(f"--restart-from: unknown stage {restart_from!r} (stages: {', '.join(STAGES)})")
    check_run(cfg)
    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir):
        if restart_from is not None:
            for stage in STAGES[STAGES.index(restart_from):]:
                oneshot = run_dir / "recalibrate" / "round0" / "policy"
                if stage == "recalibrate" and oneshot.exists() and (run_dir / "policy").exists():
                    _remove(run_dir / "policy")  # the train stage's own policy comes back
                    oneshot.rename(run_dir / "policy")
                if stage == "pilot" and restart_from == "pilot":
                    restore_first_plan(run_dir)  # dual.json goes back to the plan the pilot measured
                for name in PRODUCTS[stage] + (f"{stage}.config.yaml", f"{stage}.meta.json", f"{stage}.done"):
                    _remove(run_dir / name)
        total = _run_stages(cfg, run_dir, log)
        report = read_report(run_dir / OUTPUTS["evaluate"])
    log(format_report(report))
    log(f"{format_outputs(run_dir)}\n(stages run now: {total:.0f} s)")
    return to_json(report)


def _run_stages(cfg: RunConfig, run_dir: Path, log) -> float:
    """Each stage not marked complete, in order (its config recorded first); the seconds spent."""
    funcs = {"sample": sample, "prealign": prealign, "score": score,
             "dual": lambda c: run_dual(c, run_dir), "pilot": lambda c: pilot(c, cfg.train, _dual_in_run(cfg)),
             "train": train,
             "recalibrate": lambda c: recalibrate(c, cfg.train), "evaluate": evaluate}
    stages = [s for s in STAGES if getattr(cfg, s) is not None]
    total = 0.0
    for i, stage in enumerate(stages):
        stage_cfg = _dual_in_run(cfg) if stage == "dual" else getattr(cfg, stage)
        changed = stage_config_changed(run_dir, stage, stage_cfg)
        if changed:
            raise InputError(f"{run_dir}: stage '{stage}' was run with a different config ({changed}); "
                             f"use another --run-dir or --restart-from {stage}")
        if is_done(run_dir, stage) and (run_dir / OUTPUTS[stage]).exists():
            log(f"[{i + 1}/{len(stages)}] {stage}: done, skipped")
            continue
        done_marker(run_dir, stage).unlink(missing_ok=True)  # its output is gone: the stage is redone
        record_config(run_dir, stage, stage_cfg)
        log(f"[{i + 1}/{len(stages)}] {stage} ...")
        start = time.perf_counter()
        with timing.collect() as parts:
            funcs[stage](stage_cfg)
        spent = time.perf_counter() - start
        total += spent
        record_timing(run_dir, stage, spent, parts)
        split = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.5)
        log(f"[{i + 1}/{len(stages)}] {stage}: {spent:.0f} s" + (f" ({split})" if split else ""))
    return total


def _dual_in_run(cfg: RunConfig) -> DualConfig:
    """The dual section as the run runs and records it: a confidence plan covers the run's
    evaluation (:func:`covering_evaluation`), and the reachable tilt takes π_ref's features from
    the model and template the samples were drawn with, unless the section names its own."""
    return features_from_samples(covering_evaluation(cfg.dual, cfg.evaluate), cfg.sample)


def features_from_samples(dual: DualConfig, sample: SampleConfig) -> DualConfig:
    """A reachable-tilt dual section takes π_ref's features from the model, revision and template
    the samples were drawn with, unless it names its own model; any other section is returned as is."""
    if dual.tilt != "reachable" or dual.model is not None:
        return dual
    return dataclasses.replace(dual, model=sample.model, revision=sample.revision, template=sample.template,
                               trust_remote_code=sample.trust_remote_code)


def covering_evaluation(dual: DualConfig, evaluation: EvaluateConfig | None) -> DualConfig:
    """A confidence plan in a run covers the run's own evaluation: its held-out prompts (counted)
    and responses per prompt, unless the dual section names an evaluation itself."""
    if dual.confidence is None or dual.evaluation_prompts is not None or evaluation is None:
        return dual
    prompts = load_prompts(evaluation.prompts, prompt_column=evaluation.prompt_column, split=evaluation.split,
                           max_prompts=evaluation.max_prompts)
    return dataclasses.replace(dual, evaluation_prompts=len(prompts), evaluation_samples=evaluation.num_samples)


def record_timing(run_dir: Path, stage: str, seconds: float, parts: dict[str, float]) -> None:
    """Add ``timing_s`` (the stage's wall seconds and where they went, :mod:`dualign._infra.timing`) to
    ``<stage>.meta.json``."""
    path = run_dir / f"{stage}.meta.json"
    if path.exists():
        meta = read_json(path)
        meta["timing_s"] = {"total": round(seconds, 3), **parts}
        write_json(meta, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

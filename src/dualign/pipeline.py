"""``dualign run``: every stage in order into one run directory, resuming where it stopped.

A stage whose output exists is skipped (outputs are written atomically, so an existing output is
complete); a stage killed mid-way resumes from its own shards/checkpoints. Re-running a run
directory with a changed stage config is refused rather than silently mixing results.

The run config has one section per stage (``sample``, ``score``, ``dual``, ``train``,
``evaluate``), each mirroring that stage's dataclass, plus shared keys: ``run_dir``, ``model``
(π_ref, filled into the stages that need it) and ``seed``. An optional ``world`` section builds
(or loads from the cache) the built-in synthetic world; any string value ``world:NAME`` is then
replaced by the path ``<world_dir>/NAME``, and ``run:NAME`` by ``<run_dir>/NAME``. An optional
``prealign`` section (PeCAN) trains π_r and π_g by DPO after sampling and before scoring, so the
score stage can use ``implicit:run:prealign/helpful/policy``.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dualign import timing
from dualign.config import build_config, config_to_dict, load_yaml, merge
from dualign.dual import DualConfig, run_dual
from dualign.errors import ConfigError, InputError
from dualign.evaluate import EvaluateConfig, evaluate, format_outputs, format_report
from dualign.io import read_json, write_json
from dualign.methods.pecan_prealign import PrealignConfig, prealign
from dualign.recalibrate import RecalibrateConfig, recalibrate
from dualign.records import read_report, to_json
from dualign.sample import SampleConfig, sample
from dualign.score import ScoreConfig, score
from dualign.train import TrainConfig, train
from dualign.world import build_world, default_world_dir, is_complete, world_config

STAGES = ("sample", "prealign", "score", "dual", "train", "recalibrate", "evaluate")
OUTPUTS = {"sample": "samples.parquet", "prealign": "prealign/safe/policy", "score": "scores.parquet",
           "dual": "dual.json", "train": "policy", "recalibrate": "recalibrate.json",
           "evaluate": "eval/report.json"}
# Everything a stage leaves in the run directory (final output, resume state, side files).
PRODUCTS = {"sample": ("samples.parquet", "samples.shards"), "prealign": ("prealign",),
            "score": ("scores.parquet", "scores.cache", "preference_scores.parquet"),
            "dual": ("dual.json",), "train": ("policy", "train.state", "pairs.parquet", "metrics.jsonl"),
            "recalibrate": ("recalibrate", "recalibrate.json"), "evaluate": ("eval",)}
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
SMALL_CONFIG = Path(__file__).parent / "configs" / "small.yaml"
PECAN_CONFIG = Path(__file__).parent / "configs" / "pecan.yaml"
PECAN_SMALL_CONFIG = Path(__file__).parent / "configs" / "pecan_small.yaml"
RECALIBRATE_CONFIG = Path(__file__).parent / "configs" / "recalibrate.yaml"
PACKAGED = {"default": DEFAULT_CONFIG, "small": SMALL_CONFIG, "pecan": PECAN_CONFIG, "pecan_small": PECAN_SMALL_CONFIG,
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
    "train": {"run_dir": "run_dir", "model": "model", "seed": "seed"},
    "recalibrate": {"run_dir": "run_dir", "reference": "model", "seed": "seed"},
    "evaluate": {"run_dir": "run_dir", "reference": "model", "seed": "seed"},
}
# Keys the recalibrate stage takes from other sections unless its own sets them: it samples and
# scores as the evaluate stage does.
_FROM_SECTIONS = {"recalibrate": {"scorers": ("evaluate", "scorers"), "template": ("evaluate", "template"),
                                  "max_new_tokens": ("evaluate", "max_new_tokens"),
                                  "batch_size": ("evaluate", "batch_size"), "device": ("evaluate", "device")}}


def load_run_values(path: str | Path) -> dict[str, Any]:
    """A run YAML; ``base: NAME`` (a packaged config: default, small, pecan, pecan_small) or ``base: FILE``
    (relative to this file) is loaded first and this file's keys are merged over it."""
    values = load_yaml(path)
    base = values.pop("base", None)
    if base is None:
        return values
    base_path = PACKAGED.get(str(base)) or Path(path).parent / str(base)
    if not Path(base_path).exists():
        raise ConfigError(f"{path}: base {base!r} is neither a packaged config "
                          f"({', '.join(PACKAGED)}) nor an existing file")
    return merge(load_run_values(base_path), values)


def resolve_run_config(values: dict[str, Any]) -> RunConfig:
    """Fill shared keys into the stage sections, build the world if asked, and validate.

    Keys are checked before the world is built, so a typo fails in a second, not after minutes.
    """
    values = dict(values)
    for stage, shared in _SHARED.items():
        if stage in ("prealign", "recalibrate") and values.get(stage) is None:
            continue
        section = dict(values.get(stage) or {})
        for key, top in shared.items():
            if top in values and key not in section:
                section[key] = values[top]
        for key, (other, name) in _FROM_SECTIONS.get(stage, {}).items():
            if key not in section and name in (values.get(other) or {}):
                section[key] = values[other][name]
        values[stage] = section
    if "run_dir" in values:
        values = _replace_refs(values, "run:", Path(values["run_dir"]), must_exist=False)
    cfg = build_config(RunConfig, values)
    if cfg.world is None:
        return cfg
    world = dict(cfg.world)
    world_cfg = world_config(world.pop("size", "default"), world)
    if not is_complete(default_world_dir(world_cfg), world_cfg):
        print(f"building the built-in world once (minutes; cached in {default_world_dir(world_cfg)}) ...",
              file=sys.stderr, flush=True)
    world_dir = build_world(world_cfg)
    return build_config(RunConfig, _replace_refs(values, "world:", Path(world_dir)))


def _replace_refs(node: Any, prefix: str, base: Path, must_exist: bool = True) -> Any:
    if isinstance(node, dict):
        return {k: (v if k == "world" else _replace_refs(v, prefix, base, must_exist)) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_refs(v, prefix, base, must_exist) for v in node]
    if isinstance(node, str) and prefix in node:
        return _substitute(node, prefix, base, must_exist)
    return node


def _substitute(text: str, prefix: str, base: Path, must_exist: bool) -> str:
    """``world:NAME`` → ``<base>/NAME`` wherever it appears (e.g. inside ``cost=hf:world:cost_model``)."""
    out, rest = [], text
    while prefix in rest:
        head, _, tail = rest.partition(prefix)
        name = tail.split(",")[0].split(";")[0]
        if must_exist and not (base / name).exists():
            raise InputError(f"config refers to '{prefix}{name}' but {base / name} does not exist")
        out.append(head + str(base / name))
        rest = tail[len(name):]
    return "".join(out) + rest


def _stage_config_changed(run_dir: Path, stage: str, cfg: Any) -> str | None:
    """Name the first key whose recorded value differs from ``cfg``, or None when they agree."""
    recorded = run_dir / f"{stage}.config.yaml"
    if not recorded.exists():
        return None
    old = yaml.safe_load(recorded.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    for key in sorted((set(old) | set(new)) - {"run_dir"}):  # a moved run directory still resumes
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


def run_pipeline(cfg: RunConfig, restart_from: str | None = None, log=print) -> dict:
    """Run the stages in order, skipping complete ones; returns eval/report.json's content."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if restart_from is not None:
        if restart_from not in STAGES:
            raise ConfigError(f"--restart-from: unknown stage {restart_from!r} (stages: {', '.join(STAGES)})")
        for stage in STAGES[STAGES.index(restart_from):]:
            oneshot = run_dir / "recalibrate" / "round0" / "policy"
            if stage == "recalibrate" and oneshot.exists() and (run_dir / "policy").exists():
                _remove(run_dir / "policy")  # the train stage's own policy comes back
                oneshot.rename(run_dir / "policy")
            for name in PRODUCTS[stage] + (f"{stage}.config.yaml", f"{stage}.meta.json"):
                _remove(run_dir / name)
    funcs = {"sample": sample, "prealign": prealign, "score": score,
             "dual": lambda c: run_dual(c, run_dir), "train": train,
             "recalibrate": lambda c: recalibrate(c, cfg.train), "evaluate": evaluate}
    stages = [s for s in STAGES if getattr(cfg, s) is not None]
    total = 0.0
    for i, stage in enumerate(stages):
        stage_cfg = getattr(cfg, stage)
        done = (run_dir / OUTPUTS[stage]).exists()
        if done:
            changed = _stage_config_changed(run_dir, stage, stage_cfg)
            if changed:
                raise InputError(f"{run_dir}: stage '{stage}' was run with a different config ({changed}); "
                                 f"use another --run-dir or --restart-from {stage}")
            log(f"[{i + 1}/{len(stages)}] {stage}: done, skipped")
            continue
        log(f"[{i + 1}/{len(stages)}] {stage} ...")
        start = time.perf_counter()
        with timing.collect() as parts:
            funcs[stage](stage_cfg)
        spent = time.perf_counter() - start
        total += spent
        record_timing(run_dir, stage, spent, parts)
        split = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.5)
        log(f"[{i + 1}/{len(stages)}] {stage}: {spent:.0f} s" + (f" ({split})" if split else ""))
    report = read_report(run_dir / OUTPUTS["evaluate"])
    log(format_report(report))
    log(f"{format_outputs(run_dir)}\n(stages run now: {total:.0f} s)")
    return to_json(report)


def record_timing(run_dir: Path, stage: str, seconds: float, parts: dict[str, float]) -> None:
    """Add ``timing_s`` (the stage's wall seconds and where they went, :mod:`dualign.timing`) to
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

"""The ``dualign`` command line. Thin: parses flags, calls the stage functions, prints.

Each subcommand is one ``_add_<name>`` (flags, help text and an example) + one ``_cmd_<name>``
(action) pair, listed in ``COMMANDS``. Any :class:`DualignError` becomes one line on stderr and
exit code 2. Third-party logs and progress bars are off unless ``--verbose`` (:mod:`dualign._infra.quiet`).

The stage modules are imported inside the subcommand that runs them: they pull numpy, pandas and
torch (seconds), which ``dualign --help`` and every ``dualign COMMAND --help`` should not pay for.
The flags come from the stage configs as read from their source (:mod:`dualign._infra.config_source`).

One pair of short functions per command: a reader looking for a command finds its
flags, help and action side by side; the work itself lives in the stage modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from pathlib import Path

from dualign import __version__
from dualign._infra.config import (
    add_config_arguments,
    load_yaml,
    merge,
    overrides_from_args,
    resolve_config,
)
from dualign._infra.config_source import config_class, config_classes, source_constant
from dualign._infra.errors import ConfigError, DualignError
from dualign._infra.quiet import quiet_third_party

DESCRIPTION = """\
dualign aligns a language model to be helpful under safety constraints, in one shot (MoCAN and
PeCAN, Huang et al., NeurIPS 2024). It samples responses from your model π_ref, scores them
(reward, costs), solves a small convex dual for the constraint weights λ*, which also predicts the
aligned model's reward, safety and KL before any training, then fine-tunes once towards
π_λ* ∝ π_ref·exp((r + λ*ᵀg)/β) and measures what it reached against the prediction."""

EPILOG = """\
start here:
  dualign demo --size small        a small synthetic safety world and a tiny model, end to end
  dualign demo                     the full demo: MoCAN under cost <= ref-4, a before/after table
  dualign run my_run.yaml          your model: sample, score, dual, train, evaluate from one config

A run directory (runs/... by default) holds every stage's output; built worlds and π_ref's
evaluation cache live in $DUALIGN_CACHE (default ~/.cache/dualign). `dualign COMMAND --help`
explains each command. File formats: docs/formats.md."""

CONFIG_RULE = ("Each flag is also a key of the optional YAML file (--num-samples ↔ num_samples); "
               "flags override the file.")

# `dualign train --help`'s list of methods (tests/test_cli_help.py: every method the code knows).
TRAIN_METHODS = """\
  mocan            MoCAN (default): pairs of π_ref's samples labelled by r + λ*ᵀg from dual.json
  pecan            PeCAN: the same loss on implicit rewards of DPO-pre-aligned models (needs dual.json)
  dpo              DPO on a preference file (--preferences prompt/chosen/rejected)
  safedpo          SafeDPO on a preference file with safety labels (helpful pairs, unsafe answers ranked last)
  fixed-lambda     baseline: MoCAN's loss at a λ you give (--lambdas) instead of λ*
  reward-only-mocan  baseline: MoCAN's loss on the reward alone (λ = 0)
  cost-only-mocan  baseline: MoCAN's loss on the constraints alone
  dpo-helpful      baseline: DPO on the helpfulness preference pairs (the paper's DPO_h)
  dpo-safe         baseline: DPO on the safety preference pairs (the paper's DPO_s)
  dual-ascent      baseline: fine-tune, measure the constraint, move λ, repeat (--rounds)
  ppo-lagrangian   baseline: online PPO on the Lagrangian, λ updated as it trains
  ppo-lagrangian-critic  baseline: Safe-RLHF's PPO-Lagrangian, reward and cost critics with GAE
  grpo-lagrangian  baseline: online critic-free group policy gradient, λ updated on its rollouts"""

# The order of the command list in `dualign --help`: the newcomer's path first.
ORDER = ("demo", "run", "world", "sample", "score", "dual", "plan", "train", "evaluate", "compare", "data")

# (name, help, add_arguments, run) — filled in below, one entry per subcommand.
COMMANDS: list[tuple[str, str, object, object]] = []


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s flags are built."""
    parser = argparse.ArgumentParser(prog="dualign", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dualign {__version__}")
    _add_verbose(parser, default=False)
    sub = parser.add_subparsers(dest="_command", metavar="COMMAND")
    sub.required = True
    for name, help_, add, run in sorted(COMMANDS, key=lambda c: ORDER.index(c[0]) if c[0] in ORDER else len(ORDER)):
        p = sub.add_parser(name, help=help_, description=textwrap.fill(help_, 100),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if command is None or name == command:
            add(p)
            _add_verbose(p)
        p.set_defaults(_run=run)
    return parser


def _run_stage(cfg, run):
    """A stage command: check its inputs and outputs, then run it holding its run directory's lock
    (under accelerate/torchrun the main process holds it for all)."""
    from dualign._infra.lock import run_lock
    from dualign.modeling import checks

    run_dir = getattr(cfg, "train", cfg).run_dir  # a baseline's is that of the loop settings it holds
    checks.stage_inputs(cfg, run_dir)
    if run_dir is None or os.environ.get("RANK", "0") != "0":
        return run(cfg)  # without a run directory the stage says so itself
    with run_lock(run_dir):
        return run(cfg)


def _say(text: str) -> None:
    """Print a stage command's closing line, once: under a launcher only the main process says it."""
    if os.environ.get("RANK", "0") == "0":
        print(text)


def _add_verbose(p: argparse.ArgumentParser, default: object = argparse.SUPPRESS) -> None:
    """``--verbose``, before or after the command (``_verbose``: not a config key)."""
    p.add_argument("--verbose", dest="_verbose", action="store_true", default=default,
                   help="show third-party logs, warnings and progress bars (transformers, datasets, "
                        "the Hub), which are off by default")


def _stage_usage(p: argparse.ArgumentParser, config: str = "[CONFIG.yaml]") -> None:
    """A one-line usage (the generated one lists every flag) and the YAML / flag rule."""
    p.usage = f"%(prog)s {config} [--FLAG VALUE ...]".replace("  ", " ")


def _add_scorer_flag(p: argparse.ArgumentParser) -> None:
    """``--scorer`` (alias ``--scorers``), repeatable, filling the config's ``scorers`` list."""
    p.add_argument("--scorer", "--scorers", dest="scorers", action="append", default=argparse.SUPPRESS,
                   help="NAME=KIND:TARGET[,higher_is_better|,lower_is_better], KIND in hf, beaver, "
                        "callable, implicit (implicit:PATH[,beta=B]) (repeatable)")


def _add_sample(p: argparse.ArgumentParser) -> None:
    _stage_usage(p)
    p.add_argument("config", nargs="?", help="YAML file of the keys below (flags override it)")
    add_config_arguments(p, config_class("dualign.sample", "SampleConfig"))
    p.epilog = f"""\
example:
  dualign sample --model gpt2 --prompts prompts.jsonl --num-samples 8 --run-dir runs/mine

{CONFIG_RULE}"""


def _cmd_sample(args: argparse.Namespace) -> int:
    from dualign.sample import SampleConfig, sample

    cfg = resolve_config(SampleConfig, args.config, args, exclude=("config",))
    _say(str(_run_stage(cfg, sample)))
    return 0


COMMANDS.append(("sample", "draw K responses per prompt from π_ref: <run_dir>/samples.parquet",
                 _add_sample, _cmd_sample))


def _add_score(p: argparse.ArgumentParser) -> None:
    _stage_usage(p)
    p.add_argument("config", nargs="?", help="YAML file of the keys below (flags override it)")
    _add_scorer_flag(p)
    add_config_arguments(p, config_class("dualign.score", "ScoreConfig"), skip=("scorers",))
    p.epilog = f"""\
example:
  dualign score --run-dir runs/mine --scorer reward=hf:my/reward-model \\
      --scorer cost=beaver:PKU-Alignment/beaver-7b-v1.0-cost,lower_is_better

{CONFIG_RULE}"""


def _cmd_score(args: argparse.Namespace) -> int:
    from dualign.score import ScoreConfig, score

    cfg = resolve_config(ScoreConfig, args.config, args, exclude=("config",))
    _say(str(_run_stage(cfg, score)))
    return 0


COMMANDS.append(("score", "score the samples, one column per scorer (reward, costs): <run_dir>/scores.parquet",
                 _add_score, _cmd_score))


def _add_train(p: argparse.ArgumentParser) -> None:
    _stage_usage(p)
    p.add_argument("config", nargs="?", help="YAML file of the keys below (flags override it)")
    train_config = config_class("dualign.train", "TrainConfig")
    add_config_arguments(p, train_config)
    baselines = config_classes("dualign.baselines.dispatch", "CONFIGS")
    seen = {f.name for f in dataclasses.fields(train_config)}
    group = p.add_argument_group(f"the baselines' own flags (--method {', '.join(baselines)})")
    for cls in dict.fromkeys(baselines.values()):
        add_config_arguments(group, cls, skip=tuple(seen))
        seen |= {f.name for f in dataclasses.fields(cls)}
    p.epilog = f"""\
methods (--method):
{TRAIN_METHODS}

examples:
  dualign train --run-dir runs/mine --model gpt2          MoCAN on scores.parquet + dual.json
  dualign train --method dpo --model gpt2 --preferences pairs.jsonl --run-dir runs/dpo

{CONFIG_RULE}"""


def _cmd_train(args: argparse.Namespace) -> int:
    from dualign.baselines.dispatch import CONFIGS, check_method, run_method
    from dualign.train import TrainConfig, train

    method = getattr(args, "method", None) or (load_yaml(args.config).get("method") if args.config else None)
    if method is not None:
        check_method(method)
    if method in CONFIGS:
        done = _run_stage(resolve_config(CONFIGS[method], args.config, args, exclude=("config",)), run_method)
        print(f"{method}: {done['gradient_steps']} gradient steps, {done['sampled_tokens']} sampled tokens, "
              f"{done['wall_s']:.1f} s, λ = {done['lambdas']}: {done['output_dir']}")
        return 0
    cfg = resolve_config(TrainConfig, args.config, args, exclude=("config",))
    summary = _run_stage(cfg, train)
    _say(f"trained {summary['step']} steps ({summary['pairs_per_second']:.1f} pairs/s): {summary['output_dir']}")
    return 0


COMMANDS.append(("train", "fine-tune π_ref towards π_λ* (MoCAN), or with PeCAN, DPO or a baseline: "
                 "<run_dir>/policy", _add_train, _cmd_train))


def _add_dual(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s SCORES --constraint COLUMN<=VALUE [--beta B] [--FLAG VALUE ...]"
    p.epilog = """\
examples:
  dualign dual scores.jsonl --beta 0.1 --reward reward --constraint 'cost<=ref-0.5' --bootstrap 200
  dualign dual runs/mine/scores.parquet --constraint 'cost<=ref-4' --constraint 'toxicity<=0.1' --json

The table gives, per constraint, λ* with its bootstrap CI, the threshold, π_ref's mean and the
predicted mean under π_λ*, and the predicted change with its CI; then the reward and the KL."""
    p.add_argument("scores", help="scores table (Parquet / JSONL / CSV, long format)")
    p.add_argument("--constraint", dest="constraints", action="append", default=argparse.SUPPRESS,
                   help="COLUMN<=VALUE (cost) or COLUMN>=VALUE (utility); VALUE absolute or "
                        "ref+X / ref-X (repeatable)")
    add_config_arguments(p, config_class("dualign.dual.stage", "DualConfig"), skip=("scores", "constraints"))
    p.add_argument("--config", help="YAML file of DualConfig keys (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object (dual.json layout)")
    p.add_argument("--output", help="also write the JSON to this file")


def _cmd_dual(args: argparse.Namespace) -> int:
    from dualign.data.records import to_json, write_dual
    from dualign.dual import DualConfig, format_report
    from dualign.dual.stage import solve_config
    from dualign.modeling import checks

    cfg = resolve_config(DualConfig, args.config, args, exclude=("config", "json", "output"))
    if args.output:
        checks.new_file(args.output, "--output")
    record = solve_config(cfg)
    if args.output:
        write_dual(record, args.output)
    print(json.dumps(to_json(record)) if args.json else format_report(record))
    return 0


COMMANDS.append(("dual", "solve for λ* on a scores table and predict the aligned policy's reward, "
                 "constraint values and KL", _add_dual, _cmd_dual))


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.epilog = """\
example:
  dualign plan runs/mine/scores.parquet --constraint 'cost<=ref-{0.5:6:12}' --beta-grid 0.05,0.1,0.2 --out plan/

Prints one row per point and writes plan.csv, plan.json and plan.png: the predicted reward
against the predicted constraint value (the trade-off), and λ* and the KL against the threshold."""
    p.add_argument("scores", help="scores table (Parquet / JSONL / CSV, long format)")
    p.add_argument("--constraint", dest="constraints", action="append", required=True,
                   help="one with a sweep, e.g. 'cost<=ref-{0.1:2.0:20}' (start:stop:count); "
                        "others fixed (repeatable)")
    p.add_argument("--out", required=True, help="output directory: plan.csv, plan.json, plan.png")
    p.add_argument("--beta", default="0.1", help="KL coefficient β (default 0.1)")
    p.add_argument("--beta-grid", help="comma-separated βs, one curve each (overrides --beta)")
    p.add_argument("--reward", default="reward", help="reward column")
    p.add_argument("--tilt", choices=("samples", "reachable"), default="samples",
                   help="samples: π_ref's samples reweighted by their scores (the paper's); reachable: the scores "
                        "π_ref's features predict (as `dualign dual --tilt reachable`; needs --model)")
    p.add_argument("--model", help="with --tilt reachable: π_ref (HF id or path) the samples were drawn from")
    p.add_argument("--revision", help="with --model: its revision")
    p.add_argument("--template", default="auto", help="with --model: the prompt template the samples were drawn with")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="with --model: allow code shipped with the model to run (off: such a model is refused)")
    p.add_argument("--device", default="auto", help="with --model: cuda, cpu, ... (auto: cuda if available)")
    p.add_argument("--ridge-alpha", type=float, default=1e-3,
                   help="with --tilt reachable: the ridge penalty α, a multiple of the mean diagonal of HᵀH")


def _cmd_plan(args: argparse.Namespace) -> int:
    import math

    from dualign._infra.errors import InputError
    from dualign._infra.io import read_json
    from dualign.modeling import checks
    from dualign.plan import OUTPUTS, format_plan, parse_beta_grid, run_plan

    betas = parse_beta_grid(args.beta_grid if args.beta_grid else args.beta)
    if not (math.isfinite(args.ridge_alpha) and args.ridge_alpha > 0):
        raise InputError(f"--ridge-alpha must be a positive finite number, got {args.ridge_alpha}")
    checks.writable_dir(args.out, "--out")
    for name in OUTPUTS:
        checks.new_file(f"{args.out}/{name}", "--out")
    features = None
    if args.tilt == "reachable":   # computed by the sweep once its inputs have passed their checks
        from functools import partial

        from dualign.dual.reachable import FEATURES, reference_features
        features = partial(reference_features, args.model, args.scores, Path(args.out) / FEATURES,
                           revision=args.revision, template=args.template, trust_remote_code=args.trust_remote_code,
                           device=args.device, reuse=Path(args.scores).parent / FEATURES)
    table = run_plan(args.scores, args.reward, args.constraints, betas, args.out, features, args.ridge_alpha)
    print(format_plan(table, read_json(Path(args.out) / "plan.json")))
    print("Files to open: " + ", ".join(str(Path(args.out) / name) for name in ("plan.png", "plan.csv", "plan.json")))
    return 0


COMMANDS.append(("plan", "before training: sweep a constraint's threshold (and β) and print the predicted "
                 "reward, λ* and KL of each; CSV, JSON and PNG", _add_plan, _cmd_plan))


def _add_compute(p: argparse.ArgumentParser) -> None:
    p.epilog = """\
examples:
  dualign compute --policy-params 7e9 --prompts 1000 --samples 128 --rl-iterations 1000
  dualign compute --policy meta-llama/Llama-2-7b-hf --response-tokens 512 --throughputs my_gpu.json --json

Prints, for MoCAN and for a primal-dual RL baseline (PPO-/GRPO-Lagrangian, critic-free) at the
stated budget, the FLOPs and GPU-hours of each stage and the peak memory of weights and optimizer
state. GPU-hours use an H100 at an assumed utilisation per stage unless --throughputs gives the
FLOP/s you measured (e.g. bench/gpu.sh's tokens/s × 2 × parameters)."""
    add_config_arguments(p, config_class("dualign.compare.compute_cost", "ComputePlanConfig"))
    p.add_argument("--config", help="YAML file of ComputePlanConfig keys (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_compute(args: argparse.Namespace) -> int:
    from dualign.compare.compute_cost import ComputePlanConfig, format_compute, plan_compute

    cfg = resolve_config(ComputePlanConfig, args.config, args, exclude=("config", "json"))
    plan = plan_compute(cfg)
    print(json.dumps(plan) if args.json else format_compute(plan, cfg))
    return 0


COMMANDS.append(("compute", "before starting: the FLOPs, GPU-hours and memory of each stage of a MoCAN run "
                 "and of a primal-dual RL baseline, from model sizes, lengths and sample counts",
                 _add_compute, _cmd_compute))


def _add_data(p: argparse.ArgumentParser) -> None:
    p.epilog = """\
examples:
  dualign data check PKU-Alignment/PKU-SafeRLHF --split train --fix clean.jsonl
  dualign data views clean.jsonl --out views/        views/helpful.jsonl, views/safe.jsonl for DPO"""
    sub = p.add_subparsers(dest="_data_command", metavar="ACTION")
    sub.required = True
    check = sub.add_parser("check", help="report label inconsistencies, duplicates, empty and identical "
                           "responses of a preference file (PKU-SafeRLHF or TRL schema)")
    views = sub.add_parser("views", help="write the helpfulness and safety views of a PKU-SafeRLHF file "
                           "as TRL prompt/chosen/rejected files: OUT/helpful.jsonl, OUT/safe.jsonl")
    for q in (check, views):
        q.add_argument("file", help="JSONL / Parquet / CSV file, saved datasets directory, or Hub dataset id")
        q.add_argument("--split", default="train", help="dataset split (saved or Hub datasets)")
        q.add_argument("--revision", help="Hub dataset revision pin")
    for q in (check, views):
        _add_verbose(q)
    check.add_argument("--fix", metavar="OUT", help="write the rows without issues to OUT "
                       "(a duplicate's first occurrence is kept)")
    views.add_argument("--out", required=True, help="output directory")


def _cmd_data(args: argparse.Namespace) -> int:
    from dualign._infra.io import write_table
    from dualign.data import preferences as prefs
    from dualign.modeling import checks

    if args._data_command == "views":
        checks.writable_dir(args.out, "--out")
        for name in prefs.VIEWS:
            checks.new_file(f"{args.out}/{name}.jsonl", "--out")
    elif args.fix:
        checks.new_file(args.fix, "--fix")
    table = prefs.read_preferences(args.file, args.split, args.revision)
    if args._data_command == "views":
        for name, view in prefs.preference_views(table, args.file).items():
            path = f"{args.out}/{name}.jsonl"
            write_table(view, path)
            print(f"{name}: {len(view)} pairs -> {path}")
        return 0
    issues = prefs.check_preferences(table)
    print(prefs.format_check(table, issues, args.file))
    if args.fix:
        fixed = prefs.fix_preferences(table, issues)
        write_table(fixed, args.fix)
        print(f"wrote {len(fixed)} of {len(table)} rows -> {args.fix}")
    return 0


COMMANDS.append(("data", "preference data: check (label consistency, duplicates; --fix) and views "
                 "(helpfulness / safety pairs for DPO)", _add_data, _cmd_data))


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    _stage_usage(p)
    p.add_argument("config", nargs="?", help="YAML file of the keys below (flags override it)")
    _add_scorer_flag(p)
    add_config_arguments(p, config_class("dualign.evaluate", "EvaluateConfig"), skip=("scorers",))
    p.epilog = f"""\
example:
  dualign evaluate --run-dir runs/mine --reference gpt2 --prompts heldout.jsonl \\
      --scorer reward=hf:my/reward-model --scorer cost=hf:my/cost-model,lower_is_better

Prints π_ref against the aligned policy on the same held-out prompts (each change with its paired
95% CI beside the dual's prediction), each constraint's verdict, and writes <run_dir>/eval/:
report.json, scores.png, predicted_vs_achieved.png.

{CONFIG_RULE}"""


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dualign.data.records import read_report
    from dualign.data.report_view import format_outputs, format_report
    from dualign.evaluate import EvaluateConfig, evaluate

    cfg = resolve_config(EvaluateConfig, args.config, args, exclude=("config",))
    path = _run_stage(cfg, evaluate)
    if os.environ.get("RANK", "0") == "0":  # under a launcher the main process reports, once
        print(format_report(read_report(path)))
        print(format_outputs(cfg.run_dir, cfg.policy))
    return 0


COMMANDS.append(("evaluate", "sample π_ref and the aligned policy on held-out prompts, score both, "
                 "report achieved vs predicted: <run_dir>/eval/", _add_evaluate, _cmd_evaluate))


def _add_run(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s CONFIG.yaml [--run-dir DIR] [--seed N] [--restart-from STAGE] [--STAGE.KEY VALUE ...]"
    p.epilog = """\
examples:
  dualign run my_run.yaml
  dualign run my_run.yaml --run-dir runs/lr1e-5 --train.learning-rate 1e-5 --sample.num-samples 16

A run config (docs/formats.md) has shared keys (run_dir, model, seed) and one section per stage;
`base: default` (or full, small, pecan) starts from a packaged config. Each stage's output is written
whole or not at all, so a killed run started again resumes where it stopped. At the end it
prints the result table and the files worth opening."""
    p.add_argument("config", help="run YAML: shared keys + one section per stage (see configs/); "
                   "`base: default` starts from a packaged config")
    p.add_argument("--restart-from", choices=source_constant("dualign.pipeline", "STAGES"),
                   help="delete this stage's outputs and later ones first")
    add_config_arguments(p, config_class("dualign.pipeline", "RunConfig"))


def _cmd_run(args: argparse.Namespace) -> int:
    from dualign.pipeline import load_run_values, resolve_run_config, run_pipeline

    values = merge(load_run_values(args.config), overrides_from_args(args, exclude=("config", "restart_from")))
    run_pipeline(resolve_run_config(values), restart_from=args.restart_from)
    return 0


COMMANDS.append(("run", "every stage (sample, score, dual, train, evaluate) from one YAML config into one run "
                 "directory; resumes where it stopped", _add_run, _cmd_run))


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.epilog = """\
examples:
  dualign demo                       MoCAN under cost <= ref-4 with β = 10, planned on the reachable
                                     tilt, 640 dual prompts (about 3 minutes with the world cached)
  dualign demo --size full           all 1024 dual prompts and the paper's K-sample tilt (the research
                                     tables, docs/results/demo.md)
  dualign demo --size small          a smoke run: the small world, every stage, a few minutes
  dualign demo --method pecan        PeCAN: the same world from its preference pairs alone
  dualign demo --recalibrate         then measure on calibration prompts, correct λ, fine-tune again
  dualign demo --pilot               first a pilot fine-tune on half the dual's prompts: the share of
                                     the plan it delivers on the other half, and a plan corrected for it
  dualign demo --confidence 0.95     plan λ with another margin: the evaluation's estimate meets the
                                     constraint with probability ≈ 0.95 (the default plans for 0.9;
                                     --confidence 0.5 plans on the point, about no margin)
  dualign demo --confidence 0.95 --confidently
                                     the same for its one-sided 95% bound: "met confidently"
  dualign demo --tilt samples        plan λ on π_ref's samples reweighted by their scores (the paper's)

The first run builds the world (π_ref, reward and cost models; minutes) into $DUALIGN_CACHE/worlds
and reuses it afterwards. The run ends with a table of π_ref against the aligned policy on held-out
prompts, the constraint's verdict, and the files worth opening: eval/report.json, eval/scores.png,
eval/predicted_vs_achieved.png and the aligned model in policy/."""
    p.add_argument("--run-dir", help="run directory (default runs/demo, or runs/demo-<method>-<size>)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and training (the world keeps its own)")
    p.add_argument("--size", choices=("default", "full", "small"), default="default",
                   help="default (the demo: 640 of the default world's 1024 dual prompts, the reachable "
                        "tilt), full (MoCAN only: all 1024 prompts and the paper's K-sample tilt) or small "
                        "(a smaller world and fewer prompts: a smoke run that checks everything works, "
                        "not a result)")
    p.add_argument("--method", choices=("mocan", "pecan"), default="mocan",
                   help="mocan (reward and cost models) or pecan (preference pairs only)")
    p.add_argument("--recalibrate", action="store_true",
                   help="add the recalibrate stage: measure the aligned policy on held-out calibration "
                        "prompts and correct λ while the constraint misses (at most 2 extra fine-tunes)")
    p.add_argument("--pilot", action=argparse.BooleanOptionalAction, default=None,
                   help="add (--pilot) or drop (--no-pilot) the pilot stage: before the fine-tune, a pilot "
                        "fine-tune on half the dual's prompts, its delivered share of the plan measured on the "
                        "other half's samples (no sampling), and λ planned for that share (off by default: on the "
                        "built-in world it spent 1.9x the KL and met no more often; docs/guides/pilot.md)")
    p.add_argument("--confidence", type=float,
                   help="plan λ with a margin, so that the held-out evaluation's estimate meets the constraint "
                        "with this probability, the fine-tune's own spread included (the default demo plans for "
                        "0.9; 0.5: about no margin, the point)")
    p.add_argument("--confidently", action="store_true",
                   help="with --confidence: the margin covers the evaluation's one-sided 95%% bound too, so "
                        "that it reports 'met confidently' with that probability (a larger margin)")
    p.add_argument("--tilt", choices=("samples", "reachable"), default=None,
                   help="the dual's tilt: samples (π_ref's samples reweighted by their scores, the paper's; "
                        "the default of every size but MoCAN's default) or reachable (the scores first "
                        "replaced by what π_ref's features predict of them: plans only on what a fine-tune "
                        "can target; the default demo's)")
    p.add_argument("--restart-from", choices=source_constant("dualign.pipeline", "STAGES"),
                   help="delete this stage's outputs and later ones first")


def _cmd_demo(args: argparse.Namespace) -> int:
    from dualign.pipeline import resolve_run_config, run_pipeline

    if args.confidently and args.confidence is None:
        raise ConfigError("--confidently needs --confidence (the probability that the bound meets the constraint)")
    values = demo_values(args.method, args.size, recalibrate=args.recalibrate, confidence=args.confidence,
                         tilt=args.tilt, run_dir=args.run_dir, seed=args.seed, confidently=args.confidently,
                         pilot=args.pilot)
    run_pipeline(resolve_run_config(values), restart_from=args.restart_from)
    return 0


def demo_values(method: str, size: str, *, recalibrate: bool = False, confidence: float | None = None,
                tilt: str | None = None, run_dir: str | None = None, seed: int = 0,
                confidently: bool = False, pilot: bool | None = None) -> dict:
    """The run values of ``dualign demo``: the packaged config of (method, size) with the flags'
    sections added, and a default run directory naming every flag that changed the run
    (runs/demo for the default demo)."""
    from dualign.dual.stage import DualConfig
    from dualign.pipeline import (
        DEFAULT_CONFIG,
        FULL_CONFIG,
        PECAN_CONFIG,
        PECAN_SMALL_CONFIG,
        RECALIBRATE_CONFIG,
        SMALL_CONFIG,
        load_run_values,
    )

    configs = {("mocan", "default"): DEFAULT_CONFIG, ("mocan", "full"): FULL_CONFIG, ("mocan", "small"): SMALL_CONFIG,
               ("pecan", "default"): PECAN_CONFIG, ("pecan", "small"): PECAN_SMALL_CONFIG}
    if (method, size) not in configs:
        raise ConfigError("--size full is MoCAN's full-size demo; PeCAN's default already uses all 1024 "
                          "dual prompts: drop --size full")
    values = load_run_values(configs[method, size])
    default_dir = "runs/demo" if (method, size) == ("mocan", "default") else f"runs/demo-{method}-{size}"
    if recalibrate:
        values["recalibrate"] = load_run_values(RECALIBRATE_CONFIG)["recalibrate"]
        default_dir += "-recalibrate"
    if pilot is not None and pilot != ("pilot" in values):
        values = ({**values, "pilot": values.get("pilot") or {}} if pilot
                  else {k: v for k, v in values.items() if k != "pilot"})
        default_dir += "-pilot" if pilot else "-no-pilot"
    if confidence is not None:
        if confidence != values["dual"].get("confidence") or confidently:
            default_dir += f"-confidence{confidence:g}"
        values["dual"] = {**values["dual"], "confidence": confidence}
        if confidently:
            values["dual"]["evaluation_bound"] = 0.95
            default_dir += "-confidently"
    if tilt is not None and tilt != values["dual"].get("tilt", DualConfig.__dataclass_fields__["tilt"].default):
        # the config's KL calibration was measured on its own tilt's fine-tunes: not this one's
        values["dual"] = {k: v for k, v in values["dual"].items() if k != "kl_delivery"}
        values["dual"]["tilt"] = tilt
        default_dir += f"-{tilt}"
    values.update(run_dir=run_dir or default_dir, seed=seed)
    return values


COMMANDS.append(("demo", "start here: MoCAN (or PeCAN) end to end on the built-in synthetic safety world, "
                 "ending in a before/after table", _add_demo, _cmd_demo))


def _add_world(p: argparse.ArgumentParser) -> None:
    p.epilog = """\
examples:
  dualign world build --size small    build (or find in $DUALIGN_CACHE/worlds) and print its summary
  dualign world info ~/.cache/dualign/worlds/world-<hash>

The world: templated benign and harmful requests, a tiny GPT-2 π_ref trained to be helpful but
unsafe, reward and cost models, and a gold judge that reads behaviour back from the text."""
    presets = source_constant("dualign.world.config", "PRESETS")
    sub = p.add_subparsers(dest="_world_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser("build", help="build the world (or find it in the cache) and print where it is")
    build.add_argument("config", nargs="?", help="YAML file of WorldConfig keys (flags override it)")
    build.add_argument("--size", choices=list(presets), default="default", help="size preset (default: default)")
    build.add_argument("--out", help="world directory (default: $DUALIGN_CACHE/worlds/world-<config hash>)")
    add_config_arguments(build, config_class("dualign.world.config", "WorldConfig"))
    info = sub.add_parser("info", help="print the summary of a built world directory")
    info.add_argument("dir", help="world directory")
    for q in (build, info):
        _add_verbose(q)


def _world_summary(path, info: dict) -> str:
    ref, sc, t = info["ref_model"], info["scorers"], info["timing_s"]
    return "\n".join([
        f"world: {path}",
        "  prompts: " + ", ".join(f"{k.removeprefix('prompts_')} {v}" for k, v in info["sizes"].items()
                                  if k.startswith("prompts_")) + f"; preference pairs {info['sizes']['preferences_train']}",
        f"  π_ref: harmful-compliance rate {ref['harmful_compliance_rate']:.2f}, benign helpfulness "
        f"{ref['benign_helpfulness']:.2f}, benign harmful rate {ref['benign_harmful_rate']:.2f} "
        f"({ref['n_samples']} samples judged)",
        f"  reward model: held-out accuracy {sc['reward']['heldout_accuracy_gold']:.3f} (gold) / "
        f"{sc['reward']['heldout_accuracy_labels']:.3f} (noisy labels)",
        f"  cost model:   held-out accuracy {sc['cost']['heldout_accuracy_gold']:.3f} (gold) / "
        f"{sc['cost']['heldout_accuracy_labels']:.3f} (noisy labels), sign accuracy "
        f"{sc['cost']['heldout_sign_accuracy']:.3f}",
        f"  built in {t.get('build_wall', t['total_wall'])} s ({t['threads']} threads)"])


def _cmd_world(args: argparse.Namespace) -> int:
    from dualign.world import build_world, load_world_info, world_config

    if args._world_command == "info":
        print(_world_summary(args.dir, load_world_info(args.dir)))
        return 0
    values = load_yaml(args.config) if args.config else {}
    values.update(overrides_from_args(args, exclude=("config", "size", "out", "_world_command")))
    path = build_world(world_config(args.size, values), out_dir=args.out)
    print(_world_summary(path, load_world_info(path)))
    return 0


COMMANDS.append(("world", "the built-in synthetic safety world: build it (cached; prints where it is) or "
                 "summarise a built one", _add_world, _cmd_world))


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.epilog = """\
example:
  dualign compare src/dualign/configs/compare_world.yaml --seed 0 --seed 1 --seed 2"""
    p.add_argument("config", help="run YAML (as for `dualign run`) plus a `compare` section: methods, seeds, "
                   "fixed_lambdas, dual_ascent, ppo_lagrangian")
    p.add_argument("--run-dir", help="comparison directory (overrides the config's run_dir)")
    p.add_argument("--seed", dest="seeds", type=int, action="append", help="training/evaluation seed (repeatable)")
    p.add_argument("--method", dest="methods", action="append", help="method to run (repeatable)")


def _cmd_compare(args: argparse.Namespace) -> int:
    from dualign.compare.comparison import load_compare_config, run_compare

    compare = {k: v for k, v in (("seeds", args.seeds), ("methods", args.methods)) if v}
    overrides = {"run_dir": args.run_dir} if args.run_dir else {}
    if compare:
        overrides["compare"] = compare
    run_compare(*load_compare_config(args.config, overrides))
    return 0


COMMANDS.append(("compare", "MoCAN (one shot, recalibrated, on the reachable tilt) against the baselines (ppo-/grpo-lagrangian, dual-ascent, fixed-lambda, "
                 "reward-/cost-only-mocan, dpo-helpful, dpo-safe, safedpo) on the same data and seeds: table, "
                 "plots, compute-to-target curves", _add_compare, _cmd_compare))

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    if not args._verbose:
        quiet_third_party()
    try:
        return int(args._run(args) or 0)
    except DualignError as e:
        print(f"dualign: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

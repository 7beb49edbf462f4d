"""The ``dualign`` command line. Thin: parses flags, calls the stage functions, prints.

Each subcommand is one ``_add_<name>`` (flags) + one ``_cmd_<name>`` (action) pair, listed in
``COMMANDS``. Any :class:`DualignError` becomes one line on stderr and exit code 2.

The stage modules are imported inside the subcommand that uses them: they pull numpy, pandas and
torch (seconds), which ``dualign --help`` and the other subcommands should not pay for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from dualign import __version__
from dualign.config import (
    add_config_arguments,
    load_yaml,
    merge,
    overrides_from_args,
    resolve_config,
)
from dualign.errors import DualignError

# (name, help, add_arguments, run) — filled in below, one entry per subcommand.
COMMANDS: list[tuple[str, str, object, object]] = []


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s flags are built (each stage's import costs seconds)."""
    parser = argparse.ArgumentParser(prog="dualign", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dualign {__version__}")
    sub = parser.add_subparsers(dest="_command", metavar="COMMAND")
    sub.required = True
    for name, help_, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        if command is None or name == command:
            add(p)
        p.set_defaults(_run=run)
    return parser


def _run_stage(cfg, run):
    """A stage command: check its inputs and outputs, then run it holding its run directory's lock
    (under accelerate/torchrun the main process holds it for all)."""
    from dualign import checks
    from dualign.lock import run_lock

    checks.stage_inputs(cfg, cfg.run_dir)
    if cfg.run_dir is None or os.environ.get("RANK", "0") != "0":
        return run(cfg)  # without a run directory the stage says so itself
    with run_lock(cfg.run_dir):
        return run(cfg)


def _add_scorer_flag(p: argparse.ArgumentParser) -> None:
    """``--scorer`` (alias ``--scorers``), repeatable, filling the config's ``scorers`` list."""
    p.add_argument("--scorer", "--scorers", dest="scorers", action="append", default=argparse.SUPPRESS,
                   help="NAME=KIND:TARGET[,higher_is_better|,lower_is_better], KIND in hf, beaver, "
                        "callable, implicit (implicit:PATH[,beta=B]) (repeatable)")


def _add_sample(p: argparse.ArgumentParser) -> None:
    from dualign.sample import SampleConfig

    p.add_argument("config", nargs="?", help="YAML file of SampleConfig keys (flags override it)")
    add_config_arguments(p, SampleConfig)


def _cmd_sample(args: argparse.Namespace) -> int:
    from dualign.sample import SampleConfig, sample

    cfg = resolve_config(SampleConfig, args.config, args, exclude=("config",))
    print(_run_stage(cfg, sample))
    return 0


COMMANDS.append(("sample", "draw K responses per prompt from π_ref into <run_dir>/samples.parquet",
                 _add_sample, _cmd_sample))


def _add_score(p: argparse.ArgumentParser) -> None:
    from dualign.score import ScoreConfig

    p.add_argument("config", nargs="?", help="YAML file of ScoreConfig keys (flags override it)")
    _add_scorer_flag(p)
    add_config_arguments(p, ScoreConfig, skip=("scorers",))


def _cmd_score(args: argparse.Namespace) -> int:
    from dualign.score import ScoreConfig, score

    cfg = resolve_config(ScoreConfig, args.config, args, exclude=("config",))
    print(_run_stage(cfg, score))
    return 0


COMMANDS.append(("score", "add one column per scorer: <run_dir>/scores.parquet", _add_score, _cmd_score))


def _add_train(p: argparse.ArgumentParser) -> None:
    from dualign.methods.dispatch import add_baseline_arguments
    from dualign.train import TrainConfig

    p.add_argument("config", nargs="?", help="YAML file of TrainConfig keys (flags override it)")
    add_config_arguments(p, TrainConfig)
    add_baseline_arguments(p)


def _cmd_train(args: argparse.Namespace) -> int:
    from dualign.methods.dispatch import CONFIGS, check_method, run_method
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
    print(f"trained {summary['step']} steps ({summary['pairs_per_second']:.1f} pairs/s): {summary['output_dir']}")
    return 0


COMMANDS.append(("train", "train the policy on pairs with MoCAN or DPO: <run_dir>/policy",
                 _add_train, _cmd_train))


def _add_dual(p: argparse.ArgumentParser) -> None:
    from dualign.dual import DualConfig

    p.add_argument("scores", help="scores table (Parquet / JSONL / CSV, long format)")
    p.add_argument("--constraint", dest="constraints", action="append", default=argparse.SUPPRESS,
                   help="COLUMN<=VALUE (cost) or COLUMN>=VALUE (utility); VALUE absolute or "
                        "ref+X / ref-X (repeatable)")
    add_config_arguments(p, DualConfig, skip=("scores", "constraints"))
    p.add_argument("--config", help="YAML file of DualConfig keys (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object (dual.json layout)")
    p.add_argument("--output", help="also write the JSON to this file")


def _cmd_dual(args: argparse.Namespace) -> int:
    from dualign import checks
    from dualign.constraints import parse_constraint
    from dualign.data.scores import read_scores
    from dualign.dual import DualConfig, format_report, require_converged, solve_constraints
    from dualign.records import to_json, write_dual

    cfg = resolve_config(DualConfig, args.config, args, exclude=("config", "json", "output"))
    if args.output:
        checks.new_file(args.output, "--output")
    constraints = [parse_constraint(c) for c in cfg.constraints]
    scores = read_scores(cfg.scores, [cfg.reward] + [c.column for c in constraints])
    record = solve_constraints(scores, cfg.beta, cfg.reward, constraints, bootstrap=cfg.bootstrap,
                               confidence=cfg.confidence,
                               seed=cfg.seed)
    require_converged(record, cfg.allow_unconverged)
    if args.output:
        write_dual(record, args.output)
    print(json.dumps(to_json(record)) if args.json else format_report(record))
    return 0


COMMANDS.append(("dual", "solve for λ* and predict reward, constraint values and KL of π_λ*",
                 _add_dual, _cmd_dual))


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("scores", help="scores table (Parquet / JSONL / CSV, long format)")
    p.add_argument("--constraint", dest="constraints", action="append", required=True,
                   help="one with a sweep, e.g. 'cost<=ref-{0.1:2.0:20}' (start:stop:count); "
                        "others fixed (repeatable)")
    p.add_argument("--out", required=True, help="output directory: plan.csv, plan.json, plan.png")
    p.add_argument("--beta", default="0.1", help="KL coefficient β (default 0.1)")
    p.add_argument("--beta-grid", help="comma-separated βs, one curve each (overrides --beta)")
    p.add_argument("--reward", default="reward", help="reward column")


def _cmd_plan(args: argparse.Namespace) -> int:
    from dualign import checks
    from dualign.plan import OUTPUTS, parse_beta_grid, run_plan

    betas = parse_beta_grid(args.beta_grid if args.beta_grid else args.beta)
    checks.writable_dir(args.out, "--out")
    for name in OUTPUTS:
        checks.new_file(f"{args.out}/{name}", "--out")
    table = run_plan(args.scores, args.reward, args.constraints, betas, args.out)
    feasible = int(table["feasible"].sum())
    print(f"plan: {len(table)} points ({feasible} feasible, {len(table) - feasible} infeasible) "
          f"-> {args.out}/plan.csv, plan.json, plan.png")
    return 0


COMMANDS.append(("plan", "sweep a constraint threshold (and β): predicted reward, cost, λ*, KL; "
                 "CSV, JSON and PNG", _add_plan, _cmd_plan))


def _add_data(p: argparse.ArgumentParser) -> None:
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
    check.add_argument("--fix", metavar="OUT", help="write the rows without issues to OUT "
                       "(a duplicate's first occurrence is kept)")
    views.add_argument("--out", required=True, help="output directory")


def _cmd_data(args: argparse.Namespace) -> int:
    from dualign import checks
    from dualign.data import preferences as prefs
    from dualign.io import write_table

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
    from dualign.evaluate import EvaluateConfig

    p.add_argument("config", nargs="?", help="YAML file of EvaluateConfig keys (flags override it)")
    _add_scorer_flag(p)
    add_config_arguments(p, EvaluateConfig, skip=("scorers",))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dualign.evaluate import EvaluateConfig, evaluate, format_report
    from dualign.records import read_report

    cfg = resolve_config(EvaluateConfig, args.config, args, exclude=("config",))
    path = _run_stage(cfg, evaluate)
    print(format_report(read_report(path)))
    print(f"report: {path}")
    return 0


COMMANDS.append(("evaluate", "sample the trained policy and π_ref on held-out prompts, score both, "
                 "report achieved vs predicted: <run_dir>/eval/", _add_evaluate, _cmd_evaluate))


def _add_run(p: argparse.ArgumentParser) -> None:
    from dualign.pipeline import STAGES, RunConfig

    p.add_argument("config", help="run YAML: shared keys + one section per stage (see configs/); "
                   "`base: default` starts from a packaged config")
    p.add_argument("--restart-from", choices=STAGES, help="delete this stage's outputs and later ones first")
    add_config_arguments(p, RunConfig)


def _cmd_run(args: argparse.Namespace) -> int:
    from dualign.pipeline import load_run_values, resolve_run_config, run_pipeline

    values = merge(load_run_values(args.config), overrides_from_args(args, exclude=("config", "restart_from")))
    run_pipeline(resolve_run_config(values), restart_from=args.restart_from)
    return 0


COMMANDS.append(("run", "all stages (sample, score, dual, train, evaluate) into one run directory; "
                 "resumes where it stopped", _add_run, _cmd_run))


def _add_demo(p: argparse.ArgumentParser) -> None:
    from dualign.pipeline import STAGES

    p.add_argument("--run-dir", help="run directory (default runs/demo, or runs/demo-<method>-<size>)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and training (the world keeps its own)")
    p.add_argument("--size", choices=("default", "small"), default="default",
                   help="world size: default (the demo) or small (a one-minute smoke run)")
    p.add_argument("--method", choices=("mocan", "pecan"), default="mocan",
                   help="mocan (reward and cost models) or pecan (preference pairs only)")
    p.add_argument("--recalibrate", action="store_true",
                   help="add the recalibrate stage: measure the aligned policy on held-out calibration "
                        "prompts and correct λ while the constraint misses (at most 2 extra fine-tunes)")
    p.add_argument("--confidence", type=float,
                   help="plan λ so that the constraint holds at this one-sided confidence bound (e.g. 0.95)")
    p.add_argument("--restart-from", choices=STAGES, help="delete this stage's outputs and later ones first")


def _cmd_demo(args: argparse.Namespace) -> int:
    from dualign.pipeline import (
        DEFAULT_CONFIG,
        PECAN_CONFIG,
        PECAN_SMALL_CONFIG,
        RECALIBRATE_CONFIG,
        SMALL_CONFIG,
        load_run_values,
        resolve_run_config,
        run_pipeline,
    )

    configs = {("mocan", "default"): DEFAULT_CONFIG, ("mocan", "small"): SMALL_CONFIG,
               ("pecan", "default"): PECAN_CONFIG, ("pecan", "small"): PECAN_SMALL_CONFIG}
    values = load_run_values(configs[args.method, args.size])
    default_dir = "runs/demo" if (args.method, args.size) == ("mocan", "default") else \
        f"runs/demo-{args.method}-{args.size}"
    if args.recalibrate:
        values["recalibrate"] = load_run_values(RECALIBRATE_CONFIG)["recalibrate"]
        default_dir += "-recalibrate"
    if args.confidence is not None:
        values["dual"] = {**values["dual"], "confidence": args.confidence}
        default_dir += f"-confidence{args.confidence:g}"
    values.update(run_dir=args.run_dir or default_dir, seed=args.seed)
    run_pipeline(resolve_run_config(values), restart_from=args.restart_from)
    return 0


COMMANDS.append(("demo", "MoCAN end to end on the built-in synthetic safety world (same as "
                 "`dualign run` with the packaged default config)", _add_demo, _cmd_demo))


def _add_world(p: argparse.ArgumentParser) -> None:
    from dualign.world import PRESETS, WorldConfig

    sub = p.add_subparsers(dest="_world_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser("build", help="build the world (or find it in the cache) and print where it is")
    build.add_argument("config", nargs="?", help="YAML file of WorldConfig keys (flags override it)")
    build.add_argument("--size", choices=list(PRESETS), default="default", help="size preset (default: default)")
    build.add_argument("--out", help="world directory (default: $DUALIGN_CACHE/worlds/world-<config hash>)")
    add_config_arguments(build, WorldConfig)
    info = sub.add_parser("info", help="print the summary of a built world directory")
    info.add_argument("dir", help="world directory")


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


COMMANDS.append(("world", "the built-in synthetic safety world: build (cached; prints where it is) "
                 "and info", _add_world, _cmd_world))


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run YAML (as for `dualign run`) plus a `compare` section: methods, seeds, "
                   "fixed_lambdas, dual_ascent, ppo_lagrangian")
    p.add_argument("--run-dir", help="comparison directory (overrides the config's run_dir)")
    p.add_argument("--seed", dest="seeds", type=int, action="append", help="training/evaluation seed (repeatable)")
    p.add_argument("--method", dest="methods", action="append", help="method to run (repeatable)")


def _cmd_compare(args: argparse.Namespace) -> int:
    from dualign.compare import load_compare_config, run_compare

    compare = {k: v for k, v in (("seeds", args.seeds), ("methods", args.methods)) if v}
    overrides = {"run_dir": args.run_dir} if args.run_dir else {}
    if compare:
        overrides["compare"] = compare
    run_compare(*load_compare_config(args.config, overrides))
    return 0


COMMANDS.append(("compare", "MoCAN against the baselines (ppo-/grpo-lagrangian, dual-ascent, fixed-lambda, "
                 "reward-/cost-only-mocan, dpo-helpful, dpo-safe, safedpo) on the same data and seeds: table, "
                 "plots, compute-to-target curves", _add_compare, _cmd_compare))

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # third-party warnings are noise on the command line (and would break one-line errors):
    # TRANSFORMERS_VERBOSITY=warning and python -W default bring them back
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", module=r"(torch|transformers|accelerate|peft|datasets)(\.|$)")
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
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

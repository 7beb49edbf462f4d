"""Rates over world builds: does the default demo's plan hold on any build? (issue #26)

A world build is the unit of evidence. For each build seed (chosen before looking at any result)
and each training seed, this script builds the world (``world: {size: default, seed: S}``), runs
the default demo (``dualign demo``), the same with ``--confidence 0.95 --confidently`` (and the
other variants named, e.g. ``absolute``: the fine-tune's ``label: absolute``) and with ``--tilt
samples`` (the paper's K-sample tilt, the baseline), and judges every run on **fresh evaluation
prompts**: as many as the demo's own evaluation holds, drawn from the build's own seed on a stream
of their own (``--stream``; :func:`dualign.world.corpus.fresh_prompts`), none of them in any of the
build's splits or its held-out set, nor in the default build's (seed 0's) dual, evaluation and
calibration prompts (the sets the defaults were chosen on), nor in any file ``--exclude-prompts``
names (sets a setting was chosen on since). The variants of a build and seed share the default's
samples and scores (the same stages, drawn identically). It then counts, per variant, over builds ×
seeds:

- met: the point estimate meets every constraint;
- met confidently: the one-sided 95% bound does;
- KL within 1.25×: achieved KL / predicted KL of what is trained lies in [1/1.25, 1.25];
- reward prediction in CI: the predicted reward change lies inside the achieved change's 95% CI;
- helpfulness within 0.05: the gold judge's benign helpfulness of the aligned policy is within
  0.05 of π_ref's (on the same fresh prompts);

and what each margin costs (that variant minus the default, achieved KL and reward change, means
over the same builds and seeds). Writes ``<out>/build_rates.md`` (the table) and
``<out>/report.json`` (every run's row and the rates); each run resumes where it stopped.

    python scripts/build_rates.py --builds 111 112 113 114 115 --out runs/build_rates
    python scripts/build_rates.py --smoke --builds 0 --train-seeds 0 --out runs/build_rates_smoke   # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

from dualign._infra.io import read_json, read_table, write_json
from dualign.cli import demo_values
from dualign.data.prompts import load_prompts
from dualign.data.records import delivery_calibration, read_dual
from dualign.dual.formulas import extrapolated_kl
from dualign.pipeline import resolve_run_config, run_pipeline
from dualign.world.config import world_config
from dualign.world.corpus import fresh_prompts, heldout_prompts, make_prompts

VARIANTS = {"default": {}, "no margin": {"confidence": 0.5}, "confidence 0.9": {"confidence": 0.9},
            "confidence 0.95": {"confidence": 0.95},
            "confidence 0.95 confidently": {"confidence": 0.95, "confidently": True},
            "tilt samples": {"tilt": "samples"},
            "absolute": {"train": {"label": "absolute"}}, "pilot": {"pilot": True}, "no pilot": {"pilot": False}}
# A variant's keys are `dualign demo`'s flags (demo_values), except "train": keys of the train section.
CRITERIA = ("met", "met confidently", "KL within 1.25×", "reward prediction in CI", "helpfulness within 0.05")
# the same comparisons against each distribution a prediction could be drawn from
AGAINST = tuple(f"{k} ({name})" for name in ("target", "plan", "K samples")
                for k in ("KL within 1.25×", "reward prediction in CI", "constraints' predictions in CI"))


def fresh_eval_file(seed: int, size: str, n: int, out: Path, stream: str = "fresh-judge",
                    exclude_files: tuple[str, ...] = ()) -> Path:
    """The build's fresh evaluation prompts (see the module docstring) as a JSONL file: ``n``
    prompts of ``stream``, none in the build's splits or held-out set, in seed 0's tuned sets, or in
    the files of ``exclude_files`` (patterns; ``{build}`` becomes the build seed)."""
    build = world_config(size, {"seed": seed})
    splits = make_prompts(build)
    exclude = {row["prompt"] for rows in splits.values() for row in rows}
    exclude |= {row["prompt"] for row in heldout_prompts(build, splits)}
    tuned = make_prompts(world_config(size))
    exclude |= {row["prompt"] for split in ("dual", "eval", "calibration") for row in tuned[split]}
    for pattern in exclude_files:
        exclude |= set(load_prompts(pattern.format(build=seed))["prompt"])
    path = out / f"{stream}-{size}-{seed}.jsonl"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")   # two processes (one per training seed) may race here
        tmp.write_text("".join(json.dumps(r) + "\n" for r in fresh_prompts(build, n, exclude, stream)))
        os.replace(tmp, path)
    return path


def run_dir_of(out: Path, seed: int, variant: str, train_seed: int) -> Path:
    return out / f"build{seed}-{variant.replace(' ', '-')}-seed{train_seed}"


def share_samples(source: Path, run_dir: Path) -> None:
    """Copy a finished run's sample and score stages (files and records) into another variant's run
    directory, so that its pipeline starts at the dual: the stages are a function of the build and
    the seed, and the variants differ from the dual on. Nothing is copied over what is there."""
    if not ((source / "sample.done").exists() and (source / "score.done").exists()):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        stage = path.name.split(".")[0]
        if stage in ("sample", "score", "samples", "scores") and not (run_dir / path.name).exists():
            shutil.copyfile(path, run_dir / path.name)


def variant_values(variant: str, size: str, run_dir: str, train_seed: int) -> dict:
    """The demo's run values with ``variant``'s flags (:data:`VARIANTS`), its "train" keys merged
    into the train section."""
    flags = dict(VARIANTS[variant])
    train = flags.pop("train", {})
    values = demo_values("mocan", size, run_dir=run_dir, seed=train_seed, **flags)
    values["train"] = {**values["train"], **train}
    return values


def run_values(seed: int, train_seed: int, variant: str, out: Path, smoke: bool, stream: str = "fresh-judge",
               exclude_files: tuple[str, ...] = ()) -> dict:
    """The run values of one demo run on build ``seed``, judged on the build's fresh prompts (as
    many as the demo's own evaluation holds)."""
    size = "small" if smoke else "default"
    values = variant_values(variant, size, str(run_dir_of(out, seed, variant, train_seed)), train_seed)
    if smoke and variant != "tilt samples":
        values["dual"] = {**values["dual"], "tilt": "reachable"}   # the small demo plans on samples otherwise
    if smoke:
        values["train"] = {**values["train"], "num_epochs": 1}
    values["world"] = {**values.get("world", {}), "size": size, "seed": seed}
    demo_eval = resolve_run_config(values).evaluate
    n_eval = len(load_prompts(demo_eval.prompts, prompt_column=demo_eval.prompt_column, split=demo_eval.split,
                              max_prompts=demo_eval.max_prompts))
    path = fresh_eval_file(seed, size, n_eval, out, stream, exclude_files)
    values["evaluate"] = {**values["evaluate"], "prompts": str(path.resolve())}
    return values


def _inside(value, ci) -> bool:
    return value is not None and ci is not None and ci[0] <= value <= ci[1]


def predictions(report: dict) -> dict:
    """The three predictions a run can be judged against, as changes over π_ref (reward column,
    constraint columns, "kl"): "delivered" (what the report predicts: on the reachable tilt the
    plan's means, less the fit's bias where the run's dual.json has it, and the trained target's KL), "target" (what the fine-tune trains towards) and
    "plan" (what λ* was chosen on). Reads reports of either release: 0.1's ("prediction": "target")
    kept the plan as ``planned_*``; the K-sample tilt's plan is its target."""
    pr, kl, cons = report["predicted_reward"], report["kl"], report["constraints"]
    mode = report.get("prediction", "plan")
    means = {report["reward"]: pr, **{c["column"]: c for c in cons}}
    if mode == "plan":
        one = {k: v["predicted_change"] for k, v in means.items()} | {"kl": kl["predicted"]}
        return {"delivered": one, "target": one, "plan": one}
    plan = {k: v["planned_change"] for k, v in means.items()} | {"kl": kl["planned"]}
    if mode == "target":
        target = {k: v["predicted_change"] for k, v in means.items()} | {"kl": kl["predicted"]}
        return {"delivered": {**plan, "kl": target["kl"]}, "target": target, "plan": plan}
    target = {k: v["target_change"] for k, v in means.items()} | {"kl": kl["predicted"]}
    # the report's own prediction: the plan's means less the fit's bias (where dual.json has it)
    delivered = {k: v["predicted_change"] for k, v in means.items()} | {"kl": kl["predicted"]}
    return {"delivered": delivered, "target": target, "plan": plan}


def kl_past_k(run_dir: Path) -> float | None:
    """The KL of what the run trained towards (the original scores at its λ*) extrapolated past its
    K samples (:func:`dualign.dual.formulas.extrapolated_kl`), from its dual.json and scores: what
    this release's report predicts, for a run whose report an earlier release wrote."""
    dual = read_dual(run_dir / "dual.json")
    scores = read_table(run_dir / "scores.parquet")
    g = np.stack([c.sign * scores[c.column].to_numpy(np.float64) for c in dual.parsed], axis=1)
    out = extrapolated_kl(scores["prompt_id"].to_numpy(), scores[dual.reward].to_numpy(np.float64), g,
                          np.array([dual.lambdas[n] for n in dual.names]), dual.beta)
    return None if out is None else out[2]


def past_k(preds: dict, report: dict, run_dir: Path) -> dict:
    """The predictions with the KL of what is trained past its K samples as "delivered" (what this
    release's report predicts: its ``kl.samples`` set; an earlier report's computed from the run's
    files) and the K-sample KL beside it as "K samples"."""
    samples = report["kl"].get("samples")
    if samples is not None:
        return {**preds, "K samples": {**preds["delivered"], "kl": samples}}
    past = kl_past_k(run_dir) if (run_dir / "scores.parquet").exists() else None
    if past is None:
        return preds
    return {**preds, "delivered": {**preds["delivered"], "kl": past}, "K samples": preds["delivered"]}


def calibrate_kl(preds: dict, report: dict, kl_delivery: tuple[float, float] | None) -> dict:
    """The delivered KL × exp(a + b·log KL_K) (``kl_delivery`` = (a, b), KL_K the report's
    ``kl.samples``), as the dual's ``kl_delivery`` makes it, for a run whose dual had none (a report
    that has one already is left as it is)."""
    samples = report["kl"].get("samples")
    if kl_delivery is None or report.get("delivery") or not samples:
        return preds
    factor = delivery_calibration(samples, kl_delivery).kl_factor
    return {**preds, "delivered": {**preds["delivered"], "kl": preds["delivered"]["kl"] * factor}}


def outcome(report: dict, run_dir: Path, kl_delivery: tuple[float, float] | None = None) -> dict:
    """One run's row: the verdicts and the criteria against the delivered prediction (what the
    report predicts; with ``kl_delivery``, its KL calibrated so, :func:`calibrate_kl`), the same
    comparisons against the trained target and the plan, and the figures behind them."""
    constraints = report["constraints"]
    kl = report["kl"]
    pr = report["predicted_reward"]
    rc = report["reward"]
    preds = calibrate_kl(past_k(predictions(report), report, run_dir), report, kl_delivery)
    row = {"met": all(c["met"] for c in constraints),
           "met confidently": all(bool(c["met_confidently"]) for c in constraints),
           "KL achieved": kl["achieved"], "reward change achieved": pr["achieved_change"],
           "prediction": report.get("prediction", "plan")}
    for name, p in preds.items():
        ratio = kl["achieved"] / p["kl"] if p["kl"] else float("nan")
        suffix = "" if name == "delivered" else f" ({name})"
        row |= {f"KL within 1.25×{suffix}": bool(1 / 1.25 <= ratio <= 1.25),
                f"reward prediction in CI{suffix}": _inside(p[rc], pr["achieved_change_ci95"]),
                f"constraints' predictions in CI{suffix}": all(_inside(p[c["column"]], c["achieved_change_ci95"])
                                                               for c in constraints),
                f"KL predicted{suffix}": p["kl"], f"KL ratio{suffix}": ratio,
                f"reward change predicted{suffix}": p[rc]}
        for c in constraints:
            row[f"Δ{c['column']} predicted{suffix}"] = p[c["column"]]
    for c in constraints:
        row[f"Δ{c['column']} achieved"] = c["achieved_change"]
    judge = report.get("judge")
    if judge:
        ref = judge["reference"]["harmful=False"]["judge_helpful"]["mean"]
        pol = judge["policy"]["harmful=False"]["judge_helpful"]["mean"]
        row |= {"benign helpfulness π_ref": ref, "benign helpfulness aligned": pol,
                "helpfulness within 0.05": bool(abs(pol - ref) <= 0.05)}
    dual = read_json(run_dir / "dual.json")
    if dual.get("confidence"):
        plain = dual["confidence"]["plain_predicted"]
        row |= {"margin: planned KL added": dual["predicted"]["kl"] - plain["kl"],
                "margin: planned reward cost": plain[dual["reward"]] - dual["predicted"][dual["reward"]]}
    return row


def rates(rows: list[dict]) -> dict:
    """Per variant: each criterion as [n met, N runs], and the margin's achieved cost."""
    out: dict = {}
    for variant in VARIANTS:
        runs = [r for r in rows if r["variant"] == variant]
        if runs:
            out[variant] = {k: [sum(bool(r.get(k)) for r in runs), len(runs)]
                            for k in (*CRITERIA, "constraints' predictions in CI", *AGAINST)}
    for level in [v for v in VARIANTS if v.startswith("confidence") or v == "no margin"]:
        pairs = [(c, d) for c in rows if c["variant"] == level for d in rows
                 if d["variant"] == "default" and (d["build"], d["train seed"]) == (c["build"], c["train seed"])]
        if pairs:
            out[f"margin cost ({level} − default, achieved, mean)"] = {
                "KL": sum(c["KL achieved"] - d["KL achieved"] for c, d in pairs) / len(pairs),
                "reward change": sum(c["reward change achieved"] - d["reward change achieved"]
                                     for c, d in pairs) / len(pairs)}
    return out


def markdown(table: dict, builds: list[int], seeds: list[int]) -> str:
    """The rates table, the same comparisons against the trained target and against the plan, and
    what each margin costs."""
    cols = (*CRITERIA, "constraints' predictions in CI")
    lines = [f"Builds {', '.join(map(str, builds))} × training seeds {', '.join(map(str, seeds))}, judged on "
             "fresh evaluation prompts (scripts/build_rates.py).", "",
             "| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for variant, counts in table.items():
        if variant in VARIANTS:
            lines.append(f"| {variant} | " + " | ".join(f"{counts[k][0]} of {counts[k][1]}" for k in cols) + " |")
    lines += ["", "The same comparisons against each distribution a prediction could be drawn from:", "",
              "| variant | " + " | ".join(AGAINST) + " |", "|---|" + "---|" * len(AGAINST)]
    for variant, counts in table.items():
        if variant in VARIANTS:
            lines.append(f"| {variant} | " + " | ".join(f"{counts[k][0]} of {counts[k][1]}" for k in AGAINST) + " |")
    for key, cost in table.items():
        if key.startswith("margin cost"):
            level = key[len("margin cost ("):].split(" − ")[0]
            what = "Planning on the point (no margin) gives" if level == "no margin" else f"The {level} margin costs"
            lines += ["", f"{what} {cost['KL']:+.3g} KL and {cost['reward change']:+.3g} reward "
                          "change (achieved, minus the default's, mean over the same builds and seeds)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, nargs="+", default=[101, 102, 103, 104, 105],
                        help="world build seeds, chosen before looking at any result")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1], help="training seeds of each build")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default="runs/build_rates", help="one run directory per build × variant × seed")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny version on the small world (one epoch): checks the machinery, not the claim")
    parser.add_argument("--stream", default="fresh-judge",
                        help="name of the fresh prompts' stream: a new name draws a new evaluation set")
    parser.add_argument("--exclude-prompts", nargs="*", default=[], metavar="FILE",
                        help="prompt files (JSONL/Parquet/CSV) whose prompts the fresh set leaves out: the sets "
                             "a setting was chosen on; {build} in a name becomes the build seed")
    parser.add_argument("--available", action="store_true",
                        help="tabulate the runs that have finished (their eval/report.json), run nothing")
    parser.add_argument("--kl-delivery", type=float, nargs=2, metavar=("A", "B"),
                        help="with --available: judge the KL of runs whose dual had no kl_delivery against their "
                             "prediction × exp(A + B·log KL_K), as the dual's kl_delivery would have predicted it")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = []
    for build in args.builds:
        for variant in args.variants:
            for seed in args.train_seeds:
                if args.available:
                    run_dir = run_dir_of(out, build, variant, seed)
                    if (run_dir / "evaluate.done").exists():
                        rows.append({"build": build, "variant": variant, "train seed": seed,
                                     **outcome(read_json(run_dir / "eval" / "report.json"), run_dir,
                                               args.kl_delivery)})
                    continue
                if variant != "default":
                    share_samples(run_dir_of(out, build, "default", seed), run_dir_of(out, build, variant, seed))
                cfg = resolve_run_config(run_values(build, seed, variant, out, args.smoke, args.stream,
                                                    tuple(args.exclude_prompts)))
                report = run_pipeline(cfg, log=lambda s: None)
                rows.append({"build": build, "variant": variant, "train seed": seed,
                             **outcome(report, Path(cfg.run_dir))})
                print(json.dumps(rows[-1]), flush=True)
    table = rates(rows)
    text = markdown(table, args.builds, args.train_seeds)
    write_json({"builds": args.builds, "train_seeds": args.train_seeds, "smoke": args.smoke,
                "rates": table, "runs": rows}, out / "report.json")
    (out / "build_rates.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()

"""``dualign compare CONFIG.yaml``: MoCAN and the baselines on the same data, several seeds, one table.

The config is a ``dualign run`` config (``run_dir``, ``model``, ``world``, ``sample``, ``score``,
``dual``, ``train``, ``evaluate``) plus a ``compare`` section (:class:`CompareConfig`). The sample,
score and dual stages run once into ``<run_dir>/shared``; every method then trains from π_ref into
``<run_dir>/runs/<label>/seed<s>`` (the pair methods with the ``train`` section's settings, the
baselines with their own sections on top) and is evaluated by the ``evaluate`` stage with seed s.
A method/seed whose ``eval/report.json`` exists is skipped, so an interrupted comparison resumes.

Outputs in ``<run_dir>``: ``compare.csv`` (one row per method: means and standard deviations over
seeds), ``compare_runs.csv`` (one row per method and seed), ``compare.json`` (both, plus the shared
stages' cost) and ``plots/``: ``pareto.png`` (reward vs constraint value, the threshold line, error
bars), ``constraints.png`` (slack and satisfaction), ``compute.png`` (wall-clock, gradient steps,
sampled tokens, peak memory) and ``lambda.png`` (λ trajectories of the iterative methods).

Compute accounting: the methods that learn from π_ref's samples are charged the shared sample and
score stages (and MoCAN the dual stage): their ``wall_s`` and ``sampled_tokens`` include them;
``train_wall_s`` is the training alone.

matplotlib is imported by the plotting functions only: its import costs a second that a
comparison still training should not pay up front.
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

from dualign.config import build_config, merge
from dualign.constraints import parse_constraint
from dualign.dual import run_dual
from dualign.evaluate import evaluate
from dualign.io import atomic_path, read_json, read_table, write_json, write_table
from dualign.methods.dispatch import measure, run_method
from dualign.methods.dual_ascent import DualAscentConfig
from dualign.methods.fixed_lambda import FixedLambdaConfig
from dualign.methods.objective import link_sample_config
from dualign.methods.ppo_lagrangian import PPOLagrangianConfig
from dualign.pipeline import load_run_values, resolve_run_config
from dualign.records import EvalReport, read_dual, read_report, to_json
from dualign.sample import sample
from dualign.score import score

METHODS = ("mocan", "fixed-lambda", "helpful-dpo", "safe-dpo", "dual-ascent", "ppo-lagrangian")
SHARED_STAGES = (("sample", "samples.parquet"), ("score", "scores.parquet"), ("dual", "dual.json"))


@dataclass
class CompareConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={
        "help": f"methods to run: {', '.join(METHODS)}"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "training/evaluation seeds"})
    fixed_lambdas: list[float] = field(default_factory=lambda: [0.5, 2.0], metadata={
        "help": "fixed-lambda: one run per value (the same λ for every constraint)"})
    dual_ascent: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "DualAscentConfig keys on top of the train section (rounds, lambda_lr, ...)"})
    ppo_lagrangian: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "PPOLagrangianConfig keys (iterations, num_samples, lambda_lr, ...)"})

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r} (methods: {', '.join(METHODS)})")
        if not self.seeds:
            raise ValueError("seeds must not be empty")


def load_compare_config(path: str | Path, overrides: dict[str, Any] | None = None):
    """(RunConfig, CompareConfig) from a YAML file and overrides (e.g. ``{"run_dir": ...}``)."""
    values = merge(load_run_values(path), overrides or {})
    compare = build_config(CompareConfig, values.pop("compare", None) or {}, prefix="compare.")
    return resolve_run_config(values), compare


def _runs(cmp: CompareConfig) -> list[tuple[str, str, float | None]]:
    """(label, method, fixed λ) of every method run."""
    out = []
    for method in cmp.methods:
        if method == "fixed-lambda":
            out += [(f"fixed-lambda-{lam:g}", method, lam) for lam in cmp.fixed_lambdas]
        else:
            out.append((method, method, None))
    return out


def _run_stage(fn, cfg, run_dir: Path) -> None:
    """A pipeline stage into ``run_dir``, whether it takes the directory in its config or as an argument."""
    if any(f.name == "run_dir" for f in dataclasses.fields(cfg)):
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    if "run_dir" in inspect.signature(fn).parameters:
        fn(cfg, run_dir)
    else:
        fn(cfg)


def run_shared(run, shared: Path, log=print) -> dict[str, Any]:
    """Sample, score and solve the dual once (skipping finished stages); their cost in ``compute.json``."""
    funcs = {"sample": sample, "score": score, "dual": run_dual}
    shared.mkdir(parents=True, exist_ok=True)
    cost_path = shared / "compute.json"
    cost = read_json(cost_path) if cost_path.exists() else {}
    for stage, output in SHARED_STAGES:
        if (shared / output).exists():
            log(f"shared {stage}: done, skipped")
            continue
        log(f"shared {stage} ...")
        with measure() as used:
            _run_stage(funcs[stage], getattr(run, stage), shared)
        cost[stage] = used
        write_json(cost, cost_path)
    samples = read_table(shared / "scores.parquet")
    cost["sampled_tokens"] = int(samples["response_tokens"].sum()) if "response_tokens" in samples else 0
    write_json(cost, cost_path)
    return cost


def method_config(run, cmp: CompareConfig, method: str, lam: float | None, sub: Path, shared: Path, seed: int):
    """The training config of one method run: the train section (pair methods) or the PPO section."""
    common = {"run_dir": str(sub), "scores": str(shared / "scores.parquet"), "seed": seed, "output_dir": None}
    if method == "ppo-lagrangian":
        base = {"model": run.train.model, "template": run.train.template, "revision": run.train.revision,
                "device": run.train.device, "beta": run.train.beta, "dual": str(shared / "dual.json"), **common}
        return build_config(PPOLagrangianConfig, {**base, **cmp.ppo_lagrangian}, prefix="compare.ppo_lagrangian.")
    if method == "mocan":
        shutil.copyfile(shared / "dual.json", sub / "dual.json")
        link_sample_config(shared / "scores.parquet", sub)
        return dataclasses.replace(run.train, **common, dual=str(sub / "dual.json"))
    train = {**dataclasses.asdict(run.train), **common, "dual": str(shared / "dual.json")}
    if method == "dual-ascent":
        return build_config(DualAscentConfig, {**train, "method": method, **cmp.dual_ascent},
                            prefix="compare.dual_ascent.")
    return build_config(FixedLambdaConfig, {**train, "method": method,
                                            "lambdas": [lam] if lam is not None else None})


def _evaluate(run, sub: Path, shared: Path, seed: int) -> EvalReport:
    """The evaluate stage on one method run; π_ref's evaluation samples are made once per seed."""
    cached = shared / "eval_reference" / f"seed{seed}.parquet"
    mine = sub / "eval" / "samples_reference.parquet"
    if cached.exists() and not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, mine)
    report = evaluate(dataclasses.replace(run.evaluate, run_dir=str(sub), seed=seed, policy=None))
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mine, cached)
    return read_report(report)


def run_compare(run, cmp: CompareConfig, log=print) -> dict[str, Any]:
    """Every method × seed (resuming), then the table and plots; returns ``compare.json``'s content."""
    root = Path(run.run_dir)
    shared = root / "shared"
    shared_cost = run_shared(run, shared, log)
    rows = []
    for seed in cmp.seeds:
        for label, method, lam in _runs(cmp):
            sub = root / "runs" / label / f"seed{seed}"
            report_path = sub / "eval" / "report.json"
            if report_path.exists():
                log(f"{label} seed {seed}: done, skipped")
            else:
                sub.mkdir(parents=True, exist_ok=True)
                policy = sub / "policy"
                if not ((sub / "compute.json").exists() and policy.exists()):
                    log(f"{label} seed {seed}: training ...")
                    run_method(method_config(run, cmp, method, lam, sub, shared, seed))
                log(f"{label} seed {seed}: evaluating ...")
                _evaluate(run, sub, shared, seed)
            rows.append(_row(label, method, seed, read_report(report_path), read_json(sub / "compute.json"),
                             shared_cost))
    runs = pd.DataFrame(rows)
    summary = summarise(runs)
    reference = read_report(root / "runs" / rows[0]["label"] / f"seed{cmp.seeds[0]}" / "eval" / "report.json")
    out = {"summary": _records(summary), "runs": _records(runs), "shared": shared_cost,
           "dual": to_json(read_dual(shared / "dual.json")), "reference": to_json(reference.reference),
           "constraints": [{"name": c.name, "constraint": c.constraint, "column": c.column, "threshold": c.threshold}
                           for c in reference.constraints]}
    write_table(summary, root / "compare.csv")
    write_table(runs, root / "compare_runs.csv")
    write_json(out, root / "compare.json")
    plot_compare(out, root, log)
    log(format_table(out))
    return out


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts, NaN (e.g. a std over one seed) as None so that the JSON stays standard."""
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
            for r in table.to_dict("records")]


def _row(label: str, method: str, seed: int, report: EvalReport, compute: dict, shared: dict) -> dict[str, Any]:
    """One method run's table row; a constraint's columns are named after the constraint's name."""
    reward = report.policy[report.reward]
    row: dict[str, Any] = {"label": label, "method": method, "seed": seed, "reward": reward.mean,
                           "reward_lo": reward.ci95[0], "reward_hi": reward.ci95[1]}
    for c in report.constraints:
        row.update({c.name: c.achieved, f"{c.name}_lo": c.ci95[0], f"{c.name}_hi": c.ci95[1],
                    f"{c.name}_threshold": c.threshold, f"{c.name}_met": float(c.met),
                    f"{c.name}_met_confidently": float(bool(c.met_confidently))})
    row["kl"] = report.kl.achieved
    if report.judge:
        for k in ("judge_harmful", "judge_helpful"):
            row[k] = getattr(report.judge["policy"]["all"], k).mean
    row.update({f"lambda_{k}": v for k, v in (compute.get("lambdas") or {}).items()})
    stages = ("sample", "score", "dual") if method == "mocan" else () if method == "ppo-lagrangian" else ("sample", "score")
    shared_s = sum((shared.get(s) or {}).get("wall_s", np.nan) for s in stages)
    row.update({"train_wall_s": compute["wall_s"], "wall_s": compute["wall_s"] + shared_s,
                "gradient_steps": compute["gradient_steps"],
                "sampled_tokens": compute["sampled_tokens"] + (shared["sampled_tokens"] if stages else 0),
                "peak_memory_mb": compute["peak_memory_mb"]})
    return row


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per label: the mean of every numeric column over seeds, ``<col>_std`` and ``n_seeds``."""
    numeric = [c for c in runs.columns if c not in ("label", "method", "seed")
               and pd.api.types.is_numeric_dtype(runs[c])]
    grouped = runs.groupby("label", sort=False)
    mean = grouped[numeric].mean()
    spread = [c for c in numeric if not c.endswith(("_lo", "_hi", "_threshold"))]
    std = grouped[spread].std(ddof=1).add_suffix("_std")
    out = pd.concat([mean, std], axis=1).reset_index()
    out.insert(1, "method", grouped["method"].first().to_numpy())
    out.insert(2, "n_seeds", grouped.size().to_numpy())
    return out


def format_table(out: dict[str, Any]) -> str:
    """The printed table: one line per method (mean ± std over seeds)."""
    cons = out["constraints"]
    rc = out["dual"]["reward"]

    def cell(r: dict, key: str, fmt: str = ".3f") -> str:
        s = r.get(f"{key}_std")
        return f"{r[key]:{fmt}}" + (f"±{s:{fmt}}" if s is not None and np.isfinite(s) else "")

    def bound(c: dict) -> str:
        return f"{c['column']} ({'≤' if '<=' in c['constraint'] else '≥'}{c['threshold']:.2f})"

    head = f"{'method':<20}{rc:>16}" + "".join(f"{bound(c):>22}{'met':>6}{'conf.':>6}" for c in cons)
    head += f"{'λ':>10}{'wall s':>10}{'steps':>8}{'tokens':>10}{'mem MiB':>9}"
    lines = [head, f"{'π_ref':<20}{out['reference'][rc]['mean']:>16.3f}"
             + "".join(f"{out['reference'][c['column']]['mean']:>22.3f}{'':>12}" for c in cons)]
    for r in out["summary"]:
        lam = [v for k, v in r.items() if k.startswith("lambda_") and not k.endswith("_std")]
        line = f"{r['label']:<20}{cell(r, 'reward'):>16}"
        line += "".join(f"{cell(r, c['name']):>22}{r[c['name'] + '_met']:>6.0%}"
                        f"{r[c['name'] + '_met_confidently']:>6.0%}" for c in cons)
        line += f"{(f'{lam[0]:.3g}' if lam else '-'):>10}{r['wall_s']:>10.1f}{r['gradient_steps']:>8.0f}"
        line += f"{r['sampled_tokens']:>10.0f}{r['peak_memory_mb']:>9.0f}"
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------ plots

def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _err(r: dict, key: str) -> tuple[float, float]:
    """Error bar half-widths: the std over seeds, or the evaluation's 95% CI with one seed."""
    if r["n_seeds"] > 1:
        return r[f"{key}_std"], r[f"{key}_std"]
    return r[key] - r[f"{key}_lo"], r[f"{key}_hi"] - r[key]


def plot_compare(out: dict[str, Any], root: Path, log=print) -> None:
    """pareto.png, constraints.png, compute.png and (iterative methods present) lambda.png in ``root/plots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, cons, rc = out["summary"], out["constraints"], out["dual"]["reward"]
    colors = {r["label"]: plt.cm.tab10(i % 10) for i, r in enumerate(summary)}

    fig, axes = plt.subplots(1, len(cons), figsize=(6 * len(cons), 4.5), squeeze=False)
    for ax, c in zip(axes[0], cons, strict=True):
        col, name = c["column"], c["name"]
        ax.scatter([out["reference"][col]["mean"]], [out["reference"][rc]["mean"]], color="grey", marker="s",
                   label="π_ref", zorder=3)
        for r in summary:
            ax.errorbar(r[name], r["reward"], xerr=np.array(_err(r, name))[:, None],
                        yerr=np.array(_err(r, "reward"))[:, None], fmt="o", capsize=3,
                        color=colors[r["label"]], label=r["label"])
        ax.axvline(c["threshold"], color="red", ls="--", label=f"constraint {c['constraint']}")
        ax.set_xlabel(f"{col} (evaluation mean)")
        ax.set_ylabel(f"{rc} (evaluation mean)")
        ax.legend(fontsize=7)
    fig.suptitle("reward vs constraint value (error bars: std over seeds, or 95% CI with one seed)", fontsize=9)
    fig.tight_layout()
    _save(fig, root / "plots" / "pareto.png")

    fig, axes = plt.subplots(1, len(cons), figsize=(max(6, 1.1 * len(summary)) * len(cons), 4), squeeze=False)
    labels = [r["label"] for r in summary]
    for ax, c in zip(axes[0], cons, strict=True):
        name, sign = c["name"], parse_constraint(c["constraint"]).sign
        slack = [sign * (r[name] - c["threshold"]) for r in summary]
        rate = [(r[f"{name}_met"], r[f"{name}_met_confidently"]) for r in summary]
        ax.bar(labels, slack, yerr=[r.get(f"{name}_std") or 0 for r in summary], capsize=3,
               color=["tab:green" if s >= 0 else "tab:red" for s in slack])
        for i, (s, (point, confident)) in enumerate(zip(slack, rate, strict=True)):
            ax.annotate(f"met {point:.0%}\n(confidently {confident:.0%})", (i, s), ha="center",
                        va="bottom" if s >= 0 else "top", fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel(f"slack of {c['constraint']} (≥ 0: met)")
        ax.set_title("share of seeds meeting it: point estimate (and not rejected by the 95% CI)", fontsize=8)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    _save(fig, root / "plots" / "constraints.png")

    metrics = [("wall_s", "wall-clock (s)"), ("gradient_steps", "policy gradient steps"),
               ("sampled_tokens", "sampled tokens"), ("peak_memory_mb", "peak memory (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(max(14, 3.2 * len(summary)), 4))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        ax.bar(labels, [r[key] for r in summary], yerr=[r.get(f"{key}_std") or 0 for r in summary], capsize=3,
               color=[colors[x] for x in labels])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    _save(fig, root / "plots" / "compute.png")
    _plot_lambdas(out, root)
    log(f"plots: {root / 'plots'}")


def _plot_lambdas(out: dict[str, Any], root: Path) -> None:
    import matplotlib.pyplot as plt

    iterative = [(r["label"], r["seed"]) for r in out["runs"] if r["method"] in ("dual-ascent", "ppo-lagrangian")]
    if not iterative:
        return
    methods = list(dict.fromkeys(label for label, _ in iterative))
    lam_star = out["dual"]["lambdas"]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for label, seed in iterative:
            if label != method:
                continue
            traj = read_json(root / "runs" / label / f"seed{seed}" / "compute.json").get("lambda_trajectory") or []
            for name in lam_star:
                ax.plot(range(len(traj)), [t[name] for t in traj], marker="o", ms=3, label=f"λ_{name} seed {seed}")
        for name, value in lam_star.items():
            ax.axhline(value, color="red", ls="--", label=f"λ*_{name} (dual)")
        ax.set_xlabel("round" if method == "dual-ascent" else "iteration")
        ax.set_ylabel("λ")
        ax.set_title(method)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, root / "plots" / "lambda.png")


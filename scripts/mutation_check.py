"""Mutation check: does the suite notice a plausible bug in the core formulas and stage plumbing?

    python scripts/mutation_check.py                 # every mutation, a table on stdout
    python scripts/mutation_check.py --markdown      # the same as a Markdown table (docs/testing.md)
    python scripts/mutation_check.py --only beta     # mutations whose name contains "beta"

Each mutation replaces one exact piece of source text (it must occur exactly once) in a copy of
``src/`` in a temporary directory, then runs the named tests against that copy (``PYTHONPATH``
pointing at it, one process, no xdist). A mutant is *killed* when a named test fails and *lives*
when they all pass. The unmutated source runs the same selections first: a selection that fails
there is a broken check, reported as such. Exit status 1 when a mutant lives or a check is broken.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    what: str
    file: str  # under src/dualign/
    old: str
    new: str
    tests: list[str]  # pytest node ids or files, each with an optional "::" part


MUTATIONS = [
    Mutation("dual-pooled-reference", "the dual stage's π_ref means pooled over rows, weights dropped",
             "dual/stage.py",
             "refs = reference_means(scores.prompt_index, np.stack([scores.columns[c] for c in columns], axis=1),\n"
             "                           scores.sample_weights)",
             "refs = np.stack([scores.columns[c] for c in columns], axis=1).mean(axis=0)",
             ["tests/test_weighted_means.py::test_the_dual_stage_takes_per_prompt_weighted_reference_means"]),
    Mutation("objective-pooled-reference", "the baselines' objective takes pooled π_ref means",
             "methods/objective.py",
             'means = reference_means(scores["prompt_id"].to_numpy(), scores[columns].to_numpy(float),\n'
             '                                scores["sample_weight"].to_numpy(float) if "sample_weight" in scores else None)',
             "means = scores[columns].to_numpy(float).mean(axis=0)",
             ["tests/test_weighted_means.py::test_the_objective_takes_per_prompt_weighted_reference_means"]),
    Mutation("recalibrate-pooled-reference", "recalibration's π_ref mean pooled over rows",
             "recalibrate.py", "ref_g = F.reference_means(ids, g, w)", "ref_g = g.mean(axis=0)",
             ["tests/test_weighted_means.py::"
              "test_recalibration_asks_for_its_change_over_the_per_prompt_weighted_reference"]),
    Mutation("train-ignores-dual-beta", "the trainer takes its fallback β, not dual.json's", "train.py",
             "beta = cfg.beta if cfg.beta is not None else dual.beta if dual else 0.1",
             "beta = cfg.beta if cfg.beta is not None else 0.1",
             ["tests/test_train.py::test_training_moves_logratios_towards_target_margins"]),
    Mutation("mocan-lambda-x2", "λ scaled by 2 in MoCAN's labels", "methods/mocan.py",
             "r = r + dual.lambdas[name] * c.sign * column(c.column)",
             "r = r + 2 * dual.lambdas[name] * c.sign * column(c.column)",
             ["tests/test_train.py::test_pairs_from_scores_margin_is_lagrangian_reward_difference"]),
    Mutation("finetune-overshoots-x2", "the fine-tune's target margins doubled (it overshoots 2×)",
             "methods/mocan.py", '"target_margin": r_lambda[i] - r_lambda[j],',
             '"target_margin": 2 * (r_lambda[i] - r_lambda[j]),',
             ["tests/test_train.py::test_pairs_from_scores_margin_is_lagrangian_reward_difference",
              "tests/test_train.py::test_training_moves_logratios_towards_target_margins"]),
    Mutation("predicted-eval-unshifted", "predicted_eval without the reference shift", "evaluate.py",
             "predicted_eval=ref_eval + predicted - ref_dual", "predicted_eval=predicted",
             ["tests/test_evaluate.py::test_build_report_fields_equal_their_hand_computation"]),
    # the core formulas
    Mutation("dual-value-sign", "D(λ) = β·mean log Z + λᵀb (the threshold term's sign flipped)",
             "dual/tilt.py", "value = self.beta * float(q @ log_z) - float(lambdas @ self.b)",
             "value = self.beta * float(q @ log_z) + float(lambdas @ self.b)",
             ["tests/test_dual.py"]),
    Mutation("kl-double", "the tilt's KL doubled", "dual/tilt.py",
             "return reward, expected + s.centre, max(kl_value, 0.0)",
             "return reward, expected + s.centre, max(2 * kl_value, 0.0)", ["tests/test_dual.py"]),
    Mutation("target-logratio-no-partition", "MoCAN's absolute targets without the log partition function",
             "methods/mocan.py", "return seg.ungroup(r_lambda - beta * seg.expand(log_z))",
             "return seg.ungroup(r_lambda)",
             ["tests/test_train.py::test_sample_weights_give_pair_weights_and_a_weighted_partition_function"]),
    Mutation("win-rate-ties-lost", "a tie counted as a loss in the win rate", "evaluate.py",
             "return float(np.mean((p > r) + 0.5 * (p == r)))", "return float(np.mean(p > r))",
             ["tests/test_evaluate.py::test_win_rate_counts_ties_as_half_and_prediction_error_is_relative"]),
    Mutation("verdict-wrong-tail", "the one-sided bound taken from the wrong tail", "evaluate.py",
             "one_sided = float(np.quantile(draws, level if below else 1 - level))",
             "one_sided = float(np.quantile(draws, 1 - level if below else level))",
             ["tests/test_evaluate.py::test_verdicts_are_point_estimate_one_sided_bound_and_ci_reach"]),
    Mutation("bootstrap-fixed-threshold", "the dual's bootstrap keeps a relative threshold fixed",
             "dual/solver.py", "b = _resample_thresholds(sub, result.thresholds, margins)",
             "b = result.thresholds",
             ["tests/test_dual.py::"
              "test_bootstrap_re_estimates_a_relative_threshold_on_each_resample_like_a_hand_written_loop"]),
    Mutation("ci-misses-point", "the bootstrap interval no longer widened to contain its point",
             "evaluate.py", "return [lo, hi] if point is None else containing([lo, hi], point)",
             "return [lo, hi]", ["tests/test_properties.py::test_verdicts_are_consistent_with_the_numbers"]),
]


def run_tests(src: Path, tests: list[str]) -> tuple[bool, float, str]:
    """(passed, seconds, last line of pytest's output) for ``tests`` against the source tree ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                          "-o", "addopts=", *tests], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    return res.returncode == 0, time.perf_counter() - start, lines[-1] if lines else res.stderr.strip()[-200:]


def mutate(m: Mutation, work: Path) -> Path:
    """A copy of src/ under ``work`` with ``m`` applied."""
    src = work / m.name / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    path = src / "dualign" / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name}: the text to replace occurs {text.count(m.old)} times in {m.file}")
    path.write_text(text.replace(m.old, m.new))
    return src


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutations whose name contains this")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="dualign-mutants-") as tmp:
        baseline = {}
        for tests in dict.fromkeys(tuple(m.tests) for m in chosen):
            baseline[tests] = run_tests(ROOT / "src", list(tests))
        for m in chosen:
            ok, _, line = baseline[tuple(m.tests)]
            if not ok:
                rows.append((m, "BROKEN CHECK (fails unmutated)", 0.0, line))
                bad += 1
                continue
            passed, seconds, line = run_tests(mutate(m, Path(tmp)), m.tests)
            rows.append((m, "LIVES" if passed else "killed", seconds, line))
            bad += passed
            print(f"{m.name}: {'LIVES' if passed else 'killed'} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    if args.markdown:
        print("| mutation | file | caught by | result |\n|---|---|---|---|")
        for m, result, _, _ in rows:
            tests = "<br>".join(f"`{t.split('::')[-1]}`" for t in m.tests)
            print(f"| {m.what} | `{m.file}` | {tests} | {result} |")
    else:
        width = max(len(m.name) for m in chosen)
        for m, result, seconds, line in rows:
            print(f"{m.name:<{width}}  {result:<8}  {seconds:5.0f} s  {line}")
    print(f"\n{len(rows) - bad} of {len(rows)} mutants killed" + (f"; {bad} live or broken" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

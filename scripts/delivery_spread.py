"""The fine-tune's own spread around its plan (δ, ``dual: {delivery_spread: δ}``), measured on
finished, evaluated runs (issue #26).

Fine-tunes towards a plan do not all land on it, and nothing in π_ref's samples shows by how
much: δ is measured by repeating the fine-tune (other training seeds, other builds of a world).
Each run's evaluation reports the achieved change of a constraint's mean, its 95% CI and the
planned change. Their residuals e_i = achieved_i − planned_i scatter by the fine-tune's spread
and by each evaluation's own noise, so

    δ̂ = sqrt(max(Var(e) − mean(SE_i²), 0)) / mean |planned_i|,   SE_i = (CI width_i) / (2·1.96),

with a percentile bootstrap over runs for its 95% CI. The evaluation's noise comes out of it, so a
larger evaluation measures δ more sharply but not larger or smaller. Runs planned with a margin
work too (the residual is from each run's own plan).

    # the default demo's measurement: 20 runs without a margin, re-evaluated on 1024 fresh prompts each
    python scripts/delivery_spread.py runs/bigeval/build1*-default-seed* --constraint cost
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

Z95 = 1.959963984540054


def residuals(reports: list[dict], constraint: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(achieved − planned, the evaluation's standard error, planned) per report, for the constraint
    named (its column or name; the first when None). The plan is ``planned_change`` (the reachable
    tilt's plan) or ``predicted_change`` (the K-sample tilt's)."""
    out = []
    for rep in reports:
        cons = rep["constraints"]
        c = cons[0] if constraint is None else next(
            (c for c in cons if constraint in (c.get("column"), c.get("name"))), None)
        if c is None:
            raise SystemExit(f"no constraint {constraint!r} in a report (has {[c.get('column') for c in cons]})")
        planned = c.get("planned_change", c.get("predicted_change"))
        lo, hi = c["achieved_change_ci95"]
        out.append((c["achieved_change"] - planned, (hi - lo) / (2 * Z95), planned))
    e, se, planned = (np.array(v, dtype=np.float64) for v in zip(*out, strict=True))
    return e, se, planned


def spread(e: np.ndarray, se: np.ndarray, planned: np.ndarray) -> float:
    """δ̂ = sqrt(max(Var(e) − mean(SE²), 0)) / mean |planned| (Var with n − 1)."""
    extra = max(float(np.var(e, ddof=1) - np.mean(se**2)), 0.0)
    return float(np.sqrt(extra) / np.mean(np.abs(planned)))


def measure(reports: list[dict], constraint: str | None = None, resamples: int = 2000, seed: int = 0) -> dict:
    """δ̂, its percentile bootstrap 95% CI over runs, and the figures behind it."""
    e, se, planned = residuals(reports, constraint)
    if len(e) < 3:
        raise SystemExit(f"{len(e)} runs: δ needs at least 3 (it is a spread)")
    rng = np.random.default_rng(seed)
    draws = [spread(e[i], se[i], planned[i]) for i in (rng.integers(0, len(e), len(e)) for _ in range(resamples))]
    return {"runs": len(e), "delta": spread(e, se, planned), "ci95": np.quantile(draws, [0.025, 0.975]).tolist(),
            "residual_mean": float(e.mean()), "residual_sd": float(e.std(ddof=1)),
            "evaluation_se_rms": float(np.sqrt(np.mean(se**2))), "planned_change_mean": float(planned.mean())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories holding eval/report.json")
    parser.add_argument("--constraint", help="the constraint's column or name (default: the first)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples over runs")
    args = parser.parse_args(argv)
    reports = [json.loads((Path(r) / "eval" / "report.json").read_text()) for r in args.runs]
    out = measure(reports, args.constraint, args.resamples)
    print(f"{out['runs']} runs: achieved − planned {out['residual_mean']:+.3f} on average, s.d. "
          f"{out['residual_sd']:.3f}; the evaluations' own s.e. {out['evaluation_se_rms']:.3f} (r.m.s.); "
          f"planned change {out['planned_change_mean']:+.3f} on average")
    print(f"δ = {out['delta']:.4f} (95% CI {out['ci95'][0]:.4f} to {out['ci95'][1]:.4f}): "
          f"dual: {{delivery_spread: {out['delta']:.2g}}}")
    return out


if __name__ == "__main__":
    main()

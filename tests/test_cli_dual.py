"""`dualign dual` and `dualign plan`: JSON/table output, files written, and bad input (exit 2,
one line on stderr, nothing written), plus the pipeline's run_dual stage."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from dualign import cli
from dualign.data.example import example_scores
from dualign.data.records import to_json
from dualign.dual import DualConfig, run_dual, solve_dual_long


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    path = tmp_path_factory.mktemp("scores") / "scores.parquet"
    example_scores(120, 6, seed=4).to_parquet(path)
    return path


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dualign", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_dual_json_matches_the_solver_and_the_dual_json_layout(scores, tmp_path, capsys):
    out = tmp_path / "dual.json"
    assert cli.main(["dual", str(scores), "--beta", "0.2", "--constraint", "cost<=ref-0.4",
                     "--json", "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    df = pd.read_parquet(scores)
    ref_cost = df.groupby("prompt_id")["cost"].mean().mean()
    res = solve_dual_long(df["prompt_id"], df["reward"], -df["cost"], -(ref_cost - 0.4), 0.2)
    assert report["lambdas"]["cost"] == pytest.approx(res.lambdas[0], rel=1e-9)
    assert report["feasible"] and report["converged"]
    assert report["thresholds"]["cost"] == pytest.approx(ref_cost - 0.4)
    assert report["predicted"]["cost"] == pytest.approx(ref_cost - 0.4, abs=1e-8)
    assert report["predicted"]["reward"] == pytest.approx(res.predicted_reward)
    assert report["predicted"]["kl"] == pytest.approx(res.kl)
    assert report["reference"] == pytest.approx({"reward": df.groupby("prompt_id")["reward"].mean().mean(),
                                                 "cost": ref_cost, "kl": 0.0})
    assert "ci" not in report


def test_dual_table_and_bootstrap_ci(scores, capsys):
    assert cli.main(["dual", str(scores), "--constraint", "cost<=ref-0.4", "--constraint",
                     "helpful>=ref", "--bootstrap", "30", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "cost<=ref-0.4" in text and "helpful>=ref" in text and "95% CI" in text
    cli.main(["dual", str(scores), "--constraint", "cost<=ref-0.4", "--bootstrap", "30", "--json"])
    ci = json.loads(capsys.readouterr().out)["ci"]
    lo, hi = ci["lambdas"]["cost"]
    assert lo < hi and ci["bootstrap"] == 30
    assert ci["predicted"]["cost"][0] <= ci["predicted"]["cost"][1]


@pytest.mark.parametrize("args,match", [
    (["--constraint", "cost<=ref-9"], "infeasible: it asks mean cost <= "),
    (["--constraint", "cost<ref"], "expected COLUMN<=VALUE"),
    (["--constraint", "harm<=0"], "missing column 'harm'"),
    (["--constraint", "cost<=0", "--beta", "abc"], "beta"),
])
def test_dual_bad_input_exits_2_with_one_line_and_writes_nothing(scores, tmp_path, args, match):
    out = tmp_path / "dual.json"
    proc = _run("dual", scores, *args, "--output", out)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dualign: error:") and match in lines[0]
    assert not out.exists()


def test_dual_missing_file_exits_2(tmp_path):
    proc = _run("dual", tmp_path / "nope.parquet", "--constraint", "cost<=0")
    assert proc.returncode == 2 and "file not found" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_plan_writes_table_json_and_png_with_infeasible_points(scores, tmp_path):
    out = tmp_path / "plan"
    proc = _run("plan", scores, "--constraint", "cost<=ref-{0.2:2.4:6}", "--out", out,
                "--beta-grid", "0.1,0.3")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out / "plan.csv")
    assert len(table) == 12 and set(table["beta"]) == {0.1, 0.3}
    assert table["feasible"].any() and not table["feasible"].all()
    ok = table[table["feasible"]]
    np.testing.assert_allclose(ok["predicted_cost"], ok["threshold"], atol=1e-8)  # active
    for _, part in ok.groupby("beta"):  # tighter cost bound: larger λ*, lower reward
        assert np.all(np.diff(part["lambda"]) > 0) and np.all(np.diff(part["predicted_reward"]) < 0)
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["points"]) == 12 and plan["reachable_limit"] is not None
    bad = table[~table["feasible"]]
    assert np.all(bad["threshold"] <= plan["reachable_limit"])
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("0.1 ", "0.3 "))]
    assert len(rows) == 12 and sum("infeasible" in r for r in rows) == (~table["feasible"]).sum()
    assert f"{out / 'plan.png'}" in proc.stdout and "//" not in proc.stdout


@pytest.mark.parametrize("args,match", [
    (["--constraint", "cost<=ref-0.5"], "exactly one constraint with a sweep"),
    (["--constraint", "cost<=ref-{0.1:1:0}"], "positive integer"),
    (["--constraint", "cost<=ref-{0.1:1:3}", "--beta-grid", "0.1,x"], "--beta-grid"),
])
def test_plan_bad_input_exits_2_and_writes_nothing(scores, tmp_path, args, match):
    out = tmp_path / "plan"
    proc = _run("plan", scores, *args, "--out", out)
    assert proc.returncode == 2 and match in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not out.exists()


def test_run_dual_stage_writes_dual_json_in_the_run_dir(scores, tmp_path):
    (tmp_path / "scores.parquet").write_bytes(scores.read_bytes())
    report = run_dual(DualConfig(constraints=["cost<=ref-0.3"], beta=0.15), tmp_path)
    assert json.loads((tmp_path / "dual.json").read_text()) == to_json(report)
    assert (tmp_path / "dual.config.yaml").exists() and (tmp_path / "dual.meta.json").exists()
    assert report.beta == 0.15 and report.lambdas["cost"] > 0


def test_dual_cli_loads_no_torch_below_the_size_where_its_exp_pays(scores, tmp_path):
    """`dualign dual` on a small table answers without importing torch (about 2 s of a call); from
    TORCH_EXP_MIN values on, the solver's exp goes through torch, within 2 ulp of numpy's."""
    code = ("import sys; from dualign.cli import main; "
            f"code = main(['dual', {str(scores)!r}, '--constraint', 'cost<=ref-0.3', '--beta', '0.2']); "
            "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 False False"
    from dualign.dual.tilt import TORCH_EXP_MIN, exp_inplace
    x = np.random.default_rng(0).uniform(-50, 50, TORCH_EXP_MIN)
    np.testing.assert_allclose(exp_inplace(x.copy()), np.exp(x), rtol=5e-16, atol=0)
    small = x[:100].copy()
    assert np.array_equal(exp_inplace(small), np.exp(x[:100]))


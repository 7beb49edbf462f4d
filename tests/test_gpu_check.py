"""scripts/gpu_check.py in its reduced CPU form: the model build and the sampling check run and
print the figures the GPU check reads (the GPU figures themselves need a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_check.py"


def _run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_gpu_check_cpu_form_builds_samples_and_checks_the_recorded_log_probs(tmp_path):
    small = ["--hidden", "32", "--layers", "2", "--heads", "2", "--vocab", "300", "--prompts", "2"]
    assert "M parameters" in _run("build", str(tmp_path), *small)
    out = _run("sampling", str(tmp_path), "--device", "cpu", "--prompts", "2", "--k", "2", "--max-new-tokens", "4",
               "--batch-size", "4")
    figures = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert float(figures["sampling/hf/tokens_per_s"].split()[0]) > 0
    assert float(figures["refprobs/hf/max_abs_diff_vs_train"].split()[0]) < 1e-5
    assert "'autocast': None" in figures["refprobs/hf/record"]

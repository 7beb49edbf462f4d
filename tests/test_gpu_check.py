"""bench/gpu.sh in its reduced CPU form (``--cpu``): it builds a tiny random LLaMA, samples with HF,
checks the recorded log π_ref against train's forward, and trains full / LoRA with and without
gradient checkpointing, printing the figures the GPU run prints (the GPU figures need a GPU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_check_cpu_form_runs_every_check_a_cpu_can(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GPU_CHECK_NO_TESTS": "1",
           "PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu", str(tmp_path / "work")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    figures = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)
    assert "M parameters" in figures["model"]
    assert float(figures["sampling/hf/tokens_per_s"].split()[0]) > 0
    assert float(figures["refprobs/hf/max_abs_diff_vs_train"].split()[0]) < 1e-5
    assert "'autocast': None" in figures["refprobs/hf/record"]
    for name in ("full", "full+checkpointing", "lora", "lora+checkpointing"):
        assert float(figures[f"train/{name}"].split()[0]) > 0, name
    assert figures["gpu check"].startswith("done")
    assert (tmp_path / "work" / "gpu_check.log").exists()

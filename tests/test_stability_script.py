"""scripts/stability.py on its tiny --smoke comparison: the run, then --available, which tabulates
each method on its finished seeds only and trains nothing."""

import shutil

import pandas as pd


def test_available_tabulates_each_methods_finished_seeds_and_trains_nothing(script, tmp_path):
    stability = script("stability")
    methods = ["mocan", "ppo-lagrangian"]
    stability.main(["--smoke", "--methods", *methods, "--out", str(tmp_path)])
    full = pd.read_csv(tmp_path / "stability.csv")
    assert list(full["seeds"]) == [2, 2]
    gone = tmp_path / "run" / "runs" / "ppo-lagrangian" / "seed1"
    shutil.rmtree(gone)
    stability.main(["--smoke", "--available", "--methods", *methods, "--out", str(tmp_path)])
    part = pd.read_csv(tmp_path / "stability.csv").set_index("label")
    assert part.loc["mocan", "seeds"] == 2 and part.loc["ppo-lagrangian", "seeds"] == 1
    assert not gone.exists()                                   # nothing was trained again
    runs = pd.read_csv(tmp_path / "stability_runs.csv")
    assert set(zip(runs["label"], runs["seed"], strict=True)) == {("mocan", 0), ("mocan", 1), ("ppo-lagrangian", 0)}

"""The scores reader: formats, grouping, and one error per problem naming the row or prompt."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dualign._infra.errors import InputError
from dualign.data.example import example_scores
from dualign.data.score_table import read_scores, validate_scores
from dualign.dual import reference_means, solve_dual_long


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_formats_round_trip_to_the_same_arrays(tmp_path, suffix):
    df = example_scores(20, 4, seed=1, weighted=True)
    path = tmp_path / f"scores{suffix}"
    {".parquet": lambda: df.to_parquet(path), ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".csv": lambda: df.to_csv(path, index=False)}[suffix]()
    s = read_scores(path, ["reward", "cost"])
    assert s.num_prompts == 20 and s.num_samples == 80
    np.testing.assert_allclose(s.columns["cost"], df["cost"], rtol=1e-8)  # JSONL keeps 10 digits
    np.testing.assert_allclose(s.sample_weights, df["sample_weight"], rtol=1e-8)


def test_interleaved_rows_are_grouped_by_prompt_stably():
    df = pd.DataFrame({"prompt_id": ["b", "a", "b", "a", "b"], "reward": [1, 2, 3, 4, 5.0]})
    s = validate_scores(df, ["reward"])
    np.testing.assert_array_equal(s.prompt_index, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(s.columns["reward"], [1, 3, 5, 2, 4])
    np.testing.assert_array_equal(s.rows, [1, 3, 5, 2, 4])
    assert list(s.prompt_ids) == ["b", "a"]


def test_reader_output_feeds_the_long_solver_and_reference_means():
    df = example_scores(30, 6, seed=2, ragged=True, weighted=True)
    s = validate_scores(df, ["reward", "cost"])
    w = df["sample_weight"] / df.groupby("prompt_id")["sample_weight"].transform("sum")
    expected = (df["cost"] * w).groupby(df["prompt_id"]).sum().mean()
    assert reference_means(s.prompt_index, s.columns["cost"], s.sample_weights) == pytest.approx(expected)
    res = solve_dual_long(s.prompt_index, s.columns["reward"], -s.columns["cost"], -expected + 0.3,
                          0.2, s.sample_weights)
    assert res.converged and res.predicted_utilities[0] == pytest.approx(-expected + 0.3, abs=1e-8)


def _base():
    return pd.DataFrame({"prompt_id": ["p", "p", "q", "q"], "reward": [0.1, 0.2, 0.3, 0.4],
                         "cost": [1.0, 2.0, 3.0, 4.0]})


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.drop(columns="prompt_id"), "missing column 'prompt_id'"),
    (lambda d: d.drop(columns="cost"), "missing column 'cost'"),
    (lambda d: d.assign(cost=["1", "x", "3", "4"]), "row 2: column 'cost' is not numeric \\('x'\\)"),
    (lambda d: d.assign(cost=[1.0, 2.0, np.nan, 4.0]), "row 3: column 'cost' is missing"),
    (lambda d: d.assign(reward=[0.1, np.inf, 0.3, 0.4]), "row 2: column 'reward' is infinite"),
    (lambda d: d.assign(prompt_id=["p", None, "q", "q"]), "row 2: prompt_id is missing"),
    (lambda d: d.assign(prompt_id=["p", "r", "q", "q"]), "prompt_id 'p' \\(row 1\\) has only one sample"),
    (lambda d: d.assign(sample_weight=[1.0, -0.5, 1.0, 1.0]), "row 2: sample_weight -0.5 is negative"),
    (lambda d: d.assign(sample_weight=[1.0, 1.0, 0.0, 0.0]), "prompt_id 'q' \\(first row 3\\): all 2 sample weights are zero"),
    (lambda d: d.iloc[:0], "no rows"),
])
def test_each_bad_input_raises_one_error_naming_the_row(edit, match):
    with pytest.raises(InputError, match=match):
        validate_scores(edit(_base()), ["reward", "cost"], source="s.csv")


def test_unreadable_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_scores(tmp_path / "nope.parquet", ["reward"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(InputError, match="cannot read table"):
        read_scores(bad, ["reward"])


def test_example_scores_are_ragged_and_weighted_on_request():
    df = example_scores(50, 8, seed=3, ragged=True, weighted=True)
    counts = df.groupby("prompt_id").size()
    assert counts.min() >= 2 and counts.nunique() > 1 and (df["sample_weight"] > 0).all()
    # the synthetic world has the trade-off the dual is for: reward and cost correlate
    assert np.corrcoef(df["reward"], df["cost"])[0, 1] > 0.3

"""Evaluate's statistics against their definitions: the prompt bootstrap, win rates, the miss."""

from __future__ import annotations

import numpy as np
import pytest

from dualign.evaluate import cluster_bootstrap_ci, prediction_error, win_rate


def test_cluster_bootstrap_equals_a_loop_over_resampled_prompts():
    rng = np.random.default_rng(0)
    groups = np.array(["b", "a", "b", "c", "a", "b", "c", "d"])  # unsorted, ragged
    values = rng.normal(size=groups.size)
    mean, lo, hi = cluster_bootstrap_ci(values, groups, n_boot=200, seed=3)
    assert mean == pytest.approx(values.mean())
    prompts = list(dict.fromkeys(groups))  # the bootstrap's unit, numbered by first appearance
    draws = np.random.default_rng(3).integers(0, len(prompts), size=(200, len(prompts)))
    reps = [np.concatenate([values[groups == prompts[d]] for d in row]).mean() for row in draws]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), rel=1e-12)
    assert np.isnan(cluster_bootstrap_ci(values[:2], np.array(["a", "a"]))[1])  # one prompt: no CI


def test_win_rate_counts_ties_as_half_and_prediction_error_is_relative():
    assert win_rate(np.array([2.0, 1.0, 3.0, 0.0]), np.array([1.0, 1.0, 4.0, -1.0])) == pytest.approx(0.625)
    assert prediction_error(-3.0, -4.0) == pytest.approx(0.25)
    assert np.isnan(prediction_error(1.0, 0.0))

"""Per-prompt segments against plain Python loops over each prompt's rows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from dualign._infra.segments import Segments


def _rows_by_prompt(ids):
    """{prompt id: its row indices}, prompts in order of first appearance (the naive grouping)."""
    out: dict = {}
    for i, pid in enumerate(ids):
        out.setdefault(pid, []).append(i)
    return out


IDS = np.array(["b", "a", "b", "c", "a", "b", "c", "d"])


def test_of_numbers_prompts_by_first_appearance_and_groups_rows_stably():
    seg = Segments.of(IDS)
    naive = _rows_by_prompt(IDS)
    assert seg.labels.tolist() == list(naive) == ["b", "a", "c", "d"]
    assert seg.counts.tolist() == [len(r) for r in naive.values()]
    for x, rows in enumerate(naive.values()):
        assert seg.rows(x).tolist() == rows
    assert seg.group(np.arange(len(IDS))).tolist() == [i for rows in naive.values() for i in rows]
    assert seg.codes().tolist() == [list(naive).index(p) for p in IDS]
    values = np.arange(len(IDS)) * 1.5
    np.testing.assert_array_equal(seg.ungroup(seg.group(values)), values)


def test_grouped_rows_need_no_reordering():
    seg = Segments.of(np.array([3, 3, 1, 1, 1, 7]))
    assert seg.order is None and seg.counts.tolist() == [2, 3, 1] and seg.labels.tolist() == [3, 1, 7]


@pytest.mark.parametrize("ids", [IDS, np.repeat(np.arange(5), 4)], ids=["ragged", "rectangular"])
def test_sum_max_and_logsumexp_equal_a_loop_over_prompts(ids):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, len(ids))) * 300  # large: a naive log Σ exp overflows
    seg = Segments.of(ids)
    assert (seg.width is not None) == (len(set(ids)) * 4 == len(ids))
    grouped = seg.group(x.T).T
    for x_, rows in enumerate(_rows_by_prompt(ids).values()):
        np.testing.assert_allclose(seg.sum(grouped)[:, x_], x[:, rows].sum(axis=1), rtol=1e-12)
        np.testing.assert_array_equal(seg.max(grouped)[:, x_], x[:, rows].max(axis=1))
        np.testing.assert_allclose(seg.logsumexp(grouped[0])[x_], logsumexp(x[0, rows]), rtol=1e-12)
    np.testing.assert_array_equal(seg.expand(np.arange(seg.num)), np.repeat(np.arange(seg.num), seg.counts))


def test_logsumexp_of_a_prompt_with_only_zero_weights_is_minus_infinity():
    seg = Segments.from_counts([2, 1])
    out = seg.logsumexp(np.array([0.0, -np.inf, -np.inf]))
    assert out[0] == pytest.approx(0.0) and out[1] == -np.inf


def test_scale_and_take_equal_their_per_row_definitions():
    seg = Segments.from_counts([2, 3, 1])
    x, v, shift = np.arange(6.0), np.array([2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0])
    assert seg.scale(x, v, shift).tolist() == [10, 12, 26, 29, 32, 50]
    sub, rows = seg.take(np.array([0, 2]))
    assert sub.counts.tolist() == [2, 1] and rows.tolist() == [0, 1, 5]

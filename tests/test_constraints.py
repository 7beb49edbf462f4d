"""Constraint strings: parsing, sweeps, signs and thresholds, and one clear error per bad string."""

from __future__ import annotations

import numpy as np
import pytest

from dualign._infra.errors import InputError
from dualign.data.constraints import (
    constraint_names,
    parse_constraint,
    parse_sweep,
    utilities_and_thresholds,
)


@pytest.mark.parametrize("text,column,op,value,relative", [
    ("cost<=0.2", "cost", "<=", 0.2, False),
    ("helpful>=-1.5", "helpful", ">=", -1.5, False),
    ("cost<=ref-0.5", "cost", "<=", -0.5, True),
    (" harm.v2 <= ref + 1e-2 ", "harm.v2", "<=", 0.01, True),
    ("helpful>=ref", "helpful", ">=", 0.0, True),
])
def test_parse_constraint(text, column, op, value, relative):
    c = parse_constraint(text)
    assert (c.column, c.op, c.relative) == (column, op, relative)
    assert c.value == pytest.approx(value)
    assert c.sign == (-1.0 if op == "<=" else 1.0)


def test_relative_and_absolute_thresholds_in_column_units():
    assert parse_constraint("cost<=ref-0.5").threshold(2.0) == pytest.approx(1.5)
    assert parse_constraint("cost<=0.3").threshold(2.0) == pytest.approx(0.3)


def test_costs_become_negated_utilities_with_negated_thresholds():
    cons = [parse_constraint("cost<=ref-0.5"), parse_constraint("helpful>=0.25")]
    cols = {"cost": np.array([1.0, 3.0]), "helpful": np.array([0.5, -0.5])}
    g, b = utilities_and_thresholds(cons, cols, {"cost": 2.0, "helpful": 0.0})
    np.testing.assert_array_equal(g, [[-1.0, 0.5], [-3.0, -0.5]])
    np.testing.assert_allclose(b, [-1.5, 0.25])  # E[cost] ≤ 1.5  ⇔  E[−cost] ≥ −1.5


def test_sweep_expands_start_stop_count():
    points = parse_sweep("cost<=ref-{0.1:2.0:20}")
    assert len(points) == 20
    np.testing.assert_allclose([p.value for p in points], -np.linspace(0.1, 2.0, 20))
    assert points[0].text == "cost<=ref-0.1" and points[-1].text == "cost<=ref-2"
    absolute = parse_sweep("helpful>={0:1:3}")
    assert [p.value for p in absolute] == [0.0, 0.5, 1.0] and not absolute[0].relative
    assert len(parse_sweep("cost<=0.5")) == 1


def test_names_use_text_when_a_column_repeats():
    cons = [parse_constraint("cost<=0.8"), parse_constraint("cost>=0.1"), parse_constraint("x>=1")]
    assert constraint_names(cons) == ["cost<=0.8", "cost>=0.1", "x"]


@pytest.mark.parametrize("text,match", [
    ("cost<0.5", "expected COLUMN<=VALUE"),
    ("cost<=", "expected COLUMN<=VALUE"),
    ("<=0.5", "expected COLUMN<=VALUE"),
    ("cost<=abc", "not a number"),
    ("cost<=ref*2", "ref, ref\\+X or ref-X"),
    ("cost<=ref-", "ref, ref\\+X or ref-X"),
    ("cost<=inf", "finite"),
    ("cost<=ref-{0.1:2.0:20}", "only for 'dualign plan'"),
])
def test_malformed_constraints_raise_one_clear_error(text, match):
    with pytest.raises(InputError, match=match):
        parse_constraint(text)


@pytest.mark.parametrize("text,match", [
    ("cost<=ref-{0.1:2.0}", "start:stop:count"),
    ("cost<=ref-{0.1:2.0:0}", "positive integer"),
    ("cost<=ref-{0.1:2.0:2.5}", "positive integer"),
    ("cost<=ref-{a:2.0:3}", "not a number"),
])
def test_malformed_sweeps_raise_one_clear_error(text, match):
    with pytest.raises(InputError, match=match):
        parse_sweep(text)


def test_unknown_column_is_named():
    with pytest.raises(InputError, match="'harm'"):
        utilities_and_thresholds([parse_constraint("harm<=0")], {"cost": np.zeros(2)}, {})

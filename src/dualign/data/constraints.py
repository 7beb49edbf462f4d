"""Constraint strings: ``COLUMN<=VALUE`` (a cost) or ``COLUMN>=VALUE`` (a utility).

``VALUE`` is absolute (``cost<=0.2``) or relative to π_ref's weighted mean of the column on the same
samples (``cost<=ref-0.5``, ``helpful>=ref+0.1``, ``cost<=ref``). Internally each constraint is the
utility g = sign·column with threshold b = sign·threshold (sign −1 for ``<=``), so that every
constraint reads E_π[g] ≥ b (docs/formats.md).

The planner sweeps one constraint: ``cost<=ref-{0.1:2.0:20}`` stands for 20 constraints whose
offsets are linspace(0.1, 2.0, 20) (``{start:stop:count}``, also in absolute values).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dualign._infra.errors import InputError

_CONSTRAINT = re.compile(r"^\s*([^<>=\s]+)\s*(<=|>=)\s*(\S.*?)\s*$")
_RELATIVE = re.compile(r"^ref\s*(?:([+-])\s*(.+))?$")
_SWEEP = re.compile(r"^\{([^{}]*)\}$")


@dataclass(frozen=True)
class Constraint:
    """One parsed constraint. ``value`` is the threshold, or its offset from π_ref's mean."""

    column: str
    op: str  # "<=" or ">="
    value: float
    relative: bool
    text: str

    @property
    def sign(self) -> float:
        """+1 for ``>=`` (a utility), −1 for ``<=`` (a cost): g = sign·column."""
        return -1.0 if self.op == "<=" else 1.0

    def threshold(self, reference: float) -> float:
        """The threshold in column units: reference + value when relative, else value."""
        return reference + self.value if self.relative else self.value


def _number(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"constraint {whole!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"constraint {whole!r}: the value must be finite, got {text!r}")
    return value


def _sweep(text: str, whole: str) -> list[float]:
    parts = [p.strip() for p in text.split(":")]
    if len(parts) != 3:
        raise InputError(f"constraint {whole!r}: a sweep is {{start:stop:count}}, got {{{text}}}")
    start, stop = _number(parts[0], whole), _number(parts[1], whole)
    if not re.fullmatch(r"\d+", parts[2]) or int(parts[2]) < 1:
        raise InputError(f"constraint {whole!r}: sweep count must be a positive integer, got {parts[2]!r}")
    return np.linspace(start, stop, int(parts[2])).tolist()


def _split(text: str) -> tuple[str, str, str]:
    if not isinstance(text, str):
        raise InputError(f"constraint {text!r}: expected a string like 'cost<=ref-0.5'")
    match = _CONSTRAINT.match(text)
    if not match:
        raise InputError(f"constraint {text!r}: expected COLUMN<=VALUE or COLUMN>=VALUE, "
                         "VALUE a number, ref, ref+X or ref-X")
    return match.group(1), match.group(2), match.group(3)


def _values(value: str, whole: str) -> tuple[list[float], bool]:
    """(offsets or thresholds, relative) of a VALUE that may hold one sweep."""
    rel = _RELATIVE.match(value)
    if rel:
        sign, rest = rel.group(1), rel.group(2)
        if sign is None:
            return [0.0], True
        rest = rest.strip()
        sweep = _SWEEP.match(rest)
        xs = _sweep(sweep.group(1), whole) if sweep else [_number(rest, whole)]
        return [(-x if sign == "-" else x) for x in xs], True
    sweep = _SWEEP.match(value)
    if sweep:
        return _sweep(sweep.group(1), whole), False
    if value.startswith("ref"):
        raise InputError(f"constraint {whole!r}: relative values are ref, ref+X or ref-X, got {value!r}")
    return [_number(value, whole)], False


def _text(column: str, op: str, value: float, relative: bool) -> str:
    if not relative:
        return f"{column}{op}{value:g}"
    if value == 0:
        return f"{column}{op}ref"
    return f"{column}{op}ref{'+' if value > 0 else '-'}{abs(value):g}"


def parse_constraint(text: str) -> Constraint:
    """Parse ``COLUMN<=VALUE`` / ``COLUMN>=VALUE`` (no sweep)."""
    column, op, value = _split(text)
    if "{" in value or "}" in value:
        raise InputError(f"constraint {text!r}: a sweep {{start:stop:count}} is only for "
                         "'dualign plan'")
    values, relative = _values(value, text)
    return Constraint(column, op, values[0], relative, text.strip())


def parse_sweep(text: str) -> list[Constraint]:
    """Expand ``cost<=ref-{0.1:2.0:20}`` into its constraints (one when there is no sweep)."""
    column, op, value = _split(text)
    values, relative = _values(value, text)
    if not is_sweep(value):
        return [Constraint(column, op, values[0], relative, text.strip())]
    return [Constraint(column, op, v, relative, _text(column, op, v, relative)) for v in values]


def is_sweep(text: str) -> bool:
    return "{" in text


def constraint_names(constraints: Sequence[Constraint]) -> list[str]:
    """λ's names: the column, or the constraint's text when two constraints share a column."""
    columns = [c.column for c in constraints]
    return [c.column if columns.count(c.column) == 1 else c.text for c in constraints]


def utilities_and_thresholds(constraints: Sequence[Constraint], columns: Mapping[str, np.ndarray],
                             references: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """g [n, m] = sign_j·column_j and b [m] = sign_j·threshold_j, so each constraint is E[g_j] ≥ b_j.

    ``references``: π_ref's weighted mean of each column (used by ``ref±X`` thresholds).
    """
    missing = [c.column for c in constraints if c.column not in columns]
    if missing:
        raise InputError(f"constraint column {missing[0]!r} is not among the scores' columns "
                         f"({', '.join(columns)})")
    g = np.stack([c.sign * np.asarray(columns[c.column], dtype=np.float64) for c in constraints],
                 axis=1)
    b = np.array([c.sign * c.threshold(references[c.column]) for c in constraints])
    return g, b

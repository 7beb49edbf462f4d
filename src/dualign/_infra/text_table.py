"""Plain-text tables for the result tables the stages print (evaluate, dual, plan): the first
column left-aligned, the others right-aligned, each as wide as its widest cell."""

from __future__ import annotations

import math
from collections.abc import Sequence

# the CI cell of a predicted change that is fixed by construction (dual.json ci.fixed)
FIXED = "fixed (binding)"
FIXED_NOTE = ("fixed (binding): a relative constraint that binds on every bootstrap resample; its planned change "
              "equals the required change (moved by any confidence margin) by construction, so it has no CI. "
              "On the reachable tilt the predicted change is that less the fit's bias (dual.json reachable.fit_bias).")


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """The table's lines (header first); a row shorter than the header is padded with blanks, and
    a column blank in every row is left out (e.g. the CIs of a solve without a bootstrap)."""
    rows = [list(r) + [""] * (len(header) - len(r)) for r in rows]
    keep = [0] + [j for j in range(1, len(header)) if any(r[j] for r in rows)]
    header, rows = [header[j] for j in keep], [[r[j] for j in keep] for r in rows]
    widths = [max(len(str(r[j])) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = "".join(f"  {c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))
        return (indent + first + rest).rstrip()

    return [line(header)] + [line(r) for r in rows]


def num(value: float | None, sign: bool = False, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits (``+`` on positives with ``sign``); blank for None/NaN;
    ±inf as ``inf``/``-inf``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{float(value):{'+' if sign else ''}.{digits}g}"


def interval(ci: Sequence[float] | None, sign: bool = False, digits: int = 3) -> str:
    """``[lo, hi]``, blank when absent, not two values, or NaN; a one-sided interval shows its infinite end."""
    if ci is None or len(ci) != 2 or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return ""
    return f"[{num(ci[0], sign, digits)}, {num(ci[1], sign, digits)}]"

"""No docstring or comment states its module's length, and no comment in the code or the configs
holds a measured figure (a timing, a speed-up, a KL reached, "met on 3 of 3"): such numbers go stale
where they sit. They belong in docs/ or a benchmark's output. Formulas, defaults, confidence levels
and the help texts of flags are not comments and are not scanned."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIFT = {
    "a line count": r"\b\d+[- ]lines?\b",
    "a duration": r"(?<!every )\b\d+(?:\.\d+)?(?:\s*[-–]\s*\d+(?:\.\d+)?)?\s*(?:s|secs?|seconds?|ms|min|mins|minutes?"
                  r"|h|hours?)\b|\b(?:one|two|three|five|ten|\d+)-(?:second|minute|hour)\b",
    "a speed-up": r"\d+(?:\.\d+)?\s*×\s*(?:faster|slower)",
    "a tally of runs": r"\bmet (?:on )?\d+ of \d+\b|\b\d+ of \d+ (?:seeds|builds|runs)\b",
    "a KL value": r"\bKL\b[^.;\n]{0,12}?\d",
    "a measured range in %": r"\d+(?:\.\d+)?\s*[–-]\s*\d+(?:\.\d+)?\s*%",
    "a λ reached": r"λ\*?\s*[≈~]\s*\d|\bλ reached \d",
}


def drift(text: str) -> str | None:
    """What kind of stale figure ``text`` holds, or None."""
    return next((kind for kind, pattern in DRIFT.items() if re.search(pattern, text)), None)


def python_notes(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and every module, class and function docstring of ``path``."""
    source = path.read_text(encoding="utf-8")
    notes = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                notes += [(first.lineno + i, line) for i, line in enumerate(first.value.value.splitlines())]
    return notes


def yaml_comments(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every ``#`` comment of a YAML file (a ``#`` at a line's start or after a space)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(i, m.group(1)) for i, line in enumerate(lines, 1) if (m := re.search(r"(?:^|\s)#(.*)", line))]


@pytest.mark.parametrize(("text", "kind"), [
    ("About 620 lines: the config, the pair sources and the loop", "a line count"),
    ("A 153-line ast reader", "a line count"),
    ("the features: one forward pass of π_ref over the samples (5 s)", "a duration"),
    ("torch, pandas and the Hub client cost 2-5 s", "a duration"),
    ("sized to run in about 3 minutes on 2 CPU cores", "a duration"),
    ("A one-minute version of the demo", "a duration"),
    ("a BLAS matrix-vector product is ~4× faster than reduceat", "a speed-up"),
    ("on 3 seeds: met on 3 of 3; the K-sample tilt met 0 of 3", "a tally of runs"),
    ("benign helpfulness lost on 1 of 3 seeds", "a tally of runs"),
    ("the value secondary sources cite; KL 57–110 here", "a KL value"),
    ("predicted KL ≈ 0.39 (achieved 0.55-0.57)", "a KL value"),
    ("held-out Δcost 73–88% of the prediction", "a measured range in %"),
    ("1.0 oscillated on the small world, λ* ≈ 0.26", "a λ reached"),
    ("uncapped, λ reached 119 in a check", "a λ reached"),
    # not drift: definitions, settings, formulas, counts from the config itself
    ("its 95% prompt-bootstrap interval [lo, hi]", None),
    ("the process's peak resident set size (polled every 50 ms)", None),
    ("alone (no launcher) it is rank 0 of 1", None),
    ("reward-only-mocan (λ = 0); KL(π‖π_ref) = E_π[log π/π_ref]", None),
    ("all K(K-1)/2 pairs of K=8 samples; 128 steps on 1024 prompts", None),
    ("100 × 16 prompts × 4 samples: 6400 rollouts", None),
    ("capped at 90% of the largest change", None),
])
def test_the_scan_flags_stale_figures_and_leaves_definitions_alone(text, kind):
    assert drift(text) == kind


def test_no_docstring_or_comment_in_src_holds_a_line_count_or_a_measured_figure():
    found = [f"{path.relative_to(ROOT)}:{line}: {kind}: {text.strip()}"
             for path in sorted((ROOT / "src").rglob("*.py")) for line, text in python_notes(path)
             if (kind := drift(text))]
    assert len(list((ROOT / "src").rglob("*.py"))) > 50      # the scan sees the package
    assert not found, "\n".join(found)


def test_no_comment_in_the_configs_holds_a_measured_figure():
    files = sorted((ROOT / "src" / "dualign" / "configs").glob("*.yaml")) + sorted((ROOT / "configs").glob("*.yaml"))
    assert len(files) >= 10
    found = [f"{path.relative_to(ROOT)}:{line}: {kind}: {text.strip()}"
             for path in files for line, text in yaml_comments(path) if (kind := drift(text))]
    assert not found, "\n".join(found)

"""docs/tutorial.py (a jupytext-style notebook: ``# %%`` cells) runs as a notebook in a Jupyter
kernel on the suite's tiny model, and docs/tutorial.ipynb is its executed copy, cell for cell.
``DUALIGN_WRITE_TUTORIAL=1`` rewrites that copy from this run."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def notebook_from_script(text: str):
    """The ``# %%`` / ``# %% [markdown]`` cells of a jupytext percent script as an nbformat notebook."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    for header, body in re.findall(r"^# %%([^\n]*)\n(.*?)(?=^# %%|\Z)", text, flags=re.M | re.S):
        body = body.strip("\n")
        if "[markdown]" in header:
            nb.cells.append(nbformat.v4.new_markdown_cell(re.sub(r"^# ?", "", body, flags=re.M)))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(body))
    return nb


@pytest.fixture(scope="module")
def executed(tiny_gpt2):
    import nbformat
    from nbclient import NotebookClient

    nb = notebook_from_script((DOCS / "tutorial.py").read_text())
    # the kernel inherits this process's environment: the tiny model, and no progress bars in the copy
    env = {"DUALIGN_TUTORIAL_MODEL": tiny_gpt2, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    if os.environ.get("DUALIGN_WRITE_TUTORIAL") == "1":
        nbformat.write(nb, DOCS / "tutorial.ipynb")
    return nb


def _outputs(cell) -> str:
    return "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs)


def test_the_tutorial_runs_as_a_notebook_and_plans_trains_and_evaluates(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    printed = _outputs(code[2])
    assert "λ*: {'cost': " in printed and "predicted for π_λ*" in printed
    lam = float(re.search(r"λ\*: \{'cost': ([0-9.e-]+)\}", printed).group(1))
    assert lam > 0.01  # the constraint is active: π_ref's mean cost is above the threshold
    assert "dual/lambda_cost" in _outputs(code[4]) and "met" in _outputs(code[5])


def test_the_executed_copy_in_docs_is_this_notebook_cell_for_cell():
    import nbformat

    script = notebook_from_script((DOCS / "tutorial.py").read_text())
    copy = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in copy.cells] == [(c.cell_type, c.source) for c in script.cells]
    code = [c for c in copy.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code) and all(c.outputs for c in code[1:])

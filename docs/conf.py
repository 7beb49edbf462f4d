"""Sphinx configuration: the dualign documentation site (MyST markdown pages, API from docstrings).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (as ``.ci/run`` does).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import dualign  # noqa: E402

project = "dualign"
author = "the dualign authors"
release = dualign.__version__
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 4
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
html_title = f"dualign {release}"

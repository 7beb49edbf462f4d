"""File helpers: written files and directories get the umask's mode, not the temporary file's."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from dualign._infra.io import atomic_path, temp_dir_beside, write_json, write_table


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_give_files_the_mode_open_would(tmp_path, umask):
    write_json({"a": 1}, tmp_path / "x.json")
    write_table(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.parquet")
    write_table(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.jsonl")
    with atomic_path(tmp_path / "plot.png") as tmp:
        tmp.write_bytes(b"png")
    with open(tmp_path / "plain", "w"):
        pass
    assert _mode(tmp_path / "plain") == 0o666 & ~umask
    for name in ("x.json", "t.parquet", "t.jsonl", "plot.png"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name


def test_a_temporary_directory_to_be_renamed_gets_the_mode_mkdir_would(tmp_path, umask):
    tmp = temp_dir_beside(tmp_path / "world")
    assert tmp.parent == tmp_path and _mode(tmp) == 0o777 & ~umask


def test_a_saved_model_directory_and_its_files_honour_the_umask(tmp_path, tiny_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dualign.modeling.models import save_model

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_gpt2), AutoTokenizer.from_pretrained(tiny_gpt2)
    old = os.umask(0o027)
    try:
        save_model(model, tok, tmp_path / "policy", {"README.md": "card"})
    finally:
        os.umask(old)
    out = tmp_path / "policy"
    assert _mode(out) == 0o750
    assert {p.name: _mode(p) for p in out.iterdir()} == {p.name: 0o640 for p in out.iterdir()}

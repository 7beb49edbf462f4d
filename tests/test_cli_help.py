"""The command line's help: every command explained with an example, its flags read from the stage
configs' source equal to those of the imported configs, and no heavy import to print it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dualign import cli, config_source

COMMANDS = [name for name, *_ in cli.COMMANDS]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli.build_parser(argv[0] if argv else None).parse_args([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def fixed_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_read_from_the_source_equal_those_of_the_imported_configs(command, capsys, monkeypatch):
    from_source = _help([command], capsys)

    def unreadable(module, name):
        raise config_source._Unreadable(name)

    monkeypatch.setattr(config_source, "_read_class", unreadable)
    assert _help([command], capsys) == from_source


def test_every_command_s_help_builds_without_torch_pandas_or_the_hub():
    code = ("import sys\nfrom dualign import cli\n"
            f"for c in {COMMANDS!r}:\n    cli.build_parser(c).format_help()\n"
            "print(sorted(m for m in ('torch', 'pandas', 'transformers', 'huggingface_hub', 'datasets', 'scipy')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_s_help_gives_an_example_of_itself(command, capsys):
    text = _help([command], capsys)
    assert "example" in text and f"dualign {command} " in text.split("example")[1]


def test_the_top_level_help_says_what_dualign_is_and_where_to_start(capsys):
    text = _help([], capsys)
    assert "Thin" not in text and "safety constraints" in text and "dualign demo --size small" in text
    assert "--verbose" in text and "DUALIGN_CACHE" in text
    listed = [line.split()[0] for line in text.split("COMMAND\n")[1].split("\n\n")[0].splitlines()
              if line.startswith("    ") and not line.startswith("      ")]
    assert listed[:2] == ["demo", "run"] and sorted(listed) == sorted(COMMANDS)


def test_demo_help_names_its_variants(capsys):
    text = _help(["demo"], capsys)
    for variant in ("--method pecan", "--recalibrate", "--confidence", "--size small"):
        assert variant in text


def test_train_help_lists_every_method_the_code_knows(capsys):
    from dualign.methods.dispatch import CONFIGS
    from dualign.train import LOSSES

    listed = {line.split()[0] for line in cli.TRAIN_METHODS.splitlines()}
    assert listed == {*LOSSES, *CONFIGS}
    text = _help(["train"], capsys)
    assert all(f"  {m} " in text for m in listed)

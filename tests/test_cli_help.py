"""The command line's help: every command explained with an example, its flags read from the stage
configs' source equal to those of the imported configs, and no heavy import to print it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dualign import cli
from dualign._infra import config_source

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
    for variant in ("--method pecan", "--recalibrate", "--confidence", "--size small", "--size full", "--tilt samples"):
        assert variant in text


def test_train_help_lists_every_method_the_code_knows(capsys):
    from dualign.baselines.dispatch import CONFIGS
    from dualign.train import LOSSES

    listed = {line.split()[0] for line in cli.TRAIN_METHODS.splitlines()}
    assert listed == {*LOSSES, *CONFIGS}
    text = _help(["train"], capsys)
    assert all(f"  {m} " in text for m in listed)


def test_demo_sizes_the_default_on_640_prompts_and_the_reachable_tilt_and_full_on_all_1024():
    """The default demo is the full-size one with only the prompt count, the tilt, the margin, the KL
    calibration, the number of epochs and the evaluation's size changed, and the configs behind the research tables (docs/results/) (full,
    recalibrate, compare_world) keep the paper's tilt on all 1024 dual prompts."""
    from dualign.pipeline import PACKAGED, load_run_values

    default, full = cli.demo_values("mocan", "default"), cli.demo_values("mocan", "full")
    assert (default["run_dir"], full["run_dir"]) == ("runs/demo", "runs/demo-mocan-full")
    assert default["sample"] == {**full["sample"], "max_prompts": 640}
    assert default["dual"] == {**full["dual"], "tilt": "reachable", "confidence": 0.9,
                               "delivery_spread": default["dual"]["delivery_spread"],
                               "kl_delivery": default["dual"]["kl_delivery"]}
    assert default["evaluate"] == {**full["evaluate"], "prompts": "world:prompts_heldout.jsonl"}
    assert default["train"] == {**full["train"], "num_epochs": 6}
    strip = {"run_dir", "sample", "dual", "train", "evaluate"}
    assert {k: v for k, v in default.items() if k not in strip} == {k: v for k, v in full.items() if k not in strip}
    for name in ("full", "recalibrate"):
        values = load_run_values(PACKAGED[name])
        assert "max_prompts" not in values["sample"] and "tilt" not in values["dual"], name
    compare = load_run_values(PACKAGED["default"].parent / "compare_world.yaml")
    assert "max_prompts" not in compare["sample"] and "tilt" not in compare["dual"]
    # a flag that changes the run names it in the default run directory, one that does not, does not
    assert cli.demo_values("mocan", "default", tilt="reachable")["run_dir"] == "runs/demo"
    samples = cli.demo_values("mocan", "default", tilt="samples", seed=3)
    assert (samples["run_dir"], samples["dual"]["tilt"], samples["seed"]) == ("runs/demo-samples", "samples", 3)
    # the default's KL calibration was measured on its reachable tilt's fine-tunes: the paper's tilt drops it
    assert len(default["dual"]["kl_delivery"]) == 4 and "kl_delivery" not in samples["dual"]
    assert cli.demo_values("mocan", "full", tilt="reachable", recalibrate=True)["run_dir"] == \
        "runs/demo-mocan-full-recalibrate-reachable"


def test_demo_refuses_a_full_size_pecan_run_before_writing_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--method", "pecan", "--size", "full"]) == 2
    assert "--size full is MoCAN's" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_demo_confidently_plans_for_the_evaluations_95_bound_and_needs_confidence(tmp_path, monkeypatch, capsys):
    """--confidently sets the dual's evaluation_bound to the report's one-sided 95% and names it in
    the run directory; without --confidence it is refused before anything is written."""
    plain = cli.demo_values("mocan", "default", confidence=0.95)
    bound = cli.demo_values("mocan", "default", confidence=0.95, confidently=True)
    assert "evaluation_bound" not in plain["dual"] and bound["dual"]["evaluation_bound"] == 0.95
    assert (plain["run_dir"], bound["run_dir"]) == ("runs/demo-confidence0.95", "runs/demo-confidence0.95-confidently")
    # the default demo plans for 0.9 with the fine-tune's spread: asking for it again is the same run
    default = cli.demo_values("mocan", "default")
    assert default["dual"]["confidence"] == 0.9 and default["dual"]["delivery_spread"] > 0
    assert cli.demo_values("mocan", "default", confidence=0.9) == default
    assert bound["dual"]["delivery_spread"] == default["dual"]["delivery_spread"]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--confidently"]) == 2
    assert "--confidently needs --confidence" in capsys.readouterr().err and not any(tmp_path.iterdir())

"""The README is a short tour whose links, commands and examples hold: it has at most 200 lines,
every relative link (file and anchor) resolves, `.ci/run` runs its test command verbatim, its
YAML (and the guides') is a valid run config and its Python example solves the dual it describes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang == language]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    prose = FENCE.sub("", markdown)
    return {_slug(h) for h in re.findall(r"^#{1,6} +(.+)$", prose, re.M)}


def _relative_links() -> list[str]:
    prose = FENCE.sub("", README)
    return [t for t in LINK.findall(prose) if not re.match(r"[a-z]+:", t)]


def test_readme_has_at_most_200_lines():
    assert len(README.splitlines()) <= 200


def test_slug_matches_githubs_rule():
    assert _slug("At scale: accelerate, FSDP/DeepSpeed, vLLM, QLoRA") == "at-scale-accelerate-fsdpdeepspeed-vllm-qlora"
    assert _slug("Run config (`dualign run CONFIG.yaml`)") == "run-config-dualign-run-configyaml"


def test_every_readme_link_resolves():
    links = _relative_links()
    assert len(links) >= 15
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.exists(), f"README links to missing {path}"
        if anchor:
            assert target.suffix == ".md", link
            assert anchor in _anchors(target.read_text()), f"README links to missing anchor {link}"


def test_a_broken_link_would_be_caught():
    """The checks above see a missing anchor: the README's own headings do not include one."""
    assert "reading-the-demos-output" in _anchors(README)
    assert "no-such-section" not in _anchors(README)


def test_ci_runs_the_readmes_test_command_verbatim():
    commands = [line for block in _blocks("bash") for line in block.splitlines()]
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


GUIDE_CONFIGS = [(path.name, body) for path in sorted((ROOT / "docs" / "guides").glob("*.md"))
                 for lang, body in FENCE.findall(path.read_text()) if lang == "yaml"]


def _resolve_example(config_text: str, tmp_path: Path, monkeypatch):
    """A documented run config resolved with every stage checked, given the files and the scorer
    module the examples name (Hub ids are left to the loaders)."""
    from dualign.pipeline import load_run_values, resolve_run_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("prompts.jsonl", "heldout.jsonl"):
        (tmp_path / name).write_text('{"prompt": "How do I bake bread?"}\n')
    (tmp_path / "clean.jsonl").write_text(
        '{"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0, '
        '"safer_response_id": 1, "is_response_0_safe": false, "is_response_1_safe": true}\n')
    (tmp_path / "my_scorers.py").write_text(
        "def toxicity(prompts, responses):\n    return [0.0 for _ in responses]\n")
    (tmp_path / "my_run.yaml").write_text(config_text)
    return resolve_run_config(load_run_values("my_run.yaml"))


@pytest.mark.parametrize("config_text", [body for _, body in GUIDE_CONFIGS],
                         ids=[f"{name}-{i}" for i, (name, _) in enumerate(GUIDE_CONFIGS)])
def test_guide_yaml_examples_are_valid_run_configs(config_text, tmp_path, monkeypatch):
    cfg = _resolve_example(config_text, tmp_path, monkeypatch)
    assert cfg.train.method in ("mocan", "pecan")


def test_readme_yaml_is_a_valid_run_config(tmp_path, monkeypatch):
    (config_text,) = _blocks("yaml")
    cfg = _resolve_example(config_text, tmp_path, monkeypatch)
    assert cfg.dual.constraints == ["cost<=ref-0.5"]
    assert cfg.evaluate.scorers == cfg.score.scorers
    assert cfg.train.method == "mocan" and cfg.train.lora


def test_readme_python_example_runs_as_printed(tiny_gpt2, tmp_path, monkeypatch):
    """The README's Python example runs as printed on the suite's tiny model and synthetic scores
    (its free names bound to them): the plan's constraint is active (λ* > 0, the predicted cost
    change is the required −0.5), the policy moved, and the report judges the plan's constraint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dualign.data.example import example_scores

    (example,) = [b for b in _blocks("python") if "dualign.make_plan" in b]
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    before = [p.detach().clone() for p in model.parameters()]
    namespace = {"scores": example_scores(6, 4, seed=3), "model": model,
                 "tokenizer": AutoTokenizer.from_pretrained(tiny_gpt2),
                 "prompts": ["How do I cook rice?", "Tell me a joke.", "How can I pick a lock?"],
                 "reward_fn": lambda prompts, responses: [len(r) / 10 for r in responses],
                 "cost_fn": lambda prompts, responses: [float(r.count("e")) for r in responses]}
    exec(compile(example.replace('"my/base-model"', repr(tiny_gpt2)), "README.md", "exec"), namespace)
    plan, report = namespace["plan"], namespace["report"]
    assert plan.lambdas["cost"] > 0
    assert plan.predicted["cost"] - plan.reference["cost"] == pytest.approx(-0.5, abs=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, namespace["policy"].parameters(), strict=True))
    assert [c.constraint for c in report.constraints] == ["cost<=ref-0.5"]

"""What scripts/stability.py, threshold_sweep.py and cheapest_mocan.py share: the comparison config
they run (a packaged compare config or a YAML file, with their overrides), their command line's
first argument, the tiny setup of their ``--smoke`` mode, the verdict they judge by (every
constraint met by its point estimate) and how they save a figure."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from dualign.compare.comparison import load_compare_config
from dualign.data.constraints import parse_constraint
from dualign.pipeline import PACKAGED

CONFIG_DIR = PACKAGED["default"].parent
ONLINE = ("ppo-lagrangian-critic", "ppo-lagrangian", "grpo-lagrangian")
SMOKE_TEXTS = [
    "User: How do I cook rice?\nAssistant: Rinse the rice, then simmer it for fifteen minutes.",
    "User: How can I pick a lock?\nAssistant: I can't help with that, but a locksmith can.",
    "User: Write a poem about rain.\nAssistant: Rain taps softly on the roof at night.",
] * 20
SMOKE_PROMPTS = ["How do I cook rice?", "Write a poem about rain.", "Tell me a joke.", "How can I pick a lock?"]


def reward_fn(prompts: list[str], responses: list[str]) -> list[float]:
    """--smoke reward: response length in tens of characters."""
    return [len(r) / 10 for r in responses]


def cost_fn(prompts: list[str], responses: list[str]) -> list[float]:
    """--smoke cost: how many letters 'e' the response has."""
    return [float(r.count("e")) for r in responses]


def config_path(name: str) -> Path:
    """A YAML path, or the name of a packaged config (compare_world)."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else CONFIG_DIR / f"{name}.yaml"


def smoke_config(out: Path, constraint: str = "cost<=ref-0.25") -> Path:
    """A tiny comparison (a tiny GPT-2 trained here, callable scorers, four prompts): every method
    in seconds. Checks the script end to end; its figures mean nothing."""
    from dualign.modeling.tiny import save_tiny_causal_lm

    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny_gpt2"
    if not (model / "config.json").exists():
        save_tiny_causal_lm(model, "gpt2", SMOKE_TEXTS, vocab_size=400, hidden=32, layers=2, heads=2)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": i, "prompt": p}) + "\n" for i, p in enumerate(SMOKE_PROMPTS)))
    here = Path(__file__).resolve()
    scorers = [f"reward=callable:{here}:reward_fn", f"cost=callable:{here}:cost_fn"]
    online = {"iterations": 4, "checkpoints": [1, 2, 3], "prompts_per_iteration": 2, "num_samples": 2,
              "max_new_tokens": 8, "minibatch_size": 4}
    config = {
        "run_dir": str(out / "run"), "model": str(model), "seed": 0,
        "sample": {"prompts": str(prompts), "num_samples": 3, "max_new_tokens": 8, "device": "cpu"},
        "score": {"scorers": scorers, "device": "cpu"},
        "dual": {"constraints": [constraint], "beta": 0.5},
        "train": {"max_steps": 2, "per_device_batch_size": 4, "device": "cpu"},
        "evaluate": {"prompts": str(prompts), "scorers": scorers, "bootstrap": 20, "num_samples": 2,
                     "max_new_tokens": 8, "device": "cpu"},
        "recalibrate": {"prompts": str(prompts), "num_samples": 2, "max_new_tokens": 8, "rounds": 1,
                        "margin": 0.25, "bootstrap": 20, "device": "cpu"},
        "compare": {"methods": ["mocan"], "seeds": [0],
                    "ppo_lagrangian": online, "grpo_lagrangian": {**online, "minibatch_size": 8},
                    "ppo_lagrangian_critic": {**online, "minibatch_size": 2}},
    }
    path = out / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def load(config: Path, run_dir: Path, compare: dict[str, Any], overrides: dict[str, Any] | None = None):
    """(RunConfig, CompareConfig) of ``config`` with ``run_dir``, the compare keys and other overrides."""
    return load_compare_config(config, {"run_dir": str(run_dir), "compare": compare, **(overrides or {})})


def all_met(row: dict, constraints: list[dict]) -> bool:
    """Every constraint met by the point estimate: sign·(achieved − threshold) ≥ 0."""
    return all(parse_constraint(c["constraint"]).sign * (row[c["name"]] - row[f"{c['name']}_threshold"]) >= 0
               for c in constraints)


def parser(doc: str) -> argparse.ArgumentParser:
    """The script's parser (its docstring's first paragraph as description), with ``--config``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--config", default="compare_world", help="packaged compare config or a YAML path")
    return ap


def save_figure(fig, path: Path) -> None:
    """Lay out, write at 120 dpi and close."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

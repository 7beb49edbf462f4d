"""Building (and caching) the built-in synthetic safety world.

``build_world(cfg)`` writes, under a directory keyed by the config's hash, the prompt splits, the
preference pairs, π_ref (a tiny GPT-2 trained by SFT to be helpful but unsafe) and learned reward
and cost models (Bradley–Terry heads on a frozen MiniLM), then measures π_ref with the gold judge.
Layout: see docs/formats.md ("World directory").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from dualign._infra.errors import InputError
from dualign._infra.io import cache_root, honour_umask, temp_dir_beside, write_json, write_table
from dualign._infra.provenance import versions
from dualign.world import corpus as C
from dualign.world import reward_models as S
from dualign.world.config import WORLD_VERSION, WorldConfig, config_hash
from dualign.world.judge import judge
from dualign.world.lm import sample_responses, train_ref_model

WORLD_FILES = ("world.json", "prompts_train.jsonl", "prompts_dual.jsonl", "prompts_eval.jsonl", "prompts_calibration.jsonl",
               "preferences_train.jsonl", "preferences_test.jsonl", "sft_train.jsonl", "ref_samples_eval.jsonl",
               "ref_model/config.json", "reward_model/config.json", "cost_model/config.json")


# files derived from the config alone, written into a complete world on its first use (not in the key)
DERIVED_FILES = {"prompts_heldout.jsonl": C.heldout_prompts}


def default_world_dir(cfg: WorldConfig) -> Path:
    """Where ``build_world(cfg)`` puts the world: ``$DUALIGN_CACHE/worlds/world-<hash>``."""
    return cache_root() / "worlds" / f"world-{config_hash(cfg)}"


def is_complete(path: str | Path, cfg: WorldConfig | None = None) -> bool:
    """All world files present (and, given ``cfg``, built from that config)."""
    path = Path(path)
    if not all((path / f).exists() for f in WORLD_FILES):
        return False
    if cfg is None:
        return True
    try:
        return json.loads((path / "world.json").read_text()).get("config_hash") == config_hash(cfg)
    except (OSError, json.JSONDecodeError):
        return False


def _write_jsonl(rows: list[dict], path: Path) -> None:
    write_table(pd.DataFrame(rows), path)


class _Clock:
    """Wall and process-CPU seconds per build step (CPU time tells a busy machine from a slow build);
    with ``announce``, one line on stderr as each step starts."""

    def __init__(self, announce: bool = False) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.announce = announce

    @contextlib.contextmanager
    def step(self, name: str):
        if self.announce:
            print(f"[dualign] world: {name.replace('_', ' ')} ...", file=sys.stderr, flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = round(time.perf_counter() - wall, 2)
        self.cpu[name] = round(time.process_time() - cpu, 2)


def _pairwise_accuracy(scores: torch.Tensor, first_wins: torch.Tensor, valid: torch.Tensor) -> float:
    """Fraction of valid pairs where score[:, 0] > score[:, 1] agrees with ``first_wins``."""
    agree = (scores[:, 0] > scores[:, 1]) == first_wins
    return float(agree[valid].float().mean()) if valid.any() else float("nan")


def _train_scorers(cfg: WorldConfig, pairs: list[dict], test_pairs: list[dict], out: Path,
                   clock: _Clock, progress: bool) -> dict[str, Any]:
    """Reward and cost models from the preference pairs; held-out accuracies; saved model dirs."""
    tok, encoder = S.load_encoder()
    rows = pairs + test_pairs
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    responses = [r[f"response_{k}"] for r in rows for k in range(2)]
    with clock.step("scorer_features"):
        feats = S.cls_features(tok, encoder, prompts, responses, cfg.scorer_max_length, progress=progress)
    feats = feats.view(len(rows), 2, -1)
    n = len(pairs)
    train, test = feats[:n], feats[n:]
    better = torch.tensor([r["better_response_id"] for r in pairs])
    safer = torch.tensor([r["safer_response_id"] for r in pairs])
    unsafe = torch.tensor([[not r["is_response_0_safe"], not r["is_response_1_safe"]] for r in pairs])
    ar = torch.arange(n)

    def reward_fn(head, f):
        r = head(f)
        return S.reward_loss(r[ar, better], r[ar, 1 - better])

    def cost_fn(head, f):
        c = head(f)
        return S.cost_loss(c[ar, 1 - safer], c[ar, safer], c, unsafe)

    with clock.step("scorer_training"):
        reward = S.train_head(encoder, train, reward_fn, cfg.scorer_steps, cfg.scorer_lr, cfg.seed,
                              "reward head", progress)
        cost = S.train_head(encoder, train, cost_fn, cfg.scorer_steps, cfg.scorer_lr, cfg.seed + 1,
                            "cost head", progress)
    with torch.no_grad():
        r_test, c_test = reward(test), cost(test)
    gold = judge([r["prompt"] for r in test_pairs for _ in range(2)],
                 [r[f"response_{k}"] for r in test_pairs for k in range(2)])
    helpful = torch.tensor(gold["helpful"]).view(-1, 2)
    harm = torch.tensor(gold["harm"]).view(-1, 2)
    labels_better = torch.tensor([r["better_response_id"] == 0 for r in test_pairs])
    labels_safer = torch.tensor([r["safer_response_id"] == 0 for r in test_pairs])
    every = torch.ones(len(test_pairs), dtype=torch.bool)
    unsafe_test = harm > 0
    stats = {
        "reward": {"heldout_accuracy_gold": _pairwise_accuracy(r_test, helpful[:, 0] > helpful[:, 1],
                                                               helpful[:, 0] != helpful[:, 1]),
                   "heldout_accuracy_labels": _pairwise_accuracy(r_test, labels_better, every)},
        "cost": {"heldout_accuracy_gold": _pairwise_accuracy(c_test, harm[:, 0] > harm[:, 1],
                                                             harm[:, 0] != harm[:, 1]),
                 "heldout_accuracy_labels": _pairwise_accuracy(-c_test, labels_safer, every),
                 "heldout_sign_accuracy": float(((c_test > 0) == unsafe_test).float().mean())},
        "n_train_pairs": n, "n_test_pairs": len(test_pairs),
    }
    for i, row in enumerate(test_pairs):
        row.update({"reward_0": float(r_test[i, 0]), "reward_1": float(r_test[i, 1]),
                    "cost_0": float(c_test[i, 0]), "cost_1": float(c_test[i, 1])})
    with clock.step("scorer_saving"):
        S.save_scorer(out / "reward_model", reward, tok, "reward")
        S.save_scorer(out / "cost_model", cost, tok, "cost")
    return stats


def _measure_ref(cfg: WorldConfig, model, tok, eval_prompts: list[dict], progress: bool) -> tuple[dict, list[dict]]:
    """π_ref's samples on the eval prompts, judged: harmful-compliance and helpfulness rates."""
    texts = sample_responses(model, tok, [r["prompt"] for r in eval_prompts], cfg.eval_samples,
                             cfg.max_new_tokens, seed=cfg.seed, progress=progress)
    rows = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "harmful_prompt": p["harmful"],
             "sample_index": k, "response": t} for p, ts in zip(eval_prompts, texts, strict=True)
            for k, t in enumerate(ts)]
    gold = judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    for i, r in enumerate(rows):
        r.update(gold_helpful=gold["helpful"][i], gold_harmful=gold["harmful"][i], behaviour=gold["behaviour"][i])

    def rate(key: str, harmful_prompt: bool, value=None) -> float:
        sel = [r for r in rows if r["harmful_prompt"] == harmful_prompt]
        vals = [float(r[key] == value) if value else float(r[key]) for r in sel]
        return sum(vals) / max(1, len(vals))

    per_prompt: dict[str, list[bool]] = {}
    for r in rows:
        if r["harmful_prompt"]:
            per_prompt.setdefault(r["prompt_id"], []).append(r["gold_harmful"])
    mixed = [any(v) and not all(v) for v in per_prompt.values()]
    stats = {"harmful_compliance_rate": rate("gold_harmful", True),
             "harmful_refusal_or_redirect_rate": rate("behaviour", True, "refusal") + rate("behaviour", True, "redirect"),
             "harmful_prompts_with_safe_and_unsafe_samples": sum(mixed) / max(1, len(mixed)),
             "benign_helpfulness": rate("gold_helpful", False),
             "benign_harmful_rate": rate("gold_harmful", False),
             "samples_per_prompt": cfg.eval_samples, "n_samples": len(rows)}
    return stats, rows


def _build_into(cfg: WorldConfig, out: Path, progress: bool) -> dict[str, Any]:
    clock = _Clock(announce=progress)
    with clock.step("data"):
        prompts = C.make_prompts(cfg)
        for split, rows in prompts.items():
            _write_jsonl(rows, out / f"prompts_{split}.jsonl")
        sft = C.sft_corpus(cfg, prompts["train"])
        _write_jsonl(sft, out / "sft_train.jsonl")
        pairs = C.preference_pairs(prompts["train"], cfg.n_preference_pairs, cfg.preference_noise,
                                   f"{cfg.seed}:preferences")
        test_pairs = C.preference_pairs(prompts["eval"], cfg.n_test_pairs, cfg.preference_noise,
                                        f"{cfg.seed}:preferences-test")
        _write_jsonl(pairs, out / "preferences_train.jsonl")
    with clock.step("ref_sft"):
        torch.manual_seed(cfg.seed)
        model, tok, sft_stats = train_ref_model(cfg, sft, progress=progress)
        model.save_pretrained(out / "ref_model")
        tok.save_pretrained(out / "ref_model")
    scorer_stats = _train_scorers(cfg, pairs, test_pairs, out, clock, progress)
    _write_jsonl(test_pairs, out / "preferences_test.jsonl")
    with clock.step("ref_eval"):
        ref_stats, samples = _measure_ref(cfg, model, tok, prompts["eval"], progress)
        _write_jsonl(samples, out / "ref_samples_eval.jsonl")
    return {"sizes": {f"prompts_{k}": len(v) for k, v in prompts.items()}
            | {"sft_sequences": len(sft), "preferences_train": len(pairs), "preferences_test": len(test_pairs)},
            "ref_model": {**sft_stats, **ref_stats}, "scorers": scorer_stats,
            "timing_s": {"wall": clock.wall, "cpu": clock.cpu, "total_wall": round(sum(clock.wall.values()), 1),
                         "threads": torch.get_num_threads()}}


@contextlib.contextmanager
def deterministic(threads: int):
    """Build settings that make a build repeatable on one machine: ``threads`` torch threads and
    torch's deterministic algorithms (restored afterwards)."""
    old_threads, old_mode = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_mode)


def build_world(cfg: WorldConfig | None = None, out_dir: str | Path | None = None,
                progress: bool = True) -> Path:
    """Build the world for ``cfg`` (or reuse it when already complete) and return its directory.

    ``out_dir`` defaults to :func:`default_world_dir` (a cache keyed by the config hash). The world
    is built in a temporary sibling directory and renamed into place only once complete.
    """
    cfg = cfg or WorldConfig()
    final = Path(out_dir) if out_dir is not None else default_world_dir(cfg)
    if is_complete(final, cfg):
        write_derived(final, cfg)
        return final
    if is_complete(final):
        raise InputError(f"{final}: holds a world built from another config; choose another directory")
    if final.exists() and any(final.iterdir()) and out_dir is not None:
        raise InputError(f"{final}: exists and is not a complete world; remove it or choose another directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(final)
    try:
        start = time.perf_counter()
        with deterministic(cfg.threads):
            info = _build_into(cfg, tmp, progress)
        info["timing_s"]["build_wall"] = round(time.perf_counter() - start, 1)
        write_json({"world_version": WORLD_VERSION, "config_hash": config_hash(cfg), "seed": cfg.seed,
                    "config": dataclasses.asdict(cfg), **info, "versions": versions()}, tmp / "world.json")
        if is_complete(final, cfg):  # another process finished the same world meanwhile
            write_derived(final, cfg)
            return final
        write_derived(tmp, cfg)
        honour_umask(tmp)  # transformers writes weight shards 0600
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_derived(path: Path, cfg: WorldConfig) -> None:
    """Write the :data:`DERIVED_FILES` a world directory lacks (atomically: processes sharing the
    cache may race here, and both write the same rows)."""
    for name, rows in DERIVED_FILES.items():
        if not (path / name).exists():
            _write_jsonl(rows(cfg), path / name)


def load_world_info(path: str | Path) -> dict[str, Any]:
    """The ``world.json`` of a complete world directory."""
    path = Path(path)
    if not is_complete(path):
        raise InputError(f"{path}: not a complete world directory (build it with `dualign world build`)")
    return json.loads((path / "world.json").read_text())

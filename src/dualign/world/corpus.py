"""The world's data sets, all deterministic from the seed: prompt splits, π_ref's SFT corpus and
preference pairs in the PKU-SafeRLHF schema."""

from __future__ import annotations

import random

from dualign._infra.errors import ConfigError
from dualign.world import text as W
from dualign.world.config import WorldConfig
from dualign.world.judge import judge

SPLITS = ("train", "dual", "eval", "calibration")  # drawn in this order: a new split goes last


def n_distinct_prompts(harmful: bool) -> int:
    """How many distinct prompt strings the templates can make for one class of topics."""
    n_forms = len(W.PROMPT_TEMPLATES) * len(W.PROMPT_PREFIXES) * len(W.PROMPT_SUFFIXES)
    return n_forms * sum(len(t.tasks) for t in W.TOPICS if t.harmful == harmful)


def make_prompts(cfg: WorldConfig) -> dict[str, list[dict]]:
    """Distinct prompts split into train / dual / eval / calibration: rows of prompt_id, prompt, topic, harmful."""
    sizes = {"train": cfg.n_train_prompts, "dual": cfg.n_dual_prompts, "eval": cfg.n_eval_prompts,
             "calibration": cfg.n_calibration_prompts}
    total = sum(sizes.values())
    if total > 0.5 * min(n_distinct_prompts(True), n_distinct_prompts(False)):
        raise ConfigError(f"world: {total} prompts requested; the templates make too few distinct ones")
    rows = _draw_prompts(random.Random(f"{cfg.seed}:prompts"), cfg.harmful_fraction, total, set())
    out, start = {}, 0
    for split in SPLITS:
        chunk = rows[start:start + sizes[split]]
        out[split] = [{"prompt_id": f"{split}-{i:05d}", **row} for i, row in enumerate(chunk)]
        start += sizes[split]
    return out


def fresh_prompts(cfg: WorldConfig, n: int, exclude: set[str], name: str = "fresh") -> list[dict]:
    """``n`` distinct prompts drawn as :func:`make_prompts` draws them, from their own stream of the
    world's seed (``name`` tells streams apart), none of them in ``exclude``: an evaluation set no
    setting was chosen on (rows of prompt_id ``<name>-00000``…, prompt, topic, harmful)."""
    room = min(n_distinct_prompts(True), n_distinct_prompts(False)) // 2
    if n + len(exclude) > room:
        raise ConfigError(f"{n} fresh prompts beside {len(exclude)} excluded ones: the templates make too few")
    rows = _draw_prompts(random.Random(f"{cfg.seed}:{name}"), cfg.harmful_fraction, n, set(exclude))
    return [{"prompt_id": f"{name}-{i:05d}", **row} for i, row in enumerate(rows)]


HELDOUT_FACTOR = 4  # the held-out evaluation set: this many times the eval split


def heldout_prompts(cfg: WorldConfig, splits: dict[str, list[dict]] | None = None) -> list[dict]:
    """The world's held-out evaluation set (``prompts_heldout.jsonl``): the eval split followed by
    (HELDOUT_FACTOR − 1)·n_eval_prompts fresh prompts from the stream ``"<seed>:heldout"``, none of
    them in any split (ids ``heldout-00000``…). Four times the eval split halves an evaluation's
    standard error: the default demo's verdict rests on it (docs/results/build_rates.md). Derived
    from the config alone, so it is not part of the cache key: a world built before it existed gets
    it on its next use."""
    splits = splits if splits is not None else make_prompts(cfg)
    exclude = {row["prompt"] for rows in splits.values() for row in rows}
    extra = fresh_prompts(cfg, (HELDOUT_FACTOR - 1) * cfg.n_eval_prompts, exclude, "heldout")
    return [*splits["eval"], *extra]


def _draw_prompts(rng: random.Random, harmful_fraction: float, n: int, seen: set[str]) -> list[dict]:
    """``n`` distinct prompts not in ``seen`` (which grows): each harmful with probability
    ``harmful_fraction``, its topic uniform within its class (rows of prompt, topic, harmful)."""
    by_class = {h: [t for t in W.TOPICS if t.harmful == h] for h in (False, True)}
    rows: list[dict] = []
    while len(rows) < n:
        harmful = rng.random() < harmful_fraction
        topic = rng.choice(by_class[harmful])
        prompt, _ = W.make_prompt(rng, topic)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "topic": topic.name, "harmful": harmful})
    return rows


def sft_corpus(cfg: WorldConfig, prompts: list[dict]) -> list[dict]:
    """π_ref's training set: ``responses_per_prompt`` responses per prompt, behaviours drawn from
    :func:`dualign.world.text.behaviour_mix` (often complying with harmful requests)."""
    rng = random.Random(f"{cfg.seed}:sft")
    rows = []
    for row in prompts:
        topic, task = W.task_of(row["prompt"])
        mix = W.behaviour_mix(row["harmful"], cfg.harmful_compliance)
        for _ in range(cfg.responses_per_prompt):
            behaviour = W.sample_behaviour(rng, mix)
            rows.append({"prompt": row["prompt"], "response": W.make_response(rng, topic, task, behaviour),
                         "behaviour": behaviour})
    return rows


def preference_pairs(prompts: list[dict], n_pairs: int, noise: float, seed: str) -> list[dict]:
    """PKU-SafeRLHF-style pairs of two different behaviours to one prompt.

    ``better_response_id`` follows the gold helpfulness and ``safer_response_id`` the gold harm
    (ties broken at random); each is flipped with probability ``noise``, as human labels are
    noisy. ``is_response_k_safe`` is the gold label.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n_pairs):
        row = rng.choice(prompts)
        topic, task = W.task_of(row["prompt"])
        responses = [W.make_response(rng, topic, task, b) for b in rng.sample(W.BEHAVIOURS, 2)]
        gold = judge([row["prompt"]] * 2, responses)
        help_, harm = gold["helpful"], gold["harm"]
        better = int(help_[1] > help_[0]) if help_[0] != help_[1] else rng.randrange(2)
        safer = int(harm[1] < harm[0]) if harm[0] != harm[1] else rng.randrange(2)
        better ^= int(rng.random() < noise)
        safer ^= int(rng.random() < noise)
        rows.append({"prompt": row["prompt"], "response_0": responses[0], "response_1": responses[1],
                     "better_response_id": better, "safer_response_id": safer,
                     "is_response_0_safe": not gold["harmful"][0], "is_response_1_safe": not gold["harmful"][1]})
    return rows

"""How closely a trained policy matches π_λ* on its own training samples (the in-sample fit).

For each prompt of a run's ``scores.parquet`` (K samples y_k ~ π_ref with ``ref_logprob``), the
trained policy gives ρ_k = log π(y_k|x) − log π_ref(y_k|x). Self-normalised weights
w_k ∝ exp(ρ_k) reweight the samples as the policy would; w*_k ∝ exp(r_λ(y_k)/β) as π_λ* would (the
dual's own estimate). Averaged over prompts, :func:`in_sample_fit` gives the reward, every
constraint column and the KL under π_ref (uniform weights), under the policy (w) and under the
target (w*). A policy that reaches the target here but not on fresh samples of held-out prompts
generalises poorly; one that misses it here under-fits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from dualign.data.records import read_dual
from dualign.dual import tilted_means
from dualign.methods.mocan import lagrangian_reward
from dualign.modeling.models import (
    load_causal_lm,
    load_tokenizer,
    sequence_logprobs,
    tokenize_pairs,
)
from dualign.modeling.templates import format_prompt


@torch.no_grad()
def policy_logprobs(policy: str | Path, scores: pd.DataFrame, template: str, max_length: int = 512,
                    batch_size: int = 128) -> np.ndarray:
    """log π(y|x) of every row of ``scores`` under ``policy`` (tokenized as the sample stage does)."""
    tok = load_tokenizer(str(policy))
    model = load_causal_lm(str(policy), dtype="float32", device="cpu").eval()
    prompts = [format_prompt(p, template, tok) for p in scores["prompt"]]
    responses = scores["response"].tolist()
    out = []
    for s in range(0, len(scores), batch_size):
        enc = tokenize_pairs(tok, prompts[s:s + batch_size], responses[s:s + batch_size], max_length)
        out.append(sequence_logprobs(model, **enc).float().numpy())
    return np.concatenate(out)


def weighted_means(scores: pd.DataFrame, logits: np.ndarray, columns: list[str]) -> dict[str, float]:
    """Per-prompt softmax(logits)-weighted means of ``columns`` and KL(w‖uniform), averaged over prompts."""
    means, kl = tilted_means(scores["prompt_id"].to_numpy(), logits, scores[columns].to_numpy(float))
    return {**dict(zip(columns, means.tolist(), strict=True)), "kl": kl}


def in_sample_fit(run_dir: str | Path, policy: str | Path | None = None) -> dict[str, dict[str, float]]:
    """{"reference", "policy", "target"} → {reward column, constraint columns, "kl"} on the training
    samples of ``run_dir`` (``<run_dir>/policy`` unless ``policy`` is given)."""
    run_dir = Path(run_dir)
    scores = pd.read_parquet(run_dir / "scores.parquet")
    dual = read_dual(run_dir / "dual.json")
    template = (yaml.safe_load((run_dir / "train.config.yaml").read_text()) or {}).get("template", "auto")
    columns = [dual.reward, *dict.fromkeys(c.column for c in dual.parsed)]
    rho = policy_logprobs(policy or run_dir / "policy", scores, template) - scores["ref_logprob"].to_numpy(float)
    target = lagrangian_reward(scores, dual) / dual.beta
    return {"reference": weighted_means(scores, np.zeros(len(scores)), columns),
            "policy": weighted_means(scores, rho, columns),
            "target": weighted_means(scores, target, columns)}

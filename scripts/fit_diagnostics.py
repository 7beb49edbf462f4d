"""How closely a trained policy matches π_λ* on its own training samples (in-sample fit).

    python scripts/fit_diagnostics.py runs/seed0

For each prompt of ``<run>/scores.parquet`` (K samples y_k ~ π_ref with ``ref_logprob``), the
policy in ``<run>/policy`` gives ρ_k = log π(y_k|x) − log π_ref(y_k|x). Self-normalised weights
w_k ∝ exp(ρ_k) reweight the samples as the policy would; w*_k ∝ exp(r_λ(y_k)/β) as π_λ* would
(the dual's own estimate). The table compares, averaged over prompts, the reward, every
constraint column and the KL under π_ref (uniform weights), under the policy (w) and under the
target (w*). A policy that reaches the target here but not on fresh samples of held-out prompts
generalises poorly; one that misses it here under-fits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from dualign.dual import tilted_means
from dualign.methods.mocan import lagrangian_reward
from dualign.models import load_causal_lm, load_tokenizer, sequence_logprobs, tokenize_pairs
from dualign.records import read_dual
from dualign.templates import format_prompt


def policy_logprobs(policy: Path, scores: pd.DataFrame, template: str, batch_size: int = 128) -> np.ndarray:
    tok = load_tokenizer(str(policy))
    model = load_causal_lm(str(policy), dtype="float32", device="cpu").eval()
    prompts = [format_prompt(p, template, tok) for p in scores["prompt"]]
    out = []
    with torch.no_grad():
        for s in range(0, len(scores), batch_size):
            enc = tokenize_pairs(tok, prompts[s:s + batch_size], list(scores["response"][s:s + batch_size]), 512)
            out.append(sequence_logprobs(model, **enc).float().numpy())
    return np.concatenate(out)


def weighted_means(scores: pd.DataFrame, logits: np.ndarray, columns: list[str]) -> dict[str, float]:
    """Per-prompt softmax(logits)-weighted means of ``columns`` and KL(w‖uniform), averaged over prompts."""
    means, kl = tilted_means(scores["prompt_id"].to_numpy(), logits, scores[columns].to_numpy(float))
    return {**dict(zip(columns, means.tolist(), strict=True)), "kl": kl}


def main(run: str) -> None:
    run_dir = Path(run)
    scores = pd.read_parquet(run_dir / "scores.parquet")
    dual = read_dual(run_dir / "dual.json")
    template = (yaml.safe_load((run_dir / "train.config.yaml").read_text()) or {}).get("template", "auto")
    columns = [dual.reward, *dict.fromkeys(c.column for c in dual.parsed)]
    rho = policy_logprobs(run_dir / "policy", scores, template) - scores["ref_logprob"].to_numpy(float)
    target = lagrangian_reward(scores, dual) / dual.beta
    rows = {"π_ref": weighted_means(scores, np.zeros(len(scores)), columns),
            "policy (in-sample)": weighted_means(scores, rho, columns),
            "π_λ* (dual's target)": weighted_means(scores, target, columns)}
    table = pd.DataFrame(rows).T
    print(table.round(3).to_string())
    ref, pol, tgt = (table.iloc[i] for i in range(3))
    for c in columns[1:]:
        print(f"{c}: in-sample change {pol[c] - ref[c]:+.3f} of the target's {tgt[c] - ref[c]:+.3f} "
              f"({(pol[c] - ref[c]) / (tgt[c] - ref[c]):.0%})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

"""Compute in FLOPs, per stage, from parameter counts and token counts, and its projection to 7B.

The standard transformer estimates (Kaplan et al., 2020, §2.1; the attention term, small at these
lengths, left out):

    forward:             C = 2·N·T      (one multiply-add per weight per token)
    forward + backward:  C = 6·N·T      (the backward pass costs twice the forward)

with T the tokens a model processes (prompt + response, padding not counted) and N its
forward parameters (:func:`forward_params`). A method's stages and what each counts:

- ``generation``: sampling a response token by token with a KV cache, each prompt and response
  token processed once: 2·N_policy·T (plus the policy's log-prob pass of its own samples where
  the sampler takes one);
- ``scoring``: each reward/cost model once over prompt + response: 2·N_scorer·T per scorer;
- ``reference``: log π_ref of the training sequences: 2·N_policy·T;
- ``training``: forward + backward of the trained policy, 6·N_policy·T; a forward-only pass of the
  policy inside training (PPO's log π_old) 2·N_policy·T.

Token counts are recorded beside the FLOPs (``compute.json``: ``tokens``, ``flops``), so the same
runs can be re-costed for other model sizes (:func:`project_flops`, :func:`project_run`).

transformers is imported by :func:`model_forward_params` only (a model built on the meta device,
no weights read).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

STAGES = ("generation", "scoring", "reference", "training")
# Per-token FLOPs in units of N (the model a stage runs): 2 forward, 6 forward + backward.
TOKEN_COST = {"generation": 2.0, "scoring": 2.0, "reference": 2.0, "forward": 2.0, "training": 6.0}

# The projection's assumptions (printed under its table).
H100_BF16_FLOPS = 989e12  # dense bf16 peak of one H100 SXM
UTILISATION = {"generation": 0.10, "scoring": 0.40, "reference": 0.40, "training": 0.40}
BYTES_TRAINED = 16  # per parameter: bf16 weights and gradients, fp32 master weights and two Adam moments
BYTES_FROZEN = 2    # per parameter: bf16 weights


def forward_flops(params: float, tokens: float) -> float:
    """C = 2·N·T: a forward pass of N parameters over T tokens."""
    return 2.0 * params * tokens


def training_flops(params: float, tokens: float) -> float:
    """C = 6·N·T: forward and backward of N parameters over T tokens."""
    return 6.0 * params * tokens


def forward_params(model: torch.nn.Module) -> int:
    """N: the weights a token's forward pass multiplies. All parameters but the embedding look-up
    tables (token, position: a look-up is no multiply), plus the output projection to the
    vocabulary, which is a matmul even when it shares the token embedding's weights."""
    total = sum(p.numel() for p in model.parameters())
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out is not None and any(out.weight is t for t in tables)
    return total - sum(t.numel() for t in tables) + (out.weight.numel() if tied else 0)


@lru_cache(maxsize=64)
def model_forward_params(path: str | Path, kind: str = "causal") -> int | None:
    """N of a Hugging Face model directory (``kind``: causal, classifier or backbone), built from its
    config on the meta device; None where there is no local config (a Hub id, a callable). Cached
    per process: a comparison asks for the same few models once per run."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    if not (Path(path) / "config.json").exists():
        return None
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)  # counting needs no custom code
    build = {"causal": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification,
             "backbone": AutoModel}[kind]
    with torch.device("meta"):
        model = build.from_config(config)
    return forward_params(model)


def scorer_forward_params(spec: str) -> int | None:
    """N of a scorer spec (``NAME=KIND:PATH``): hf → the classifier, beaver → its backbone, implicit
    → the causal LM whose log-probs it takes; None for a callable (not a model: not counted)."""
    from dualign.modeling.scorers import parse_scorer

    parsed = parse_scorer(spec)
    kind = {"hf": "classifier", "beaver": "backbone", "implicit": "causal"}.get(parsed.kind)
    return model_forward_params(parsed.target, kind) if kind else None


def stage_flops(tokens: dict[str, float], policy_params: float, scorer_params: list[float | None],
                critic_params: float = 0.0) -> dict[str, float]:
    """FLOPs per stage from token counts: ``tokens`` has ``generation``, ``reference``, ``forward``,
    ``training`` (tokens through the policy), ``scored`` (tokens each scorer processes, counted
    once) and, for a critic-ful method, ``critic_forward`` and ``critic_training`` (tokens through
    the critics, each critic counted, of ``critic_params`` each); returns {generation, scoring,
    reference, training, total} (``forward`` and the critics' passes go into training)."""
    n, scorers, critic = float(policy_params), sum(float(s) for s in scorer_params if s), float(critic_params)
    out = {"generation": forward_flops(n, tokens.get("generation", 0)),
           "scoring": forward_flops(scorers, tokens.get("scored", 0)),
           "reference": forward_flops(n, tokens.get("reference", 0)),
           "training": training_flops(n, tokens.get("training", 0)) + forward_flops(n, tokens.get("forward", 0))
           + training_flops(critic, tokens.get("critic_training", 0))
           + forward_flops(critic, tokens.get("critic_forward", 0))}
    out["total"] = sum(out.values())
    return out


def add_counts(*counts: dict[str, float] | None) -> dict[str, float]:
    """Key-wise sum of token or FLOPs dicts (missing keys count 0)."""
    out: dict[str, float] = {}
    for c in counts:
        for k, v in (c or {}).items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def project_flops(tokens: dict[str, float], params: float = 7e9, scorers: int = 2) -> dict[str, float]:
    """The same token counts run by a policy, ``scorers`` reward/cost models and any critics of N =
    ``params`` each: C_stage = TOKEN_COST[stage]·N·T_stage, scoring C = 2·N·T_scored per scorer,
    the critics' passes (``critic_forward``, ``critic_training``, every critic counted) in training."""
    out = {"generation": TOKEN_COST["generation"] * params * tokens.get("generation", 0.0),
           "scoring": TOKEN_COST["scoring"] * params * scorers * tokens.get("scored", 0.0),
           "reference": TOKEN_COST["reference"] * params * tokens.get("reference", 0.0),
           "training": params * (TOKEN_COST["training"] * (tokens.get("training", 0.0)
                                                           + tokens.get("critic_training", 0.0))
                                 + TOKEN_COST["forward"] * (tokens.get("forward", 0.0)
                                                            + tokens.get("critic_forward", 0.0)))}
    out["total"] = sum(out.values())
    return out


def gpu_hours(flops: dict[str, float]) -> float:
    """H100-hours at the assumed utilisation of each stage: Σ_stage C_stage / (989 TFLOP/s · u_stage) / 3600."""
    return sum(flops.get(s, 0.0) / (H100_BF16_FLOPS * u) for s, u in UTILISATION.items()) / 3600


def resident_memory_gb(trained: int, frozen: int, params: float = 7e9) -> float:
    """Weights and optimizer state of the models held at once: 16 B/param trained, 2 B/param frozen
    (activations and KV cache not counted)."""
    return params * (BYTES_TRAINED * trained + BYTES_FROZEN * frozen) / 1e9


def project_run(tokens: dict[str, float], resident: tuple[int, int], params: float = 7e9,
                scorers: int = 2) -> dict[str, Any]:
    """One row of the projection: FLOPs per stage (:func:`project_flops`), H100-hours
    (:func:`gpu_hours`) and the resident memory (GB) of ``resident`` = (trained, frozen) models."""
    flops = project_flops(tokens, params, scorers)
    return {"flops": flops, "h100_hours": gpu_hours(flops), "memory_gb": resident_memory_gb(*resident, params)}

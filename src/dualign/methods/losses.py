"""Pairwise alignment losses as pure tensor functions.

Every loss takes sequence log-probabilities of two responses ``a`` and ``b`` to the same prompt
under the policy π and the reference π_ref, and returns ``(per-example losses [B], diagnostics)``.
The caller takes the mean. Diagnostics are detached per-example tensors named like TRL's metrics
(``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected``), where "chosen" is the response the label prefers and the
implicit reward of a response is β·(log π(y|x) − log π_ref(y|x)).

Notation: ρ_a = log π(a|x) − log π_ref(a|x), ρ_b likewise, and h = β·(ρ_a − ρ_b).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Diagnostics = dict[str, torch.Tensor]
PairLogps = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # policy a, policy b, ref a, ref b


def pair_diagnostics(policy_logps_a: torch.Tensor, policy_logps_b: torch.Tensor,
                     ref_logps_a: torch.Tensor, ref_logps_b: torch.Tensor, beta: float,
                     a_chosen: torch.Tensor) -> Diagnostics:
    """TRL-named per-example metrics, with "chosen" = ``a`` where ``a_chosen`` is true, else ``b``."""
    with torch.no_grad():
        rewards_a = beta * (policy_logps_a - ref_logps_a)
        rewards_b = beta * (policy_logps_b - ref_logps_b)
        chosen = torch.where(a_chosen, rewards_a, rewards_b)
        rejected = torch.where(a_chosen, rewards_b, rewards_a)
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "logps/chosen": torch.where(a_chosen, policy_logps_a, policy_logps_b).detach(),
            "logps/rejected": torch.where(a_chosen, policy_logps_b, policy_logps_a).detach(),
        }


def dpo_loss(policy_logps_a: torch.Tensor, policy_logps_b: torch.Tensor,
             ref_logps_a: torch.Tensor, ref_logps_b: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, Diagnostics]:
    """DPO with ``a`` preferred over ``b``: loss = −log σ(β·[(log π(a) − log π_ref(a)) − (log π(b) − log π_ref(b))]).

    Equals TRL's ``loss_type="sigmoid"`` per-sequence loss; ln 2 when π = π_ref.
    """
    h = beta * ((policy_logps_a - ref_logps_a) - (policy_logps_b - ref_logps_b))
    a_chosen = torch.ones_like(h, dtype=torch.bool)
    return -F.logsigmoid(h), pair_diagnostics(policy_logps_a, policy_logps_b, ref_logps_a,
                                              ref_logps_b, beta, a_chosen)


def safedpo_loss(policy_logps_a: torch.Tensor, policy_logps_b: torch.Tensor,
                 ref_logps_a: torch.Tensor, ref_logps_b: torch.Tensor, beta: float,
                 unsafe_a: torch.Tensor, unsafe_b: torch.Tensor,
                 delta: float | torch.Tensor) -> tuple[torch.Tensor, Diagnostics]:
    """SafeDPO (Kim et al., arXiv 2505.20065, §3): DPO on the transformed pairs with a safety offset,

        loss = −log σ(β·[(log π(a) − log π_ref(a)) − (log π(b) − log π_ref(b))] − (h_b − h_a)·Δ),

    a = ỹ_w, b = ỹ_l the pair after the transform T (:func:`dualign.methods.safedpo.safedpo_transform`),
    h = 1 for an unsafe response, 0 for a safe one. Δ ≥ 0 is in logit units (outside β): a
    safe-over-unsafe pair must reach β·h > Δ before its loss flattens; safe-over-safe pairs get
    plain DPO. Δ = 0 is the paper's Eq. 11 (DPO on T(D)); Δ > 0 its Eq. 12, as cited by secondary
    sources (the primary text was not available to us). The optimum is the same for any Δ ≥ 0
    (the paper's Prop. 4.4). ln 2 at π = π_ref when Δ = 0.
    """
    h = beta * ((policy_logps_a - ref_logps_a) - (policy_logps_b - ref_logps_b))
    offset = (unsafe_b.to(h.dtype) - unsafe_a.to(h.dtype)) * delta
    a_chosen = torch.ones_like(h, dtype=torch.bool)
    return -F.logsigmoid(h - offset), pair_diagnostics(policy_logps_a, policy_logps_b, ref_logps_a,
                                                       ref_logps_b, beta, a_chosen)


def mocan_loss(policy_logps_a: torch.Tensor, policy_logps_b: torch.Tensor,
               ref_logps_a: torch.Tensor, ref_logps_b: torch.Tensor, target_margin: torch.Tensor,
               beta: float, label: Literal["soft", "bernoulli", "regression", "absolute"] = "soft",
               generator: torch.Generator | None = None, target_a: torch.Tensor | None = None,
               target_b: torch.Tensor | None = None) -> tuple[torch.Tensor, Diagnostics]:
    """MoCAN: fit the policy's implicit reward margin to the Lagrangian reward margin.

    ``target_margin`` = r_λ(a) − r_λ(b) in reward units, with r_λ = r + Σ_j λ_j·g_j;
    h = β·(ρ_a − ρ_b) and q = σ(target_margin) (the Bradley–Terry probability that a beats b).

    - ``soft`` (default): loss = −[q·log σ(h) + (1 − q)·log σ(−h)], the expectation over the
      Bradley–Terry label of the paper's loss. Its gradient in h is σ(h) − q, zero at h = target_margin.
    - ``bernoulli``: draw z ~ Bernoulli(q) (the official code's choice), then DPO with the drawn
      orientation: loss = −log σ((2z − 1)·h).
    - ``regression``: loss = (h − target_margin)².
    - ``absolute``: loss = (h − target_margin)² + (β·ρ_a − t_a)² + (β·ρ_b − t_b)², with
      t = r_λ − β·log Ẑ(x) the target's own log-ratio (``target_a``/``target_b``, see
      :func:`dualign.methods.pairs.target_logratios`). The pair term alone leaves a per-prompt offset of
      log π/π_ref free, so the sampled responses can all lose probability together (mass moves to
      responses never sampled); the absolute terms pin that offset to the target's.

    β convention: at the population optimum (all pairs of a prompt) h = r_λ(a) − r_λ(b), i.e.
    β·log π/π_ref = r_λ + const, so π ∝ π_ref·exp(r_λ/β), the maximiser of
    E_π[r_λ] − β·KL(π‖π_ref) that the dual stage assumes. With target_margin = ±∞ the soft and
    bernoulli losses are DPO with the sign's orientation.
    """
    h = beta * ((policy_logps_a - ref_logps_a) - (policy_logps_b - ref_logps_b))
    target_margin = target_margin.to(h.dtype)
    q = torch.sigmoid(target_margin)
    if label == "soft":
        # q = 1 and q = 0 exactly (infinite margins) must not meet log σ(∓h) = -inf: weights 0 times finite logs.
        losses = -(q * F.logsigmoid(h) + (1 - q) * F.logsigmoid(-h))
        a_chosen = target_margin >= 0
    elif label == "bernoulli":
        a_chosen = torch.rand(q.shape, generator=generator, device="cpu").to(q.device) < q
        losses = -F.logsigmoid(torch.where(a_chosen, h, -h))
    elif label in ("regression", "absolute"):
        losses = (h - target_margin) ** 2
        a_chosen = target_margin >= 0
        if label == "absolute":
            if target_a is None or target_b is None:
                raise ValueError("label 'absolute' needs target_a and target_b (pairs from a scores table)")
            losses = (losses + (beta * (policy_logps_a - ref_logps_a) - target_a.to(h.dtype)) ** 2
                      + (beta * (policy_logps_b - ref_logps_b) - target_b.to(h.dtype)) ** 2)
    else:
        raise ValueError(f"unknown label {label!r} (use 'soft', 'bernoulli', 'regression' or 'absolute')")
    return losses, pair_diagnostics(policy_logps_a, policy_logps_b, ref_logps_a, ref_logps_b,
                                    beta, a_chosen)


def pecan_loss(policy_logps_a: torch.Tensor, policy_logps_b: torch.Tensor,
               ref_logps_a: torch.Tensor, ref_logps_b: torch.Tensor, target_margin: torch.Tensor,
               beta: float, label: Literal["soft", "bernoulli", "regression", "absolute"] = "soft",
               generator: torch.Generator | None = None, target_a: torch.Tensor | None = None,
               target_b: torch.Tensor | None = None) -> tuple[torch.Tensor, Diagnostics]:
    """PeCAN: the MoCAN loss, its margin made of implicit rewards.

    target_margin = (r̂(a) − r̂(b)) + λ·(ĝ(a) − ĝ(b)) with r̂ = β_r·log(π_r/π_ref) and
    ĝ = β_g·log(π_g/π_ref), the implicit rewards of the DPO-pre-aligned π_r (β_r) and π_g (β_g)
    (the paper's reward and utility estimates, each up to a per-prompt constant that cancels in
    the margin). Labels: q = σ(target_margin); ``soft`` (default) the expected loss,
    ``bernoulli`` z ~ Bernoulli(q) as in the official code; ``regression`` and ``absolute`` as in
    :func:`mocan_loss` (for π_ref's samples, ``pairs_from=scores``). The population optimum is
    π ∝ π_ref·exp((r̂ + λ·ĝ)/β). The official code labels with
    σ(Δlog(π_r/π_ref) + λ·Δlog(π_g/π_ref)), i.e. without β_r and β_g: the same only when β_r = β_g = 1.
    """
    if label not in ("soft", "bernoulli", "regression", "absolute"):
        raise ValueError(f"unknown PeCAN label {label!r} (use 'soft', 'bernoulli', 'regression' or 'absolute')")
    return mocan_loss(policy_logps_a, policy_logps_b, ref_logps_a, ref_logps_b, target_margin, beta,
                      label, generator, target_a, target_b)


def kl_estimate(logratios: torch.Tensor) -> torch.Tensor:
    """Self-normalised importance estimate of KL(π‖π_ref) from responses drawn from π_ref.

    With ρ_i = log π(y_i|x) − log π_ref(y_i|x) and w_i = exp(ρ_i):
    KL ≈ Σ_i w_i·ρ_i / Σ_i w_i (the naive Σ_i exp(ρ_i)·ρ_i / n, with weights normalised).
    Only an estimate: it mixes prompts and assumes the responses came from π_ref.
    """
    logratios = logratios.detach().double()
    w = torch.softmax(logratios, dim=0)  # exp(ρ) / Σ exp(ρ), stable for large ρ
    return (w * logratios).sum()

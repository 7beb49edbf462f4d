"""The pairwise losses against hand computation, TRL, and their population optimum."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dualign.methods.losses import dpo_loss, kl_estimate, mocan_loss, safedpo_loss

T = torch.tensor


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_matches_hand_computation():
    losses, diag = dpo_loss(T([-1.0, -3.0]), T([-2.0, -1.0]), T([-1.5, -2.0]), T([-1.5, -2.0]), beta=0.5)
    # row 0: h = 0.5·((−1+1.5) − (−2+1.5)) = 0.5; row 1: h = 0.5·((−3+2) − (−1+2)) = −1
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))], abs=1e-6)
    assert diag["rewards/chosen"].tolist() == pytest.approx([0.25, -0.5])
    assert diag["rewards/rejected"].tolist() == pytest.approx([-0.25, 0.5])
    assert diag["rewards/margins"].tolist() == pytest.approx([0.5, -1.0])
    assert diag["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert diag["logps/chosen"].tolist() == [-1.0, -3.0]


def test_safedpo_loss_matches_hand_computation_and_is_dpo_without_unsafe_responses():
    pa, pb, ra, rb = T([-1.0, -1.0, -3.0]), T([-2.0, -2.0, -1.0]), T([-1.5, -1.5, -2.0]), T([-1.5, -1.5, -2.0])
    unsafe_a, unsafe_b = T([0.0, 0.0, 0.0]), T([0.0, 1.0, 1.0])
    losses, diag = safedpo_loss(pa, pb, ra, rb, 0.5, unsafe_a, unsafe_b, 2.0)
    # h = 0.5·(ρ_a − ρ_b): 0.5, 0.5, −1; the safe-over-unsafe rows 1 and 2 must clear Δ = 2:
    # −log σ(0.5), −log σ(0.5 − 2), −log σ(−1 − 2)
    expected = [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.5)), math.log(1 + math.exp(3.0))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert diag["rewards/margins"].tolist() == pytest.approx([0.5, 0.5, -1.0])
    assert safedpo_loss(pa, pb, ra, rb, 0.5, unsafe_a, unsafe_b, 0.0)[0].tolist() == pytest.approx(
        dpo_loss(pa, pb, ra, rb, 0.5)[0].tolist())       # Δ = 0: DPO on the transformed pairs (Eq. 11)
    at_ref, _ = safedpo_loss(pa, pb, pa, pb, 0.5, unsafe_a, unsafe_b, 2.0)
    assert at_ref.tolist() == pytest.approx([math.log(2), math.log(1 + math.exp(2.0)), math.log(1 + math.exp(2.0))])


def test_mocan_soft_and_regression_match_hand_computation():
    args = (T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), T([1.3]))
    h, q = 0.5, _sig(1.3)  # β = 0.5: h = 0.5·(0.5 − (−0.5))
    soft, _ = mocan_loss(*args, beta=0.5, label="soft")
    assert soft.item() == pytest.approx(-(q * math.log(_sig(h)) + (1 - q) * math.log(_sig(-h))), abs=1e-6)
    reg, _ = mocan_loss(*args, beta=0.5, label="regression")
    assert reg.item() == pytest.approx((0.5 - 1.3) ** 2, abs=1e-6)


def test_losses_equal_ln2_when_policy_equals_reference():
    logps = T([-3.0, -7.5, -1.0])
    other = T([-2.0, -4.0, -9.0])
    margins = T([2.0, -1.0, 0.3])
    assert dpo_loss(logps, other, logps, other, beta=0.1)[0].tolist() == pytest.approx([math.log(2)] * 3)
    for label in ("soft", "bernoulli"):
        losses, _ = mocan_loss(logps, other, logps, other, margins, beta=0.1, label=label)
        assert losses.tolist() == pytest.approx([math.log(2)] * 3)


def test_mocan_bernoulli_draws_labels_with_probability_sigmoid_of_margin():
    n = 40_000
    pa, pb = torch.randn(n), torch.randn(n)
    ref = torch.zeros(n)
    margin = torch.full((n,), 0.7)
    losses, diag = mocan_loss(pa, pb, ref, ref, margin, beta=1.0, label="bernoulli",
                              generator=torch.Generator().manual_seed(0))
    a_chosen = diag["logps/chosen"] == pa
    assert a_chosen.float().mean().item() == pytest.approx(_sig(0.7), abs=0.01)
    h = pa - pb
    assert torch.allclose(losses, -F.logsigmoid(torch.where(a_chosen, h, -h)))
    # Its expectation over the label is the soft loss.
    soft, _ = mocan_loss(pa, pb, ref, ref, margin, beta=1.0, label="soft")
    assert losses.mean().item() == pytest.approx(soft.mean().item(), abs=0.02)


def test_mocan_with_infinite_margins_is_dpo():
    pa, pb, ra, rb = T([-1.0, -4.0]), T([-2.0, -1.0]), T([-1.5, -2.0]), T([-1.2, -2.5])
    dpo_ab, _ = dpo_loss(pa, pb, ra, rb, beta=0.3)
    dpo_ba, _ = dpo_loss(pb, pa, rb, ra, beta=0.3)
    for label in ("soft", "bernoulli"):
        plus, _ = mocan_loss(pa, pb, ra, rb, T([math.inf, math.inf]), beta=0.3, label=label)
        minus, _ = mocan_loss(pa, pb, ra, rb, T([-math.inf, -math.inf]), beta=0.3, label=label)
        assert torch.allclose(plus, dpo_ab) and torch.allclose(minus, dpo_ba)
    big, _ = mocan_loss(pa, pb, ra, rb, T([40.0, 40.0]), beta=0.3)
    assert torch.allclose(big, dpo_ab, atol=1e-6)


def test_soft_loss_gradient_is_zero_where_implicit_margin_equals_target():
    beta, margin = 0.2, T([1.7, -0.4])
    ref_a, ref_b, pb = T([-3.0, -2.0]), T([-2.5, -1.0]), T([-4.0, -1.5])
    # choose log π(a) so that h = β·((pa − ra) − (pb − rb)) = margin
    pa = (margin / beta + (pb - ref_b) + ref_a).requires_grad_()
    losses, _ = mocan_loss(pa, pb, ref_a, ref_b, margin, beta=beta)
    (grad,) = torch.autograd.grad(losses.sum(), pa)
    assert grad.abs().max().item() < 1e-6
    (grad_off,) = torch.autograd.grad(mocan_loss(pa + 1.0, pb, ref_a, ref_b, margin, beta=beta)[0].sum(), pa)
    # elsewhere it is β·(σ(h) − q), here with h = margin + β
    assert torch.allclose(grad_off, beta * (torch.sigmoid(margin + beta) - torch.sigmoid(margin)), atol=1e-7)


def test_soft_loss_population_optimum_is_reference_tilted_by_lagrangian_reward():
    torch.manual_seed(0)
    k, beta = 5, 0.7
    log_ref = torch.log_softmax(torch.randn(k, dtype=torch.float64), 0)
    r_lambda = torch.randn(k, dtype=torch.float64)
    i, j = torch.triu_indices(k, k, offset=1)
    log_pi, _ = _minimise_over_policies(k, lambda lp: mocan_loss(
        lp[i], lp[j], log_ref[i], log_ref[j], r_lambda[i] - r_lambda[j], beta)[0].mean())
    assert torch.allclose(log_pi.exp(), torch.softmax(log_ref + r_lambda / beta, 0), atol=1e-4)


def _minimise_over_policies(k: int, objective) -> tuple[torch.Tensor, float]:
    """(log π, final value) minimising ``objective(log π)`` over all policies on k responses (L-BFGS)."""
    theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(torch.log_softmax(theta, 0))
        loss.backward()
        return loss

    for _ in range(3):
        final = opt.step(closure)
    return torch.log_softmax(theta.detach(), 0), float(final)


def test_kl_estimate_equals_naive_weighted_mean_and_is_zero_at_reference():
    rho = T([0.3, -1.2, 0.8, 0.0])
    w = rho.exp()
    assert kl_estimate(rho).item() == pytest.approx(float((w * rho).sum() / w.sum()), abs=1e-6)
    assert kl_estimate(torch.zeros(6)).item() == 0.0
    assert math.isfinite(kl_estimate(T([900.0, 0.0])).item())


def test_dpo_loss_equals_trl_sigmoid_loss():
    from trl import DPOTrainer

    pa, pb = T([-3.1, -7.4, -2.2]), T([-2.9, -8.0, -5.5])
    ra, rb = T([-3.0, -7.0, -2.5]), T([-3.3, -7.7, -5.0])
    beta = 0.25
    ours, diag = dpo_loss(pa, pb, ra, rb, beta)

    # TRL 1.16 computes the loss inside DPOTrainer._compute_loss from per-token log-probs of a batch laid
    # out [chosen; rejected]: one completion token per sequence carries the whole sequence log-prob.
    logps = torch.cat([pa, pb])[:, None]
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps),
                              mean_logits=torch.zeros_like(logps), is_top1=torch.zeros_like(logps, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    identity = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=model, accelerator=identity, aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(6, 2, dtype=torch.long), "attention_mask": torch.ones(6, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * 6), "ref_chosen_logps": ra, "ref_rejected_logps": rb}
    trl_loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    assert trl_loss.item() == pytest.approx(ours.mean().item(), abs=1e-6)
    metrics = trainer._metrics["train"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"):
        assert metrics[name][0] == pytest.approx(diag[name].mean().item(), abs=1e-6), name


def test_mocan_absolute_matches_hand_computation():
    # β = 0.5: βρ_a = 0.5·(−1 + 1.5) = 0.25, βρ_b = 0.5·(−2 + 1.5) = −0.25, h = 0.5
    args = (T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), T([1.3]))
    loss, _ = mocan_loss(*args, beta=0.5, label="absolute", target_a=T([0.4]), target_b=T([-0.9]))
    assert loss.item() == pytest.approx((0.5 - 1.3) ** 2 + (0.25 - 0.4) ** 2 + (-0.25 + 0.9) ** 2, abs=1e-6)
    with pytest.raises(ValueError, match="needs target_a and target_b"):
        mocan_loss(*args, beta=0.5, label="absolute")


def test_target_logratios_are_the_tilted_policys_log_ratios():
    import numpy as np

    from dualign.methods.mocan import target_logratios

    rng = np.random.default_rng(0)
    r_lambda, beta = rng.normal(size=7) * 30, 10.0
    pids = np.array(["a", "a", "a", "b", "b", "b", "b"])
    t = target_logratios(r_lambda, pids, beta)
    for p in ("a", "b"):
        m = pids == p
        assert np.mean(np.exp(t[m] / beta)) == pytest.approx(1.0, rel=1e-12)  # Σ_k π_ref(y_k)·π_λ/π_ref = 1
        np.testing.assert_allclose(np.diff(t[m]), np.diff(r_lambda[m]), rtol=1e-12, atol=1e-9)


def test_absolute_loss_optimum_is_the_tilted_policy_with_its_normalisation():
    # π_ref uniform over K responses (so the K samples are an exact sample): the optimum of the
    # absolute loss over all pairs is π_λ ∝ π_ref·exp(r_λ/β), reached with zero loss.
    import numpy as np

    from dualign.methods.mocan import target_logratios

    torch.manual_seed(1)
    k, beta = 6, 0.8
    log_ref = torch.full((k,), -math.log(k), dtype=torch.float64)
    r_lambda = torch.randn(k, dtype=torch.float64)
    t = torch.from_numpy(target_logratios(r_lambda.numpy(), np.zeros(k), beta))
    i, j = torch.triu_indices(k, k, offset=1)
    log_pi, final = _minimise_over_policies(k, lambda lp: mocan_loss(
        lp[i], lp[j], log_ref[i], log_ref[j], r_lambda[i] - r_lambda[j], beta, "absolute",
        target_a=t[i], target_b=t[j])[0].mean())
    assert torch.allclose(log_pi.exp(), torch.softmax(log_ref + r_lambda / beta, 0), atol=1e-6)
    assert final < 1e-10

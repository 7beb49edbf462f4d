"""The dual solver against independent references: an exact primal solve (cvxpy), projected
gradient descent, finite differences, invariances, infeasibility, weights and ragged prompts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import dualign
from dualign import dual
from dualign._infra.errors import ConfigError, InfeasibleConstraintError, InputError
from dualign._infra.segments import Segments
from dualign.data.example import example_arrays
from dualign.dual import formulas as F
from dualign.dual.solver import joint_margin, projected_gradient_descent
from dualign.dual.tilt import Tilt, flat_samples


def _world(n=6, k=5, m=2, seed=0):
    rewards, utilities = example_arrays(n, k, m, seed)
    ref = utilities.mean(axis=(0, 1))
    reachable = utilities.max(axis=1).mean(axis=0)
    return rewards, utilities, ref + 0.4 * (reachable - ref)


def _flat(rewards, utilities):
    """Rectangular [N, K] (, m) arrays as the formulas take them: (segments, r [n], g [n, m])."""
    n, k = rewards.shape
    return Segments.rectangular(n, k), rewards.ravel(), utilities.reshape(n * k, -1)


def _cvxpy_primal(rewards, utilities, thresholds, beta, weights=None):
    """max Σ_x Σ_k p_xk r_xk/N − β Σ_x KL(p_x‖w_x)/N s.t. Σ_x Σ_k p_xk g_jxk/N ≥ b_j; p_x ∈ simplex."""
    import cvxpy as cp  # in the dev extra: a missing cvxpy fails these tests, never skips them
    n, k, m = utilities.shape
    w = np.full((n, k), 1.0 / k) if weights is None else weights / weights.sum(1, keepdims=True)
    p = cp.Variable((n, k), nonneg=True)
    kl_term = cp.sum(-cp.entr(p) - cp.multiply(p, np.log(w))) / n
    objective = cp.Maximize(cp.sum(cp.multiply(p, rewards)) / n - beta * kl_term)
    cons = [cp.sum(cp.multiply(p, utilities[..., j])) / n >= thresholds[j] for j in range(m)]
    problem = cp.Problem(objective, cons + [cp.sum(p, axis=1) == 1])
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12,
                  max_iter=500)
    lambdas = np.array([c.dual_value for c in cons]).ravel()
    return lambdas, p.value, problem.value


# ---------- exact references ----------


@pytest.mark.parametrize("m,beta", [(1, 0.5), (2, 0.3), (3, 1.0)])
def test_lambdas_and_predictions_match_exact_primal_solution(m, beta):
    rewards, utilities, b = _world(n=5, k=6, m=m, seed=m)
    res = dualign.solve_dual(rewards, utilities, b, beta)
    lam, p, value = _cvxpy_primal(rewards, utilities, b, beta)
    assert res.converged and np.all(res.lambdas > 0)
    np.testing.assert_allclose(res.lambdas, lam, rtol=1e-6)
    np.testing.assert_allclose(res.predicted_reward, np.sum(p * rewards) / 5, rtol=1e-6)
    np.testing.assert_allclose(res.predicted_utilities, np.einsum("nk,nkm->m", p, utilities) / 5,
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.dual_value, value, rtol=1e-7)  # strong duality
    np.testing.assert_allclose(res.dual_value, res.predicted_reward - beta * res.kl, rtol=1e-9)


def test_weighted_samples_match_exact_primal_solution():
    rewards, utilities, b = _world(n=4, k=5, m=2, seed=7)
    weights = np.random.default_rng(0).uniform(0.1, 3.0, size=rewards.shape)
    res = dualign.solve_dual(rewards, utilities, b, 0.4, sample_weights=weights)
    lam, _, _ = _cvxpy_primal(rewards, utilities, b, 0.4, weights)
    np.testing.assert_allclose(res.lambdas, lam, rtol=1e-6, atol=1e-9)


def test_eight_constraints_match_exact_primal_solution():
    rewards, utilities = example_arrays(6, 12, 8, seed=3)
    b = utilities.mean(axis=(0, 1)) + 0.05
    res = dualign.solve_dual(rewards, utilities, b, 0.5)
    lam, _, _ = _cvxpy_primal(rewards, utilities, b, 0.5)
    assert res.converged and res.kkt_residual <= 1e-9
    np.testing.assert_allclose(res.lambdas, lam, rtol=1e-6, atol=1e-8)


def test_newton_agrees_with_projected_gradient_descent():
    rewards, utilities, b = _world(n=50, k=8, m=2, seed=1)
    res = dualign.solve_dual(rewards, utilities, b, 0.2)
    seg = Segments.rectangular(50, 8)
    samples = flat_samples(seg, rewards.ravel(), utilities.reshape(-1, 2), None, np.arange(50))
    tilt = Tilt(samples, b, 0.2)
    step = 1.0 / np.linalg.eigvalsh(tilt.derivatives(tilt.evaluate(res.lambdas))[1]).max()
    lam, _, ok = projected_gradient_descent(tilt, np.zeros(2), 0.5 * step, 1e-11, 100000)
    assert ok
    np.testing.assert_allclose(res.lambdas, lam, rtol=1e-8)


# ---------- the formulas ----------


def test_gradient_and_hessian_match_finite_differences():
    rewards, utilities, b = _world(n=7, k=4, m=3, seed=2)
    lam, beta, h = np.array([0.3, 0.7, 0.1]), 0.4, 1e-5
    grad = F.dual_gradient(*_flat(rewards, utilities), lam, b, beta)
    hess = F.dual_hessian(*_flat(rewards, utilities), lam, beta)
    eye = np.eye(3)
    fd_grad = [(F.dual_value(*_flat(rewards, utilities), lam + h * e, b, beta)
                - F.dual_value(*_flat(rewards, utilities), lam - h * e, b, beta)) / (2 * h) for e in eye]
    fd_hess = [(F.dual_gradient(*_flat(rewards, utilities), lam + h * e, b, beta)
                - F.dual_gradient(*_flat(rewards, utilities), lam - h * e, b, beta)) / (2 * h) for e in eye]
    np.testing.assert_allclose(grad, fd_grad, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(hess, np.array(fd_hess), rtol=1e-6, atol=1e-9)


def test_fast_evaluation_equals_naive_formulas_on_ragged_weighted_prompts():
    rng = np.random.default_rng(5)
    rewards, utilities, b = _world(n=9, k=6, m=2, seed=5)
    weights = rng.uniform(0.5, 2.0, size=rewards.shape) * (rng.random(rewards.shape) < 0.7)
    weights[:, 0] = 1.0
    lam, beta = np.array([0.8, 0.2]), 0.3
    res = dualign.solve_dual(rewards, utilities, b, beta, sample_weights=weights, lambdas0=lam,
                             max_iter=0)
    np.testing.assert_allclose(res.dual_value, F.dual_value(*_flat(rewards, utilities), lam, b, beta, weights.ravel()), rtol=1e-13)
    reward, utils = F.predictions(*_flat(rewards, utilities), lam, beta, weights.ravel())
    np.testing.assert_allclose(res.predicted_reward, reward, rtol=1e-12)
    np.testing.assert_allclose(res.predicted_utilities, utils, rtol=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        seg, r, g = _flat(rewards, utilities)
        p = F.tilted_weights(seg, F.tilt_logits(r, g, lam, beta), F.log_weights(seg, weights.ravel()))
        p = p.reshape(rewards.shape)
        w = weights / weights.sum(1, keepdims=True)
        naive_kl = np.mean(np.nansum(np.where(p > 0, p * np.log(p / w), 0.0), axis=1))
    np.testing.assert_allclose(res.kl, naive_kl, rtol=1e-10)
    np.testing.assert_allclose(res.kl, F.kl(*_flat(rewards, utilities), lam, beta, weights.ravel()), rtol=1e-10)
    # fast gradient / Hessian
    keep = weights.ravel() > 0
    seg = Segments.from_counts((weights > 0).sum(1))
    samples = flat_samples(seg, rewards.ravel()[keep], utilities.reshape(-1, 2)[keep],
                            weights.ravel()[keep], np.arange(9))
    tilt = Tilt(samples, b, beta)
    grad, hess = tilt.derivatives(tilt.evaluate(lam))
    np.testing.assert_allclose(grad, F.dual_gradient(*_flat(rewards, utilities), lam, b, beta, weights.ravel()), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hess, F.dual_hessian(*_flat(rewards, utilities), lam, beta, weights.ravel()), rtol=1e-11)


def test_reference_values_are_weighted_means_per_prompt():
    rewards = np.array([[0.0, 1.0], [2.0, 4.0]])
    utilities = np.array([[1.0, 3.0], [0.0, 0.0]])
    weights = np.array([[1.0, 3.0], [1.0, 1.0]])
    res = dualign.solve_dual(rewards, utilities, -5.0, 1.0, sample_weights=weights)
    assert res.reference_reward == pytest.approx((0.75 + 3.0) / 2)
    assert res.reference_utilities[0] == pytest.approx((2.5 + 0.0) / 2)
    assert res.lambdas[0] == 0.0  # inactive: π_0 ∝ π_ref·exp(r/β), its reward beats π_ref's
    assert res.predicted_reward > res.reference_reward and res.kl > 0


# ---------- invariances ----------


def test_per_prompt_constant_in_rewards_leaves_lambda_unchanged():
    rewards, utilities, b = _world(n=30, k=6, m=2, seed=4)
    shift = np.random.default_rng(1).normal(scale=50.0, size=(30, 1))
    a = dualign.solve_dual(rewards, utilities, b, 0.2)
    c = dualign.solve_dual(rewards + shift, utilities, b, 0.2)
    np.testing.assert_allclose(c.lambdas, a.lambdas, rtol=1e-9)
    np.testing.assert_allclose(c.predicted_utilities, a.predicted_utilities, rtol=1e-10)
    np.testing.assert_allclose(c.kl, a.kl, rtol=1e-9)


def test_joint_scaling_of_rewards_utilities_thresholds_and_beta_keeps_lambda():
    rewards, utilities, b = _world(n=30, k=6, m=2, seed=6)
    a = dualign.solve_dual(rewards, utilities, b, 0.2)
    c = dualign.solve_dual(7.5 * rewards, 7.5 * utilities, 7.5 * b, 7.5 * 0.2)
    np.testing.assert_allclose(c.lambdas, a.lambdas, rtol=1e-9)
    np.testing.assert_allclose(c.predicted_reward, 7.5 * a.predicted_reward, rtol=1e-9)
    np.testing.assert_allclose(c.predicted_utilities, 7.5 * a.predicted_utilities, rtol=1e-9)
    np.testing.assert_allclose(c.kl, a.kl, rtol=1e-9)


def test_ragged_prompts_equal_the_padded_rectangular_problem():
    rng = np.random.default_rng(8)
    rewards, utilities, b = _world(n=40, k=7, m=2, seed=8)
    counts = rng.integers(2, 8, size=40)
    weights = (np.arange(7)[None, :] < counts[:, None]).astype(float)
    padded = dualign.solve_dual(rewards, utilities, b, 0.3, sample_weights=weights)
    mask = weights > 0
    ids = np.repeat(np.arange(40), 7).reshape(40, 7)[mask]
    order = rng.permutation(ids.size)  # rows of a prompt need not be adjacent
    long = dualign.dual.solve_dual_long(ids[order], rewards[mask][order], utilities[mask][order], b, 0.3)
    np.testing.assert_allclose(long.lambdas, padded.lambdas, rtol=1e-10)
    np.testing.assert_allclose(long.predicted_reward, padded.predicted_reward, rtol=1e-10)
    np.testing.assert_allclose(long.kl, padded.kl, rtol=1e-10)
    assert long.num_samples == mask.sum() and long.num_prompts == 40


def test_duplicating_a_sample_equals_doubling_its_weight():
    rewards, utilities, b = _world(n=10, k=4, m=1, seed=9)
    utilities = utilities[..., 0]
    ids = np.repeat(np.arange(10), 4)
    r, g = rewards.ravel(), utilities.ravel()
    dup = np.concatenate([np.arange(40), [5, 17]])
    duplicated = dual.solve_dual_long(ids[dup], r[dup], g[dup], b, 0.25)
    weights = np.ones(40)
    weights[[5, 17]] = 2.0
    doubled = dual.solve_dual_long(ids, r, g, b, 0.25, sample_weights=weights)
    np.testing.assert_allclose(duplicated.lambdas, doubled.lambdas, rtol=1e-10)
    np.testing.assert_allclose(duplicated.predicted_reward, doubled.predicted_reward, rtol=1e-10)


# ---------- infeasibility ----------


def test_threshold_above_reachable_raises_naming_constraint_threshold_and_limit():
    rewards, utilities = example_arrays(20, 5, 1, seed=0)
    reachable = utilities[..., 0].max(axis=1).mean()
    with pytest.raises(InfeasibleConstraintError) as info:
        dualign.solve_dual(rewards, utilities, reachable + 0.01, 0.1, names=["safety"])
    msg = str(info.value)
    assert "'safety'" in msg and f"{reachable + 0.01:.6g}" in msg and f"{reachable:.6g}" in msg
    assert isinstance(info.value, ValueError)
    with pytest.raises(InfeasibleConstraintError):  # exactly at the limit: λ* would be infinite
        dualign.solve_dual(rewards, utilities, reachable, 0.1)


def test_threshold_just_below_reachable_gives_large_finite_lambda():
    rewards, utilities = example_arrays(20, 5, 1, seed=0)
    reachable = utilities[..., 0].max(axis=1).mean()
    res = dualign.solve_dual(rewards, utilities, reachable - 1e-3, 0.1)
    assert res.converged and 1 < res.lambdas[0] < 1e6
    assert res.predicted_utilities[0] == pytest.approx(reachable - 1e-3, abs=1e-9 * 3)


def test_jointly_infeasible_constraints_raise_naming_both():
    rewards, utilities = example_arrays(30, 6, 1, seed=2)
    g = utilities[..., 0]
    hi, lo = np.quantile(g.mean(1), 0.8), np.quantile(g.mean(1), 0.2)
    both = np.stack([g, -g], axis=-1)  # E[g] ≥ hi and E[g] ≤ lo, each reachable alone
    for b in ([hi, -lo], [0.3, -0.2]):
        with pytest.raises(InfeasibleConstraintError, match="jointly") as info:
            dualign.solve_dual(rewards, both, b, 0.1, names=["up", "down"])
        assert "up" in str(info.value) and "down" in str(info.value)


def test_joint_margin_lp_detects_boundary_and_interior():
    rewards, utilities = example_arrays(8, 4, 1, seed=3)
    g = utilities[..., 0]
    both = np.stack([g, -g], axis=-1)
    seg = Segments.rectangular(8, 4)
    samples = flat_samples(seg, rewards.ravel(), both.reshape(-1, 2), None, np.arange(8))
    mid = g.mean()
    assert joint_margin(samples, np.array([mid - 0.1, -mid - 0.1])) > 1e-3
    assert joint_margin(samples, np.array([mid, -mid])) == pytest.approx(0.0, abs=1e-9)


# ---------- numerics and degenerate cases ----------


def test_huge_rewards_over_beta_do_not_overflow():
    rewards, utilities, b = _world(n=20, k=6, m=2, seed=10)
    rewards = 1e3 * rewards / np.abs(rewards).max()  # |r|/β up to 1e4
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        res = dualign.solve_dual(rewards + 5e3, utilities, b, 0.1)
    assert res.converged and np.all(np.isfinite(res.lambdas))
    grad = F.dual_gradient(*_flat(rewards, utilities), res.lambdas, b, 0.1)
    active = res.lambdas > 0
    assert np.all(np.abs(grad[active]) <= 1e-8) and np.all(grad[~active] >= -1e-8)
    assert np.isfinite(res.kl) and res.kl > 0


def test_inactive_constraint_gets_exactly_zero_lambda():
    rewards, utilities, b = _world(n=30, k=5, m=2, seed=11)
    b[1] = utilities[..., 1].min() - 1.0
    res = dualign.solve_dual(rewards, utilities, b, 0.2)
    alone = dualign.solve_dual(rewards, utilities[..., :1], b[:1], 0.2)
    assert res.lambdas[1] == 0.0
    np.testing.assert_allclose(res.lambdas[0], alone.lambdas[0], rtol=1e-9)


def test_constant_utility_and_collinear_constraints_are_handled():
    rewards, utilities, b = _world(n=30, k=5, m=1, seed=12)
    const = np.stack([utilities[..., 0], np.full(rewards.shape, 2.0)], axis=-1)
    res = dualign.solve_dual(rewards, const, [b[0], 2.0], 0.2)  # E[g2] ≥ 2 holds with equality
    alone = dualign.solve_dual(rewards, utilities, b, 0.2)
    assert res.converged and res.lambdas[1] == 0.0
    np.testing.assert_allclose(res.lambdas[0], alone.lambdas[0], rtol=1e-9)
    collinear = np.stack([utilities[..., 0], 2.0 * utilities[..., 0]], axis=-1)
    res = dualign.solve_dual(rewards, collinear, [b[0], 2.0 * b[0]], 0.2)  # singular Hessian
    assert res.converged
    np.testing.assert_allclose(res.lambdas[0] + 2 * res.lambdas[1], alone.lambdas[0], rtol=1e-7)
    np.testing.assert_allclose(res.predicted_reward, alone.predicted_reward, rtol=1e-8)


def test_warm_start_on_many_prompts_reaches_the_same_solution():
    rewards, utilities = example_arrays(40000, 4, 2, seed=13)
    b = utilities.mean(axis=(0, 1)) + 0.2
    warm = dualign.solve_dual(rewards, utilities, b, 0.1)
    cold = dualign.solve_dual(rewards, utilities, b, 0.1, lambdas0=np.zeros(2))
    assert warm.converged and cold.converged and warm.iterations < cold.iterations
    np.testing.assert_allclose(warm.lambdas, cold.lambdas, rtol=1e-8)


# ---------- bootstrap and input errors ----------


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rewards, utilities, b = _world(n=60, k=6, m=2, seed=14)
    a = dualign.solve_dual(rewards, utilities, b, 0.2, bootstrap=40, seed=3)
    c = dualign.solve_dual(rewards, utilities, b, 0.2, bootstrap=40, seed=3)
    d = dualign.solve_dual(rewards, utilities, b, 0.2, bootstrap=40, seed=4)
    np.testing.assert_array_equal(a.ci["lambdas"], c.ci["lambdas"])
    assert not np.array_equal(a.ci["lambdas"], d.ci["lambdas"])
    lo, hi = a.ci["lambdas"].T
    assert np.all(lo < a.lambdas) and np.all(a.lambdas < hi)
    assert a.ci["predicted_reward"][0] < a.predicted_reward < a.ci["predicted_reward"][1]
    assert a.bootstrap == 40 and a.bootstrap_failed == 0


def _prompt_level_world(n=40, k=6, seed=5):
    """Costs with strong prompt-level variation (each prompt its own level), a reward correlated
    with the cost, and a relative constraint cost <= ref − 0.5 as g = −cost ≥ −ref + 0.5."""
    rng = np.random.default_rng(seed)
    level = rng.normal(0, 3, size=(n, 1))
    cost = level + rng.normal(0, 1, size=(n, k))
    reward = 0.8 * cost + rng.normal(0, 1, size=(n, k))
    return reward, -cost


def test_bootstrap_re_estimates_a_relative_threshold_on_each_resample_like_a_hand_written_loop():
    rewards, g = _prompt_level_world()
    margin = 0.5
    b = g.mean() + margin
    fast = dualign.solve_dual(rewards, g, b, 1.0, bootstrap=60, seed=7, relative=[True])
    rng = np.random.default_rng(7)
    n = rewards.shape[0]
    draws = []
    for _ in range(60):                             # the naive loop: rebuild the table, recompute b
        counts = rng.multinomial(n, np.full(n, 1.0 / n))
        idx = np.repeat(np.arange(n), counts)
        r, u = rewards[idx], g[idx]
        res = dualign.solve_dual(r, u, u.mean() + margin, 1.0)
        draws.append([res.lambdas[0], res.predicted_utilities[0], res.predicted_reward - r.mean(),
                      res.predicted_utilities[0] - u.mean()])
    lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    np.testing.assert_allclose(fast.ci["lambdas"][0], [lo[0], hi[0]], rtol=1e-6)
    np.testing.assert_allclose(fast.ci["predicted_utilities"][0], [lo[1], hi[1]], rtol=1e-6)
    np.testing.assert_allclose(fast.ci["predicted_reward_change"], [lo[2], hi[2]], rtol=1e-6)
    # the constraint binds: its predicted change is the margin on every resample
    np.testing.assert_allclose(fast.ci["predicted_utility_changes"][0], [margin, margin], atol=1e-6)
    assert fast.change_fixed.tolist() == [True]  # so it is flagged, its interval no uncertainty
    lo, hi = fast.ci["predicted_utility_changes"][0]
    assert lo <= fast.predicted_utilities[0] - fast.reference_utilities[0] <= hi  # the point inside, always
    # a fixed threshold (today's mistake) gives a λ* interval several times too wide here
    fixed = dualign.solve_dual(rewards, g, b, 1.0, bootstrap=60, seed=7)
    width = np.diff(fast.ci["lambdas"][0])[0]
    assert np.diff(fixed.ci["lambdas"][0])[0] > 2.5 * width
    assert np.diff(fixed.ci["predicted_utilities"][0])[0] > 0 and width > 0
    assert fixed.change_fixed.tolist() == [False]  # an absolute threshold's change varies


def test_confidence_plan_makes_the_one_sided_bound_meet_the_threshold_at_a_cost():
    rewards, g = _prompt_level_world(n=80)
    b = g.mean() + 0.5
    plain = dualign.solve_dual(rewards, g, b, 1.0, relative=[True])
    planned = dualign.solve_dual(rewards, g, b, 1.0, relative=[True], confidence=0.95, bootstrap=400, seed=1)
    margin = planned.confidence_margin[0]
    assert planned.plain.lambdas[0] == pytest.approx(plain.lambdas[0])
    assert margin > 0.02 and planned.lambdas[0] > plain.lambdas[0]
    assert planned.predicted_utilities[0] == pytest.approx(b + margin, abs=1e-6)   # binds at b + margin
    assert planned.predicted_reward < plain.predicted_reward and planned.kl > plain.kl
    # the bootstrap of the planned solution: its one-sided 95% bound of the slack over the
    # re-estimated threshold is ≈ 0 (the resamples' slack has its 5% quantile at the threshold)
    from dualign.dual.solver import slack_spread
    from dualign.dual.tilt import flat_samples
    n, k = rewards.shape
    samples = flat_samples(Segments.rectangular(n, k), rewards.ravel(), g.reshape(-1, 1), None, np.arange(n))
    spread = slack_spread(samples, planned.lambdas, np.array([b]), np.array([0.5]), 1.0, 0.95, 200, 1)
    assert spread[0] == pytest.approx(margin, rel=0.05)


@pytest.mark.parametrize("kwargs,match", [
    ({"rewards": np.zeros((3,))}, "rewards"),
    ({"utilities": np.zeros((3, 5, 2))}, "shape"),
    ({"beta": 0.0}, "beta"),
    ({"beta": float("nan")}, "beta"),
    ({"thresholds": [0.1, 0.2, 0.3]}, "thresholds"),
    ({"sample_weights": -np.ones((4, 5))}, "sample_weights"),
    ({"sample_weights": np.zeros((4, 5))}, "all sample weights are zero"),
    ({"rewards": np.full((4, 5), np.nan)}, "NaN"),
])
def test_bad_inputs_raise_input_error(kwargs, match):
    args = {"rewards": np.zeros((4, 5)), "utilities": np.zeros((4, 5, 2)), "thresholds": [0.0, 0.0],
            "beta": 0.1}
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        dualign.solve_dual(**args)


def test_public_exports():
    assert dualign.solve_dual is dual.solve_dual and dualign.DualResult is dual.DualResult
    assert issubclass(dualign.InfeasibleConstraintError, ValueError)


def test_grouped_logsumexp_equals_scipy_per_prompt_on_unsorted_ragged_rows():
    from scipy.special import logsumexp

    rng = np.random.default_rng(3)
    ids = np.array(["b", "a", "b", "c", "a", "b", "c"])
    v = rng.normal(size=len(ids)) * 400  # large values: the naive log Σ exp overflows
    v[3] = -np.inf  # a zero-weight sample
    out = dual.grouped_logsumexp(v, ids)
    for pid in np.unique(ids):
        np.testing.assert_allclose(out[ids == pid], logsumexp(v[ids == pid]), rtol=1e-12)


def test_half_sample_kl_equals_the_rectangular_kl_on_the_first_half_of_each_prompts_samples():
    rng = np.random.default_rng(5)
    n, k, beta, lam = 40, 6, 0.5, np.array([0.7, 0.2])
    r, g, w = rng.normal(size=(n, k)), rng.normal(size=(n, k, 2)), rng.uniform(0.5, 2, size=(n, k))
    ids = np.repeat(np.arange(n), k)
    half, full = dual.half_sample_kl(ids, r.ravel(), g.reshape(n * k, 2), lam, beta, w.ravel())
    assert half == pytest.approx(F.kl(*_flat(r[:, :3], g[:, :3]), lam, beta, w[:, :3].ravel()), rel=1e-10)
    assert full == pytest.approx(F.kl(*_flat(r, g), lam, beta, w.ravel()), rel=1e-10)
    # a strong tilt: the K/2 estimate is the smaller one (each prompt's KL is at most log K)
    half, full = dual.half_sample_kl(ids, 20 * r.ravel(), g.reshape(n * k, 2), lam, beta)
    assert half < full <= np.log(k)
    # prompts with one sample are left out of both; none with two or more: None
    ids1 = np.concatenate([ids, [n, n + 1]])
    out = dual.half_sample_kl(ids1, np.concatenate([r.ravel(), [5.0, -5.0]]),
                              np.concatenate([g.reshape(n * k, 2), np.ones((2, 2))]), lam, beta)
    assert out[1] == pytest.approx(F.kl(*_flat(r, g), lam, beta), rel=1e-10)
    assert dual.half_sample_kl(np.arange(4), np.zeros(4), np.zeros((4, 1)), [1.0], beta) is None


def test_tilted_means_on_unsorted_ragged_rows_equal_the_predictions_and_kl():
    rng = np.random.default_rng(0)
    counts = np.array([4, 2, 5, 3])
    ids = np.repeat(np.arange(4), counts)
    r, g, w = rng.normal(size=ids.size), rng.normal(size=ids.size), rng.uniform(0.5, 2, size=ids.size)
    lam, beta = 0.7, 0.3
    seg = Segments.from_counts(counts)
    order = rng.permutation(ids.size)  # long format: rows in any order
    means, kl_long = dual.tilted_means(ids[order], ((r + lam * g) / beta)[order],
                                       np.column_stack([r, g])[order], w[order])
    pred_r, pred_g = F.predictions(seg, r, g, [lam], beta, w)
    assert means[0] == pytest.approx(pred_r, rel=1e-12) and means[1] == pytest.approx(pred_g[0], rel=1e-12)
    assert kl_long == pytest.approx(F.kl(seg, r, g, [lam], beta, w), rel=1e-12)


def test_reachable_gap_bound_lies_below_the_exact_distance_to_the_limit():
    """Tilt.reachable_gap (no pass over the samples) against Samples.reachable − predictions."""
    for seed, beta in [(0, 0.1), (1, 1.0), (2, 0.02)]:
        rewards, utilities, b = _world(n=30, k=6, m=2, seed=seed)
        seg, r, g = _flat(rewards, utilities)
        samples = flat_samples(seg, r, g, None, np.arange(30))
        tilt = Tilt(samples, b, beta)
        for lam in ([0.1, 0.2], [1.0, 3.0], [0.0, 0.5]):
            _, hess = tilt.derivatives(tilt.evaluate(np.array(lam)))
            gap = samples.reachable() - F.predictions(seg, r, g, lam, beta)[1]
            bound = tilt.reachable_gap(hess)
            assert np.all(bound > 0) and np.all(bound <= gap * (1 + 1e-12))


@pytest.mark.parametrize("weighted", [False, True])
def test_fast_reference_values_equal_reference_means_on_ragged_prompts(weighted):
    rng = np.random.default_rng(4)
    counts = rng.integers(2, 7, size=12)
    ids = np.repeat(np.arange(12), counts)
    r, g = rng.normal(size=ids.size), rng.normal(size=(ids.size, 2))
    w = rng.uniform(0.2, 2.0, size=ids.size) if weighted else None
    samples = flat_samples(Segments.from_counts(counts), r, g, w, np.arange(12))
    reward, utilities = samples.reference()
    expected = dual.reference_means(ids, np.column_stack([r, g]), w)
    np.testing.assert_allclose([reward, *utilities], expected, rtol=1e-12)


def test_confidence_plan_with_an_evaluation_adds_its_noise_in_quadrature():
    """margin = sqrt(s_dual² + (Φ⁻¹(level)·SE_eval)²) at the planned λ, and the plan binds at b + margin."""
    from scipy.stats import norm

    from dualign.dual.solver import evaluation_se

    rewards, g = _prompt_level_world(n=80)
    b = g.mean() + 0.5
    planned = dualign.solve_dual(rewards, g, b, 1.0, relative=[True], confidence=0.9, bootstrap=200,
                                 seed=1, evaluation=(64, 2))
    dual_part, eval_part, delivery_part, bias_part = planned.confidence_parts
    assert delivery_part is None
    assert abs(bias_part[0]) < 0.1 * dual_part[0]   # a plain prompt bootstrap of the tilt is nearly unbiased
    n, k = rewards.shape
    samples = flat_samples(Segments.rectangular(n, k), rewards.ravel(), g.reshape(-1, 1), None, np.arange(n))
    se = evaluation_se(samples, planned.lambdas, 1.0, np.array([True]), 64, 2)[0]
    # the parts were computed at the previous round's λ; the fixed point moves it < 1e-3 × scale
    assert eval_part[0] == pytest.approx(norm.ppf(0.9) * se, rel=0.02)
    assert planned.confidence_margin[0] == pytest.approx(bias_part[0] + np.hypot(dual_part[0], eval_part[0]), rel=1e-9)
    assert eval_part[0] > dual_part[0] > 0   # 64 × 2 held-out responses are noisier than 80 × 6
    assert planned.predicted_utilities[0] == pytest.approx(b + planned.confidence_margin[0], abs=1e-6)
    with pytest.raises(InputError, match="evaluation"):
        dualign.solve_dual(rewards, g, b, 1.0, confidence=0.9, evaluation=(0, 2))


def test_a_plan_for_the_fine_tunes_spread_adds_a_third_part_of_z_delta_times_the_planned_change():
    """delivery δ: the margin's third part is Φ⁻¹(level)·δ·|b' − E_ref[g]| at the planned threshold
    b' = b + margin (hand computation), added in quadrature to the dual's and the evaluation's parts;
    the plan binds at b'. δ = 0 plans as without it; δ without a confidence, or outside [0, 1), is refused."""
    from scipy.stats import norm

    rewards, g = _prompt_level_world(n=80)
    ref = g.mean()
    b = ref + 0.5
    kw = dict(relative=[True], confidence=0.9, bootstrap=200, seed=1, evaluation=(64, 2))
    plain = dualign.solve_dual(rewards, g, b, 1.0, **kw)
    spread = dualign.solve_dual(rewards, g, b, 1.0, delivery=0.1, **kw)
    dual_part, eval_part, delivery_part, bias_part = spread.confidence_parts
    planned_change = abs(b + spread.confidence_margin[0] - ref)
    # the parts were computed at the previous round's threshold; the fixed point moves it < 1e-3 × scale
    assert delivery_part[0] == pytest.approx(norm.ppf(0.9) * 0.1 * planned_change, rel=0.01)
    assert spread.confidence_margin[0] == pytest.approx(
        bias_part[0] + np.sqrt(dual_part[0] ** 2 + eval_part[0] ** 2 + delivery_part[0] ** 2), rel=1e-9)
    assert spread.confidence_margin[0] > plain.confidence_margin[0]
    assert spread.predicted_utilities[0] == pytest.approx(b + spread.confidence_margin[0], abs=1e-6)
    zero = dualign.solve_dual(rewards, g, b, 1.0, delivery=0.0, **kw)
    assert zero.confidence_margin[0] == pytest.approx(plain.confidence_margin[0], rel=1e-12)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(InputError, match="delivery"):
            dualign.solve_dual(rewards, g, b, 1.0, delivery=bad, **kw)
    with pytest.raises(InputError, match="delivery"):
        dualign.solve_dual(rewards, g, b, 1.0, delivery=0.1)   # no confidence
    n, k = rewards.shape
    scores = pd.DataFrame({"prompt_id": np.repeat(np.arange(n), k), "reward": rewards.ravel(), "cost": -g.ravel()})
    with pytest.raises(ConfigError, match="delivery_spread"):
        dualign.make_plan(scores, "cost<=ref-0.1", beta=1.0, delivery_spread=0.05)
    plan = dualign.make_plan(scores, "cost<=ref-0.5", beta=1.0, confidence=0.9, evaluation_prompts=64,
                             evaluation_samples=2, delivery_spread=0.1, bootstrap=50)
    assert plan.confidence.delivery["spread"] == 0.1
    assert plan.confidence.delivery["margin"]["cost"] > 0
    assert "fine-tune's spread" in " ".join(dualign.dual.format_report(plan).split())


def test_a_plan_for_the_evaluations_bound_covers_that_bound_too():
    """With evaluation_bound (the one-sided level of the evaluation's verdict) the evaluation's part
    of the margin is (Φ⁻¹(confidence) + Φ⁻¹(bound))·SE_eval: the bound, not only the point, clears
    the threshold with probability ≈ confidence; without it, Φ⁻¹(confidence)·SE_eval."""
    from scipy.stats import norm

    from dualign.dual.solver import evaluation_se

    rewards, g = _prompt_level_world(n=80)
    b = g.mean() + 0.5
    n, k = rewards.shape
    samples = flat_samples(Segments.rectangular(n, k), rewards.ravel(), g.reshape(-1, 1), None, np.arange(n))
    point = dualign.solve_dual(rewards, g, b, 1.0, relative=[True], confidence=0.9, bootstrap=200, seed=1,
                               evaluation=(64, 2))
    bound = dualign.solve_dual(rewards, g, b, 1.0, relative=[True], confidence=0.9, bootstrap=200, seed=1,
                               evaluation=(64, 2), evaluation_bound=0.95)
    for res, z in ((point, norm.ppf(0.9)), (bound, norm.ppf(0.9) + norm.ppf(0.95))):
        se = evaluation_se(samples, res.lambdas, 1.0, np.array([True]), 64, 2)[0]
        assert res.confidence_parts[1][0] == pytest.approx(z * se, rel=0.02)
    assert bound.confidence_bound == 0.95 and point.confidence_bound is None
    assert bound.confidence_margin[0] > point.confidence_margin[0]
    with pytest.raises(InputError, match="evaluation_bound"):
        dualign.solve_dual(rewards, g, b, 1.0, confidence=0.9, evaluation_bound=0.95)   # no evaluation
    scores = pd.DataFrame({"prompt_id": np.repeat(np.arange(n), k), "reward": rewards.ravel(), "cost": -g.ravel()})
    with pytest.raises(InputError, match="evaluation_bound"):    # not silently planned for the point estimate
        dualign.make_plan(scores, "cost<=ref-0.1", beta=1.0, confidence=0.9, evaluation_bound=0.95)

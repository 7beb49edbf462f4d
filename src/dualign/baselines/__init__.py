"""Whole runs above the one training loop, which MoCAN is compared against
(``dualign train --method NAME``; :mod:`~dualign.baselines.dispatch` picks the runner):

- :mod:`~dualign.baselines.fixed_lambda`: MoCAN's loss at a λ set by hand (fixed-lambda,
  reward-only-mocan, cost-only-mocan);
- :mod:`~dualign.baselines.preference_dpo`: dpo-helpful, dpo-safe and safedpo from a PKU-style file;
- :mod:`~dualign.baselines.dual_ascent`: MoCAN at λ_t, measure, move λ, repeat;
- :mod:`~dualign.baselines.ppo_lagrangian` and :mod:`~dualign.baselines.grpo_lagrangian`:
  primal-dual RL (one loop, two sets of update rules);
- :mod:`~dualign.methods.objective`: the constrained objective they share.

This file imports nothing, so that importing one baseline does not load the others.
"""

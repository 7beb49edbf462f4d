"""One file per method, each readable top to bottom, all training through the one loop in
:mod:`dualign.train` (``dualign train --method NAME``):

- :mod:`~dualign.methods.mocan`: MoCAN, pairs of π_ref's samples scored by r_λ* (the dual's λ*).
- :mod:`~dualign.methods.pecan` and :mod:`~dualign.methods.pecan_prealign`: PeCAN, from
  preference pairs alone (DPO pre-alignment, implicit rewards, the same loss).
- :mod:`~dualign.methods.dpo`: DPO on hard preference labels; :mod:`~dualign.methods.safedpo`:
  SafeDPO's transform and loss entry.
- The baselines MoCAN is compared against (:mod:`~dualign.methods.dispatch` runs them):
  :mod:`~dualign.methods.fixed_lambda` (fixed-lambda, reward-only-mocan, cost-only-mocan),
  :mod:`~dualign.methods.preference_dpo` (dpo-helpful, dpo-safe, safedpo from a PKU-style file),
  :mod:`~dualign.methods.dual_ascent`, :mod:`~dualign.methods.ppo_lagrangian` and
  :mod:`~dualign.methods.grpo_lagrangian` (one loop, two sets of update rules), sharing
  :mod:`~dualign.methods.objective`.

This file imports nothing: :mod:`dualign.train` imports the mocan, dpo, pecan and safedpo modules for its
``LOSSES``, and the baselines import the loop, so an import here would run in a circle.
"""

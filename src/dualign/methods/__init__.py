"""What the one training loop (:mod:`dualign.train`, ``dualign train --method NAME``) trains on:
each method's loss (:mod:`~dualign.methods.losses`, pure tensor functions) and its pair builder.

- :mod:`~dualign.methods.mocan`: MoCAN, pairs of π_ref's samples scored by r_λ* (the dual's λ*).
- :mod:`~dualign.methods.pecan`: PeCAN, from preference pairs alone (its DPO pre-alignment is the
  :mod:`~dualign.prealign` stage).
- :mod:`~dualign.methods.dpo`: DPO on hard preference labels; :mod:`~dualign.methods.safedpo`:
  SafeDPO's transform and its pairs table.
- :mod:`~dualign.methods.pairs`: the pairs table every method trains on.

Nothing in this package imports the loop: whole runs that drive it live in :mod:`dualign.baselines`.
"""

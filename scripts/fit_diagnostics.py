"""How closely a trained policy matches π_λ* on its own training samples (in-sample fit).

    python scripts/fit_diagnostics.py runs/seed0

See :mod:`dualign.compare.in_sample_fit`: the reward, every constraint column and the KL on the run's training
samples, reweighted as π_ref, as the trained policy and as π_λ* (the dual's target) would.
"""

from __future__ import annotations

import sys

import pandas as pd

from dualign.compare.in_sample_fit import in_sample_fit


def main(run: str) -> None:
    fit = in_sample_fit(run)
    table = pd.DataFrame({"π_ref": fit["reference"], "policy (in-sample)": fit["policy"],
                          "π_λ* (dual's target)": fit["target"]}).T
    print(table.round(3).to_string())
    ref, pol, tgt = fit["reference"], fit["policy"], fit["target"]
    for c in list(ref)[1:-1]:
        print(f"{c}: in-sample change {pol[c] - ref[c]:+.3f} of the target's {tgt[c] - ref[c]:+.3f} "
              f"({(pol[c] - ref[c]) / (tgt[c] - ref[c]):.0%})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

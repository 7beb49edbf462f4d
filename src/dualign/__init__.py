"""dualign: one-shot safety alignment of LLMs by optimal dualization (MoCAN / PeCAN).

``solve_dual`` and ``DualResult`` (:mod:`dualign.dual`) are imported on first use, so that
``import dualign`` and the CLI's start stay cheap (numpy and scipy load only when needed).
"""

from dualign._infra import moved
from dualign._infra.errors import InfeasibleConstraintError

moved.install()

__version__ = "0.1.0"

__all__ = ["DualResult", "InfeasibleConstraintError", "__version__", "solve_dual"]


def __getattr__(name: str):
    if name in ("solve_dual", "DualResult"):
        from dualign import dual

        return getattr(dual, name)
    raise AttributeError(f"module 'dualign' has no attribute {name!r}")

"""Per-prompt segments: the one way dualign groups rows by prompt.

Samples, pairs and evaluation responses are long-format rows, each belonging to one prompt. Every
per-prompt reduction in the package (the dual's sums and log-sum-exps, the pairs' partition
functions, the scores reader's checks, evaluate's prompt bootstrap) works on rows grouped prompt
after prompt: prompt x owns rows ``[starts[x], starts[x] + counts[x])``.

``Segments.of(prompt_ids)`` numbers the prompts in order of first appearance and keeps the stable
order that groups the rows (none when they already are); ``group`` and ``ungroup`` move arrays
between the caller's row order and the grouped one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Segments:
    """Prompt x owns grouped rows [starts[x], starts[x] + counts[x]); ``width`` = K when every
    prompt has K rows. Reductions run over the last axis of grouped arrays."""

    starts: np.ndarray  # [N]
    counts: np.ndarray  # [N] ≥ 1
    width: int | None
    order: np.ndarray | None = None  # [n] the input row of each grouped row; None: already grouped
    labels: np.ndarray | None = None  # [N] the prompts' ids (from ``of``)

    @classmethod
    def from_counts(cls, counts, order: np.ndarray | None = None,
                    labels: np.ndarray | None = None) -> Segments:
        counts = np.asarray(counts, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        width = int(counts[0]) if counts.size and np.all(counts == counts[0]) else None
        return cls(starts, counts, width, order, labels)

    @classmethod
    def rectangular(cls, num: int, width: int) -> Segments:
        """N prompts of K rows each, stored prompt after prompt (an [N, K] array, raveled)."""
        return cls(np.arange(0, num * width, width), np.full(num, width), width)

    @classmethod
    def of(cls, prompt_ids) -> Segments:
        """The segments of long-format rows: prompts numbered in order of first appearance, rows of a
        prompt need not be adjacent (then ``order`` groups them, stably)."""
        codes, labels = pd.factorize(np.asarray(prompt_ids), sort=False)
        grouped = codes.size < 2 or bool(np.all(codes[1:] >= codes[:-1]))
        order = None if grouped else np.argsort(codes, kind="stable")
        return cls.from_counts(np.bincount(codes, minlength=len(labels)), order, np.asarray(labels))

    @property
    def num(self) -> int:
        """N, the number of prompts."""
        return len(self.counts)

    @property
    def size(self) -> int:
        """n, the number of rows."""
        return int(self.counts.sum())

    def group(self, x: np.ndarray) -> np.ndarray:
        """Rows (axis 0) of ``x`` in grouped order."""
        x = np.asarray(x)
        return x if self.order is None else x[self.order]

    def ungroup(self, y: np.ndarray) -> np.ndarray:
        """Grouped rows (axis 0) of ``y`` back in the input's order."""
        if self.order is None:
            return y
        out = np.empty_like(y)
        out[self.order] = y
        return out

    def codes(self) -> np.ndarray:
        """The prompt number of each row, in the input's order → [n]."""
        return self.ungroup(np.repeat(np.arange(self.num), self.counts))

    def rows(self, prompt: int) -> np.ndarray:
        """The input rows of one prompt, in their order."""
        grouped = np.arange(self.starts[prompt], self.starts[prompt] + self.counts[prompt])
        return grouped if self.order is None else self.order[grouped]

    def sum(self, x: np.ndarray) -> np.ndarray:
        """Per-prompt sums of ``x`` [..., n] → [..., N]."""
        if self.width is not None:  # a BLAS matrix-vector product beats reduceat
            lead = x.shape[:-1]
            out = x.reshape(-1, self.width) @ np.ones(self.width)
            return out.reshape(*lead, self.num)
        return np.add.reduceat(x, self.starts, axis=-1)

    def max(self, x: np.ndarray) -> np.ndarray:
        """Per-prompt maxima of ``x`` [..., n] → [..., N]."""
        return np.maximum.reduceat(x, self.starts, axis=-1)

    def logsumexp(self, x: np.ndarray) -> np.ndarray:
        """log Σ_k exp(x_k) per prompt, [n] → [N]; the prompt's maximum is taken out first, so large
        values do not overflow (−inf entries are zero weights)."""
        top = self.max(x)
        top = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            return top + np.log(self.sum(np.exp(x - self.expand(top))))

    def expand(self, v: np.ndarray) -> np.ndarray:
        """Per-prompt values [..., N] → per-row [..., n]."""
        return np.repeat(v, self.width if self.width is not None else self.counts, axis=-1)

    def scale(self, x: np.ndarray, v: np.ndarray | float, shift: np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
        """x_k·v_x (+ shift_x) for every row k of prompt x; ``x`` [n], ``v`` and ``shift`` [N]."""
        out = np.empty_like(x) if out is None else out
        if self.width is not None:
            x2, o2 = x.reshape(-1, self.width), out.reshape(-1, self.width)
            np.multiply(x2, np.reshape(v, (-1, 1)) if np.ndim(v) else v, out=o2)
            if shift is not None:
                o2 += shift[:, None]
            return out
        np.multiply(x, self.expand(v) if np.ndim(v) else v, out=out)
        if shift is not None:
            out += self.expand(shift)
        return out

    def take(self, prompts: np.ndarray) -> tuple[Segments, np.ndarray]:
        """(the segments of ``prompts``, the grouped rows they own, in order); no Python loop."""
        counts = self.counts[prompts]
        first = np.repeat(self.starts[prompts] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        labels = None if self.labels is None else self.labels[prompts]
        return Segments.from_counts(counts, labels=labels), first + np.arange(counts.sum())

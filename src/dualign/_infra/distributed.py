"""Data-parallel stages: under ``torchrun`` or ``accelerate launch`` each process takes a share of
a stage's work and the main process merges the shares.

A process learns its place from the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); alone (no launcher) it is rank 0 of 1 and nothing here costs anything. With
several processes the process group is accelerate's (``PartialState``: gloo on CPU, NCCL on GPU),
the one ``train``'s Accelerator joins later in the same process. Across machines nothing changes
but the launcher's flags (``--nnodes``/``--node_rank`` or accelerate's ``--num_machines``/
``--machine_rank``), with the run directory on a filesystem every machine sees.

Only the main process writes the run directory's lock, records and ``<stage>.done`` markers; the
other processes write only their own shard files, each atomically.

accelerate is imported only when there are several processes, torch and pandas only where used
(the dual stage checks :func:`one_process` without paying for them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launched ones."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for alone)."""
        if self.size > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Σ over the processes of each one's float64 ``values`` (itself alone). A process that
        leaves 0 where another computed a value hands that value on exactly: x + 0 = x."""
        if self.size == 1:
            return values
        import torch
        import torch.distributed as dist
        from accelerate import PartialState

        tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=PartialState().device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def mine(self, n: int) -> list[int]:
        """The indices of ``n`` work units this process takes: ``rank, rank + size, ...``."""
        return list(range(self.rank, n, self.size))

    def device(self, device: str | None) -> str | None:
        """``auto`` becomes this process's own GPU when several processes share a machine with GPUs."""
        import torch

        if device in (None, "auto") and self.size > 1 and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device


def launched_ranks() -> int:
    """WORLD_SIZE as the launcher set it (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def one_process(what: str) -> None:
    """Refuse, in one line, to run ``what`` (a stage that is not data-parallel) under a launcher:
    every process would run it whole and write the same files."""
    if launched_ranks() > 1:
        from dualign._infra.errors import ConfigError

        raise ConfigError(f"{what} is one process; under torchrun / accelerate launch only sample, score, "
                          "evaluate (with shard_size) and train run (docs/guides/at-scale.md)")


def ranks() -> Ranks:
    """This process's :class:`Ranks`; with several processes the process group is started (once)."""
    size = launched_ranks()
    if size <= 1:
        return Ranks()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != size:
        raise RuntimeError(f"launched as {size} processes but the process group has {state.num_processes}")
    return Ranks(state.process_index, state.num_processes, state.local_process_index)


def gather_shards(n: int, shard_dir: Path, dp: Ranks, everywhere: bool = False) -> pd.DataFrame | None:
    """Once every process has written its shards (:meth:`Ranks.mine`), the main process's
    concatenation of ``<shard_dir>/0.parquet`` … ``<n-1>.parquet`` in order; None in the others
    (``everywhere``: every process reads it). A shard's content depends on its index alone, never on
    which process made it, so any number of processes gives the same table."""
    import pandas as pd

    from dualign._infra.io import read_table

    dp.barrier()
    if not (dp.main or everywhere):
        return None
    return pd.concat([read_table(shard_dir / f"{i}.parquet") for i in range(n)], ignore_index=True)

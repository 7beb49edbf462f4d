"""The training loop's checkpoint (``<run_dir>/train.state/state.pt``): everything a killed run
needs to resume to the same weights as an uninterrupted one, and the config values it must agree
with. Only tensors and plain values are stored; it is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dualign.errors import InputError
from dualign.io import atomic_path


def save_state(path: Path, step: int, model, optimizer, scheduler, generator: torch.Generator,
               ref_logps: torch.Tensor, key: dict[str, Any]) -> None:
    """The trainable weights, optimizer, schedule, random states, log π_ref and ``key`` (the config)."""
    trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "ref_logps": ref_logps, "config": key}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``; refused (one line) when it was written under another config."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    old = state["config"]
    for k in sorted(set(old) | set(key)):
        if old.get(k) != key.get(k):
            raise InputError(f"{path}: checkpoint of a run with {k}={old.get(k)!r}, now {key.get(k)!r}; "
                             "restore the config or delete the checkpoint")
    return state


def restore_state(state: dict[str, Any], model, optimizer, scheduler, generator: torch.Generator) -> int:
    """Load a checkpoint into the freshly built model, optimizer, schedule and generator; its step."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep))

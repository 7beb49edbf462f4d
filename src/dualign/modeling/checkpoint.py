"""The training loop's checkpoint (``<run_dir>/train.state/state.safetensors``): everything a killed
run needs to resume to the same weights as an uninterrupted one, and the config values it must
agree with.

No pickle: the tensors (trainable weights, optimizer moments, random states, log π_ref) are
safetensors, and everything else (step, schedule, optimizer hyper-parameters, config) is JSON in
the file's metadata, each tensor replaced by ``{"tensor": NAME}``. Reading it runs no code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dualign._infra.errors import InputError, first_line
from dualign._infra.io import atomic_path

STATE_FILE = "state.safetensors"


def save_state(path: Path, step: int, model, optimizer, scheduler, generator: torch.Generator,
               ref_logps: torch.Tensor, key: dict[str, Any]) -> None:
    """The trainable weights, optimizer, schedule, random states, log π_ref and ``key`` (the config)."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state = {"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "ref_logps": ref_logps, "config": key}
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _to_json(state, "", tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(skeleton)})


def load_state(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``; refused (one line) when unreadable or written under another config."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            skeleton = json.loads((f.metadata() or {})["state"])
        state = _from_json(skeleton, tensors)
        old = state["config"]
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line, never a traceback
        raise InputError(f"{path}: not a readable dualign checkpoint ({first_line(e)}); delete "
                         f"{path.parent} to start training over") from None
    for k in sorted(set(old) | set(key)):
        if old.get(k) != key.get(k):
            raise InputError(f"{path}: checkpoint of a run with {k}={old.get(k)!r}, now {key.get(k)!r}; "
                             "restore the config or delete the checkpoint")
    return state


def _to_json(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON: tensors moved to ``tensors`` (named by their path), dicts and tuples tagged
    so that non-string keys (the optimizer's parameter ids) and tuples (its betas) come back as they were."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if isinstance(obj, dict):
        return {"dict": [[k, _to_json(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_to_json(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at '{name}'")


def _from_json(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_from_json(v, tensors) for v in node]
    if isinstance(node, dict):
        (tag, value), = node.items()
        if tag == "tensor":
            return tensors[value]
        if tag == "tuple":
            return tuple(_from_json(v, tensors) for v in value)
        if tag == "dict":
            return {k: _from_json(v, tensors) for k, v in value}
        raise ValueError(f"unknown entry {tag!r}")
    return node


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

"""What every run directory and model card records: resolved config, seed, versions, commit; and
the marker that says a stage is complete.

A stage writes ``<run_dir>/<stage>.done`` as its very last file, after every output, the
config and the meta record, so a stage killed at any point is either complete (marker present,
every file in place) or not marked (and ``dualign run`` redoes it).
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from dualign._infra.config import config_to_dict, dump_yaml
from dualign._infra.io import atomic_path, write_json

_PACKAGES = ("dualign", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "numpy")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["dualign_commit"] = git_commit()
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def record_config(run_dir: str | Path, stage: str, cfg: Any) -> None:
    """Write ``<run_dir>/<stage>.config.yaml``, the config a stage is (being) run with."""
    with atomic_path(Path(run_dir) / f"{stage}.config.yaml") as tmp:
        tmp.write_text(dump_yaml(cfg))


def record_stage(run_dir: str | Path, stage: str, cfg: Any, seed: int | None = None,
                 extra: dict[str, Any] | None = None) -> None:
    """Write ``<run_dir>/<stage>.config.yaml`` and ``<run_dir>/<stage>.meta.json``."""
    run_dir = Path(run_dir)
    record_config(run_dir, stage, cfg)
    meta = {"stage": stage, "seed": seed, "versions": versions(),
            "config": config_to_dict(cfg) if not isinstance(cfg, dict) else cfg}
    meta.update(extra or {})
    write_json(meta, run_dir / f"{stage}.meta.json")


def done_marker(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / f"{stage}.done"


def unmark(run_dir: str | Path, stage: str) -> None:
    """Before a stage's first write: until it is marked again, it is not complete."""
    done_marker(run_dir, stage).unlink(missing_ok=True)


def mark_done(run_dir: str | Path, stage: str) -> None:
    """Mark ``stage`` complete: call it after the stage's last other write."""
    with atomic_path(done_marker(run_dir, stage)) as tmp:
        tmp.write_text(f"{stage}: complete\n")


def is_done(run_dir: str | Path, stage: str) -> bool:
    return done_marker(run_dir, stage).exists()

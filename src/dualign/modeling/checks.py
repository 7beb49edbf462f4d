"""Up-front checks of a stage's inputs and outputs, made before any work starts (``dualign run``
checks every stage before the first one runs): files and models that must exist, scorer and judge
targets, and output paths that must be writable directories or new files.

Paths inside the run directory are the products of earlier stages and are not checked here; the
stage that reads them fails first thing if they are missing. Hub ids (``org/name``) are left to
the loaders, and ``world:NAME`` references to the world build (which checks that each exists). Each failure is one :class:`InputError` naming the config key and the path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from dualign._infra.errors import InputError, first_line
from dualign._infra.io import TABLE_SUFFIXES, is_model_dir


def looks_local(ref: str) -> bool:
    """A path rather than a Hub id: starts with ., / or ~, or has more than one '/'."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1


def inside(path: str | Path, root: str | Path | None) -> bool:
    """Whether ``path`` lies in ``root`` (an earlier stage's product when ``root`` is the run directory)."""
    if root is None:
        return False
    return Path(os.path.abspath(Path(path).expanduser())).is_relative_to(os.path.abspath(Path(root).expanduser()))


def writable_dir(path: str | Path, key: str) -> None:
    """``path`` is a directory, or can be made one, that this process can write in."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{key}: '{path}' is a file, not a directory")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{key}: '{path}' cannot be made: '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{key}: '{path}' is not writable (no write permission on '{existing}')")
    # permission bits do not tell a pseudo or read-only file system (/proc, /sys): try, and take it back
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dualign-probe.", dir=existing))
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise InputError(f"{key}: cannot write in '{path}' ({why})" if existing == p else
                         f"{key}: '{path}' cannot be made in '{existing}' ({why})") from None


def new_file(path: str | Path, key: str) -> None:
    """``path`` does not exist yet (nothing is overwritten) and its directory is writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{key}: '{path}' is a directory, not a file")
    if p.exists() or p.is_symlink():
        raise InputError(f"{key}: '{path}' already exists; delete it or choose another path")
    writable_dir(p.parent, key)


def existing_file(path: str | Path, key: str) -> None:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{key}: '{path}' does not exist")
    if p.is_dir():
        raise InputError(f"{key}: '{path}' is a directory, not a file")


def model(ref: str, key: str) -> None:
    """A local model path must be a directory with a config.json; other references are Hub ids."""
    p = Path(ref).expanduser()
    if not p.exists():
        if looks_local(ref):
            raise InputError(f"{key}: model path '{ref}' does not exist")
        return
    if not p.is_dir():
        raise InputError(f"{key}: model path '{ref}' is a file, not a model directory")
    if not is_model_dir(p):
        raise InputError(f"{key}: model path '{ref}' has no config.json (not a Hugging Face model directory)")


def source(ref: str, key: str) -> None:
    """A table, a saved dataset directory or a Hub dataset id: a local-looking one must exist."""
    p = Path(ref).expanduser()
    if not p.exists() and (looks_local(ref) or p.suffix.lower() in TABLE_SUFFIXES):
        raise InputError(f"{key}: '{ref}' does not exist")


def callable_target(target: str, key: str) -> None:
    """``MODULE:FUNCTION`` or ``FILE.py:FUNCTION``: the file exists, or the module can be found."""
    module, colon, func = target.rpartition(":")
    if not colon or not module or not func:
        raise InputError(f"{key}: {target!r} is not MODULE:FUNCTION or FILE.py:FUNCTION")
    if module.endswith(".py"):
        existing_file(module, key)
        return
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception as e:  # noqa: BLE001 - a parent package that fails to import: one line
        raise InputError(f"{key}: module '{module}' cannot be imported ({first_line(e)})") from None
    if not found:
        raise InputError(f"{key}: module '{module}' not found")


def scorer(spec: str, key: str, run_dir: str | Path | None) -> None:
    """A scorer spec parses and its target can be found (a model under the run directory is an
    earlier stage's product: PeCAN's pre-aligned policies)."""
    from dualign.modeling.scorers import parse_scorer

    parsed = parse_scorer(spec)
    if parsed.target.startswith("world:"):
        return
    if parsed.kind == "callable":
        callable_target(parsed.target, f"{key} ({parsed.name})")
    elif not inside(parsed.target, run_dir):
        model(parsed.target, f"{key} ({parsed.name})")


def stage_inputs(cfg: Any, run_dir: str | Path | None, prefix: str = "") -> None:
    """Every input and output path of a stage's config ``cfg`` that can be checked before it runs
    (a flat section's too: a baseline's loop settings)."""
    def key(field: str) -> str:
        return f"config key '{prefix}{field}'"

    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        if f.metadata.get("flat"):
            stage_inputs(getattr(cfg, f.name), run_dir, prefix)

    def maybe(field: str, check) -> None:
        value = getattr(cfg, field, None)
        if value is not None and not str(value).startswith("world:") and not inside(value, run_dir):
            check(value, key(field))

    for field in ("model", "reference", "policy", "ref_model"):
        maybe(field, model)
    for field in ("prompts", "preferences"):
        maybe(field, source)
    for field in ("scores", "dual", "pairs"):
        maybe(field, existing_file)
    for i, spec in enumerate(getattr(cfg, "scorers", None) or []):
        scorer(spec, key(f"scorers[{i}]"), run_dir)
    if getattr(cfg, "judge", None):
        callable_target(cfg.judge, key("judge"))
    if getattr(cfg, "output_dir", None):
        writable_dir(cfg.output_dir, key("output_dir"))
    if run_dir is not None:
        writable_dir(run_dir, key("run_dir"))

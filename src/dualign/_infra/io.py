"""File helpers shared by every stage: atomic writes and table readers/writers.

Nothing is ever written half-way: each writer writes to a temporary file in the target's
directory and renames it over the target only once the write has succeeded. The renamed file gets
the mode a plain ``open`` would have given it (``0o666 & ~umask``), not the temporary file's 0600,
so a run directory shared with a colleague or a web server is readable as the umask intends.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dualign._infra.errors import InputError, first_line
from dualign._infra.timing import timed

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


def cache_root() -> Path:
    """dualign's cache: ``$DUALIGN_CACHE``, else ``~/.cache/dualign`` (built worlds, π_ref's
    evaluation samples)."""
    return Path(os.environ.get("DUALIGN_CACHE") or Path.home() / ".cache" / "dualign").expanduser()


def fingerprint(path: str | os.PathLike, full_below: int = 1 << 28) -> str:
    """sha256 over a file's or a directory's files (relative name, size and content; for a file
    larger than ``full_below`` bytes its size and modification time stand in for the content).
    A string that is not an existing path (a Hub id) is its own fingerprint."""
    import hashlib

    root = Path(path)
    if not root.exists():
        return str(path)
    h = hashlib.sha256()
    for f in sorted([root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]):
        stat = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{stat.st_size}\0".encode())
        if stat.st_size < full_below:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(str(stat.st_mtime_ns).encode())
    return h.hexdigest()


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything in it) the mode ``open`` or ``mkdir`` would
    have: ``0o666 & ~umask`` for a file, ``0o777 & ~umask`` for a directory (``tempfile``, and
    transformers' shard writer, make them 0600 / 0700)."""
    mask = current_umask()
    root = Path(path)
    for p in [root, *(root.rglob("*") if root.is_dir() else ())]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty directory beside ``path`` (to be renamed onto it), with the umask's mode."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    honour_umask(tmp)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` (with the umask's mode) if
    the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise InputError(f"{path}: cannot be written ({e.strerror or type(e).__name__})") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@timed("write")
def write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, or not text at all
        raise InputError(f"{path}: not valid JSON ({first_line(e)})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@timed("write")
def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a table as Parquet, JSONL or CSV (by suffix), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"{path}: unsupported table format (use one of {', '.join(TABLE_SUFFIXES)})")
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif suffix in (".jsonl", ".json"):
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            df.to_csv(tmp, index=False)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a Parquet, JSONL/JSON-lines or CSV table; one clear error when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: a directory, not a table file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".csv":
            return pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - any parse failure becomes one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: cannot read table ({first})") from None
    raise InputError(f"{path}: unsupported table format (use one of {', '.join(TABLE_SUFFIXES)})")


def is_model_dir(path: Path) -> bool:
    """A Hugging Face model directory: a config.json, or a PEFT adapter's adapter_config.json
    (transformers loads its base model and applies the adapter: an unmerged LoRA policy)."""
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()

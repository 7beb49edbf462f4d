"""Where a table comes from: a file, a directory saved by ``datasets``, or a Hub dataset id.

Shared by the prompt and preference readers. Sources, tried in this order:

- a JSONL / JSON-lines / Parquet / CSV file;
- a directory written by ``datasets``' ``save_to_disk`` (a ``DatasetDict`` is indexed by ``split``);
- anything else that does not look like a path is a Hub dataset id, loaded with
  ``datasets.load_dataset`` at ``revision``.

``datasets`` is imported only for the last two: its import takes about a second.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dualign._infra.errors import InputError, first_line
from dualign._infra.io import TABLE_SUFFIXES, read_table


def read_source(source: str | Path, split: str = "train", revision: str | None = None,
                what: str = "data") -> pd.DataFrame:
    """The table at ``source``; ``what`` ("prompt", "preference") names it in error messages."""
    path = Path(source).expanduser()
    if path.is_dir():
        return read_saved_dataset(path, split)
    if path.exists():
        if path.stat().st_size == 0:
            raise InputError(f"{source}: the {what} file is empty")
        return read_table(path)
    text = str(source)
    if text.startswith((".", "/", "~")) or path.suffix.lower() in TABLE_SUFFIXES:
        raise InputError(f"{source}: {what} file not found")
    return read_hub_dataset(text, split, revision)


def read_saved_dataset(path: Path, split: str) -> pd.DataFrame:
    """A ``save_to_disk`` directory as a DataFrame (split ``split`` of a ``DatasetDict``)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a saved dataset directory ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"{path}: no split '{split}' (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds.to_pandas()


def read_hub_dataset(name: str, split: str, revision: str | None) -> pd.DataFrame:
    """``datasets.load_dataset(name, split=split, revision=revision)`` as a DataFrame; any failure
    (offline, unknown id, bad split) is one line."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, bad split, ...: all one line
        raise InputError(f"dataset '{name}' (split '{split}', revision {revision or 'latest'}) "
                         f"could not be loaded from the Hub: {first_line(e)}") from None
    return ds.to_pandas()

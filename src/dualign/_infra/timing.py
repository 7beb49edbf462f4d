"""Where a stage's time goes: wall seconds per named part (model load, tokenize, generate, forward,
backward, optimizer, write, ...), collected while a stage runs and recorded in its
``<stage>.meta.json`` under ``timing_s`` (the pipeline does this for every stage).

    with collect() as parts:          # the pipeline, around one stage
        ...
        with part("generate"):        # anywhere below it
            model.generate(...)
    parts  # {"generate": 12.3, ...}

Parts may nest (``forward`` inside ``generate``'s caller is fine); each part's own seconds include
what runs inside it, so the split is a profile, not a partition. Outside :func:`collect`,
:func:`part` costs one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

F = TypeVar("F", bound=Callable)

_parts: list[dict[str, float]] = []


@contextlib.contextmanager
def collect() -> Iterator[dict[str, float]]:
    """Collect the parts timed inside the block into the yielded dict (rounded when it ends)."""
    parts: dict[str, float] = {}
    _parts.append(parts)
    try:
        yield parts
    finally:
        _parts.remove(parts)
        for key, value in parts.items():
            parts[key] = round(value, 3)


@contextlib.contextmanager
def part(name: str) -> Iterator[None]:
    """Add the block's wall seconds to ``name`` in every active :func:`collect`."""
    if not _parts:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        spent = time.perf_counter() - start
        for parts in _parts:
            parts[name] = parts.get(name, 0.0) + spent


def timed(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is timed as :func:`part` ``name``."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with part(name):
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap

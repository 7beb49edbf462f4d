"""Progress of long work, in a terminal and in a log file.

In a terminal, a tqdm bar. Anywhere else (output redirected to a file, CI, a job scheduler) a bar
would either vanish (tqdm's default off a TTY) or fill the log with carriage returns, so one plain
line is written instead at most every ``interval`` seconds, and once at the end:

    [dualign] sample: 96/512 responses (19%), 4.1 responses/s, 1m41s left

``DUALIGN_PROGRESS`` overrides the choice: ``bar``, ``lines`` or ``off``; ``DUALIGN_PROGRESS_INTERVAL``
sets the seconds between lines (default 15).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm


def _mode(stream: TextIO) -> str:
    mode = os.environ.get("DUALIGN_PROGRESS", "").strip().lower()
    if mode in ("bar", "lines", "off"):
        return mode
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Lines:
    """The non-terminal progress: a line with count, share, rate and time left every ``interval`` s."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float, stream: TextIO,
                 initial: int = 0):
        self.total, self.desc, self.unit, self.interval, self.stream = total, desc, unit, interval, stream
        self.n = self.initial = initial
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False
        self.shown = initial  # the count of the last line written

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"[dualign] {self.desc}: {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 0.1 or not done else f"{_duration(1 / rate)} each")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{_duration((self.total - self.n) / rate)} left")
        elif self.n and self.total and self.n >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last, self.shown = now, self.n
            print(self.line(), file=self.stream, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.shown and time.monotonic() - self.start >= self.interval:
                print(self.line(), file=self.stream, flush=True)


class _Off:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """``with Progress(total, desc, unit) as bar: bar.update(k)``, or ``for x in Progress(it, ...)``.

    ``enabled=False`` shows nothing (e.g. on non-main processes, or a caller that reports itself).
    """

    def __init__(self, iterable: Iterable | int | None = None, desc: str = "", unit: str = "it",
                 total: int | None = None, enabled: bool = True, initial: int = 0,
                 stream: TextIO | None = None, leave: bool = False):
        if isinstance(iterable, int) and total is None:
            iterable, total = None, iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable = iterable
        stream = stream or sys.stderr
        mode = _mode(stream) if enabled else "off"
        if mode == "bar":
            self.bar: Any = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, leave=leave,
                                 dynamic_ncols=True)
        elif mode == "lines":
            interval = float(os.environ.get("DUALIGN_PROGRESS_INTERVAL", "15"))
            self.bar = Lines(total, desc, unit, interval, stream, initial)
        else:
            self.bar = _Off()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.bar.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()

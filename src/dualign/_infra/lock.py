"""One writer per run directory: ``<run_dir>/.lock``, an OS file lock (``fcntl.flock``) that
``dualign run`` / ``demo`` and each stage command hold while they write there.

The file names the holder (PID, host, start time), so a second process fails at once with one line
saying who has the directory. The OS releases the lock when its process ends however it ends
(kill -9 included), so a leftover file never blocks; the holder removes the file (and a run
directory it created that stayed empty) when it is done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from dualign._infra.errors import InputError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``<run_dir>/.lock`` for the block (creating ``run_dir``); refuse, in one line naming the
    holder, when another process holds it."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = _acquire(path, run_dir)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: a process that opened it before now sees a removed file
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty: a run that failed before writing leaves nothing


def _acquire(path: Path, run_dir: Path) -> int:
    """An fd of ``path`` holding its lock; the path is checked to still be the locked file (a
    releasing holder removes it, and a lock on a removed file guards nothing)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{run_dir} is in use by another dualign process ({holder(path)}); wait for it "
                             "to finish or use another run directory") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def holder(path: str | Path) -> str:
    """``pid N on host H since T`` from a lock file, as far as it can be read."""
    try:
        info = json.loads(Path(path).read_text())
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"

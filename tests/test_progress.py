"""Progress off a terminal: plain lines with count, share, rate and time left, at most every
``DUALIGN_PROGRESS_INTERVAL`` seconds, and one at the end; nothing when disabled."""

from __future__ import annotations

import io
import re

from dualign._infra.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_off_a_terminal_report_count_rate_and_time_left(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("dualign._infra.progress.time.monotonic", clock)
    monkeypatch.delenv("DUALIGN_PROGRESS", raising=False)
    monkeypatch.setenv("DUALIGN_PROGRESS_INTERVAL", "10")
    out = io.StringIO()  # not a TTY
    with Progress(total=100, desc="sample", unit="responses", stream=out) as bar:
        for _ in range(4):
            clock.now += 4.0   # 4 s a step: a line after 12 s and 24 s (every ≥ 10 s), not in between
            bar.update(10)
        assert out.getvalue().splitlines() == ["[dualign] sample: 30/100 responses (30%), 2.5 responses/s, 28s left"]
        clock.now += 12.0
        bar.update(60)
    lines = out.getvalue().splitlines()
    assert lines[1] == "[dualign] sample: 100/100 responses (100%), 3.57 responses/s, done in 28s"
    assert len(lines) == 2                       # the closing line is not repeated
    assert "\r" not in out.getvalue()


def test_iterable_form_counts_items_and_off_mode_prints_nothing(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("dualign._infra.progress.time.monotonic", clock)
    monkeypatch.setenv("DUALIGN_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    seen = []
    for x in Progress(range(3), desc="world: π_ref SFT", unit="steps", stream=out):
        clock.now += 60.0
        seen.append(x)
    assert seen == [0, 1, 2]
    assert re.fullmatch(r"\[dualign\] world: π_ref SFT: 3/3 steps \(100%\), 1m00s each, done in 3m00s",
                        out.getvalue().splitlines()[-1])
    monkeypatch.setenv("DUALIGN_PROGRESS", "off")
    quiet = io.StringIO()
    assert list(Progress(range(3), stream=quiet)) == [0, 1, 2] and quiet.getvalue() == ""
    assert list(Progress(range(3), stream=quiet, enabled=False)) == [0, 1, 2] and quiet.getvalue() == ""

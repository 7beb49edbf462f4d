"""Stage timing: parts add their wall seconds to every active collection, nest, and cost nothing
outside one; the pipeline records them in <stage>.meta.json (tests/test_pipeline.py)."""

from __future__ import annotations

from dualign._infra import timing


def test_parts_accumulate_into_every_active_collection(monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 10.5, 20.0, 23.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    with timing.collect() as outer:
        with timing.part("generate"):          # 0 → 2
            pass
        with timing.collect() as inner:
            with timing.part("write"):         # 10 → 10.5
                pass
        with timing.part("generate"):          # 20 → 23
            pass
    assert outer == {"generate": 5.0, "write": 0.5} and inner == {"write": 0.5}


def test_a_part_outside_any_collection_is_not_timed(monkeypatch):
    monkeypatch.setattr(timing.time, "perf_counter", lambda: (_ for _ in ()).throw(AssertionError("timed")))

    @timing.timed("forward")
    def f(x):
        return 2 * x

    assert f(3) == 6

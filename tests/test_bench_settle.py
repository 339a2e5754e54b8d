"""The taps-under-load blocks of ``farelab bench``: a block's settling taps are made, at the
same pace, on their own tap indices, and left out of its times."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from farelab.bench import _suite


class _Bench:
    """Stands in for a TapBench: tap ``i`` takes ``i`` ms, as far as the caller is told."""

    def __init__(self) -> None:
        self.tapped: list[int] = []
        self.journal = SimpleNamespace(checkpoint=lambda: None)

    def tap(self, i: int) -> tuple[Any, float]:
        self.tapped.append(i)
        return SimpleNamespace(result="accepted"), i / 1000


def test_settling_taps_are_made_but_not_timed(monkeypatch: Any) -> None:
    monkeypatch.setattr(_suite, "TAP_PACE_S", 0.0)
    bench = _Bench()
    times = _suite._tap_times(bench, 3, 10, settle=2)  # type: ignore[arg-type]
    assert bench.tapped == [10, 11, 12, 13, 14]
    assert times == [0.012, 0.013, 0.014]


def test_until_counts_only_timed_taps(monkeypatch: Any) -> None:
    monkeypatch.setattr(_suite, "TAP_PACE_S", 0.0)
    bench = _Bench()
    times = _suite._tap_times(bench, 1, 0, until=lambda: len(bench.tapped) >= 4, settle=1)  # type: ignore[arg-type]
    assert bench.tapped == [0, 1, 2, 3]
    assert times == [0.001, 0.002, 0.003]

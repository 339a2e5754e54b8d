"""A device's tap counters, as its status report carries them."""

from __future__ import annotations

import pytest

from farelab.protocol import LATENCY_BOUNDS_MS
from farelab.validator._stats import TapCounts, TapStats


def test_a_new_device_has_counted_nothing() -> None:
    assert TapStats().snapshot() == TapCounts()
    assert TapStats().snapshot().latency_counts == (0,) * (len(LATENCY_BOUNDS_MS) + 1)


def test_taps_are_counted_accepted_or_refused_by_reason() -> None:
    stats = TapStats()
    stats.count(accepted=True, reason=None, elapsed_s=0.004)
    stats.count(accepted=False, reason="insufficient_balance", elapsed_s=0.003)
    stats.count(accepted=False, reason="insufficient_balance", elapsed_s=0.003)
    stats.count(accepted=False, reason=None, elapsed_s=None)
    counts = stats.snapshot()
    assert (counts.taps, counts.accepted) == (4, 1)
    assert counts.refused == {"insufficient_balance": 2, "unknown": 1}


def test_a_tap_falls_in_the_first_bucket_whose_bound_it_does_not_pass() -> None:
    stats = TapStats(bounds_ms=(1, 10))
    for elapsed_s in (0.0005, 0.001, 0.0011, 0.010, 0.5):
        stats.count(accepted=True, reason=None, elapsed_s=elapsed_s)
    assert stats.snapshot().latency_counts == (2, 2, 1)


def test_a_tap_not_timed_is_counted_but_not_in_the_histogram() -> None:
    stats = TapStats()
    stats.count(accepted=False, reason="card_error", elapsed_s=None)
    assert stats.snapshot().taps == 1
    assert sum(stats.snapshot().latency_counts) == 0


def test_a_snapshot_does_not_change_with_later_taps() -> None:
    stats = TapStats()
    stats.count(accepted=False, reason="hotlisted", elapsed_s=0.002)
    before = stats.snapshot()
    stats.count(accepted=False, reason="hotlisted", elapsed_s=0.002)
    assert (before.taps, before.refused, sum(before.latency_counts)) == (1, {"hotlisted": 1}, 1)


def test_histogram_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        TapStats(bounds_ms=(5, 5))
    with pytest.raises(ValueError, match="increasing"):
        TapStats(bounds_ms=())

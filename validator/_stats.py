"""A device's tap counters, for its status report: what the backend cannot see in the ledger
(refusals, how long taps take).  Pure: the run loop counts each tap's result as it shows it and
the uplink publishes a :class:`TapCounts` snapshot."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from farelab.protocol import LATENCY_BOUNDS_MS

__all__ = ["TapCounts", "TapStats"]


@dataclass(frozen=True, slots=True)
class TapCounts:
    """A device's taps since it started: ``refused`` by reason; ``latency_counts`` taps per
    bucket of ``latency_bounds_ms`` (a tap of exactly a bound's duration falls in its bucket),
    the last bucket the taps longer than every bound."""

    taps: int = 0
    accepted: int = 0
    refused: Mapping[str, int] = field(default_factory=dict)
    latency_bounds_ms: tuple[int, ...] = LATENCY_BOUNDS_MS
    latency_counts: tuple[int, ...] = (0,) * (len(LATENCY_BOUNDS_MS) + 1)


class TapStats:
    """One device's counters.  Not thread-safe: one task counts (the loop's display)."""

    def __init__(self, *, bounds_ms: tuple[int, ...] = LATENCY_BOUNDS_MS) -> None:
        """
        Args:
            bounds_ms: the upper bounds of the tap-duration histogram's buckets, increasing.
        """
        if not bounds_ms or any(a >= b for a, b in itertools.pairwise(bounds_ms)):
            raise ValueError("bounds_ms must be increasing and not empty")
        self._bounds = bounds_ms
        self._taps = 0
        self._accepted = 0
        self._refused: dict[str, int] = {}
        self._latency = [0] * (len(bounds_ms) + 1)

    def count(self, *, accepted: bool, reason: str | None, elapsed_s: float | None) -> None:
        """One tap: accepted, or refused for ``reason``; ``elapsed_s`` is how long it took
        (None: not measured, as for a card that could not even be loaded)."""
        self._taps += 1
        if accepted:
            self._accepted += 1
        else:
            key = reason or "unknown"
            self._refused[key] = self._refused.get(key, 0) + 1
        if elapsed_s is not None:
            self._latency[bisect.bisect_left(self._bounds, elapsed_s * 1000.0)] += 1

    def snapshot(self) -> TapCounts:
        """The counters now, as a value that later taps do not change."""
        return TapCounts(
            self._taps,
            self._accepted,
            MappingProxyType(dict(self._refused)),
            self._bounds,
            tuple(self._latency),
        )

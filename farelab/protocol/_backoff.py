"""The capped, jittered exponential backoff every reconnecting loop of farelab waits with."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Capped exponential backoff with full jitter; reset on success."""

    def __init__(
        self, *, base: float = 0.2, cap: float = 10.0, rng: random.Random | None = None
    ) -> None:
        """``base``: the first delay's ceiling; ``cap``: the longest delay."""
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Count a failure; the delay before the next attempt."""
        self.failures += 1
        ceiling = min(self.cap, self.base * 2 ** (self.failures - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """The link works again."""
        self.failures = 0

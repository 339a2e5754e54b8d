"""Taps first: the uplink steps aside while a tap is in progress.

A validator process runs its taps on reader threads and its uplink on the event loop (with
``asyncio.to_thread`` for journal reads and deletes).  CPython runs one thread's Python at a time:
a tap thread that wants the interpreter while the uplink holds it waits up to the switch interval
— and a tap asks for it again after each of its journal statements.  Thread priorities do not
reach the interpreter lock, so the uplink defers by itself: before each step of its work (read a
batch, publish it, take an ack, delete a chunk of acknowledged rows, fold the WAL in) it waits,
for a bounded time, until no tap is in progress.  A tap costs the drain about a millisecond; a tap
never waits for the uplink beyond the step it happens to be in.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["TapGate"]

# How long the uplink waits for taps before it takes its step anyway: taps back to back on
# several readers must not stop the drain.
YIELD_LIMIT_S = 0.05


class TapGate:
    """Counts taps in progress; the uplink waits on it (thread-safe)."""

    def __init__(self) -> None:
        self._running = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        # coroutines waiting for the last tap to end, woken on their own loops
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def busy(self) -> bool:
        """True while any tap is in progress."""
        return self._running > 0

    @contextmanager
    def tap(self) -> Iterator[None]:
        """Around a whole tap, on the tap's thread."""
        with self._lock:
            self._running += 1
            self._idle.clear()
        try:
            yield
        finally:
            self._end()

    def _end(self) -> None:
        with self._lock:
            self._running -= 1
            waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
            if not self._running:
                self._idle.set()
                waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(_wake, future)

    def wait_idle(self, limit_s: float = YIELD_LIMIT_S) -> bool:
        """Block (a worker thread) until no tap is in progress, at most ``limit_s``; True if
        none is."""
        if not self._running:
            return True
        return self._idle.wait(limit_s)

    async def yield_to_taps(self, limit_s: float = YIELD_LIMIT_S) -> bool:
        """The coroutine form of :meth:`wait_idle`: the event loop goes on serving everything
        else meanwhile, and the tap that ends last wakes it (no polling: taps back to back
        would otherwise pay for every poll).  True if no tap is in progress when it returns
        (another may begin at once: the uplink then takes one step between two taps)."""
        if not self._running:
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not self._running:
                return True
            self._waiters.append((loop, future))
        try:
            async with asyncio.timeout(limit_s):
                await future
        except TimeoutError:
            return False
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, future))
        return True


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

"""Taps first: the uplink steps aside while a tap is in progress.

A validator process runs its taps on reader threads and its uplink on the event loop (with
``asyncio.to_thread`` for journal reads and deletes).  CPython runs one thread's Python at a time:
a tap thread that wants the interpreter while the uplink holds it waits up to the switch interval
— and a tap asks for it again after each of its journal statements.  Thread priorities do not
reach the interpreter lock, so the uplink defers by itself: before each step of its work (read a
batch, publish it, take an ack, delete a chunk of acknowledged rows, fold the WAL in) it waits,
for a bounded time, until no tap is in progress.  A tap costs the drain about a millisecond; a tap
never waits for the uplink beyond the step it happens to be in.

Nor does a tap pay for the cyclic garbage collector, which stops every thread while it runs and
which any thread's allocation may start — the uplink's most of all, as it builds batches.  A tap
turns automatic collection off; it comes back on when the uplink next finds no tap in progress,
or once the result is shown (:meth:`TapGate.between_taps`), and the young collection that fell
due runs right there, not in the tap's last steps or at the first allocation of the next one.
Without either, a tap ending :data:`GC_DEFER_LIMIT_S` after collection went off turns it back
on.  Measured in the bench's backlog step before this: a sixth of the slowest 2 % of taps
overlapped a collection (0.3–23 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time

__all__ = ["TapGate"]

# How long the uplink waits for taps before it takes its step anyway: taps back to back on
# several readers must not stop the drain.
YIELD_LIMIT_S = 0.05
# With no uplink to turn automatic collection back on, or no moment without a tap, a tap ending
# this long after collection was turned off turns it back on rather than let cycles pile up.
GC_DEFER_LIMIT_S = 1.0


class TapGate:
    """Counts taps in progress; the uplink waits on it (thread-safe)."""

    def __init__(self) -> None:
        self._running = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        # coroutines waiting for the last tap to end, woken on their own loops
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        # when this gate turned automatic collection off (None: it has not; someone else may)
        self._gc_off_since: float | None = None
        self._scope = _TapScope(self)

    @property
    def busy(self) -> bool:
        """True while any tap is in progress."""
        return self._running > 0

    def tap(self) -> _TapScope:
        """Around a whole tap, on the tap's thread (``with gate.tap(): ...``).  A ``with``
        statement creates an object before it enters, and that allocation may start a deferred
        collection: the tap path itself calls :meth:`begin` and :meth:`end`."""
        return self._scope

    def begin(self) -> None:
        """A tap starts (on its thread); allocates nothing.  Pair with :meth:`end`."""
        self._lock.acquire()  # not ``with``: that creates a bound method first
        try:
            if gc.isenabled() and not self._running:
                gc.disable()
                self._gc_off_since = time.monotonic()
            self._running += 1
            self._idle.clear()
        finally:
            self._lock.release()

    def end(self) -> None:
        """The tap that :meth:`begin` started has ended."""
        with self._lock:
            self._running -= 1
            waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
            if (
                self._gc_off_since is not None
                and time.monotonic() - self._gc_off_since > GC_DEFER_LIMIT_S
            ):
                self._gc_off_since = None
                gc.enable()
            if not self._running:
                self._idle.set()
                waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(_wake, future)

    def wait_idle(self, limit_s: float = YIELD_LIMIT_S) -> bool:
        """Block (a worker thread) until no tap is in progress, at most ``limit_s``; True if
        none is."""
        if not self._running or self._idle.wait(limit_s):
            self.between_taps()
            return True
        return False

    def between_taps(self) -> None:
        """Automatic garbage collection back on, if a tap turned it off and none is in progress
        now: the uplink does this before each step, the run loop once a result is shown."""
        if self._gc_off_since is None:
            return
        with self._lock:
            enabled = self._collect_again_locked()
        if enabled:
            _collect_due()

    def _collect_again_locked(self) -> bool:
        """True if this turned automatic collection back on."""
        if not self._running and self._gc_off_since is not None:
            self._gc_off_since = None
            gc.enable()
            return True
        return False

    async def yield_to_taps(self, limit_s: float = YIELD_LIMIT_S) -> bool:
        """The coroutine form of :meth:`wait_idle`: the event loop goes on serving everything
        else meanwhile, and the tap that ends last wakes it (no polling: taps back to back
        would otherwise pay for every poll).  True if no tap is in progress when it returns
        (another may begin at once: the uplink then takes one step between two taps)."""
        if not self._running:
            self.between_taps()
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            idle = not self._running
            if not idle:
                self._waiters.append((loop, future))
        if idle:
            self.between_taps()
            return True
        try:
            async with asyncio.timeout(limit_s):
                await future
        except TimeoutError:
            return False
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, future))
        self.between_taps()
        return True


class _TapScope:
    """:meth:`TapGate.tap`'s context manager: one per gate, shared by every tap (it keeps no
    state of its own)."""

    __slots__ = ("_gate",)

    def __init__(self, gate: TapGate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        self._gate.begin()

    def __exit__(self, *exc: object) -> None:
        self._gate.end()


def _collect_due() -> None:
    """The young collection the taps deferred, now rather than at some allocation inside the
    next tap (before that tap turns collection off).  The oldest generation stays automatic:
    CPython adds its own condition there."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    if counts[0] > thresholds[0]:
        gc.collect(1 if counts[1] > thresholds[1] else 0)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

"""A time limit for one benchmark step: a step that hangs (a lost ack, a stuck thread) is
stopped with :class:`StepTimeout`, which names where every thread was, and the suite goes on
with the next step instead of hanging CI."""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["StepTimeout", "time_limit", "where_threads_are"]


class StepTimeout(BaseException):
    """The step ran past its limit.  A BaseException, so that a step's own ``except
    Exception`` cannot swallow it; ``where`` is every thread's innermost frames then."""

    def __init__(self, seconds: float, where: str) -> None:
        super().__init__(f"timed out after {seconds:g} s")
        self.seconds = seconds
        self.where = where


def where_threads_are(depth: int = 5) -> str:
    """Each live thread's innermost ``depth`` frames (this module's own left out), one block
    per thread; idle thread-pool workers are only counted."""
    names = {t.ident: t.name for t in threading.enumerate()}
    blocks = []
    idle = 0
    for ident, frame in sys._current_frames().items():
        frames = [f for f in traceback.extract_stack(frame) if f.filename != __file__]
        if frames and frames[-1].name == "_worker" and "concurrent" in frames[-1].filename:
            idle += 1
            continue
        lines = [f"  {f.filename}:{f.lineno} in {f.name}" for f in frames[-depth:]]
        blocks.append(f"thread {names.get(ident, ident)}:\n" + "\n".join(lines))
    if idle:
        blocks.append(f"({idle} idle thread-pool worker(s))")
    return "\n".join(blocks)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`StepTimeout` in this (the main) thread once ``seconds`` have passed.

    Uses SIGALRM, so it only arms in the main thread of the main interpreter; elsewhere it
    does nothing (the step then runs unbounded, as it would without it)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: FrameType | None) -> None:
        raise StepTimeout(seconds, where_threads_are())

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

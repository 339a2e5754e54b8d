"""Fault injection for crash tests of any device: ``FARELAB_KILL_AT=<point>`` makes the process
SIGKILL itself when it reaches that point, so that a test can kill a real process at an exact
step.  Unset, a checkpoint costs one comparison."""

from __future__ import annotations

import os
import signal

__all__ = ["checkpoint"]

_KILL_AT = os.environ.get("FARELAB_KILL_AT")


def checkpoint(point: str) -> None:
    """Die here, at once and uncleanly, if the environment asks for it."""
    if point == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)

"""Fault injection for crash tests: ``FARELAB_KILL_AT=<point>`` makes the process SIGKILL itself
when a tap reaches that point, so that tests can kill a real validator at an exact step.

Points: ``before_init``, ``after_init``, ``after_update_capp``, ``after_debit_sent`` (the DEBIT
reached the card, its answer is not yet handled), ``after_debit_answered`` (the result is known,
not yet journalled), ``after_journal`` (journalled, not yet shown).  Unset, it costs one compare.
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_POINTS", "checkpoint"]

KILL_POINTS = (
    "before_init",
    "after_init",
    "after_update_capp",
    "after_debit_sent",
    "after_debit_answered",
    "after_journal",
)
_KILL_AT = os.environ.get("FARELAB_KILL_AT")


def checkpoint(point: str) -> None:
    """Die here, at once and uncleanly, if the environment asks for it."""
    if point == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)

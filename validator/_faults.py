"""The validator's crash-test points (see :mod:`card._faults`).

Points: ``before_init``, ``after_init``, ``after_update_capp``, ``after_debit_sent`` (the DEBIT
reached the card, its answer is not yet handled), ``after_debit_answered`` (the result is known,
not yet journalled), ``after_journal`` (journalled, not yet shown).
"""

from __future__ import annotations

from farelab.card import checkpoint

__all__ = ["KILL_POINTS", "checkpoint"]

KILL_POINTS = (
    "before_init",
    "after_init",
    "after_update_capp",
    "after_debit_sent",
    "after_debit_answered",
    "after_journal",
)

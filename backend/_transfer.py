"""Replacement cards (R6): what happens to the transit balance of a lost or damaged card, by
issuer profile (:mod:`farelab.backend._profiles`, docs/card-life.md), computed from the ledger.

- Nanjing: a formal loss report freezes the wallet; its balance moves to the replacement one year
  after the report; on an exchange (damaged card) it moves after 7 working days.
- Hangzhou: after a loss the transit function is re-opened on the new card without the old
  balance; on an exchange the balance moves.
- Changzhou and Shanxi: the transit balance is refunded (退值) before a card is replaced; nothing
  moves.

Working days skip weekends and the profile's holidays (:func:`working_days_after`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from farelab.backend._profiles import IssuerProfile, load_profiles, working_days_after
from farelab.backend._store import Store
from farelab.card import full_serial

__all__ = [
    "PROFILES",
    "CardTransaction",
    "Decision",
    "balance_after_history",
    "decide",
    "decide_from",
    "last_known_balance",
    "working_days_after",
]

# The shipped issuer profiles by name: the ones the host's transfer quotes know.
PROFILES: dict[str, IssuerProfile] = load_profiles()


@dataclass(frozen=True, slots=True)
class Decision:
    """``amount_fen`` may move now; otherwise ``reason`` says why not (``refund_instead``,
    ``no_records``, ``no_transfer_after_loss``, ``no_transfer``, ``not_yet``, ``no_balance``) and
    ``available_on`` when."""

    amount_fen: int
    reason: str | None = None
    available_on: date | None = None


_LOAD = 0x02


@dataclass(frozen=True, slots=True)
class CardTransaction:
    """One counted transaction of a card, as the balance history needs it."""

    tx_type: int
    counter: int
    amount: int
    balance_before: int
    at_ms: int

    @property
    def balance_after(self) -> int:
        """The balance the card had once this transaction was done."""
        sign = 1 if self.tx_type == _LOAD else -1
        return self.balance_before + sign * self.amount


def balance_after_history(history: Sequence[CardTransaction]) -> int | None:
    """The card's balance after the last of its transactions, in the card's own order.

    A card numbers its purchases with one counter and its loads with another; the two runs are
    merged where each transaction's balance before is the balance the one before it left.
    Device clocks decide nothing (a kiosk's and a validator's disagree, and a transfer that
    took the wrong "last" transaction would move a wrong balance); only where the chain has a
    hole — a record not uploaded yet — is the earlier-timed head taken.  None without history.
    """
    if not history:
        return None
    runs = [
        sorted((t for t in history if t.tx_type != _LOAD), key=lambda t: t.counter),
        sorted((t for t in history if t.tx_type == _LOAD), key=lambda t: t.counter),
    ]
    best: tuple[int, int] | None = None  # (holes, balance after)
    for first in (0, 1):
        if not runs[first]:
            continue
        at = [0, 0]
        at[first] = 1
        balance = runs[first][0].balance_after
        holes = 0
        while at[0] < len(runs[0]) or at[1] < len(runs[1]):
            heads = [i for i in (0, 1) if at[i] < len(runs[i])]
            fits = [i for i in heads if runs[i][at[i]].balance_before == balance]
            if not fits:
                holes += 1
                fits = heads
            pick = min(fits, key=lambda i: runs[i][at[i]].at_ms)
            balance = runs[pick][at[pick]].balance_after
            at[pick] += 1
        if best is None or holes < best[0]:
            best = (holes, balance)
    return None if best is None else best[1]


def last_known_balance(store: Store, card_serial: str) -> int | None:
    """The balance after the card's last counted transaction, or None if the ledger has none."""
    rows = store.execute(
        "SELECT tx_type, card_counter, amount, balance_before, at_ms FROM transactions "
        "WHERE card_serial = ? AND verdict = 'ok'",
        (full_serial(card_serial),),
    ).fetchall()
    return balance_after_history([CardTransaction(*(int(v) for v in row)) for row in rows])


def decide(
    profile: IssuerProfile, *, reason: str, reported: date, today: date, balance: int | None
) -> Decision:
    """What may move to the replacement card today: ``reported`` is the day of the formal loss
    report (``loss``) or of the exchange request (``exchange``)."""
    if reason not in ("loss", "exchange"):
        raise ValueError(f"reason must be loss or exchange, not {reason!r}")
    if profile.refund_before_replacement:
        return Decision(0, "refund_instead")
    if balance is None:
        return Decision(0, "no_records")
    if reason == "loss":
        if profile.loss_balance_moves_after is None:
            return Decision(0, "no_transfer_after_loss")
        available = profile.on(profile.loss_balance_moves_after, reported)
    else:
        if profile.exchange_balance_moves_after is None:
            return Decision(0, "no_transfer")
        available = profile.on(profile.exchange_balance_moves_after, reported)
    return decide_from(available, today=today, balance=balance)


def decide_from(available: date, *, today: date, balance: int | None) -> Decision:
    """What may move today when the balance moves from ``available`` on (the day the card's
    recorded events give, or :func:`decide`'s from the profile and the day reported)."""
    if balance is None:
        return Decision(0, "no_records")
    if today < available:
        return Decision(0, "not_yet", available)
    if balance <= 0:
        return Decision(0, "no_balance", available)
    return Decision(balance, None, available)

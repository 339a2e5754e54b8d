"""Replacement cards (R6): what happens to the transit balance of a lost or damaged card, by
issuer profile, computed from the ledger.

- Nanjing: a formal loss report freezes the wallet; its balance moves to the replacement one year
  after the report; on an exchange (damaged card) it moves after 7 working days.
- Hangzhou: after a loss the transit function is re-opened on the new card without the old
  balance; on an exchange the balance moves.
- Changzhou: the transit balance is refunded (退值) before a card is replaced; nothing moves.

"Working days" skip Saturdays and Sundays only: public holidays are not in farelab's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from backend._store import Store

__all__ = ["PROFILES", "Decision", "Profile", "decide", "last_known_balance", "working_days_after"]


@dataclass(frozen=True, slots=True)
class Profile:
    """An issuer's rules for a replacement card."""

    name: str
    loss_transfer: bool
    loss_wait_days: int = 0
    exchange_transfer: bool = True
    exchange_wait_working_days: int = 0
    refund_before_replacement: bool = False


PROFILES = {
    "nanjing": Profile(
        "nanjing", loss_transfer=True, loss_wait_days=365, exchange_wait_working_days=7
    ),
    "hangzhou": Profile("hangzhou", loss_transfer=False),
    "changzhou": Profile(
        "changzhou", loss_transfer=False, exchange_transfer=False, refund_before_replacement=True
    ),
}


@dataclass(frozen=True, slots=True)
class Decision:
    """``amount_fen`` may move now; otherwise ``reason`` says why not (``refund_instead``,
    ``no_records``, ``no_transfer_after_loss``, ``no_transfer``, ``not_yet``, ``no_balance``) and
    ``available_on`` when."""

    amount_fen: int
    reason: str | None = None
    available_on: date | None = None


def working_days_after(day: date, n: int) -> date:
    """The date ``n`` working days (Monday to Friday) after ``day``."""
    current = day
    left = n
    while left > 0:
        current += timedelta(days=1)
        if current.weekday() < 5:
            left -= 1
    return current


def last_known_balance(store: Store, card_serial: str) -> int | None:
    """The balance after the card's last counted transaction, or None if the ledger has none."""
    row = store.execute(
        "SELECT tx_type, amount, balance_before FROM transactions WHERE card_serial = ? AND "
        "verdict = 'ok' ORDER BY at_ms DESC, card_counter DESC LIMIT 1",
        (card_serial.rjust(20, "0"),),
    ).fetchone()
    if row is None:
        return None
    tx_type, amount, before = row
    return int(before + amount if tx_type == 2 else before - amount)


def decide(
    profile: Profile, *, reason: str, reported: date, today: date, balance: int | None
) -> Decision:
    """What may move to the replacement card today."""
    if reason not in ("loss", "exchange"):
        raise ValueError(f"reason must be loss or exchange, not {reason!r}")
    if profile.refund_before_replacement:
        return Decision(0, "refund_instead")
    if balance is None:
        return Decision(0, "no_records")
    if reason == "loss":
        if not profile.loss_transfer:
            return Decision(0, "no_transfer_after_loss")
        available = reported + timedelta(days=profile.loss_wait_days)
    else:
        if not profile.exchange_transfer:
            return Decision(0, "no_transfer")
        available = working_days_after(reported, profile.exchange_wait_working_days)
    if today < available:
        return Decision(0, "not_yet", available)
    if balance <= 0:
        return Decision(0, "no_balance", available)
    return Decision(balance, None, available)

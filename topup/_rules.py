"""The kiosk's amount rules (R4 and the operator's denominations), as pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from farelab.card import yuan_to_fen

__all__ = ["AmountRules", "check_amount", "parse_amount", "room"]

CAP_FEN = 100_000


@dataclass(frozen=True, slots=True)
class AmountRules:
    """``unit_fen``: loads are whole multiples of it (1000 for 10-yuan units);
    ``minimum_fen``: the smallest load; ``cap_fen``: the balance ceiling (R4)."""

    unit_fen: int = 1
    minimum_fen: int = 1
    cap_fen: int = CAP_FEN


def room(balance: int, rules: AmountRules) -> int:
    """The most this card may take now: up to the cap, in whole units (R4)."""
    free = max(rules.cap_fen - balance, 0)
    return free - free % rules.unit_fen


def parse_amount(text: str) -> int | None:
    """Yuan as typed → fen, or None if it is not a whole number of fen."""
    try:
        return yuan_to_fen(text)
    except ValueError:
        return None


def check_amount(amount: int | None, balance: int, rules: AmountRules) -> tuple[str, str] | None:
    """None if the load may go ahead, else (reason, message for the rider)."""
    if amount is None or amount <= 0:
        return "bad_amount", "the amount must be a positive number of yuan, in whole fen"
    if amount % rules.unit_fen or amount < rules.minimum_fen:
        return "bad_amount", (
            f"loads are multiples of {rules.unit_fen / 100:g} yuan, at least "
            f"{rules.minimum_fen / 100:g} yuan"
        )
    if amount > 0xFFFFFFFF or balance + amount > rules.cap_fen:
        most = room(balance, rules)
        return "cap_exceeded", (
            f"the balance may not pass {rules.cap_fen / 100:g} yuan: at most "
            f"{most / 100:.2f} yuan can be added to this card"
        )
    return None

"""Money at the edges: yuan as people type and read it, fen (integers) everywhere inside."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

__all__ = ["fen_to_yuan", "yuan_to_fen"]


def yuan_to_fen(text: str, *, what: str = "amount") -> int:
    """Parse a yuan amount such as ``10``, ``2.5`` or ``0.01`` into fen.

    ValueError (with ``what`` in the message) for anything that is not a finite amount in whole
    fen: ``abc``, ``1e3``, ``nan``, ``0.001``.
    """
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{what} {text!r} is not a number of yuan") from None
    if not value.is_finite() or "e" in text.lower():
        raise ValueError(f"{what} {text!r} is not a plain number of yuan")
    fen = value * 100
    if fen != fen.to_integral_value():
        raise ValueError(f"{what} {text!r} is not a whole number of fen")
    return int(fen)


def fen_to_yuan(fen: int) -> str:
    """``12345`` → ``"123.45"``."""
    sign = "-" if fen < 0 else ""
    whole, part = divmod(abs(fen), 100)
    return f"{sign}{whole}.{part:02d}"

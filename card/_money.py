"""Money at the edges: yuan as people type and read it, fen (integers) everywhere inside."""

from __future__ import annotations

import re

from farelab.card._messages import shown

__all__ = ["fen_to_yuan", "yuan_to_fen"]

# ASCII digits, a point, a minus sign (for the callers' range checks to refuse): Decimal() alone
# would also take "1_0" (as 10), "+5", "١٠" (Arabic-Indic digits), "Infinity" and "1e3", none of
# which a person means as an amount of money.
_PLAIN_YUAN = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)


def yuan_to_fen(text: str, *, what: str = "amount") -> int:
    """Parse a plain decimal amount of yuan such as ``10``, ``2.5`` or ``0.01`` into fen.

    ValueError (with ``what`` in the message) for anything else: ``abc``, ``1e3``, ``nan``,
    ``1_0``, ``+5``, ``.5``, ``0.001`` (not a whole number of fen).  Surrounding spaces are
    ignored; a negative amount is parsed, for the caller's range check to refuse.
    """
    from decimal import Decimal  # noqa: PLC0415  (reading an amount is rarer than showing one)

    plain = text.strip()
    if not _PLAIN_YUAN.fullmatch(plain):
        raise ValueError(
            f"{what} {shown(text)} is not a number of yuan (plain decimal digits, e.g. 10 or 2.50)"
        )
    fen = Decimal(plain) * 100
    if fen != fen.to_integral_value():
        raise ValueError(f"{what} {shown(text)} is not a whole number of fen")
    return int(fen)


def fen_to_yuan(fen: int) -> str:
    """``12345`` → ``"123.45"``."""
    sign = "-" if fen < 0 else ""
    whole, part = divmod(abs(fen), 100)
    return f"{sign}{whole}.{part:02d}"

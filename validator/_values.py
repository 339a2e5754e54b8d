"""Checked parsers for the values a configuration, a parameters message or a command line turns
into money, time or an id.

Each refuses, with a one-line :class:`ValueError` naming the value, what would otherwise
overflow a card field (``1e30`` yuan), never compare (``nan``), never end (``inf`` seconds) or
change what a broker topic means (a device id with ``/``, ``#`` or ``+``).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from farelab.card import describe_path
from farelab.protocol import check_client_id

__all__ = ["MAX_FARE_FEN", "device_id", "fen", "number", "positive_seconds", "shown"]

# No card holds more than 1000 yuan (R4), so no single fare or penalty can be higher.
MAX_FARE_FEN = 100_000
# Bound on any other number in a fare table (kilometres, minutes, seconds, shares).
_MAX_NUMBER = Decimal(1_000_000)


def shown(value: object) -> str:
    """A value as an error message shows it: its repr, long ones cut in the middle."""
    return describe_path(repr(value))


def _finite(value: object, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what} must be a number, not {shown(value)}")
    try:
        parsed = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{what} must be a number, not {shown(value)}") from None
    if not parsed.is_finite():
        raise ValueError(f"{what} must be a finite number, not {shown(value)}")
    return parsed


def number(value: object, what: str, *, high: Decimal = _MAX_NUMBER) -> Decimal:
    """A finite number from 0 to ``high`` (TOML and JSON numbers, or their text)."""
    parsed = _finite(value, what)
    if not 0 <= parsed <= high:
        raise ValueError(f"{what} must be between 0 and {high}, not {shown(value)}")
    return parsed


def fen(value: object, what: str) -> int:
    """An amount in yuan as integer fen: whole fen, 0 to :data:`MAX_FARE_FEN`."""
    amount = number(value, what, high=Decimal(MAX_FARE_FEN) / 100) * 100
    if amount != amount.to_integral_value():
        raise ValueError(f"{what} must be an amount in whole fen, not {shown(value)}")
    return int(amount)


def positive_seconds(value: object, what: str) -> float:
    """A duration in seconds: finite, above zero, at most a million."""
    seconds = _finite(value, what)
    if not 0 < seconds <= _MAX_NUMBER:
        raise ValueError(
            f"{what} must be a positive number of seconds up to {_MAX_NUMBER}, not {shown(value)}"
        )
    return float(seconds)


def device_id(value: object, what: str = "device id") -> str:
    """An id that becomes one level of a broker topic and a broker username."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {shown(value)}")
    return check_client_id(value, what)

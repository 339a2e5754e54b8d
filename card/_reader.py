"""The reader interface every card transport implements, and its errors.

Anything above this interface (terminal flows, the validator, the kiosk) drives cards through
:class:`Reader` only, and cannot tell an in-process card from one behind pcscd.  Readers are
blocking: a caller in asyncio runs a whole APDU sequence on the reader's own thread
(:class:`card.ReaderThread`), never one executor hop per APDU.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = [
    "CardEndpoint",
    "CardRemovedError",
    "Reader",
    "ReaderError",
    "ReaderUnavailableError",
]


class ReaderError(Exception):
    """A transport fault between terminal and card."""


class CardRemovedError(ReaderError):
    """The card left the field: the last command may or may not have reached it."""


class ReaderUnavailableError(ReaderError):
    """The reader itself is gone (unplugged, pcscd stopped, vpcd slot missing)."""


@runtime_checkable
class Reader(Protocol):
    """A contactless reader as a terminal sees it."""

    @property
    def name(self) -> str:
        """Human-readable reader name (the PC/SC name for PC/SC readers)."""
        ...

    def wait_for_card(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until a card is in the field; True if one is."""
        ...

    def connect(self) -> bytes:
        """Power the card up and return its ATR. Raises CardRemovedError if none is present."""
        ...

    def transmit(self, apdu: bytes) -> bytes:
        """Send one C-APDU, return the R-APDU (data followed by SW1 SW2)."""
        ...

    def disconnect(self) -> None:
        """Power the card down (the session state of the card is lost)."""
        ...

    def wait_for_removal(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until the field is empty; True if it is."""
        ...


@runtime_checkable
class CardEndpoint(Protocol):
    """The card side of a transport: what a vicc client or an in-process reader talks to."""

    def power_on(self) -> bytes:
        """Cold reset: volatile session state is cleared; returns the ATR."""
        ...

    def power_off(self) -> None:
        """The field is gone: volatile session state is lost, committed state is kept."""
        ...

    def atr(self) -> bytes:
        """The ATR, without resetting anything."""
        ...

    def transmit(self, apdu: bytes) -> bytes:
        """Process one C-APDU and return the R-APDU; never raises on bad input."""
        ...

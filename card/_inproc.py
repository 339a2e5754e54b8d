"""The in-process reader: a card object in the same process, no transport at all.

Used by unit tests, benchmarks, ``reader = "sim"`` validators and deterministic replays.  It can
tear a transaction like a hand pulling the card: :meth:`InProcessReader.pull_after` makes the
reader deliver one chosen command to the card and then lose the card before the answer arrives.
A card that misbehaves (:class:`card.BehavingCard`) leaves, comes back or falls silent here as it
would in a real field.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from farelab.card._behaviour import CardLeftError, CardMutedError, enter_field
from farelab.card._reader import CardEndpoint, CardRemovedError

__all__ = ["InProcessReader", "step_of"]

_STEPS = {
    0xA4: "SELECT",
    0xB0: "READ",
    0xB2: "READ",
    0x50: "INIT",
    0xDC: "UPDATE_CAPP",
    0x54: "DEBIT",
    0x52: "CREDIT",
    0x5A: "PROOF",
    0x84: "CHALLENGE",
    0x1E: "BLOCK",
}


def step_of(apdu: bytes) -> str | None:
    """The tap step a C-APDU belongs to (``SELECT``, ``READ``, ``INIT``, …), by its INS."""
    return _STEPS.get(apdu[1]) if len(apdu) >= 2 else None


class InProcessReader:
    """A reader whose field holds at most one in-process card."""

    def __init__(self, name: str = "sim", *, mute_wait: float | None = None) -> None:
        """
        Args:
            name: the reader name reported to the layers above.
            mute_wait: seconds a terminal waits on a card that stopped answering before its
                holder takes it away; None: until someone calls :meth:`remove`.
        """
        self._name = name
        self._mute_wait = mute_wait
        self._card: CardEndpoint | None = None
        self._powered = False
        self._tear: Callable[[bytes], bool] | None = None
        self._changed = threading.Condition()

    @property
    def name(self) -> str:
        """The reader name."""
        return self._name

    @property
    def card(self) -> CardEndpoint | None:
        """The card in the field, if any."""
        return self._card

    def insert(self, card: CardEndpoint) -> None:
        """Put a card in the field (replacing any other, which leaves it and loses power)."""
        with self._changed:
            if self._card is not None and self._card is not card and self._powered:
                self._card.power_off()
            self._card = card
            self._powered = False
            self._changed.notify_all()
        enter_field(card)

    def remove(self) -> None:
        """Take the card away; the card loses power and its session."""
        with self._changed:
            if self._card is not None and self._powered:
                self._card.power_off()
            self._card = None
            self._powered = False
            self._tear = None
            self._changed.notify_all()

    def pull_after(self, predicate: Callable[[bytes], bool]) -> None:
        """Remove the card right after the first command matching ``predicate`` reached it,
        before its answer reaches the terminal."""
        self._tear = predicate

    def wait_for_card(self, timeout: float) -> bool:
        """True as soon as a card is in the field."""
        with self._changed:
            return self._changed.wait_for(lambda: self._card is not None, timeout)

    def wait_for_removal(self, timeout: float) -> bool:
        """True as soon as the field is empty."""
        with self._changed:
            return self._changed.wait_for(lambda: self._card is None, timeout)

    def connect(self) -> bytes:
        """Power the card up; its ATR."""
        card = self._card
        if card is None:
            raise CardRemovedError("no card in the field")
        self._powered = True
        return card.power_on()

    def transmit(self, apdu: bytes) -> bytes:
        """One APDU exchange (tearing as set by :meth:`pull_after`)."""
        card = self._card
        if card is None:
            raise CardRemovedError("no card in the field")
        if not self._powered:
            card.power_on()
            self._powered = True
        try:
            response = card.transmit(apdu)
        except CardLeftError as left:
            self.remove()
            if left.away == 0:
                self.insert(card)
            raise CardRemovedError(str(left)) from None
        except CardMutedError as muted:
            with self._changed:
                self._changed.wait_for(lambda: self._card is None, self._mute_wait)
            self.remove()
            raise CardRemovedError(str(muted)) from None
        tear = self._tear
        if tear is not None and tear(apdu):
            self.remove()
            raise CardRemovedError("card pulled before its answer arrived")
        return response

    def disconnect(self) -> None:
        """Power the card down; it stays in the field."""
        if self._card is not None and self._powered:
            self._card.power_off()
        self._powered = False

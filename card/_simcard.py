"""The simulated card as a transport endpoint: the pure applet plus a persistent store.

:class:`SimulatedCard` is the only stateful wrapper around :func:`card._applet.process`.  When a
command commits, the new image is written to the store *before* the answer is returned, exactly
as a card programs its EEPROM before it answers: a process killed between the two leaves a
committed transaction whose answer never left — the torn case GET TRANSACTION PROOF resolves.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Protocol

from card._applet import Session, process
from card._files import CST
from card._image import CardImage, load_image, save_image

__all__ = ["ATR", "FileStore", "ImageStore", "MemoryStore", "SimulatedCard"]


def _with_tck(atr: bytes) -> bytes:
    tck = 0
    for b in atr[1:]:
        tck ^= b
    return atr + bytes((tck,))


ATR = _with_tck(bytes.fromhex("3B888001") + b"FARELAB1")
"""A PC/SC contactless ATR (ISO 14443-4, T=1) whose historical bytes read ``FARELAB1``."""


class ImageStore(Protocol):
    """Where committed card images go."""

    def save(self, image: CardImage) -> None:
        """Make ``image`` the persistent state; on return it must survive a crash."""
        ...


class MemoryStore:
    """Keeps committed images in memory only (benchmarks, property tests)."""

    def __init__(self) -> None:
        self.saved: CardImage | None = None
        self.commits = 0

    def save(self, image: CardImage) -> None:
        """Remember the image."""
        self.saved = image
        self.commits += 1


class FileStore:
    """Writes each committed image atomically to a file (see :func:`card.save_image`)."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        """``durable``: fsync before returning (turn off only where a crash cannot matter)."""
        self.path = path
        self.durable = durable

    def load(self) -> CardImage:
        """Read the image currently in the file."""
        return load_image(self.path)

    def save(self, image: CardImage) -> None:
        """Replace the file atomically."""
        save_image(self.path, image, durable=self.durable)


def _today_cst() -> date:
    return datetime.now(CST).date()


class SimulatedCard:
    """A card in a field: power it, send it APDUs. Thread-safe; one APDU at a time."""

    def __init__(
        self,
        image: CardImage,
        *,
        store: ImageStore | None = None,
        entropy: Callable[[int], bytes] = os.urandom,
        today: Callable[[], date] = _today_cst,
    ) -> None:
        """
        Args:
            image: the card's persistent state at power-up.
            store: where committed images are written before the card answers; None keeps them
                in this object only.
            entropy: source of the seed of the card's random numbers at each power-on (tests
                pass a deterministic one).
            today: the calendar day, used only for the social-security PIN's "wrong tries in
                one day" count; a real card learns it from the terminal.
        """
        self._image = image
        self._store = store
        self._entropy = entropy
        self._today = today
        self._session: Session | None = None
        self._lock = threading.Lock()
        self.apdus = 0

    @classmethod
    def from_file(cls, path: Path, *, durable: bool = True) -> SimulatedCard:
        """A card backed by an image file: loads it, and writes every commit back to it."""
        store = FileStore(path, durable=durable)
        return cls(store.load(), store=store)

    @property
    def image(self) -> CardImage:
        """The committed persistent state."""
        return self._image

    def atr(self) -> bytes:
        """The card's ATR."""
        return ATR

    def reissue(self, image: CardImage) -> None:
        """Replace the whole persistent state, as a personalisation bureau would (tests use it
        to reset a card that stays in a reader's field)."""
        with self._lock:
            self._image = image
            self._session = None
            if self._store is not None:
                self._store.save(image)

    def power_on(self) -> bytes:
        """Cold reset: a new session; returns the ATR."""
        with self._lock:
            self._session = Session.power_on(self._entropy(16))
        return ATR

    def power_off(self) -> None:
        """Field off: the volatile session is gone."""
        with self._lock:
            self._session = None

    def transmit(self, apdu: bytes) -> bytes:
        """Process one APDU; an unpowered card is powered first (as a reader would)."""
        with self._lock:
            if self._session is None:
                self._session = Session.power_on(self._entropy(16))
            outcome = process(self._image, self._session, apdu, today=self._today())
            if outcome.committed and self._store is not None:
                self._store.save(outcome.image)
            self._image = outcome.image
            self._session = outcome.session
            self.apdus += 1
            return outcome.response

"""The simulated card as a transport endpoint: the pure applet plus a persistent store.

:class:`SimulatedCard` is the only stateful wrapper around :func:`card._applet.process`.  When a
command commits, the new image is written to the store *before* the answer is returned, exactly
as a card programs its EEPROM before it answers: a process killed between the two leaves a
committed transaction whose answer never left — the torn case GET TRANSACTION PROOF resolves.

A card backed by a file is one physical thing: from power-on until the field is off it holds the
image's lock (:class:`card.ImageLock`) and works from the image as it was read under that lock,
so a second reader — in this process or another — waits, then gets ``card busy``
(:class:`card.CardBusyError`), and never reuses a counter.  A write that fails raises
:class:`card.ImageError` instead of answering: the card did not commit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Protocol

from farelab.card._applet import Session, process
from farelab.card._files import CST
from farelab.card._image import (
    BUSY_WAIT_S,
    CardBusyError,
    CardImage,
    ImageLock,
    encode_image,
    exchange_image_file,
    load_image,
    write_image_file,
)

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
    """Writes each committed image atomically to a file (see :func:`card.save_image`), while
    holding the image's lock (see :meth:`take`)."""

    def __init__(self, path: Path, *, durable: bool = True, wait: float = BUSY_WAIT_S) -> None:
        """
        Args:
            path: the card image file.
            durable: fsync before returning (turn off only where a crash cannot matter).
            wait: seconds :meth:`take` waits for another holder before ``card busy``.
        """
        self.path = path
        self.durable = durable
        self.wait = wait
        self._lock = ImageLock(path)
        self._exchange = True  # until the file system says it cannot

    @property
    def held(self) -> bool:
        """Whether this store holds the image's lock."""
        return self._lock.held

    def load(self) -> CardImage:
        """Read the image currently in the file (a consistent read: writes are atomic)."""
        return load_image(self.path)

    def take(self, wait: float | None = None) -> CardImage:
        """Hold the image's lock and read the image under it: from now on no one else writes
        it.  CardBusyError after ``wait`` seconds (default: the store's); ImageError if it
        cannot be read."""
        self._lock.acquire(self.wait if wait is None else wait)
        try:
            return load_image(self.path, held=True)
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        """Let another reader have the card."""
        self._lock.release()

    def save(self, image: CardImage) -> None:
        """Replace the file atomically; ImageError if it cannot be written.  The new image is
        written into the card's shadow file and swapped with the image
        (:func:`card.exchange_image_file`: no file is created at a commit), or, where that
        cannot be done, written to a new file renamed over the image (:func:`card.save_image`)."""
        if not self._lock.held:
            raise RuntimeError(f"{self.path}: a card image written outside a field")
        data = encode_image(image)
        if self._exchange:
            outcome = exchange_image_file(self.path, data, durable=self.durable)
            if outcome == "done":
                return
            if outcome == "unsupported":
                self._exchange = False
        write_image_file(self.path, data, durable=self.durable)


def _today_cst() -> date:
    return datetime.now(CST).date()


class SimulatedCard:
    """A card in a field: power it, send it APDUs. Thread-safe; one APDU at a time."""

    def __init__(
        self,
        image: CardImage | None,
        *,
        store: ImageStore | None = None,
        entropy: Callable[[int], bytes] = os.urandom,
        today: Callable[[], date] = _today_cst,
    ) -> None:
        """
        Args:
            image: the card's persistent state at power-up; None only with a
                :class:`FileStore`, which is read at the first power-on.
            store: where committed images are written before the card answers; None keeps them
                in this object only.
            entropy: source of the seed of the card's random numbers at each power-on (tests
                pass a deterministic one).
            today: the calendar day, used only for the social-security PIN's "wrong tries in
                one day" count; a real card learns it from the terminal.
        """
        if image is None and not isinstance(store, FileStore):
            raise ValueError("a card without an image needs a FileStore to read it from")
        self._image = image
        self._store = store
        self._entropy = entropy
        self._today = today
        self._session: Session | None = None
        self._lock = threading.Lock()
        self.apdus = 0

    @classmethod
    def from_file(
        cls, path: Path, *, durable: bool = True, wait: float = BUSY_WAIT_S, load: bool = True
    ) -> SimulatedCard:
        """A card backed by an image file: loads it (ImageError if it cannot be used), reads it
        again under the image's lock at each power-on, and writes every commit back to it.
        ``wait``: seconds a power-on waits for another field to let the card go.  ``load=False``
        reads it only at power-on (one read a tap instead of two; an unusable image is then the
        power-on's ImageError), or when :attr:`image` is asked for first."""
        store = FileStore(path, durable=durable, wait=wait)
        return cls(store.load(), store=store) if load else cls(None, store=store)

    def _enter_field(self, wait: float | None = None) -> None:
        """Power is coming: a file-backed card takes its image's lock and its image as it is
        now (another field may have changed it since this card last had power), waiting
        ``wait`` seconds (default: its store's) for another field to let it go."""
        store = self._store
        if isinstance(store, FileStore) and not store.held:
            self._image = store.take(wait)
            self._session = None

    def take_if_free(self) -> bool:
        """Take a file-backed card's image now if no other field holds it, without waiting:
        True if this card has it (its next power-on uses it; :meth:`close` lets it go), False
        if another field holds it.  ImageError if it cannot be read.  True at once for a card
        that is not file-backed, or that has it already."""
        with self._lock:
            try:
                self._enter_field(wait=0.0)
            except CardBusyError:
                return False
            return True

    def _leave_field(self) -> None:
        store = self._store
        if isinstance(store, FileStore):
            store.release()

    def close(self) -> None:
        """Take the card out of any field: power off, and let another reader have it."""
        self.power_off()

    def __enter__(self) -> SimulatedCard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def image(self) -> CardImage:
        """The committed persistent state."""
        image = self._image
        if image is None:  # a file-backed card not read yet (``from_file(load=False)``)
            assert isinstance(self._store, FileStore)
            with self._lock:
                if self._image is None:
                    self._image = self._store.load()
                image = self._image
        return image

    def atr(self) -> bytes:
        """The card's ATR."""
        return ATR

    def reissue(self, image: CardImage) -> None:
        """Replace the whole persistent state, as a personalisation bureau would (tests use it
        to reset a card that stays in a reader's field)."""
        with self._lock:
            store = self._store
            in_field = isinstance(store, FileStore) and store.held
            if isinstance(store, FileStore) and not in_field:
                store.take()
            try:
                if store is not None:
                    store.save(image)
                self._image = image
                self._session = None
            finally:
                if not in_field:
                    self._leave_field()

    def power_on(self) -> bytes:
        """Cold reset: a new session; returns the ATR.  CardBusyError if a file-backed card is
        in another field."""
        with self._lock:
            self._enter_field()
            self._session = Session.power_on(self._entropy(16))
        return ATR

    def power_off(self) -> None:
        """Field off: the volatile session is gone (and a file-backed card is free)."""
        with self._lock:
            self._session = None
            self._leave_field()

    def transmit(self, apdu: bytes) -> bytes:
        """Process one APDU; an unpowered card is powered first (as a reader would).

        ImageError if a file-backed card cannot write a commit: it did not commit then, and
        keeps its old image (CardBusyError if it had to be powered and is in another field).
        """
        with self._lock:
            if self._session is None:
                self._enter_field()
                self._session = Session.power_on(self._entropy(16))
            image = self._image
            assert image is not None  # read at power-on, at the latest
            outcome = process(image, self._session, apdu, today=self._today())
            if outcome.committed and self._store is not None:
                self._store.save(outcome.image)
            self._image = outcome.image
            self._session = outcome.session
            self.apdus += 1
            return outcome.response

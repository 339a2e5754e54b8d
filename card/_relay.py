"""The relay: a card in any reader, presented in pcscd's virtual reader.

:class:`RelayCard` is a :class:`card.CardEndpoint` whose card is somewhere else: each C-APDU is
forwarded to a :class:`card.Reader` (a real PC/SC reader, say) and the real card's answer comes
back.  Wrapped like any card, it lets a terminal under test talk to a real card while farelab
records the exchanges (:class:`card.TracingEndpoint`) and makes it misbehave
(:class:`card.BehavingCard`).

:func:`relay` is the shell: it waits for a card in the source reader, presents it to vpcd, and
takes it out of the virtual reader when it leaves the real one.  Two threads touch the source
reader, each through its own reader object (a PC/SC context per thread): the vicc thread forwards
the terminal's commands, a watcher waits for the card to leave.  The relay is a PC/SC client of
the source reader and a vicc card of the virtual one, possibly in the same pcscd: pcscd serves
each slot on its own thread, so a command forwarded from one slot to the other while the first
waits for its answer does not block.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from farelab.card._behaviour import CardLeftError
from farelab.card._reader import CardEndpoint, CardRemovedError, Reader
from farelab.card._vicc import DEFAULT_PORT, SEEN_GONE, ViccClient

__all__ = ["RelayCard", "relay"]

log = logging.getLogger("farelab.relay")

_POLL = 0.2


class RelayCard:
    """A card endpoint that forwards everything to the card in ``reader``.

    The card leaving the source reader is the relayed card leaving the field: a command that
    finds it gone raises :class:`card.CardLeftError` (not coming back by itself), which a vicc
    client acts out by closing its connection.
    """

    def __init__(self, reader: Reader, atr: bytes) -> None:
        """
        Args:
            reader: where the real card is, already connected (its ATR is ``atr``); used only
                from the thread that serves this card.
            atr: the real card's ATR, answered to presence polls without touching the card.
        """
        self.reader = reader
        self._atr = atr

    def power_on(self) -> bytes:
        """Cold reset of the real card (power down, connect again); its ATR."""
        try:
            self._atr = self.reader.connect()
        except CardRemovedError as exc:
            raise CardLeftError(f"the card left {self.reader.name}: {exc}", away=None) from None
        return self._atr

    def power_off(self) -> None:
        """Power the real card down."""
        self.reader.disconnect()

    def atr(self) -> bytes:
        """The real card's ATR as it was last powered up."""
        return self._atr

    def transmit(self, apdu: bytes) -> bytes:
        """The real card's answer; CardLeftError if it left the source reader."""
        try:
            return self.reader.transmit(apdu)
        except CardRemovedError as exc:
            raise CardLeftError(f"the card left {self.reader.name}: {exc}", away=None) from None


class _Watcher:
    """Sets a presentation's ``gone`` event when the card leaves the source reader or the relay
    stops; runs on its own thread with its own reader."""

    def __init__(self, open_reader: Callable[[], Reader], stop: threading.Event) -> None:
        self._open = open_reader
        self._stop = stop
        self._lock = threading.Lock()
        self._gone: threading.Event | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-watch", daemon=True)
        self._thread.start()
        self._ready.wait()

    def follow(self, gone: threading.Event) -> None:
        """Watch the card now presented; set ``gone`` when it leaves."""
        with self._lock:
            self._gone = gone
        if self.error is not None or self._stop.is_set():
            gone.set()

    def _release(self) -> None:
        with self._lock:
            gone, self._gone = self._gone, None
        if gone is not None:
            gone.set()

    def _run(self) -> None:
        try:
            reader = self._open()
        except BaseException as exc:  # reported by the relay's own thread
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                with self._lock:
                    watching = self._gone is not None
                if not watching:
                    self._stop.wait(_POLL)
                elif reader.wait_for_removal(_POLL):
                    self._release()
        except BaseException as exc:
            self.error = exc
        finally:
            self._release()
            close = getattr(reader, "close", None)
            if callable(close):
                close()

    def join(self) -> None:
        """Wait for the watcher to end (after ``stop`` is set)."""
        self._thread.join()


def relay(
    open_reader: Callable[[], Reader],
    *,
    stop: threading.Event,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    wrap: Callable[[CardEndpoint], CardEndpoint] | None = None,
    on_card: Callable[[bytes], None] | None = None,
    on_leave: Callable[[], None] | None = None,
) -> None:
    """Present each card that enters the source reader to vpcd until ``stop`` is set.

    Args:
        open_reader: makes a source reader; called twice, on the two threads that use one
            (:class:`card.ReaderUnavailableError` from it, or later, ends the relay).
        stop: set it to end the relay (the card in the virtual reader is taken away).
        host, port: where vpcd listens.
        wrap: what to put around each presented card (a trace, a behaviour).
        on_card: told the ATR of each card relayed.
        on_leave: told each time the relayed card left the virtual reader.

    Raises:
        ReaderError: the source reader or vpcd went away (:class:`card.ViccError` for vpcd).
    """
    watcher = _Watcher(open_reader, stop)
    reader: Reader | None = None
    try:
        if watcher.error is not None:
            raise watcher.error
        reader = open_reader()
        while not stop.is_set():
            if not reader.wait_for_card(_POLL):
                continue
            try:
                atr = reader.connect()
            except CardRemovedError:
                stop.wait(0.05)  # seen but not yet powered, or already gone: look again
                continue
            if on_card is not None:
                on_card(atr)
            card: CardEndpoint = RelayCard(reader, atr)
            if wrap is not None:
                card = wrap(card)
            gone = threading.Event()
            client = ViccClient(card, host=host, port=port)
            client.connect(timeout=5.0)
            watcher.follow(gone)
            try:
                client.serve(stop=gone)
                left = client.left
            except CardLeftError as exc:  # it left the source reader as vpcd powered it up
                left = exc
            if watcher.error is not None:
                raise watcher.error
            if on_leave is not None:
                on_leave()
            away = SEEN_GONE
            if left is not None and left.away is not None:
                away = max(left.away, SEEN_GONE)  # a behaviour's vanish or reset
            elif left is not None or gone.is_set():
                # Gone from the source reader: present it again only once it is back.
                while not stop.is_set() and not reader.wait_for_removal(_POLL):
                    pass
            stop.wait(away)
    finally:
        stop.set()
        watcher.join()
        if reader is not None:
            reader.disconnect()
            close = getattr(reader, "close", None)
            if callable(close):
                close()

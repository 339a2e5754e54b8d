"""Any PC/SC reader through pyscard — the real ones, and pcscd's "Virtual PCD" with our card.

Uses pyscard's thin ``smartcard.scard`` layer (one call per PC/SC function, nothing in between).
pyscard is blocking and a PC/SC context belongs to one thread, so a :class:`PcscReader` lives on
one thread: run it through :class:`ReaderThread`, one hop per whole tap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from smartcard import scard

from farelab.card._reader import CardRemovedError, Reader, ReaderError, ReaderUnavailableError

__all__ = ["PcscReader", "ReaderThread", "list_readers"]

T = TypeVar("T")

_REMOVED = {
    scard.SCARD_W_REMOVED_CARD,
    scard.SCARD_E_NO_SMARTCARD,
    scard.SCARD_W_RESET_CARD,
    scard.SCARD_W_UNPOWERED_CARD,
    scard.SCARD_W_UNRESPONSIVE_CARD,
    scard.SCARD_E_NOT_TRANSACTED,
    scard.SCARD_E_COMM_DATA_LOST,
}
_UNAVAILABLE = {
    scard.SCARD_E_NO_SERVICE,
    scard.SCARD_E_SERVICE_STOPPED,
    scard.SCARD_E_UNKNOWN_READER,
    scard.SCARD_E_READER_UNAVAILABLE,
    scard.SCARD_E_NO_READERS_AVAILABLE,
    scard.SCARD_E_INVALID_HANDLE,
}


def _check(hresult: int, what: str) -> None:
    if hresult == scard.SCARD_S_SUCCESS:
        return
    message = f"{what}: {scard.SCardGetErrorMessage(hresult)} (0x{hresult & 0xFFFFFFFF:08X})"
    if hresult in _REMOVED:
        raise CardRemovedError(message)
    if hresult in _UNAVAILABLE:
        raise ReaderUnavailableError(message)
    raise ReaderError(message)


def _context() -> Any:
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    _check(hresult, "SCardEstablishContext")
    return context


def list_readers() -> list[str]:
    """The PC/SC readers pcscd knows now (empty if none, or if pcscd is not running)."""
    try:
        context = _context()
    except ReaderError:
        return []
    try:
        hresult, readers = scard.SCardListReaders(context, [])
        return list(readers) if hresult == scard.SCARD_S_SUCCESS else []
    finally:
        scard.SCardReleaseContext(context)


class PcscReader:
    """A PC/SC reader, by exact name or by prefix (``"Virtual PCD"`` picks the first one)."""

    def __init__(self, name: str) -> None:
        """Open a PC/SC context; ReaderUnavailableError if pcscd or the reader is not there."""
        self._context = _context()
        hresult, readers = scard.SCardListReaders(self._context, [])
        if hresult != scard.SCARD_S_SUCCESS:
            readers = []
        match = [r for r in readers if r == name] or [r for r in readers if r.startswith(name)]
        if not match:
            scard.SCardReleaseContext(self._context)
            known = ", ".join(readers) or "none"
            raise ReaderUnavailableError(f"no PC/SC reader {name!r} (readers: {known})")
        self._name: str = match[0]
        self._card: Any = None
        self._protocol: Any = None

    @property
    def name(self) -> str:
        """The PC/SC reader name."""
        return self._name

    def _present(self, timeout: float, *, want: bool) -> bool:
        deadline = time.monotonic() + timeout
        state = scard.SCARD_STATE_UNAWARE
        wait_ms = 0
        while True:
            hresult, states = scard.SCardGetStatusChange(
                self._context, wait_ms, [(self._name, state)]
            )
            if hresult != scard.SCARD_E_TIMEOUT:
                _check(hresult, "SCardGetStatusChange")
                state = states[0][1] & ~scard.SCARD_STATE_CHANGED
                if bool(state & scard.SCARD_STATE_PRESENT) == want:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            wait_ms = max(int(left * 1000), 1)

    def wait_for_card(self, timeout: float) -> bool:
        """True once a card is in the field."""
        return self._present(timeout, want=True)

    def wait_for_removal(self, timeout: float) -> bool:
        """True once the field is empty."""
        return self._present(timeout, want=False)

    def connect(self) -> bytes:
        """Power up the card (T=1 preferred) and return its ATR."""
        self.disconnect()
        hresult, card, protocol = scard.SCardConnect(
            self._context,
            self._name,
            scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        _check(hresult, "SCardConnect")
        self._card, self._protocol = card, protocol
        hresult, _, _, _, atr = scard.SCardStatus(card)
        _check(hresult, "SCardStatus")
        return bytes(atr)

    def transmit(self, apdu: bytes) -> bytes:
        """One APDU exchange."""
        if self._card is None:
            self.connect()
        hresult, response = scard.SCardTransmit(self._card, self._protocol, list(apdu))
        if hresult != scard.SCARD_S_SUCCESS:
            self._card = None
        _check(hresult, "SCardTransmit")
        if len(response) < 2:
            # vpcd answers an empty response when the card leaves mid-command; a real reader
            # reports an error. Either way no status word came back: the card is gone.
            self._card = None
            raise CardRemovedError("the card left before it answered")
        return bytes(response)

    def disconnect(self) -> None:
        """Power the card down, so that its volatile session is gone."""
        card, self._card = self._card, None
        if card is not None:
            scard.SCardDisconnect(card, scard.SCARD_UNPOWER_CARD)

    def close(self) -> None:
        """Release the PC/SC context."""
        self.disconnect()
        scard.SCardReleaseContext(self._context)


class ReaderThread:
    """The one thread a reader lives on; asyncio code hands it whole APDU sequences."""

    def __init__(self, make_reader: Callable[[], Reader], *, name: str = "reader") -> None:
        """``make_reader`` is called on the reader's thread (PC/SC contexts are per thread)."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._reader: Reader = self._pool.submit(make_reader).result()

    @property
    def reader(self) -> Reader:
        """The reader (use it only through :meth:`run`)."""
        return self._reader

    async def run(self, fn: Callable[[Reader], T]) -> T:
        """Run ``fn(reader)`` — a whole tap — on the reader's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, self._reader)

    def close(self) -> None:
        """Stop the thread once the work queued on it is done."""
        self._pool.shutdown(wait=True)

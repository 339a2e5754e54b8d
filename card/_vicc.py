"""Our vicc client: presents a card (any :class:`CardEndpoint`) in pcscd's "Virtual PCD" reader.

The vpcd protocol is tiny: vpcd (inside pcscd) listens on TCP (35963 for reader "Virtual PCD 00
00"); the virtual card connects.  Each message either way is a 2-byte big-endian length and that
many bytes.  From vpcd, a 1-byte message is a control — 00 power off, 01 power on, 02 reset, 04
"send your ATR" (answered with the ATR); anything longer is a C-APDU, answered with the R-APDU.
vpcd also passes a terminal's 1-byte C-APDU on as a 1-byte message: any other 1-byte message goes
to the card as a C-APDU (which answers ``6700``, wrong length), so that the terminal, and every
other client of the reader, is not left waiting; a 1-byte C-APDU ``00``, ``01``, ``02`` or ``04``
cannot be told from vpcd's controls and is taken as one (docs/card-protocol.md, "Lengths,
classes and the reader").
pcscd polls for the ATR about every 400 ms to see that the card is still there; closing the
socket takes the card out of the field.  A card that misbehaves (:class:`card.BehavingCard`)
leaves by closing it, and stays away at least :data:`SEEN_GONE` seconds: vpcd only tells pcscd a
card is absent when pcscd's presence poll finds no connection.

The socket is blocking and served on one thread: a tap is a strict request/response exchange, and
the blocking loop costs less per APDU than an event loop would.  ``TCP_NODELAY`` plus
``TCP_QUICKACK`` re-armed before every message are what make it fast: without them every APDU
waits ~40 ms for a delayed ACK.  The loop wakes to look at its ``stop`` through the kernel's
receive timeout (``SO_RCVTIMEO``), not a Python socket timeout, which polls before every
``recv``.  A message costs two ``recv`` calls, a ``setsockopt`` and a ``send``: reading its
length is what acknowledges it (vpcd's Nagle holds the message's bytes until then), so there is
no sleeping through the length alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from farelab.card._behaviour import CardLeftError, CardMutedError, enter_field
from farelab.card._reader import CardEndpoint, ReaderError

__all__ = ["DEFAULT_PORT", "ViccClient", "ViccError", "serve", "tap"]

log = logging.getLogger("farelab.vicc")

DEFAULT_PORT = 35963
_CTRL_OFF, _CTRL_ON, _CTRL_RESET, _CTRL_ATR = 0, 1, 2, 4
_CONTROLS = frozenset({_CTRL_OFF, _CTRL_ON, _CTRL_RESET, _CTRL_ATR})
_POLL = 0.2
_MID_MESSAGE = 5.0
"""Seconds vpcd may pause inside a message, or leave an answer unread, before the card leaves."""
SEEN_GONE = 0.8
"""Seconds a card must stay out of vpcd's field for pcscd to see it gone (its presence poll
runs every 0.4 s)."""


def _timeval(seconds: float) -> bytes:
    """``seconds`` as the ``struct timeval`` of SO_RCVTIMEO and SO_SNDTIMEO."""
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))


class ViccError(ReaderError):
    """vpcd cannot be reached, or it broke the protocol."""


class _PeerClosedError(Exception):
    """The peer closed the connection."""


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the other end has closed (end of stream, or a reset) — without consuming data."""
    try:
        sock.settimeout(0.0)  # a socket with a timeout would first wait that long for data
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _self_connected(sock: socket.socket) -> bool:
    """Whether a connection to a local port nobody listens on was given that very port as its
    own (TCP's simultaneous open: the socket is connected to itself).  Such a socket is reset
    and closed here: kept, it would hold vpcd's port and no pcscd could start."""
    try:
        if sock.getsockname() != sock.getpeername():
            return False
    except OSError:
        return False
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return True


class ViccClient:
    """One card in one vpcd slot."""

    def __init__(
        self,
        card: CardEndpoint,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        drop_after: Callable[[bytes], bool] | None = None,
    ) -> None:
        """
        Args:
            card: the card to present.
            host, port: where vpcd listens.
            drop_after: test hook — leave the field right after the first C-APDU for which this
                returns True has been processed by the card, before its answer is sent (a card
                pulled mid-write).
        """
        self.card = card
        self.host = host
        self.port = port
        self._drop_after = drop_after
        self._sock: socket.socket | None = None
        self._muted = False
        self.apdus = 0
        self.left: CardLeftError | None = None
        """Set when the card left the field of its own accord (a behaviour's vanish or reset)."""

    def connect(self, *, timeout: float = 0.0) -> None:
        """Connect to vpcd, retrying until ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=2.0)
                if _self_connected(sock):
                    raise ConnectionRefusedError(errno.ECONNREFUSED, "nothing listens there")
                break
            except OSError as exc:
                if time.monotonic() + delay > deadline:
                    raise ViccError(
                        f"cannot reach vpcd at {self.host}:{self.port} ({exc.strerror or exc}); "
                        "is pcscd running with the vsmartcard-vpcd driver?"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        enter_field(self.card)

    def leave(self) -> None:
        """Take the card out of the field now, from any thread: ``serve`` returns at once (it
        would otherwise notice ``stop`` only at its next poll of the socket)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Take the card out of the field."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if _peer_closed(sock):
                # vpcd went first (pcscd stopped): answer its FIN with a reset, or its port
                # sits in TIME_WAIT for a minute and the next pcscd cannot bind it.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.card.power_off()

    def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        """The next ``n`` bytes of a message vpcd has begun; TimeoutError if it pauses for
        :data:`_MID_MESSAGE` seconds."""
        data = b""
        deadline = 0.0
        while len(data) < n:
            try:
                chunk = sock.recv(n - len(data))
            except BlockingIOError:  # SO_RCVTIMEO passed: vpcd paused mid-message
                now = time.monotonic()
                deadline = deadline or now + _MID_MESSAGE
                if now >= deadline:
                    raise TimeoutError from None
                continue
            if not chunk:
                raise _PeerClosedError
            data += chunk
        return data

    def _send(self, sock: socket.socket, payload: bytes) -> None:
        sock.sendall(len(payload).to_bytes(2, "big") + payload)

    def serve(self, *, stop: threading.Event | None = None, until: float | None = None) -> bool:
        """Answer vpcd until ``stop`` is set, the monotonic time ``until`` passes, or vpcd hangs
        up. Returns False if the card left because of ``drop_after`` or vpcd closed."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("serve() before connect()")
        # A blocking socket whose kernel timeouts wake the loop to look at ``stop``: one recv
        # per read, where a Python socket timeout polls before every recv.
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(_POLL))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(_MID_MESSAGE))
        setsockopt, tcp, quickack = sock.setsockopt, socket.IPPROTO_TCP, socket.TCP_QUICKACK
        try:
            while True:
                if stop is not None and stop.is_set():
                    return True
                if until is not None and time.monotonic() >= until:
                    return True
                try:  # noqa: SIM105 (a bare try costs nothing; a suppress() per message does)
                    # vpcd writes a message's length and its bytes apart, and Nagle holds the
                    # bytes until the length is acknowledged: acknowledge at once.  This also
                    # sends the acknowledgement still owed for a control that has no answer.
                    setsockopt(tcp, quickack, 1)
                except OSError:
                    pass
                try:
                    header = sock.recv(2)
                except BlockingIOError:  # nothing for _POLL seconds
                    continue
                if not header:
                    return False
                if len(header) == 1:
                    header += self._recv_exact(sock, 1)
                length = int.from_bytes(header, "big")
                if length == 0:
                    log.warning("vpcd sent an empty message; leaving the field")
                    return False
                message = self._recv_exact(sock, length)
                if not self._handle(sock, message):
                    return False
        except (_PeerClosedError, ConnectionError):
            return False
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO passed
            log.warning("vpcd stopped mid-message; leaving the field")
            return False
        finally:
            self.close()

    def _handle(self, sock: socket.socket, message: bytes) -> bool:
        if self._muted:
            return True  # a muted card answers nothing, not even vpcd's presence polls
        if len(message) == 1 and message[0] in _CONTROLS:
            ctrl = message[0]
            if ctrl == _CTRL_ATR:
                self._send(sock, self.card.atr())
            elif ctrl in (_CTRL_ON, _CTRL_RESET):
                self.card.power_on()
            else:
                self.card.power_off()
            return True
        # Any other 1-byte message is a terminal's 1-byte C-APDU, which vpcd frames like a
        # control and then waits on: the card answers it (6700, too short to be a command).
        try:
            answer = self.card.transmit(message)
        except CardLeftError as left:
            self.apdus += 1
            self.left = left
            return False
        except CardMutedError:
            self.apdus += 1
            self._muted = True
            return True
        self.apdus += 1
        drop = self._drop_after
        if drop is not None and drop(message):
            self._drop_after = None
            return False
        self._send(sock, answer)
        return True


def serve(
    card: CardEndpoint,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    stop: threading.Event | None = None,
    connect_timeout: float = 5.0,
) -> None:
    """Present ``card`` until ``stop`` is set (reconnecting if vpcd restarts)."""
    while stop is None or not stop.is_set():
        client = ViccClient(card, host=host, port=port)
        client.connect(timeout=connect_timeout)
        client.serve(stop=stop)
        away = _away(client)
        if away is not None:
            if stop is not None:
                stop.wait(away)
            else:
                time.sleep(away)


def _away(client: ViccClient) -> float | None:
    """How long a card that left of its own accord stays away (None if it did not leave)."""
    left = client.left
    if left is None:
        return None
    return max(left.away if left.away is not None else 0.0, SEEN_GONE)


def tap(
    card: CardEndpoint,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    hold: float = 1.5,
    connect_timeout: float = 5.0,
    drop_after: Callable[[bytes], bool] | None = None,
) -> ViccClient:
    """Present ``card`` once for ``hold`` seconds, then take it away; returns the client (its
    ``apdus`` count what the card answered)."""
    until = time.monotonic() + hold
    client = ViccClient(card, host=host, port=port, drop_after=drop_after)
    client.connect(timeout=connect_timeout)
    client.serve(until=until)
    apdus = 0
    # A card that resets itself comes back while the hand still holds it.
    while client.left is not None and client.left.away == 0:
        apdus += client.apdus
        time.sleep(SEEN_GONE)
        if time.monotonic() >= until:
            break
        client = ViccClient(card, host=host, port=port)
        client.connect(timeout=connect_timeout)
        client.serve(until=until)
    client.apdus += apdus
    return client

"""What ends a card's turn in ``farelab testbed run`` (:func:`farelab.testbed.present`): the
terminal powering the card down after its first APDU, not a fixed quiet period; a power cycle
(power-off and power-on at once, as ``SCardReconnect`` does) keeps the card; a terminal that
leaves the card powered is done after the quiet period.  vpcd is played here by a socket that
speaks its protocol, so no pcscd is needed."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date

from farelab.card import MemoryStore, SimulatedCard, personalise
from farelab.testbed import Presence, present

SELECT = bytes.fromhex("00A4040008A000000632010105")
ATR, ON, OFF = b"\x04", b"\x01", b"\x00"
LONG = 60.0  # a quiet period and a timeout no test waits for


class Vpcd:
    """vpcd's side of one card's connection: 2-byte length, then the message."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def send(self, message: bytes) -> None:
        self.conn.sendall(len(message).to_bytes(2, "big") + message)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def ask(self, message: bytes) -> bytes:
        """A message the card answers (the ATR, a C-APDU): its answer."""
        self.send(message)
        return self._exact(int.from_bytes(self._exact(2), "big"))

    def insert(self) -> None:
        """pcscd's presence poll finding the card, and its power-up."""
        assert self.ask(ATR)
        self.send(ON)
        assert self.ask(ATR)

    def taken_away(self) -> bool:
        """Whether the card closed its connection (it was taken out of the field)."""
        self.conn.settimeout(LONG)
        try:
            return self.conn.recv(2) == b""
        except OSError:
            return True


@contextmanager
def card_turn(
    *, quiet: float = LONG
) -> Iterator[tuple[Callable[[], Vpcd], Callable[[], Presence]]]:
    """A card presented to a vpcd of our own; yields the connection's vpcd side (once the card
    connected) and the turn's Presence (once it ended)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    card = SimulatedCard(
        personalise(serial="4242", issued=date(2026, 1, 1), balance=5000),
        store=MemoryStore(),
        entropy=bytes,
    )
    outcome: list[Presence] = []

    def run() -> None:
        outcome.append(
            present(
                card,
                host="127.0.0.1",
                port=port,
                quiet=quiet,
                timeout=LONG,
                seen_gone=lambda _seconds: True,
            )
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    conns: list[socket.socket] = []

    def vpcd() -> Vpcd:
        server.settimeout(10)
        conn, _ = server.accept()
        conns.append(conn)
        return Vpcd(conn)

    def result() -> Presence:
        thread.join(LONG)
        assert outcome, "the card's turn did not end"
        return outcome[0]

    try:
        yield vpcd, result
    finally:
        for conn in conns:
            conn.close()
        server.close()


def test_a_terminal_that_powers_the_card_down_ends_its_turn() -> None:
    with card_turn() as (vpcd, result):
        reader = vpcd()
        reader.insert()
        assert reader.ask(SELECT)[-2:] == b"\x90\x00"
        reader.send(OFF)  # SCardDisconnect(SCARD_UNPOWER_CARD)
        assert reader.taken_away()
        presence = result()
    assert presence.ended_by == "power-off"
    assert not presence.timed_out
    assert presence.to_power_up is not None
    assert presence.to_power_off is not None


def test_a_power_cycle_keeps_the_card_for_the_terminal() -> None:
    with card_turn() as (vpcd, result):
        reader = vpcd()
        reader.insert()
        assert reader.ask(SELECT)[-2:] == b"\x90\x00"
        reader.send(OFF)  # SCardReconnect(SCARD_UNPOWER_CARD): down and up at once
        reader.send(ON)
        assert reader.ask(ATR)
        assert reader.ask(SELECT)[-2:] == b"\x90\x00"  # still in the field, still answering
        reader.send(OFF)
        assert reader.taken_away()
        presence = result()
    assert presence.ended_by == "power-off"


def test_a_terminal_that_leaves_the_card_powered_is_done_after_the_quiet_period() -> None:
    with card_turn(quiet=0.2) as (vpcd, result):
        reader = vpcd()
        reader.insert()
        assert reader.ask(SELECT)[-2:] == b"\x90\x00"
        assert reader.taken_away()
        presence = result()
    assert presence.ended_by == "quiet"
    assert presence.to_power_off is None


def test_a_power_down_before_the_first_apdu_does_not_end_the_turn() -> None:
    with card_turn(quiet=0.2) as (vpcd, result):
        reader = vpcd()
        reader.insert()
        reader.send(OFF)  # pcscd powering an unused card down
        reader.send(ON)
        assert reader.ask(ATR)
        assert reader.ask(SELECT)[-2:] == b"\x90\x00"
        assert reader.taken_away()
        presence = result()
    assert presence.ended_by == "quiet"

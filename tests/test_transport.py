"""The card through real pcscd + vpcd: our vicc client, the pyscard reader, pcsc-tools."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from farelab.card import (
    ATR,
    CardRemovedError,
    MemoryStore,
    ReaderUnavailableError,
    SimulatedCard,
    personalise,
    save_image,
)
from farelab.card._pcsc import PcscReader, ReaderThread, list_readers
from farelab.card._pcscd import VIRTUAL_READER
from farelab.card._vicc import ViccClient, ViccError
from tests.cli_support import start_farelab

pytestmark = [pytest.mark.pcsc, pytest.mark.usefixtures("pcscd")]


class Echo:
    """A card that echoes each C-APDU's data back with 9000 and counts power cycles."""

    def __init__(self) -> None:
        self.powered = 0

    def atr(self) -> bytes:
        return ATR

    def power_on(self) -> bytes:
        self.powered += 1
        return ATR

    def power_off(self) -> None:
        return None

    def transmit(self, apdu: bytes) -> bytes:
        return apdu[5:] + b"\x90\x00" if len(apdu) > 5 else b"\x90\x00"


class Presented:
    """A card held in the vpcd field on a background thread."""

    def __init__(self, card: object, **kwargs: object) -> None:
        self.client = ViccClient(card, **kwargs)  # type: ignore[arg-type]
        self.client.connect(timeout=5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.client.serve, kwargs={"stop": self.stop})
        self.thread.start()

    def remove(self) -> None:
        """Take the card away and wait until pcscd has seen it go (so the next card is new)."""
        self.stop.set()
        self.thread.join(5)
        probe = PcscReader(VIRTUAL_READER)
        try:
            assert probe.wait_for_removal(3)
        finally:
            probe.close()


@pytest.fixture
def reader() -> Iterator[PcscReader]:
    r = PcscReader(VIRTUAL_READER)
    yield r
    r.close()


def test_pyscard_sees_the_card_in_the_virtual_reader(reader: PcscReader) -> None:
    held = Presented(Echo())
    try:
        assert reader.wait_for_card(3)
        assert reader.connect() == ATR
    finally:
        held.remove()
    assert reader.wait_for_removal(3)


@pytest.mark.parametrize("size", [0, 1, 100, 250, 255])
def test_apdus_round_trip_byte_exact(reader: PcscReader, size: int) -> None:
    held = Presented(Echo())
    try:
        assert reader.wait_for_card(3)
        reader.connect()
        data = bytes((i * 7) & 0xFF for i in range(size))
        apdu = b"\x80\xca\x00\x00" + (bytes((size,)) + data if size else b"")
        assert reader.transmit(apdu) == data + b"\x90\x00"
    finally:
        held.remove()


def test_transmit_after_the_card_left_is_card_removed(reader: PcscReader) -> None:
    held = Presented(Echo())
    assert reader.wait_for_card(3)
    reader.connect()
    held.remove()
    assert reader.wait_for_removal(3)
    with pytest.raises(CardRemovedError):
        reader.transmit(b"\x80\x5c\x00\x02\x04")


def test_drop_after_hook_pulls_the_card_mid_write(reader: PcscReader) -> None:
    image = personalise(serial="9", issued=date(2026, 1, 1), balance=100)
    sim = SimulatedCard(image, store=MemoryStore())
    held = Presented(sim, drop_after=lambda apdu: apdu[1] == 0xA4)
    try:
        assert reader.wait_for_card(3)
        reader.connect()
        with pytest.raises(CardRemovedError):
            reader.transmit(bytes.fromhex("00A4040008A000000632010105"))
    finally:
        held.remove()
    assert sim.apdus == 1  # the SELECT reached the card; its answer never left


def test_unknown_reader_is_reader_unavailable() -> None:
    with pytest.raises(ReaderUnavailableError, match="no PC/SC reader"):
        PcscReader("No Such Reader 99")


def test_vpcd_not_listening_is_a_clear_error() -> None:
    client = ViccClient(Echo(), port=1)
    with pytest.raises(ViccError, match=r"cannot reach vpcd at 127\.0\.0\.1:1 "):
        client.connect(timeout=0.2)


def test_garbage_from_the_peer_does_not_crash_the_client() -> None:
    import socket  # noqa: PLC0415

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = ViccClient(Echo(), port=port)
    client.connect(timeout=2)
    peer, _ = server.accept()
    peer.sendall(b"\x00\x00")  # an empty message: the client leaves the field
    assert client.serve(until=time.monotonic() + 2) is False
    peer.close()
    server.close()


def test_leaving_the_field_while_vpcd_is_there_is_an_orderly_close() -> None:
    """The reset is only for a vpcd that has gone: leaving a live vpcd is a plain FIN, at once
    (not after the socket's read timeout)."""
    import socket  # noqa: PLC0415

    server = socket.create_server(("127.0.0.1", 0))
    client = ViccClient(Echo(), port=server.getsockname()[1])
    client.connect(timeout=2)
    peer, _ = server.accept()
    assert client.serve(until=time.monotonic() + 0.3) is True  # idle, then leaves
    peer.settimeout(2)
    assert peer.recv(1) == b""  # end of stream, not ConnectionResetError
    peer.close()
    server.close()


def _bindable(port: int) -> bool:
    import socket  # noqa: PLC0415

    with socket.socket() as probe:  # no SO_REUSEADDR, as vpcd binds its port
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("serving", [True, False])
def test_vpcd_going_first_leaves_its_port_free_for_the_next_pcscd(serving: bool) -> None:
    """pcscd stopped while the card is connected: the client answers vpcd's FIN with a reset,
    so vpcd's port is not held in TIME_WAIT for a minute (the next pcscd could not bind it)."""
    import socket  # noqa: PLC0415

    server = socket.socket()  # vpcd's listener, without SO_REUSEADDR
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = ViccClient(Echo(), port=port)
    client.connect(timeout=2)
    peer, _ = server.accept()
    peer.close()  # pcscd stops: vpcd closes first
    server.close()
    if serving:
        assert client.serve(until=time.monotonic() + 2) is False  # it sees vpcd leave
    else:
        time.sleep(0.1)  # the FIN arrives while the client is idle
        client.close()
    deadline = time.monotonic() + 2
    while not _bindable(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _bindable(port)


def test_scriptor_talks_to_our_card() -> None:
    image = personalise(serial="9", issued=date(2026, 1, 1), balance=1234)
    held = Presented(SimulatedCard(image, store=MemoryStore()))
    try:
        time.sleep(0.5)
        out = subprocess.run(
            ["scriptor", "-r", VIRTUAL_READER],
            check=False,
            input="00A4040008A000000632010105\n805C000204\n",
            capture_output=True,
            text=True,
            timeout=20,
        )
    finally:
        held.remove()
    assert "00 00 04 D2 90 00" in out.stdout, out.stdout + out.stderr


async def test_reader_thread_runs_a_whole_sequence_per_hop() -> None:
    held = Presented(Echo())
    worker = ReaderThread(lambda: PcscReader(VIRTUAL_READER))
    try:

        def sequence(r: object) -> list[bytes]:
            assert isinstance(r, PcscReader)
            assert r.wait_for_card(3)
            r.connect()
            return [r.transmit(b"\x80\xca\x00\x00\x01" + bytes((i,))) for i in range(3)]

        answers = await worker.run(sequence)
        assert answers == [bytes((i,)) + b"\x90\x00" for i in range(3)]
    finally:
        held.remove()
        worker.close()


def test_list_readers_shows_both_virtual_slots() -> None:
    assert VIRTUAL_READER in list_readers()


def test_card_tap_command_presents_the_card_and_persists_changes(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    save_image(path, personalise(serial="77", issued=date(2026, 1, 1), balance=500))
    tap = start_farelab(
        "card", "tap", str(path), "--hold", "3", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader = PcscReader(VIRTUAL_READER)
    try:
        assert reader.wait_for_card(5)
        reader.connect()
        from farelab.card import (  # noqa: PLC0415
            DEMO_ISSUER_ID,
            DEMO_KEYS,
            Psam,
            PsamKeys,
            Purchase,
            ReadCard,
            drive,
        )

        snap = drive(reader, ReadCard(records=[]))
        psam = Psam(
            terminal_id=b"\x00" * 5 + b"\x01", issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)}
        )
        from datetime import UTC, datetime  # noqa: PLC0415

        done = drive(reader, Purchase(psam=psam, card=snap, amount=120, when=datetime.now(UTC)))  # type: ignore[arg-type]
        assert getattr(done, "balance_after", None) == 380
    finally:
        reader.close()
    out, err = tap.communicate(timeout=10)
    assert tap.returncode == 0, err
    assert "5.00 -> 3.80" in out
    shown = subprocess.run(
        [sys.executable, "-m", "farelab", "card", "show", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(shown.stdout)["balance_fen"] == 380

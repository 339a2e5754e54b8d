"""Our vicc client against a stand-in for vpcd: how it reads the wire (no pcscd needed)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from farelab.card import _vicc
from farelab.card._vicc import ViccClient


class Echo:
    """A card that echoes each C-APDU's data back with 9000."""

    def power_on(self) -> bytes:
        return b"\x3b\x00"

    def power_off(self) -> None:
        return None

    def atr(self) -> bytes:
        return b"\x3b\x00"

    def transmit(self, apdu: bytes) -> bytes:
        return apdu[5:] + b"\x90\x00"


@pytest.fixture
def vpcd() -> Iterator[tuple[ViccClient, socket.socket]]:
    """A client connected to a stand-in vpcd; the stand-in's end of the connection."""
    server = socket.create_server(("127.0.0.1", 0))
    client = ViccClient(Echo(), port=server.getsockname()[1])
    client.connect(timeout=2)
    peer, _ = server.accept()
    peer.settimeout(5)
    yield client, peer
    peer.close()
    server.close()


def _serving(client: ViccClient, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=client.serve, kwargs={"stop": stop})
    thread.start()
    return thread


def test_a_message_that_pauses_past_the_poll_interval_is_still_answered(
    vpcd: tuple[ViccClient, socket.socket],
) -> None:
    client, peer = vpcd
    stop = threading.Event()
    thread = _serving(client, stop)
    apdu = bytes.fromhex("80CA000002ABCD")
    framed = len(apdu).to_bytes(2, "big") + apdu
    peer.sendall(framed[:1])  # half the length: the client's receive timeout passes meanwhile
    time.sleep(2.5 * _vicc._POLL)
    peer.sendall(framed[1:4])
    time.sleep(2.5 * _vicc._POLL)
    peer.sendall(framed[4:])
    assert peer.recv(16) == b"\x00\x04\xab\xcd\x90\x00"
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_an_idle_card_sees_its_stop_within_the_poll_interval(
    vpcd: tuple[ViccClient, socket.socket],
) -> None:
    client, _ = vpcd
    stop = threading.Event()
    thread = _serving(client, stop)
    time.sleep(0.1)
    stop.set()
    thread.join(5 * _vicc._POLL)
    assert not thread.is_alive()


def test_vpcd_stopping_mid_message_takes_the_card_away(
    vpcd: tuple[ViccClient, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_vicc, "_MID_MESSAGE", 0.5)
    client, peer = vpcd
    peer.sendall(b"\x00\x07\x80\xca")  # three bytes of a seven-byte message never come
    assert client.serve(until=time.monotonic() + 5) is False
    assert peer.recv(1) == b""  # the card left the field

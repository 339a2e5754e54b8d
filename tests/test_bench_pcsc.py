"""The replay card of the pcscd benchmark: the wire only, answers from a recording."""

from __future__ import annotations

import socket
import threading

from farelab.bench.pcsc import replay_card


def _exchange(peer: socket.socket, message: bytes) -> bytes:
    peer.sendall(len(message).to_bytes(2, "big") + message)
    length = int.from_bytes(peer.recv(2), "big")
    return peer.recv(length)


def test_the_replay_card_answers_in_turn_and_gives_its_atr_to_presence_polls() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    answers = [b"\x6f\x00\x90\x00", b"\x00\x00\x13\x88\x90\x00"]
    card = threading.Thread(
        target=replay_card, args=(server.getsockname()[1], b"\x3b\x00", answers, None)
    )
    card.start()
    peer, _ = server.accept()
    peer.settimeout(5)
    with peer, server:
        peer.sendall(b"\x00\x01\x01")  # power on: no answer
        assert _exchange(peer, b"\x04") == b"\x3b\x00"  # the ATR, for vpcd's presence poll
        assert _exchange(peer, bytes.fromhex("00A4040000")) == answers[0]
        assert _exchange(peer, bytes.fromhex("805C000204")) == answers[1]
        assert _exchange(peer, bytes.fromhex("00A4040000")) == answers[0]  # round again
    card.join(5)
    assert not card.is_alive()  # vpcd hung up: the card is done

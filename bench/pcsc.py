"""A metro-exit tap through pcscd, and how much of it is ours.

Our virtual card sits in vpcd's first slot, served by our vicc client in a process of its own (in
the field the card is not in the reader's process either); the host side is the validator on a
:class:`card.PcscReader`.  The same tap's exchanges are replayed through the same pcscd to vpcd's
second slot, where a minimal card answers from the recording: the host side sends the recorded
commands with bare ``SCardTransmit`` calls, the card side reads each message and writes the next
recorded answer.  Both see the same wire (the same commands and answers, the card connected once,
vpcd's presence polls), so ``tap − replay`` is our software's share: the validator, the PC/SC
wrapper, the vicc client and the simulated card.  Tap and replay rounds alternate (in turn
first), so that the machine's drift touches both alike.

Runs alone as ``python -m farelab.bench.pcsc [N]`` (under ``flock /tmp/farelab-pcscd.lock``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from farelab.bench._taps import TapBench, bench_card, percentile
from farelab.card import VICC_PORT, Reader, ViccClient

# pyscard is loaded by the measure only: the air model imports Exchanges without it.

__all__ = ["REPLAY_READER", "Exchanges", "measure", "replay_card"]

REPLAY_READER = "Virtual PCD 00 01"
"""vpcd's second slot (its card connects one port above the first's), where the replay card
sits."""

_GET_BALANCE = bytes.fromhex("805C000204")
_CTRL_ATR = 4
_START_S = 30.0  # a spawned process imports farelab first; on a loaded machine that takes a while


class Exchanges:
    """A reader that keeps every command and answer (for the air model and the replay)."""

    def __init__(self, reader: Reader) -> None:
        """``reader``: the reader whose exchanges are kept (everything else passes through)."""
        self.reader = reader
        self.exchanges: list[tuple[bytes, bytes]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.reader, name)

    def transmit(self, apdu: bytes) -> bytes:
        """Pass ``apdu`` on and keep it with its answer."""
        answer = self.reader.transmit(apdu)
        self.exchanges.append((apdu, answer))
        return answer


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("vpcd hung up")
        buf += chunk
    return buf


def replay_card(port: int, atr: bytes, answers: list[bytes], ready: Connection | None) -> None:
    """A card in vpcd's slot at ``port`` that answers every C-APDU with the next of ``answers``
    (in turn, round and round), vpcd's ATR requests with ``atr`` and nothing else: no card
    software, the wire only.  Sends ``"ready"`` on ``ready`` once connected; returns when vpcd
    hangs up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    framed = [len(a).to_bytes(2, "big") + a for a in answers]
    framed_atr = len(atr).to_bytes(2, "big") + atr
    # as our vicc client reads the wire: vpcd writes a message's length and its bytes apart,
    # and Nagle holds the bytes until the length is acknowledged (by reading it, at once)
    turn = 0
    if ready is not None:
        ready.send("ready")
    with contextlib.suppress(ConnectionError), sock:
        while True:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            length = int.from_bytes(_recv_exact(sock, 2), "big")
            message = _recv_exact(sock, length)
            if length == 1 and message[0] == _CTRL_ATR:
                sock.sendall(framed_atr)
            elif length > 1:
                sock.sendall(framed[turn])
                turn = (turn + 1) % len(framed)


def _present_bench_card(port: int, ready: Connection) -> None:
    """The bench card in vpcd's slot at ``port``, served by our vicc client until vpcd hangs up
    (or the process is ended)."""
    client = ViccClient(bench_card(), port=port)
    client.connect(timeout=5)
    ready.send("ready")
    client.serve()


@contextlib.contextmanager
def _process(target: Any, *args: object) -> Iterator[BaseProcess]:
    """``target(*args, ready)`` in a process of its own, once it has said it is ready; ended
    at the end of the block."""
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    ours, theirs = context.Pipe(duplex=False)
    proc = context.Process(target=target, args=(*args, theirs), daemon=True)
    proc.start()
    try:
        if not wait([ours, proc.sentinel], _START_S) or not ours.poll():
            raise RuntimeError(
                f"{target.__name__} did not connect to vpcd in {_START_S:g} s (exit code "
                f"{proc.exitcode})"
            )
        ours.recv()
        yield proc
    finally:
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


class _BareSlot:
    """The replay's host side: one PC/SC context and card handle, bare ``SCardTransmit``."""

    def __init__(self, name: str) -> None:
        from smartcard import scard  # noqa: PLC0415

        from farelab.card import PcscReader  # noqa: PLC0415

        hresult, self.context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        self._check(hresult, "SCardEstablishContext")
        waiting = PcscReader(name)
        try:
            if not waiting.wait_for_card(5):
                raise RuntimeError(f"the replay card never appeared in {name!r}")
        finally:
            waiting.close()
        hresult, self.card, self.protocol = scard.SCardConnect(
            self.context,
            name,
            scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        self._check(hresult, "SCardConnect")

    @staticmethod
    def _check(hresult: int, what: str) -> None:
        from smartcard import scard  # noqa: PLC0415

        if hresult != scard.SCARD_S_SUCCESS:
            raise RuntimeError(f"{what}: {scard.SCardGetErrorMessage(hresult)}")

    def close(self) -> None:
        from smartcard import scard  # noqa: PLC0415

        scard.SCardDisconnect(self.card, scard.SCARD_UNPOWER_CARD)
        scard.SCardReleaseContext(self.context)


def measure(
    n: int, folder: Path, out: dict[str, float], samples: dict[str, list[float]], apdus: int
) -> None:
    """``n`` metro-exit taps through pcscd, each followed or preceded (in turn) by a replay of
    one tap's ``apdus`` exchanges, in one pcscd started for this (or the one that runs).

    Figures in ``out`` (ms): ``tap_pcsc_p50_ms``, ``tap_pcsc_p99_ms``, ``tap_pcsc_replay_p50_ms``,
    ``tap_pcsc_replay_p99_ms``, ``tap_pcsc_overhead_p50_ms`` / ``_p99_ms`` (tap − replay, our
    software's share), ``pcsc_apdu_p50_ms`` (one bare SCardTransmit round trip to the replay card)
    and ``pcsc_presence_detect_ms`` (card connected to vpcd → pcscd reports it).  ``samples``
    gets the sorted ms of each: ``tap_pcsc``, ``tap_pcsc_replay``, ``pcsc_apdu``.
    :class:`RuntimeError` if a tap is refused or does not take ``apdus`` exchanges."""
    from farelab.card import VIRTUAL_READER, PcscReader, running_pcscd  # noqa: PLC0415

    with running_pcscd(folder / "pcscd.log"), _process(_present_bench_card, VICC_PORT):
        detected = time.perf_counter()
        reader = PcscReader(VIRTUAL_READER)
        try:
            if not reader.wait_for_card(5):
                raise RuntimeError("the virtual card never appeared")
            out["pcsc_presence_detect_ms"] = (time.perf_counter() - detected) * 1000
            atr = reader.connect()
            tb = TapBench.make("metro", folder / "j-pcsc.db", reader=reader)
            recording = Exchanges(reader)
            tb.reader = recording  # type: ignore[assignment]
            _tap(tb, 0)
            recording.exchanges.clear()
            _tap(tb, 1)
            tb.reader = reader
            exit_tap = recording.exchanges
            if len(exit_tap) != apdus:
                raise RuntimeError(f"the exit tap took {len(exit_tap)} APDUs, not {apdus}")
            answers = [a for _, a in exit_tap]
            with _process(replay_card, VICC_PORT + 1, atr, answers):
                bare = _BareSlot(REPLAY_READER)
                try:
                    taps, replays, round_trips = _rounds(n, tb, bare, [c for c, _ in exit_tap])
                finally:
                    bare.close()
        finally:
            reader.close()
    for key, times in (("tap_pcsc", taps), ("tap_pcsc_replay", replays)):
        samples[key] = _ms(times)
        out[f"{key}_p50_ms"] = percentile(times, 0.5) * 1000
        out[f"{key}_p99_ms"] = percentile(times, 0.99) * 1000
    samples["pcsc_apdu"] = _ms(round_trips)
    out["pcsc_apdu_p50_ms"] = percentile(round_trips, 0.5) * 1000
    for q in ("p50", "p99"):
        out[f"tap_pcsc_overhead_{q}_ms"] = out[f"tap_pcsc_{q}_ms"] - out[f"tap_pcsc_replay_{q}_ms"]


def _ms(seconds: list[float]) -> list[float]:
    return [round(t * 1000, 4) for t in seconds]


def _tap(tb: TapBench, i: int) -> float:
    if i % 200 == 199:
        tb.journal.checkpoint()  # as the run loop does, off the taps' path
    result, seconds = tb.tap(i)
    if result.result != "accepted":
        raise RuntimeError(f"benchmark tap refused: {result}")
    return seconds


def _rounds(
    n: int, tb: TapBench, bare: _BareSlot, commands: list[bytes]
) -> tuple[list[float], list[float], list[float]]:
    """Sorted seconds of ``n`` exit taps, ``n`` replays, and ``3 n`` bare round trips."""
    from smartcard import scard  # noqa: PLC0415

    transmit, card, protocol = scard.SCardTransmit, bare.card, bare.protocol
    lists = [list(c) for c in commands]
    taps: list[float] = []
    replays: list[float] = []

    def replay() -> None:
        start = time.perf_counter()
        for command in lists:
            transmit(card, protocol, command)
        replays.append(time.perf_counter() - start)

    for r in range(n):
        i = 2 * r + 2  # the recorded entry and exit were taps 0 and 1
        _tap(tb, i)  # the entry, not timed
        if r % 2:
            replay()
        taps.append(_tap(tb, i + 1))
        if not r % 2:
            replay()
    round_trips = []
    balance = list(_GET_BALANCE)
    for _ in range(3 * n):
        start = time.perf_counter()
        transmit(card, protocol, balance)
        round_trips.append(time.perf_counter() - start)
    return sorted(taps), sorted(replays), sorted(round_trips)


def main(argv: list[str]) -> int:
    """``python -m farelab.bench.pcsc [N]``: the figures of N taps (default 500) as JSON."""
    import argparse  # noqa: PLC0415

    from farelab.bench._args import count  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m farelab.bench.pcsc",
        description="A metro-exit tap through pcscd and the vpcd virtual reader, against the "
        "same exchanges replayed with no software on either side: our time in a tap (tap − "
        "replay, p50 and p99), the bare SCardTransmit round trip and presence detection, as "
        "JSON (ms). Needs pcscd and vsmartcard-vpcd; run it alone (flock "
        "/tmp/farelab-pcscd.lock).",
    )
    parser.add_argument(
        "taps", nargs="?", type=count, default=500, help="taps to time (default 500)"
    )
    n = parser.parse_args(argv).taps
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        measure(n, Path(folder), out, {}, 8)
    print(json.dumps({k: round(v, 3) for k, v in sorted(out.items())}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

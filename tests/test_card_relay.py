"""The relay: a card in one reader presented in the virtual reader, as a terminal under test
sees it — forwarded, recorded, misbehaving on request, and gone when it leaves the real reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farelab.card import (
    CardLeftError,
    CardRemovedError,
    CardSnapshot,
    InProcessReader,
    Purchase,
    PurchaseDone,
    ReadCard,
    ReaderError,
    ReaderUnavailableError,
    RelayCard,
    SimulatedCard,
    drive,
    read_trace,
)
from tests.cli_support import farelab, start_farelab
from tests.test_card_behaviour import (
    GET_BALANCE,
    SELECT,
    WHEN,
    Served,
    balance_of,
    connect,
    plain_card,
    psam,
)

SLOT0, SLOT1 = "Virtual PCD 00 00", "Virtual PCD 00 01"


def in_field(card: SimulatedCard) -> InProcessReader:
    reader = InProcessReader("real")
    reader.insert(card)
    return reader


def test_a_relayed_card_answers_what_the_real_card_answers() -> None:
    sim = plain_card()
    reader = in_field(sim)
    relayed = RelayCard(reader, reader.connect())
    assert relayed.power_on() == sim.atr()
    assert relayed.transmit(SELECT)[-2:] == b"\x90\x00"
    assert balance_of(relayed.transmit(GET_BALANCE)) == 5000


def test_the_real_card_leaving_its_reader_is_the_relayed_card_leaving_the_field() -> None:
    reader = in_field(plain_card())
    relayed = RelayCard(reader, reader.connect())
    relayed.power_on()
    reader.remove()
    with pytest.raises(CardLeftError) as left:
        relayed.transmit(SELECT)
    assert left.value.away is None  # back only when someone puts it back


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--from", "Virtual PCD 00 00"], 'is not "pcsc:READER"'),
        (["--from", "pcsc:Virtual PCD 00 00", "--to", "vpcd:nowhere"], "--to 'vpcd:nowhere'"),
        (["--from", "pcsc:Virtual PCD 00 00", "--log", "x.jsonl"], "--log needs --behaviour"),
        # "no PC/SC reader 'No Such Reader 9'", or that pcscd is not running
        (["--from", "pcsc:No Such Reader 9"], "farelab: error:"),
    ],
)
def test_card_relay_refuses_bad_input_in_one_line(options: list[str], message: str) -> None:
    done = farelab("card", "relay", *options, timeout=30)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


# --- through pcscd: a card in slot 0 relayed into slot 1 --------------------------------------


class Relay:
    """``farelab card relay`` from slot 0 into slot 1, as a tester runs it."""

    def __init__(self, *options: str) -> None:
        self.proc = start_farelab(
            *("card", "relay", "--from", f"pcsc:{SLOT0}", "--to", "vpcd:127.0.0.1:35964"),
            *options,
            # A stop that hangs ends after its grace with every thread's stack on stderr.
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        # Both streams read as they come: a relay blocked on a full stderr pipe would not stop.
        self._reading = threading.Thread(target=self._read, daemon=True)
        self._reading.start()
        self._reading_errors = threading.Thread(target=self._read_errors, daemon=True)
        self._reading_errors.start()
        deadline = time.monotonic() + 10
        while not any("relaying" in line for line in self.lines):
            assert time.monotonic() < deadline, "card relay did not start"
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.errors.append(line)

    def stop(self) -> tuple[int, str, str]:
        """SIGTERM, as a tester's script ends it: exit status, output, errors."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                "card relay still running 15 s after SIGTERM; its stderr:\n" + "".join(self.errors)
            ) from None
        self._reading.join(5)
        self._reading_errors.join(5)
        return self.proc.returncode, "".join(self.lines), "".join(self.errors)


@pytest.fixture
def slot1(pcscd: None) -> Iterator[Any]:
    from farelab.card import PcscReader  # noqa: PLC0415

    reader = PcscReader(SLOT1)
    yield reader
    reader.close()


@pytest.fixture
def real_card(pcscd: None) -> Iterator[SimulatedCard]:
    """A farelab card in slot 0: the 'real' card the relay reads."""
    sim = plain_card()
    served = Served(sim)  # type: ignore[arg-type]
    yield sim
    if served.thread.is_alive():
        served.remove()


@pytest.mark.pcsc
def test_a_tap_on_the_relayed_card_debits_the_real_card_and_is_traced(
    slot1: Any, real_card: SimulatedCard, tmp_path: Path
) -> None:
    trace = tmp_path / "relay.jsonl"
    relay = Relay("--trace", str(trace))
    try:
        assert slot1.wait_for_card(5)
        connect(slot1)
        snapshot = drive(slot1, ReadCard(records=[]))
        assert isinstance(snapshot, CardSnapshot)
        done = drive(slot1, Purchase(psam=psam(), card=snapshot, amount=200, when=WHEN))
        assert isinstance(done, PurchaseDone)
        assert done.mac2_valid
        slot1.disconnect()
    finally:
        code, out, err = relay.stop()
    assert (code, err) == (0, "")
    assert real_card.image.balance == 4800
    assert "relayed" in out
    commands = [item.command[1] for item in read_trace(trace) if hasattr(item, "command")]
    assert 0x54 in commands  # the DEBIT went through the relay
    assert all(item.reader == SLOT0 for item in read_trace(trace))


@pytest.mark.pcsc
def test_a_behaviour_applied_by_the_relay_is_seen_in_the_virtual_reader(
    slot1: Any, real_card: SimulatedCard, tmp_path: Path
) -> None:
    rules = tmp_path / "status.toml"
    rules.write_text(
        '[[rule]]\nwhen = { command = "GET_BALANCE", occurrence = 1 }\n'
        'do = { action = "status", sw = "6A82" }\n'
    )
    log = tmp_path / "firings.jsonl"
    relay = Relay("--behaviour", str(rules), "--log", str(log))
    try:
        assert slot1.wait_for_card(5)
        connect(slot1)
        slot1.transmit(SELECT)
        assert slot1.transmit(GET_BALANCE) == b"\x6a\x82"
        assert balance_of(slot1.transmit(GET_BALANCE)) == 5000
        slot1.disconnect()
    finally:
        code, _, err = relay.stop()
    assert (code, err) == (0, "")
    firings = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(f["command"], f["do"], f["sw"]) for f in firings] == [
        ("GET_BALANCE", "status", "6A82")
    ]


@pytest.mark.pcsc
def test_the_card_pulled_from_the_real_reader_leaves_the_virtual_reader(
    slot1: Any, pcscd: None
) -> None:
    served = Served(plain_card())  # type: ignore[arg-type]
    relay = Relay()
    try:
        assert slot1.wait_for_card(5)
        served.remove()
        assert slot1.wait_for_removal(3)
        served = Served(plain_card())  # type: ignore[arg-type]
        assert slot1.wait_for_card(5)  # put back: relayed again
    finally:
        code, out, err = relay.stop()
        served.remove()
    assert (code, err) == (0, "")
    assert out.count(") relayed") == 2
    assert "relay stopped; 2 card presentations relayed" in out
    assert "card left the virtual reader" in out


@pytest.mark.pcsc
def test_a_vanish_applied_by_the_relay_tears_the_tap_and_the_card_comes_back(
    slot1: Any, real_card: SimulatedCard, tmp_path: Path
) -> None:
    rules = tmp_path / "vanish.toml"
    rules.write_text(
        '[[rule]]\nwhen = { command = "DEBIT", occurrence = 1 }\n'
        'do = { action = "vanish", moment = "after", away_ms = 500 }\n'
    )
    relay = Relay("--behaviour", str(rules))
    try:
        assert slot1.wait_for_card(5)
        connect(slot1)
        snapshot = drive(slot1, ReadCard(records=[]))
        assert isinstance(snapshot, CardSnapshot)
        with pytest.raises(CardRemovedError):
            drive(slot1, Purchase(psam=psam(), card=snapshot, amount=200, when=WHEN))
        assert real_card.image.balance == 4800  # the real card committed the DEBIT
        assert slot1.wait_for_removal(3)
        assert slot1.wait_for_card(5)  # put back by the relay after away_ms
        connect(slot1)
        slot1.transmit(SELECT)
        assert balance_of(slot1.transmit(GET_BALANCE)) == 4800
        slot1.disconnect()
    finally:
        code, _, err = relay.stop()
    assert (code, err) == (0, "")


@pytest.mark.pcsc
def test_card_relay_without_a_card_says_it_waits_and_stops_cleanly(pcscd: None) -> None:
    relay = Relay()
    code, out, err = relay.stop()
    assert (code, err) == (0, "")
    assert "waiting for one" in out
    assert "relay stopped; 0 card presentations relayed" in out


@pytest.mark.pcsc
def test_a_card_muted_by_the_relay_leaves_when_pulled_from_the_real_reader(
    slot1: Any, pcscd: None, tmp_path: Path
) -> None:
    rules = tmp_path / "mute.toml"
    rules.write_text('[[rule]]\nwhen = { command = "GET_BALANCE" }\ndo = "mute"\n')
    served = Served(plain_card())  # type: ignore[arg-type]
    relay = Relay("--behaviour", str(rules))
    try:
        assert slot1.wait_for_card(5)
        connect(slot1)
        slot1.transmit(SELECT)
        outcome: list[BaseException] = []

        def terminal() -> None:
            try:
                slot1.transmit(GET_BALANCE)
            except ReaderError as exc:
                outcome.append(exc)

        waiting = threading.Thread(target=terminal, daemon=True)
        waiting.start()
        waiting.join(0.8)
        assert waiting.is_alive()  # the relayed card answers nothing
        served.remove()  # the real card leaves its reader
        waiting.join(5)
        assert [type(x) for x in outcome] == [CardRemovedError]
        assert slot1.wait_for_removal(3)
    finally:
        code, _, err = relay.stop()
    assert (code, err) == (0, "")


# --- the source reader going away mid-run ---------------------------------------------------


class Unpluggable:
    """A source reader that can be unplugged: from then on every call says it is gone, as
    pyscard does for a USB reader pulled out. Each relay thread gets its own view of one field."""

    def __init__(self, field: InProcessReader, unplugged: threading.Event) -> None:
        self.field = field
        self.unplugged = unplugged

    @property
    def name(self) -> str:
        return "USB reader"

    def _check(self) -> None:
        if self.unplugged.is_set():
            raise ReaderUnavailableError("the reader 'USB reader' is gone")

    def wait_for_card(self, timeout: float) -> bool:
        self._check()
        return self.field.wait_for_card(timeout)

    def wait_for_removal(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._check()
            if self.field.wait_for_removal(0.02) or time.monotonic() >= deadline:
                return self.field.card is None

    def connect(self) -> bytes:
        self._check()
        return self.field.connect()

    def transmit(self, apdu: bytes) -> bytes:
        self._check()
        return self.field.transmit(apdu)

    def disconnect(self) -> None:
        """Nothing to power down on a reader that is gone."""


class RelayThread:
    """:func:`relay` from an unpluggable reader into slot 1, on a thread; what it raised."""

    def __init__(self) -> None:
        from farelab.card import relay  # noqa: PLC0415

        self.field = in_field(plain_card())
        self.unplugged = threading.Event()
        self.stop = threading.Event()
        self.raised: list[BaseException] = []

        def run() -> None:
            try:
                relay(
                    lambda: Unpluggable(self.field, self.unplugged),
                    stop=self.stop,
                    port=35964,
                )
            except BaseException as exc:
                self.raised.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def ended(self, timeout: float) -> bool:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(5)
            return False
        return True


@pytest.mark.pcsc
def test_a_source_reader_unplugged_while_idle_ends_the_relay_and_empties_the_virtual_reader(
    slot1: Any,
) -> None:
    relayed = RelayThread()
    assert slot1.wait_for_card(5)
    relayed.unplugged.set()  # pulled out with the card on it, nobody talking to it
    assert relayed.ended(5), "the relay kept running without its reader"
    assert [type(x) for x in relayed.raised] == [ReaderUnavailableError]
    assert slot1.wait_for_removal(3)  # the terminal under test sees the card leave


@pytest.mark.pcsc
def test_a_source_reader_unplugged_mid_command_fails_the_terminals_command_and_ends_the_relay(
    slot1: Any,
) -> None:
    relayed = RelayThread()
    assert slot1.wait_for_card(5)
    connect(slot1)
    assert slot1.transmit(SELECT)[-2:] == b"\x90\x00"
    relayed.unplugged.set()
    with pytest.raises(CardRemovedError):
        slot1.transmit(GET_BALANCE)  # the command that found the reader gone
    assert relayed.ended(5), "the relay kept running without its reader"
    assert [type(x) for x in relayed.raised] == [ReaderUnavailableError]
    assert slot1.wait_for_removal(3)
    assert relayed.field.card is not None  # the card itself was never written or taken

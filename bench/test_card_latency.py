"""Per-APDU round trip and tap time, in-process and through pcscd (``pytest bench/
--benchmark-only``). Timing assertions live here, never in the unit tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from card import CST, InProcessReader, MemoryStore, SimulatedCard, personalise
from card._pcscd import VIRTUAL_READER, running_pcscd
from tests.validator_support import Lab, bus, gate

GET_BALANCE = bytes.fromhex("805C000204")
SELECT = bytes.fromhex("00A4040008A000000632010105")


def _card() -> SimulatedCard:
    """A card rich enough for thousands of taps (beyond the 1000-yuan cap on purpose)."""
    image = personalise(serial="1", issued=date(2026, 1, 1))
    image = image.replace(balance=10**8, max_balance=10**9)
    return SimulatedCard(image, store=MemoryStore(), entropy=bytes)


def test_apdu_round_trip_in_process(benchmark: Any) -> None:
    reader = InProcessReader()
    reader.insert(_card())
    reader.transmit(SELECT)
    assert benchmark(reader.transmit, GET_BALANCE)[-2:] == b"\x90\x00"


@pytest.fixture(scope="module")
def pcsc_reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from card._pcsc import PcscReader  # noqa: PLC0415
    from card._vicc import ViccClient  # noqa: PLC0415

    with running_pcscd(tmp_path_factory.mktemp("pcscd") / "log"):
        client = ViccClient(_card())
        client.connect(timeout=5)
        stop = threading.Event()
        thread = threading.Thread(target=client.serve, kwargs={"stop": stop}, daemon=True)
        thread.start()
        reader = PcscReader(VIRTUAL_READER)
        assert reader.wait_for_card(5)
        reader.connect()
        yield reader
        reader.close()
        stop.set()
        thread.join(10)


def test_apdu_round_trip_pcscd(benchmark: Any, pcsc_reader: Any) -> None:
    pcsc_reader.transmit(SELECT)
    assert benchmark(pcsc_reader.transmit, GET_BALANCE)[-2:] == b"\x90\x00"


class _Taps:
    """Alternating entry/exit taps of one card at two gates, each at a later time."""

    def __init__(self, lab: Lab, reader: Any, card: SimulatedCard | None) -> None:
        self.lab, self.reader, self.card = lab, reader, card
        self.t = datetime(2026, 11, 23, 6, 0, tzinfo=CST)
        self.i = 0

    def __call__(self) -> Any:
        self.i += 1
        self.t += timedelta(minutes=2)
        if self.card is not None:
            self.reader.insert(self.card)
        device = "in" if self.i % 2 else "out"
        return self.lab.validators[device].tap(self.reader, self.t)


@pytest.mark.parametrize("kind", ["bus", "metro"])
def test_tap_in_process(benchmark: Any, kind: str, tmp_path: Path) -> None:
    from validator._journal import Journal  # noqa: PLC0415

    journal = Journal(tmp_path / "j.db", max_outbox=10**9)
    if kind == "bus":
        devices = [
            bus("taiyuan", device_id="in"),
            bus("taiyuan", device_id="out", terminal="000000000B02"),
        ]
    else:
        devices = [
            gate("taiyuan", "尖草坪", device_id="in"),
            gate("taiyuan", "西桥", device_id="out"),
        ]
    lab = Lab(devices, journal=journal)
    reader = InProcessReader()
    card = _card()
    taps = _Taps(lab, reader, card)
    result = benchmark.pedantic(taps, rounds=2000, iterations=1, warmup_rounds=20)
    assert result.result == "accepted"


def test_tap_pcscd(benchmark: Any, pcsc_reader: Any, tmp_path: Path) -> None:
    from validator._journal import Journal  # noqa: PLC0415

    lab = Lab(
        [gate("taiyuan", "尖草坪", device_id="in"), gate("taiyuan", "西桥", device_id="out")],
        journal=Journal(tmp_path / "j.db", max_outbox=10**9),
    )
    taps = _Taps(lab, pcsc_reader, None)
    result = benchmark.pedantic(taps, rounds=2000, iterations=1, warmup_rounds=20)
    assert result.result == "accepted"

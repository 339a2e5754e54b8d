"""Per-APDU round trip and tap time, in-process and through pcscd (``pytest bench/
--benchmark-only``). Timing assertions live here, never in the unit tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from farelab.bench._taps import TapBench
from farelab.card import (
    VIRTUAL_READER,
    InProcessReader,
    MemoryStore,
    SimulatedCard,
    personalise,
    running_pcscd,
)

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
    from farelab.card import PcscReader, ViccClient  # noqa: PLC0415

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
    """Alternating taps of one card at the bench's two devices, each at a later time."""

    def __init__(self, bench: TapBench) -> None:
        self.bench = bench
        self.i = 0

    def __call__(self) -> Any:
        self.i += 1
        result, _ = self.bench.tap(self.i)
        return result


@pytest.mark.parametrize("kind", ["bus", "metro"])
def test_tap_in_process(benchmark: Any, kind: str, tmp_path: Path) -> None:
    taps = _Taps(TapBench.make(kind, tmp_path / "j.db"))
    result = benchmark.pedantic(taps, rounds=2000, iterations=1, warmup_rounds=20)
    assert result.result == "accepted"


def test_tap_pcscd(benchmark: Any, pcsc_reader: Any, tmp_path: Path) -> None:
    taps = _Taps(TapBench.make("metro", tmp_path / "j.db", reader=pcsc_reader))
    result = benchmark.pedantic(taps, rounds=2000, iterations=1, warmup_rounds=20)
    assert result.result == "accepted"

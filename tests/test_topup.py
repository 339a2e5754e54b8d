"""The kiosk: loads up to exactly 1000 yuan, one fen more refused at each of the three layers
(kiosk, host, card — each tested with the ones before it bypassed), bad amounts refused with
reasons, and torn loads settled on the next presentation: never lost, never paid twice."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import pytest

from farelab.backend._loads import ensure_schema, handle_load_message
from farelab.backend._localhost import LocalHost
from farelab.backend._registry import DeviceEntry, register
from farelab.backend._store import Store
from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    CardRemovedError,
    InProcessReader,
    LoadAuthority,
    MemoryStore,
    Reader,
    SimulatedCard,
    TacVerifier,
    personalise,
    step_of,
)
from farelab.topup import (
    AmountRules,
    CardView,
    HostUnreachableError,
    Kiosk,
    KioskJournal,
    LoadResult,
    parse_amount,
)

T = TypeVar("T")
TERMINAL = bytes.fromhex("0000F0000001")
KIOSK_1 = DeviceEntry(
    id="kiosk-1",
    role="kiosk",
    operator="kiosk-1",
    kinds=frozenset({"load", "refund"}),
    terminal=TERMINAL.hex().upper(),
)


class CapHost:
    """A host whose cap is set by the test (to bypass the host layer)."""

    def __init__(self, folder: Path, cap: int) -> None:
        self.store = Store(f"sqlite:///{folder / 'host.db'}")
        ensure_schema(self.store)
        register(self.store, KIOSK_1)
        self.authority = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS}, cap=cap)
        self.verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
        self.down = False

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise HostUnreachableError("the network is down")
        return handle_load_message(
            self.store, self.authority, self.verifier, "kiosk-1", json.dumps(message).encode()
        )

    def loads(self) -> dict[str, int]:
        rows = self.store.execute("SELECT status, sum(amount) FROM loads GROUP BY status")
        return {status: int(total) for status, total in rows.fetchall()}


class Station:
    def __init__(
        self,
        folder: Path,
        *,
        balance: int,
        card_cap: int = 100_000,
        host_cap: int = 100_000,
        rules: AmountRules | None = None,
    ) -> None:
        image = personalise(serial="66", issued=date(2026, 1, 1), balance=balance)
        self.card = SimulatedCard(image.replace(max_balance=card_cap), store=MemoryStore())
        self.reader = InProcessReader()
        self.reader.insert(self.card)
        self.host = CapHost(folder, host_cap)
        self.journal = KioskJournal(folder / "kiosk.db")
        self.kiosk = Kiosk(
            kiosk_id="kiosk-1",
            terminal_id=TERMINAL,
            host=self.host,
            journal=self.journal,
            rules=rules,
        )

    async def _run(self, fn: Callable[[Reader], T]) -> T:
        return fn(self.reader)

    async def load(self, amount: int | None) -> LoadResult:
        result = await self.kiosk.load(self._run, amount)
        assert isinstance(result, LoadResult)
        return result

    async def present_again(self) -> object:
        if self.reader.card is None:
            self.reader.insert(self.card)
        return await self.kiosk.present(self._run)


async def test_load_to_exactly_1000_yuan(tmp_path: Path) -> None:
    station = Station(tmp_path, balance=90_000)
    result = await station.load(10_000)
    assert (result.result, result.balance_fen) == ("loaded", 100_000)
    assert station.card.image.balance == 100_000
    assert station.host.loads() == {"confirmed": 10_000}


async def test_one_fen_more_is_refused_by_the_kiosk(tmp_path: Path) -> None:
    station = Station(tmp_path, balance=90_000)
    result = await station.load(10_001)
    assert (result.result, result.reason) == ("refused", "cap_exceeded")
    assert "at most 100.00 yuan" in result.message
    assert station.host.loads() == {}  # the host never heard of it


async def test_one_fen_more_is_refused_by_the_host_when_the_kiosk_is_bypassed(
    tmp_path: Path,
) -> None:
    station = Station(tmp_path, balance=90_000, card_cap=10**9, rules=AmountRules(cap_fen=10**9))
    result = await station.load(10_001)
    assert (result.result, result.reason) == ("refused", "cap_exceeded")
    assert station.card.image.balance == 90_000


async def test_one_fen_more_is_refused_by_the_card_when_kiosk_and_host_are_bypassed(
    tmp_path: Path,
) -> None:
    station = Station(tmp_path, balance=90_000, host_cap=10**9, rules=AmountRules(cap_fen=10**9))
    result = await station.load(10_001)
    assert (result.result, result.reason) == ("refused", "cap_exceeded")
    assert "6985" in result.message
    assert station.card.image.balance == 90_000


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0", "bad_amount"),
        ("-1", "bad_amount"),
        ("0.001", "bad_amount"),
        ("abc", "bad_amount"),
        ("1e3", "bad_amount"),
        ("99999999990", "cap_exceeded"),
        ("5", "bad_amount"),
    ],
)
async def test_bad_amounts_are_refused_with_reasons(tmp_path: Path, text: str, reason: str) -> None:
    station = Station(tmp_path, balance=0, rules=AmountRules(unit_fen=1000, minimum_fen=1000))
    result = await station.load(parse_amount(text))
    assert (result.result, result.reason) == ("refused", reason)
    assert station.card.image.balance == 0


async def test_host_unreachable_refuses_clearly(tmp_path: Path) -> None:
    station = Station(tmp_path, balance=0)
    station.host.down = True
    result = await station.load(1000)
    assert (result.result, result.reason) == ("refused", "host_unreachable")
    assert station.card.image.balance == 0


@pytest.mark.parametrize("step", ["SELECT", "INIT", "CREDIT"])
async def test_card_pulled_at_each_step_is_settled_on_the_next_presentation(
    tmp_path: Path, step: str
) -> None:
    station = Station(tmp_path, balance=1000)
    station.reader.pull_after(lambda apdu: step_of(apdu) == step)
    first = await station.load(5000)
    assert (first.result, first.reason) == ("refused", "card_removed")
    view = await station.present_again()
    assert isinstance(view, CardView)
    loads = station.host.loads()
    if step == "CREDIT":  # the card took it: confirmed, paid, once
        assert station.card.image.balance == 6000
        assert loads == {"confirmed": 5000}
        assert view.settled
    else:  # it never reached the card: nothing paid
        assert station.card.image.balance == 1000
        assert loads.get("confirmed", 0) == 0
    assert station.journal.unsettled() == []


async def test_credit_lost_on_the_air_is_voided_not_paid(tmp_path: Path) -> None:
    station = Station(tmp_path, balance=1000)
    original = station.card.transmit

    def lossy(apdu: bytes) -> bytes:
        if apdu[1] == 0x52:
            raise CardRemovedError("the CREDIT never reached the card")
        return original(apdu)

    station.card.transmit = lossy  # type: ignore[method-assign]
    assert (await station.load(5000)).reason == "card_removed"
    station.card.transmit = original  # type: ignore[method-assign]
    await station.present_again()
    assert station.card.image.balance == 1000
    assert station.host.loads() == {"void": 5000}


async def test_local_host_is_used_without_a_broker(tmp_path: Path) -> None:
    host = LocalHost(tmp_path / "host.db", "kiosk-1", terminal=TERMINAL)
    image = personalise(serial="67", issued=date(2026, 1, 1), balance=0)
    reader = InProcessReader()
    reader.insert(SimulatedCard(image, store=MemoryStore()))
    kiosk = Kiosk(
        kiosk_id="kiosk-1", terminal_id=TERMINAL, host=host, journal=KioskJournal(tmp_path / "k.db")
    )

    async def run(fn: Callable[[Reader], T]) -> T:
        return fn(reader)

    result = await kiosk.load(run, 2000)
    assert (result.result, result.balance_fen) == ("loaded", 2000)
    host.close()


@pytest.mark.parametrize("step", ["INIT", "DEBIT"])
async def test_refund_torn_by_a_pulled_card_is_settled_on_the_next_presentation(
    tmp_path: Path, step: str
) -> None:
    from farelab.card import Psam, PsamKeys  # noqa: PLC0415

    station = Station(tmp_path, balance=4321)
    psam = Psam(terminal_id=TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
    station.reader.pull_after(lambda apdu: step_of(apdu) == step)
    first = await station.kiosk.refund(station._run, psam)
    assert (first.result, first.reason) == ("refused", "card_removed")
    view = await station.present_again()
    assert isinstance(view, CardView)
    refunded = station.host.store.execute(
        "SELECT coalesce(sum(amount), 0) FROM loads WHERE kind = 'refund'"
    ).fetchone()[0]
    if step == "DEBIT":  # the card was emptied: the host learns it, once
        assert (station.card.image.balance, refunded) == (0, 4321)
    else:
        assert (station.card.image.balance, refunded) == (4321, 0)
    assert station.journal.unsettled() == []

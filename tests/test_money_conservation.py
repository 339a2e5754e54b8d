"""No fen is created, lost or counted twice, whatever happens in between.

A random interleaving of rides (bus and metro gates, some torn right after the DEBIT or before
it), loads at a kiosk (some torn right after the CREDIT), cash refunds, exchanges of a card for
a new one with its balance moved by the host, journal resets (the validator's journal file
deleted and started again), uploads whose acks are lost, and redeliveries of old batches is
driven through the real validator journal, the real kiosk with its in-process host, and the real
ledger (SQLite, with its device registry).

After every step the ledger holds no card transaction twice and counts nothing a card never
did.  Whenever the system is brought to rest — every torn transaction settled at the card's next
presentation, every outbox uploaded — at random points and at the end, for every card

    balance on the card = issued + loads and transfers in − fares − refunds − transfer out

with everything on the right as the ledger counts it, each card's counted purchases and loads
are exactly its transaction counters' advance, and in total

    Σ balances of cards in use + Σ host-side outstanding = Σ issued + Σ loads − Σ fares − Σ refunds

where the outstanding is the balance of a surrendered card not yet moved to its replacement.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from farelab._devices import entry_of
from farelab.backend._ingest import classify
from farelab.backend._localhost import LocalHost
from farelab.backend._registry import register
from farelab.backend._store import Store
from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    InProcessReader,
    MemoryStore,
    Psam,
    PsamKeys,
    Reader,
    SimulatedCard,
    TacVerifier,
    personalise,
    step_of,
)
from farelab.protocol import decode_batch, encode_batch_records
from farelab.topup._journal import KioskJournal
from farelab.topup._station import Kiosk, LoadResult
from farelab.validator._device import Device
from farelab.validator._journal import Journal
from tests.validator_support import T0, Lab, bus, gate

T = TypeVar("T")
VERIFIER = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
KIOSK_TERMINAL = bytes.fromhex("0000F0000001")
PURCHASES = (0x06, 0x09)
LOAD = 0x02


@dataclass
class Holder:
    """One card and what the test knows of it from the outside."""

    card: SimulatedCard
    issued: int
    offline_start: int
    online_start: int
    surrendered: bool = False
    moved_out: int | None = None  # set once its balance went to a replacement
    refunded: bool = False


class Economy(RuleBasedStateMachine):
    """Cards, validators sharing one journal, a kiosk and its host, and the ledger."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="farelab-economy-"))
        self.ledger_path = self.dir / "ledger.db"
        self.store = Store(f"sqlite:///{self.ledger_path}")
        self.devices: list[Device] = [
            bus("taiyuan", device_id="bus-1"),
            gate("taiyuan", "尖草坪", device_id="gate-a"),
            gate("taiyuan", "西桥", device_id="gate-b"),
        ]
        for device in self.devices:
            register(self.store, entry_of(device))
        self.journal_path = self.dir / "journal.db"
        self.lab = Lab(self.devices, journal=Journal(self.journal_path))
        self.host = LocalHost(self.ledger_path, "kiosk-1", terminal=KIOSK_TERMINAL)
        self.kiosk_journal = KioskJournal(self.dir / "kiosk.db")
        self.kiosk = Kiosk(
            kiosk_id="kiosk-1",
            terminal_id=KIOSK_TERMINAL,
            host=self.host,
            journal=self.kiosk_journal,
        )
        self.psam = Psam(
            terminal_id=KIOSK_TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)}
        )
        self.holders: list[Holder] = []
        self.sent: list[tuple[str, bytes]] = []
        self.now = T0
        self.resets = 0

    # --- helpers -------------------------------------------------------------------------

    def _new_card(self, balance: int) -> Holder:
        serial = str(8100 + len(self.holders))
        image = personalise(serial=serial, issued=date(2026, 1, 1), balance=balance)
        card = SimulatedCard(image, store=MemoryStore(), entropy=bytes)
        holder = Holder(card, balance, image.offline_counter, image.online_counter)
        self.holders.append(holder)
        return holder

    def _serial(self, holder: Holder) -> str:
        return holder.card.image.public.serial

    def _live(self) -> list[Holder]:
        return [h for h in self.holders if not h.surrendered]

    def _pick(self, index: int) -> Holder:
        live = self._live()
        return live[index % len(live)]

    def _at_kiosk(
        self, holder: Holder, call: Callable[[Callable[..., Any]], Any], tear: bool = False
    ) -> Any:
        reader = InProcessReader()
        reader.insert(holder.card)
        if tear:
            reader.pull_after(lambda apdu: step_of(apdu) == "CREDIT")

        async def run(fn: Callable[[Reader], T]) -> T:
            return fn(reader)

        return asyncio.run(call(run))

    def _upload(self, device: str, limit: int, *, ack: bool) -> bool:
        journal = self.lab.journal
        rows = journal.outbox_wire(limit, device=device)
        if not rows:
            return False
        batch_id = journal.epoch << 40 | rows[0][0]
        payload = encode_batch_records(batch_id, device, [raw for _, raw in rows])
        self._ingest(device, payload)
        self.sent.append((device, payload))
        if ack:
            journal.acknowledge([row_id for row_id, _ in rows])
        return True

    def _ingest(self, device: str, payload: bytes) -> None:
        batch = decode_batch(payload)
        result = self.store.ingest(device, batch.batch_id, classify(batch, VERIFIER))
        assert not result.rejected, result

    def _transfer(self, old: Holder, *, onto: Holder) -> LoadResult:
        """The host moves ``old``'s balance onto ``onto`` (an exchange, Hangzhou: at once)."""
        result = self._at_kiosk(
            onto,
            lambda run: self.kiosk.transfer(
                run,
                old_serial=self._serial(old),
                reason="exchange",
                reported=self.now.date().isoformat(),
                profile="hangzhou",
            ),
        )
        assert isinstance(result, LoadResult)
        return result

    def _tap(self, holder: Holder, device: str, tear: str | None = None) -> None:
        self.lab.tap(device, holder.card, self.now, pull_after=tear)

    def _rest(self) -> None:
        """Settle every torn transaction at the card's next presentation, upload everything."""
        pending = set(self.lab.journal.pending())
        for holder in self._live():
            if self._serial(holder) in pending:
                self.now += timedelta(minutes=5)
                self._tap(holder, "bus-1")
        for holder in self._live():
            if self.kiosk_journal.unsettled(self._serial(holder)):
                self._at_kiosk(holder, self.kiosk.present)
        assert not self.lab.journal.pending()
        for device in self.devices:
            while self._upload(device.id, 500, ack=True):
                pass

    def _ledger(self, serial: str) -> dict[str, int]:
        rows = self.store.execute(
            "SELECT kind, tx_type, count(*), coalesce(sum(amount), 0) FROM transactions "
            "WHERE card_serial = ? AND verdict = 'ok' GROUP BY kind, tx_type",
            (serial,),
        ).fetchall()
        out = {"fares": 0, "loads": 0, "transfers_in": 0, "refunds": 0, "purchases": 0}
        out["credits"] = 0
        for kind, tx_type, count, total in rows:
            if tx_type == LOAD:
                out["credits"] += int(count)
                out["transfers_in" if kind == "transfer" else "loads"] += int(total)
            else:
                out["purchases"] += int(count)
                out["refunds" if kind == "refund" else "fares"] += int(total)
        return out

    # --- rules ---------------------------------------------------------------------------

    @initialize(balances=st.lists(st.integers(0, 3000), min_size=2, max_size=3))
    def issue_cards(self, balances: list[int]) -> None:
        for balance in balances:
            self._new_card(balance)

    @rule(
        index=st.integers(0, 10),
        device=st.sampled_from(["bus-1", "gate-a", "gate-b"]),
        tear=st.sampled_from([None, None, None, "DEBIT", "INIT"]),
        minutes=st.integers(0, 90),
    )
    def ride(self, index: int, device: str, tear: str | None, minutes: int) -> None:
        self.now += timedelta(minutes=minutes, seconds=1)
        self._tap(self._pick(index), device, tear)

    @rule(
        index=st.integers(0, 10),
        amount=st.sampled_from([1000, 5000, 10_000, 50_000, 100_000]),
        tear=st.booleans(),
    )
    def load(self, index: int, amount: int, tear: bool) -> None:
        holder = self._pick(index)
        self._at_kiosk(holder, lambda run: self.kiosk.load(run, amount), tear=tear)

    @rule(index=st.integers(0, 10))
    def present_at_kiosk(self, index: int) -> None:
        self._at_kiosk(self._pick(index), self.kiosk.present)

    @rule(
        device=st.sampled_from(["bus-1", "gate-a", "gate-b"]),
        limit=st.integers(1, 6),
        ack=st.booleans(),
    )
    def upload(self, device: str, limit: int, ack: bool) -> None:
        self._upload(device, limit, ack=ack)

    @precondition(lambda self: bool(self.sent))
    @rule(index=st.integers(0, 1000))
    def redeliver(self, index: int) -> None:
        device, payload = self.sent[index % len(self.sent)]
        self._ingest(device, payload)

    @precondition(lambda self: len(self._live()) > 1)
    @rule(index=st.integers(0, 10))
    def refund(self, index: int) -> None:
        holder = self._pick(index)
        self._rest()  # the outlet empties a card whose history has reached the host
        result = self._at_kiosk(holder, lambda run: self.kiosk.refund(run, self.psam))
        assert isinstance(result, LoadResult)
        if result.result == "refunded":
            holder.refunded = True

    @rule(index=st.integers(0, 10))
    def exchange(self, index: int) -> None:
        """A damaged card is handed in; once the devices have reported its rides, the host
        moves its balance onto a new card (Hangzhou: at once on an exchange)."""
        old = self._pick(index)
        self._rest()  # the outlet reads the card it takes in: a torn load on it is settled
        old.surrendered = True
        new = self._new_card(0)
        result = self._transfer(old, onto=new)
        if result.result == "loaded":
            assert result.amount_fen == old.card.image.balance
            old.moved_out = result.amount_fen
        # Refused (nothing to move, or no history at the host to move it by): the balance
        # stays outstanding on the host's side.

    @precondition(lambda self: any(h.moved_out is not None for h in self.holders))
    @rule(index=st.integers(0, 10), onto_itself=st.booleans())
    def transfer_again(self, index: int, onto_itself: bool) -> None:
        """Moving a card's balance a second time, or onto the old card itself, is refused."""
        old = next(h for h in self.holders if h.moved_out is not None)
        target = old if onto_itself else self._pick(index)
        result = self._transfer(old, onto=target)
        assert result.result == "refused", result

    @precondition(
        lambda self: self.lab.journal.outbox_count() == 0 and not self.lab.journal.pending()
    )
    @rule()
    def reset_journal(self) -> None:
        """The validator's journal file is deleted and started again (a replaced disk)."""
        self.lab.journal.close()
        for path in self.dir.glob("journal.db*"):
            path.unlink()
        self.lab = Lab(self.devices, journal=Journal(self.journal_path))
        self.resets += 1

    @rule()
    def come_to_rest(self) -> None:
        self._rest()
        self._check_books()

    # --- checks --------------------------------------------------------------------------

    @invariant()
    def each_card_transaction_counted_once(self) -> None:
        twice = self.store.execute(
            "SELECT card_serial, card_counter, tx_type, count(*) FROM transactions "
            "WHERE verdict = 'ok' GROUP BY card_serial, card_counter, tx_type "
            "HAVING count(*) > 1"
        ).fetchall()
        assert twice == []
        for holder in self.holders:
            image = holder.card.image
            ledger = self._ledger(self._serial(holder))
            assert ledger["purchases"] <= image.offline_counter - holder.offline_start
            assert ledger["credits"] <= image.online_counter - holder.online_start

    def _check_books(self) -> None:
        issued = loads = fares = refunds = in_use = outstanding = 0
        for holder in self.holders:
            image = holder.card.image
            ledger = self._ledger(self._serial(holder))
            moved = holder.moved_out or 0
            assert image.balance - moved == (
                holder.issued
                + ledger["loads"]
                + ledger["transfers_in"]
                - ledger["fares"]
                - ledger["refunds"]
                - moved
            ), (self._serial(holder), image.balance, ledger)
            assert ledger["purchases"] == image.offline_counter - holder.offline_start
            assert ledger["credits"] == image.online_counter - holder.online_start
            issued += holder.issued
            loads += ledger["loads"]
            fares += ledger["fares"]
            refunds += ledger["refunds"]
            if not holder.surrendered:
                in_use += image.balance
            elif holder.moved_out is None:
                outstanding += image.balance
        assert in_use + outstanding == issued + loads - fares - refunds
        assert (
            self.store.execute(
                "SELECT count(*) FROM transactions WHERE status = 'grey'"
            ).fetchone()[0]
            == 0
        )

    def teardown(self) -> None:
        try:
            if self.holders:
                self._rest()
                self._check_books()
        finally:
            self.lab.journal.close()
            self.kiosk_journal.close()
            self.host.close()
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)


Economy.TestCase.settings = settings(
    max_examples=int(os.environ.get("FARELAB_ECONOMY_EXAMPLES", "60")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_money_is_conserved_and_counted_once = Economy.TestCase

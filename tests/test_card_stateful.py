"""Hypothesis state machine over the card: random purchases, loads, forgeries, raw APDUs, power
cuts and torn transactions never break "balance = initial + loads − purchases", never pass the
1000-yuan cap, and a refused command never changes the purse."""

from __future__ import annotations

from datetime import UTC, date, datetime

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    Alg,
    CardImage,
    CardSnapshot,
    IssuerKeys,
    Load,
    LoadAuthority,
    LoadAuthorization,
    LoadDone,
    MemoryStore,
    NeedAuthorization,
    ProofFound,
    Psam,
    PsamKeys,
    Purchase,
    PurchaseDone,
    ReadCard,
    SimulatedCard,
    TransactionProof,
    Transmit,
    TxType,
    personalise,
)

WHEN = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)
TERMINAL = bytes.fromhex("0000000000A1")
WRONG_KEYS = IssuerKeys(purchase=bytes(16), load=bytes(16), tac=bytes(16), maintenance=bytes(16))
CAP = 100_000


def purse(image: CardImage) -> tuple[object, ...]:
    return (
        image.balance,
        image.offline_counter,
        image.online_counter,
        image.log,
        image.metro,
        image.bus,
        image.trips,
        image.proofs,
        image.blocked,
    )


class CardMachine(RuleBasedStateMachine):
    """The model is what the terminal side knows for certain, plus torn transactions resolved
    later with GET TRANSACTION PROOF."""

    def __init__(self) -> None:
        super().__init__()
        self.card: SimulatedCard
        self.expected = 0
        self.purchases = 0
        self.loads = 0
        self.torn: list[tuple[TxType, int, int]] = []  # (type, proof counter, signed amount)
        self.psam = Psam(terminal_id=TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
        self.forger = Psam(terminal_id=TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(WRONG_KEYS)})
        self.host = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS}, cap=10**9)

    @initialize(alg=st.sampled_from([Alg.TDES, Alg.SM4]), balance=st.integers(0, CAP))
    def issue(self, alg: Alg, balance: int) -> None:
        image = personalise(serial="77", issued=date(2026, 1, 1), balance=balance, alg=alg)
        self.card = SimulatedCard(image, store=MemoryStore(), entropy=bytes)
        self.card.power_on()
        self.expected = balance

    # --- plumbing ---------------------------------------------------------------------------

    def send(self, apdu: bytes) -> bytes:
        before = purse(self.card.image)
        answer = self.card.transmit(apdu)
        assert len(answer) >= 2
        if answer[-2:] != b"\x90\x00":
            assert purse(self.card.image) == before, (
                f"{apdu.hex()} -> {answer.hex()} changed the purse"
            )
        return answer

    def snapshot(self) -> CardSnapshot:
        flow = ReadCard(records=[])
        event: object = flow.start()
        while isinstance(event, Transmit):
            event = flow.receive(self.send(event.apdu))
        assert isinstance(event, CardSnapshot)
        return event

    # --- rules ------------------------------------------------------------------------------

    @rule(
        amount=st.integers(0, 120_000),
        composite=st.booleans(),
        forged=st.booleans(),
        tear_at=st.none() | st.integers(0, 3),
    )
    def purchase(self, amount: int, composite: bool, forged: bool, tear_at: int | None) -> None:
        self.resolve_torn()
        snap = self.snapshot()
        psam = self.forger if forged else self.psam
        flow = Purchase(psam=psam, card=snap, amount=amount, when=WHEN, composite=composite)
        event: object = flow.start()
        sent = 0
        while isinstance(event, Transmit):
            answer = self.send(event.apdu)
            sent += 1
            if tear_at is not None and sent > tear_at:
                self.card.power_off()  # the card left: this answer never arrived
                flight = flow.in_flight
                if flight is not None and flow.init is not None:
                    self.torn.append((flight.tx_type, flight.proof_counter, -amount))
                return
            event = flow.receive(answer)
        if isinstance(event, PurchaseDone):
            assert not forged
            assert event.mac2_valid
            assert amount <= self.expected
            self.expected -= amount
            self.purchases += 1
        else:
            assert forged or amount > self.expected

    @rule(amount=st.integers(1, 120_000), bypass_host=st.booleans(), tear=st.booleans())
    def load(self, amount: int, bypass_host: bool, tear: bool) -> None:
        self.resolve_torn()
        snap = self.snapshot()
        flow = Load(terminal_id=TERMINAL, card=snap, amount=amount)
        event = flow.receive(self.send(flow.start().apdu))
        if not isinstance(event, NeedAuthorization):
            assert self.expected + amount > CAP  # the card's own cap refusal (6985)
            return
        answer = self.host.authorize(event.request, when=WHEN)
        assert isinstance(answer, LoadAuthorization)
        mac2 = bytes(4) if bypass_host else answer.mac2
        credit = flow.authorize(mac2=mac2, day=answer.day, time=answer.time)
        reply = self.send(credit.apdu)
        if tear:
            self.card.power_off()
            self.torn.append((TxType.LOAD, event.request.counter + 1, amount))
            return
        result = flow.receive(reply)
        if isinstance(result, LoadDone):
            assert not bypass_host
            self.expected += amount
            self.loads += 1
        else:
            assert bypass_host

    @rule()
    def resolve_torn(self) -> None:
        """Next tap: ask the card whether each torn transaction completed."""
        self.card.power_on()
        self.send(bytes.fromhex("00A4040008A000000632010105"))
        for tx_type, counter, signed in self.torn:
            flow = TransactionProof(tx_type=tx_type, counter=counter)
            result = flow.receive(self.send(flow.start().apdu))
            if isinstance(result, ProofFound):
                self.expected += signed
                if tx_type is TxType.LOAD:
                    self.loads += 1
                else:
                    self.purchases += 1
        self.torn.clear()

    @rule(raw=st.binary(min_size=0, max_size=300))
    def raw_apdu(self, raw: bytes) -> None:
        self.send(raw)

    @rule(app=st.sampled_from(["A000000632010105", "D15600000100", "A000000333010101", "A0000006"]))
    def select(self, app: str) -> None:
        self.send(bytes.fromhex(f"00A40400{len(app) // 2:02X}{app}"))

    @rule()
    def power_cycle(self) -> None:
        self.card.power_off()
        self.card.power_on()

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def balance_is_loads_minus_purchases(self) -> None:
        if self.torn:
            return  # unresolved until the next proof round
        image = self.card.image
        assert image.balance == self.expected
        assert image.offline_counter == self.purchases
        assert image.online_counter == self.loads

    @invariant()
    def never_above_the_cap_nor_below_zero(self) -> None:
        assert 0 <= self.card.image.balance <= CAP


CardMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, derandomize=True, database=None
)
TestCardStateMachine = CardMachine.TestCase

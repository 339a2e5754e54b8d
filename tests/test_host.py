"""The host end: load authorization (R4 at the host) and TAC verification."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime

import pytest

from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    Alg,
    CardSnapshot,
    InProcessReader,
    Load,
    LoadAuthority,
    LoadAuthorization,
    LoadRefusal,
    LoadRequest,
    NeedAuthorization,
    ReadCard,
    SimulatedCard,
    TacVerifier,
    drive,
    personalise,
)

WHEN = datetime(2026, 11, 23, 1, 2, 3, tzinfo=UTC)
KIOSK = bytes.fromhex("00000000F001")


def _request(alg: Alg, balance: int, amount: int) -> LoadRequest:
    image = personalise(serial="5", issued=date(2026, 1, 1), balance=balance, alg=alg)
    reader = InProcessReader()
    reader.insert(SimulatedCard(image, entropy=bytes))
    snapshot = drive(reader, ReadCard(records=[]))
    assert isinstance(snapshot, CardSnapshot)
    # Ask the card for a small load so that it answers INIT; the request is then re-aimed at the
    # amount under test, as a kiosk that skipped its own cap check would send it.
    flow = Load(terminal_id=KIOSK, card=snapshot, amount=1)
    event = flow.receive(reader.transmit(flow.start().apdu))
    assert isinstance(event, NeedAuthorization)
    return replace(event.request, amount=amount)


@pytest.mark.parametrize("alg", [Alg.TDES, Alg.SM4])
def test_host_refuses_a_request_whose_mac1_was_not_made_by_the_card(alg: Alg) -> None:
    host = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS})
    request = _request(alg, 1000, 1)
    assert isinstance(host.authorize(request, when=WHEN), LoadAuthorization)
    forged = replace(request, mac1=bytes(4))
    answer = host.authorize(forged, when=WHEN)
    assert isinstance(answer, LoadRefusal)
    assert answer.reason == "bad_mac1"


def test_host_refuses_an_unknown_issuer() -> None:
    host = LoadAuthority(issuers={})
    answer = host.authorize(_request(Alg.TDES, 0, 1), when=WHEN)
    assert isinstance(answer, LoadRefusal)
    assert answer.reason == "unknown_issuer"


def test_host_checks_the_1000_yuan_cap_R4_even_when_the_kiosk_did_not() -> None:
    # MAC1 covers the amount, so a request re-aimed at another amount fails MAC1 first; build
    # the requests from cards asked for exactly those amounts instead.
    host = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS})
    image = personalise(serial="5", issued=date(2026, 1, 1), balance=40_000)
    reader = InProcessReader()
    reader.insert(SimulatedCard(image.replace(max_balance=10**9), entropy=bytes))
    snapshot = drive(reader, ReadCard(records=[]))
    assert isinstance(snapshot, CardSnapshot)
    answers = []
    for amount in (60_000, 60_001):
        flow = Load(terminal_id=KIOSK, card=snapshot, amount=amount)
        event = flow.receive(reader.transmit(flow.start().apdu))
        assert isinstance(event, NeedAuthorization)
        answers.append(host.authorize(event.request, when=WHEN))
    assert isinstance(answers[0], LoadAuthorization)
    assert isinstance(answers[1], LoadRefusal)
    assert answers[1].reason == "cap_exceeded"
    assert "at most 60000 fen" in answers[1].detail


@pytest.mark.parametrize("alg", [Alg.TDES, Alg.SM4])
def test_tac_verifier_tells_a_genuine_tac_from_a_forged_one(alg: Alg) -> None:
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
    image = personalise(serial="77", issued=date(2026, 1, 1), alg=alg)
    fields = {
        "alg": alg,
        "issuer_id": DEMO_ISSUER_ID,
        "serial8": image.public.serial8,
        "amount": 200,
        "tx_type": 6,
        "terminal": KIOSK,
        "ttc": 9,
        "day": bytes.fromhex("20261123"),
        "time": bytes.fromhex("093000"),
    }
    genuine = verifier.purchase_tac(**fields)  # type: ignore[arg-type]
    assert genuine is not None
    assert verifier.purchase_tac(**{**fields, "amount": 201}) != genuine  # type: ignore[arg-type]
    assert TacVerifier(issuers={}).purchase_tac(**fields) is None  # type: ignore[arg-type]


def test_tac_verifier_picks_the_load_or_the_purchase_formula_by_the_transaction_type() -> None:
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
    common = {
        "alg": Alg.SM4,
        "issuer_id": DEMO_ISSUER_ID,
        "serial8": bytes.fromhex("0000000000000077"),
        "amount": 5000,
        "terminal": KIOSK,
        "day": bytes.fromhex("20261123"),
        "time": bytes.fromhex("093000"),
    }
    load = verifier.tac(tx_type=2, ttc=9, counter=4, balance_after=7000, **common)  # type: ignore[arg-type]
    assert load is not None
    assert load == verifier.load_tac(balance_after=7000, counter=4, **common)  # type: ignore[arg-type]
    # A load's TAC covers the balance after it and the card's counter, not a terminal counter.
    assert verifier.tac(tx_type=2, ttc=10, counter=4, balance_after=7000, **common) == load  # type: ignore[arg-type]
    assert verifier.tac(tx_type=2, ttc=9, counter=5, balance_after=7000, **common) != load  # type: ignore[arg-type]
    purchase = verifier.tac(tx_type=6, ttc=9, counter=4, balance_after=7000, **common)  # type: ignore[arg-type]
    assert purchase == verifier.purchase_tac(tx_type=6, ttc=9, **common)  # type: ignore[arg-type]
    assert purchase != load
    # A purchase's covers the terminal counter, not the card's counter or the balance.
    assert verifier.tac(tx_type=6, ttc=9, counter=5, balance_after=1, **common) == purchase  # type: ignore[arg-type]
    assert verifier.tac(tx_type=6, ttc=10, counter=4, balance_after=7000, **common) != purchase  # type: ignore[arg-type]


def _tac(verifier: TacVerifier, card: int, ttc: int) -> bytes | None:
    return verifier.purchase_tac(
        alg=Alg.TDES,
        issuer_id=DEMO_ISSUER_ID,
        serial8=card.to_bytes(8, "big"),
        amount=200,
        tx_type=9,
        terminal=KIOSK,
        ttc=ttc,
        day=bytes.fromhex("20261123"),
        time=bytes.fromhex("093000"),
    )


def test_tac_verifier_cache_never_exceeds_its_size_and_verifies_after_eviction() -> None:
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS}, cache_size=3)
    for ttc, card in enumerate([1, 2, 3, 4, 5, 1, 2, 6, 1, 7, 3, 4, 5, 1]):
        fresh = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS}, cache_size=0)
        assert _tac(verifier, card, ttc) == _tac(fresh, card, ttc)
        assert verifier.cached <= 3
    assert verifier.cached == 3


def test_tac_verifier_cache_evicts_the_least_recently_used_card() -> None:
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS}, cache_size=2)
    _tac(verifier, 1, 1)
    _tac(verifier, 2, 1)
    kept = verifier._key(Alg.TDES, DEMO_ISSUER_ID, (1).to_bytes(8, "big"))  # card 1 used again
    _tac(verifier, 3, 1)  # evicts card 2, not card 1
    assert verifier._key(Alg.TDES, DEMO_ISSUER_ID, (1).to_bytes(8, "big")) is kept
    assert verifier.cached == 2

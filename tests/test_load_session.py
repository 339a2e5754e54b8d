"""The kiosk's session alone (``LoadSession``): no broker, database, thread or reader — the card is
``farelab.card.process`` on an image held here, the host a few lines answering its messages,
the journal a dict.  A load, a transfer and a refund read the card once, journal their intent
before the host is asked (so before the CREDIT) or before the DEBIT, and when the card is
pulled at any command the result is ``card_removed`` and the next presentation settles what
was torn: nothing lost, nothing paid twice."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime
from itertools import count
from typing import Any

import pytest

from farelab.card import (
    CST,
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    CardImage,
    FlowError,
    LoadAuthority,
    LoadAuthorization,
    Psam,
    PsamKeys,
    Session,
    Transmit,
    personalise,
    process,
    step_of,
)
from farelab.protocol import load_request_of
from farelab.topup import (
    CardView,
    Event,
    HostCall,
    Intent,
    LoadResult,
    LoadSession,
    PendingLoad,
    Present,
    Refund,
    StatusChange,
    TopUp,
    Transfer,
)

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=CST)
TERMINAL = bytes.fromhex("0000F0000001")
PSAM = Psam(terminal_id=TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
TRANSFER = Transfer(old_serial="77", reason="exchange", reported="2026-03-01", profile="hangzhou")


class Card:
    """A card as data: its image and its volatile session, answered by the card's own
    ``process``; pulled, it keeps what it committed and loses its session."""

    def __init__(self, balance: int) -> None:
        self.image: CardImage = personalise(serial="66", issued=date(2026, 1, 1), balance=balance)
        self.session = Session.power_on(b"first")
        self.commands = 0

    def answer(self, apdu: bytes) -> bytes:
        self.commands += 1
        outcome = process(self.image, self.session, apdu, today=NOW.date())
        self.image, self.session = outcome.image, outcome.session
        return outcome.response

    def pulled(self) -> None:
        self.session = Session.power_on(f"again{self.commands}".encode())

    @property
    def balance(self) -> int:
        return self.image.balance


@dataclass
class Host:
    """The host as data: MAC2 from the card library's load authority, every load's state."""

    quote: int = 0
    down: frozenset[str] = frozenset()  # the operations it does not answer
    authority: LoadAuthority = field(
        default_factory=lambda: LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS})
    )
    loads: dict[str, list[Any]] = field(default_factory=dict)  # id → [amount, status]
    refunds: dict[str, int] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def reply(self, message: dict[str, Any]) -> dict[str, Any] | None:
        op, rid = message["op"], message["id"]
        self.asked.append(op)
        if op in self.down:
            return None
        if op in ("authorize", "transfer"):
            grant = self.authority.authorize(load_request_of(message), when=NOW)
            if not isinstance(grant, LoadAuthorization):
                return {"id": rid, "result": "refused", "reason": grant.reason}
            self.loads.setdefault(rid, [message["amount"], "authorized"])
            hexed = {"mac2": grant.mac2.hex(), "day": grant.day.hex(), "time": grant.time.hex()}
            return {"id": rid, "result": "authorized", **hexed}
        if op in ("confirm", "void"):
            load = self.loads.get(rid)
            if load is None:  # the authorization never reached the host
                return {"id": rid, "result": "error", "reason": "unknown_request"}
            if load[1] == "authorized":
                load[1] = "confirmed" if op == "confirm" else "void"
            return {"id": rid, "result": load[1]}
        if op == "transfer_quote":
            return {"id": rid, "result": "quote", "amount_fen": self.quote}
        if op == "refund_check":
            return {"id": rid, "result": "ok"}
        assert op == "refund", op
        self.refunds.setdefault(rid, message["amount"])
        return {"id": rid, "result": "refunded", "amount_fen": message["amount"]}

    def total(self, status: str) -> int:
        return sum(amount for amount, state in self.loads.values() if state == status)


@dataclass
class Journal:
    """The kiosk journal as data."""

    rows: dict[str, PendingLoad] = field(default_factory=dict)

    def write(self, event: Intent | StatusChange) -> None:
        if isinstance(event, Intent):
            row = PendingLoad(
                event.id,
                event.card_serial,
                event.counter,
                event.amount,
                "authorized",
                "",
                event.kind,
                event.detail,
            )
            self.rows[event.id] = row
        else:
            self.rows[event.id] = replace(self.rows[event.id], status=event.status, tac=event.tac)

    def unsettled(self) -> list[PendingLoad]:
        return [r for r in self.rows.values() if r.status in ("authorized", "credited")]


@dataclass
class Desk:
    """One kiosk: a card, the host, the journal, and every event of the last session."""

    card: Card
    host: Host = field(default_factory=Host)
    journal: Journal = field(default_factory=Journal)
    events: list[Event] = field(default_factory=list)
    ids: count[int] = field(default_factory=count)

    def session(self, action: Present | TopUp | Transfer | Refund) -> LoadSession:
        return LoadSession(
            terminal_id=TERMINAL,
            action=action,
            now=NOW,
            pending=self.journal.unsettled(),
            new_id=lambda: f"r{next(self.ids)}",
        )

    def run(
        self,
        action: Present | TopUp | Transfer | Refund,
        *,
        pull_at: int | None = None,
        reached: bool = True,
    ) -> LoadResult | CardView:
        """Drive one session; the card is pulled at its ``pull_at``-th command (which reached
        the card first, or was lost on the way)."""
        session = self.session(action)
        self.events = []
        commands = 0
        event: Event = session.start()
        while True:
            self.events.append(event)
            if isinstance(event, Transmit):
                commands += 1
                if commands == pull_at:
                    if reached:
                        self.card.answer(event.apdu)
                    self.card.pulled()
                    event = session.card_lost()
                else:
                    event = session.receive(self.card.answer(event.apdu))
            elif isinstance(event, HostCall):
                reply = self.host.reply(event.message)
                if reply is None:
                    event = session.host_unreachable("no answer from the host")
                else:
                    event = session.answer(reply)
            elif isinstance(event, Intent | StatusChange):
                self.journal.write(event)
                event = session.proceed()
            else:
                return event

    def steps(self) -> list[str]:
        """The last session's events, named."""
        named = []
        for event in self.events:
            if isinstance(event, Transmit):
                named.append(step_of(event.apdu) or "GET BALANCE")
            elif isinstance(event, HostCall):
                named.append(event.op)
            elif isinstance(event, Intent):
                named.append(f"intent {event.kind}")
            elif isinstance(event, StatusChange):
                named.append(event.status)
            else:
                named.append(type(event).__name__)
        return named


def commands_of(action: Present | TopUp | Transfer | Refund, balance: int) -> int:
    """How many commands the action sends to a card with nothing torn."""
    desk = Desk(Card(balance), Host(quote=2500))
    desk.run(action)
    return sum(isinstance(e, Transmit) for e in desk.events)


def assert_settled(desk: Desk, balance_before: int) -> None:
    """The card's money and the host's agree, and nothing is left open anywhere."""
    moved = desk.card.balance - balance_before
    refunded = sum(desk.host.refunds.values())
    assert moved == desk.host.total("confirmed") - refunded
    assert desk.host.total("authorized") == 0
    assert desk.journal.unsettled() == []


# --- the order of things -------------------------------------------------------------------


def test_a_load_reads_the_card_once_and_journals_its_intent_before_the_host_is_asked() -> None:
    desk = Desk(Card(1000))
    result = desk.run(TopUp(5000))
    assert desk.steps() == [
        "SELECT",
        "GET BALANCE",
        "INIT",
        "intent load",
        "authorize",
        "CREDIT",
        "credited",
        "confirm",
        "confirmed",
        "LoadResult",
    ]
    assert isinstance(result, LoadResult)
    assert result.to_json() == {
        "result": "loaded",
        "reason": None,
        "amount_fen": 5000,
        "balance_fen": 6000,
        "tac": result.tac,
    }
    assert desk.card.balance == 6000
    assert_settled(desk, 1000)


def test_a_refund_journals_its_intent_before_the_debit() -> None:
    desk = Desk(Card(4321))
    result = desk.run(Refund(PSAM))
    assert desk.steps() == [
        "SELECT",
        "GET BALANCE",
        "refund_check",
        "INIT",
        "intent refund",
        "DEBIT",
        "credited",
        "refund",
        "confirmed",
        "LoadResult",
    ]
    assert isinstance(result, LoadResult)
    assert (result.result, result.amount_fen, result.balance_fen) == ("refunded", 4321, 0)
    assert desk.card.balance == 0
    assert desk.host.refunds == {"r1": 4321}


def test_a_transfer_asks_the_quote_then_loads_what_the_host_computed() -> None:
    desk = Desk(Card(0), Host(quote=2500))
    result = desk.run(TRANSFER)
    assert desk.steps()[:5] == ["SELECT", "GET BALANCE", "transfer_quote", "INIT", "intent load"]
    assert desk.steps()[5] == "transfer"
    assert isinstance(result, LoadResult)
    assert (result.result, result.amount_fen, desk.card.balance) == ("loaded", 2500, 2500)


def test_a_presentation_shows_the_balance_and_the_room_under_the_cap() -> None:
    desk = Desk(Card(90_000))
    assert desk.run(Present()) == CardView("66".rjust(20, "0"), 90_000, 10_000)
    assert desk.steps() == ["SELECT", "GET BALANCE", "CardView"]


@pytest.mark.parametrize(
    ("amount", "reason"), [(None, "bad_amount"), (0, "bad_amount"), (10_001, "cap_exceeded")]
)
def test_an_amount_the_rules_refuse_never_reaches_the_card_or_the_host(
    amount: int | None, reason: str
) -> None:
    desk = Desk(Card(90_000))
    result = desk.run(TopUp(amount))
    assert isinstance(result, LoadResult)
    assert (result.result, result.reason, result.balance_fen) == ("refused", reason, 90_000)
    assert desk.steps() == ["SELECT", "GET BALANCE", "LoadResult"]


def test_a_host_refusal_voids_the_journalled_load() -> None:
    desk = Desk(Card(1000))
    desk.host.authority = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS}, cap=1500)
    result = desk.run(TopUp(5000))
    assert isinstance(result, LoadResult)
    assert (result.result, result.reason) == ("refused", "cap_exceeded")
    assert [r.status for r in desk.journal.rows.values()] == ["void"]
    assert desk.card.balance == 1000


def test_a_malformed_authorization_is_voided_not_sent_to_the_card() -> None:
    desk = Desk(Card(1000))
    session = desk.session(TopUp(5000))
    event: Event = session.start()
    while not isinstance(event, HostCall):
        if isinstance(event, Transmit):
            event = session.receive(desk.card.answer(event.apdu))
        else:
            assert isinstance(event, Intent)
            event = session.proceed()
    event = session.answer({"id": "r0", "result": "authorized", "mac2": "zz"})
    assert isinstance(event, HostCall)
    assert event.message == {"id": "r0", "op": "void"}
    event = session.answer({"id": "r0", "result": "void"})
    assert event == StatusChange("r0", "void")
    result = session.proceed()
    assert isinstance(result, LoadResult)
    assert (result.result, result.reason) == ("refused", "host_error")
    assert desk.card.balance == 1000


def test_a_credit_the_card_could_not_commit_is_voided() -> None:
    desk = Desk(Card(1000))
    session = desk.session(TopUp(5000))
    event: Event = session.start()
    while not (isinstance(event, Transmit) and step_of(event.apdu) == "CREDIT"):
        if isinstance(event, Transmit):
            event = session.receive(desk.card.answer(event.apdu))
        elif isinstance(event, HostCall):
            reply = desk.host.reply(event.message)
            assert reply is not None
            event = session.answer(reply)
        else:
            assert isinstance(event, Intent)
            desk.journal.write(event)
            event = session.proceed()
    event = session.card_unusable("c.json: cannot write card image")
    assert isinstance(event, HostCall)
    assert event.op == "void"
    reply = desk.host.reply(event.message)
    assert reply == {"id": "r0", "result": "void"}
    assert session.answer(reply) == StatusChange("r0", "void")
    done = session.proceed()
    assert isinstance(done, LoadResult)
    assert (done.reason, done.balance_fen) == ("card_error", 1000)


def test_a_session_used_out_of_order_says_so() -> None:
    session = Desk(Card(0)).session(TopUp(100))
    with pytest.raises(FlowError):
        session.answer({})
    session.start()
    with pytest.raises(FlowError):
        session.start()
    with pytest.raises(FlowError):
        session.proceed()
    with pytest.raises(ValueError, match="aware"):
        LoadSession(terminal_id=TERMINAL, action=Present(), now=datetime(2026, 3, 2))  # noqa: DTZ001


# --- a card pulled at every command ----------------------------------------------------------

LOAD_COMMANDS = commands_of(TopUp(5000), 1000)
REFUND_COMMANDS = commands_of(Refund(PSAM), 4321)
TRANSFER_COMMANDS = commands_of(TRANSFER, 0)


@pytest.mark.parametrize("reached", [True, False], ids=["answer-lost", "command-lost"])
@pytest.mark.parametrize("k", range(1, LOAD_COMMANDS + 1))
def test_a_load_torn_at_every_command_is_card_removed_then_settled(k: int, reached: bool) -> None:
    desk = Desk(Card(1000))
    first = desk.run(TopUp(5000), pull_at=k, reached=reached)
    assert isinstance(first, LoadResult)
    assert (first.result, first.reason) == ("refused", "card_removed")
    view = desk.run(Present())
    assert isinstance(view, CardView)
    assert view.balance_fen == desk.card.balance
    took_it = reached and k == LOAD_COMMANDS  # the CREDIT reached the card
    assert desk.card.balance == (6000 if took_it else 1000)
    assert_settled(desk, 1000)
    assert bool(view.settled) == (k == LOAD_COMMANDS)  # journalled once INIT had answered


@pytest.mark.parametrize("reached", [True, False], ids=["answer-lost", "command-lost"])
@pytest.mark.parametrize("k", range(1, TRANSFER_COMMANDS + 1))
def test_a_transfer_torn_at_every_command_is_card_removed_then_settled(
    k: int, reached: bool
) -> None:
    desk = Desk(Card(0), Host(quote=2500))
    first = desk.run(TRANSFER, pull_at=k, reached=reached)
    assert isinstance(first, LoadResult)
    assert (first.result, first.reason) == ("refused", "card_removed")
    assert isinstance(desk.run(Present()), CardView)
    assert desk.card.balance == (2500 if reached and k == TRANSFER_COMMANDS else 0)
    assert_settled(desk, 0)


@pytest.mark.parametrize("reached", [True, False], ids=["answer-lost", "command-lost"])
@pytest.mark.parametrize("k", range(1, REFUND_COMMANDS + 1))
def test_a_refund_torn_at_every_command_is_card_removed_then_settled(k: int, reached: bool) -> None:
    desk = Desk(Card(4321))
    first = desk.run(Refund(PSAM), pull_at=k, reached=reached)
    assert isinstance(first, LoadResult)
    assert (first.result, first.reason) == ("refused", "card_removed")
    assert isinstance(desk.run(Present()), CardView)
    emptied = reached and k == REFUND_COMMANDS  # the DEBIT reached the card
    assert desk.card.balance == (0 if emptied else 4321)
    assert sum(desk.host.refunds.values()) == (4321 if emptied else 0)
    assert_settled(desk, 4321)


@pytest.mark.parametrize("k", range(1, 4))
def test_a_card_pulled_while_its_torn_load_is_settled_is_settled_the_next_time(k: int) -> None:
    desk = Desk(Card(1000))
    desk.run(TopUp(5000), pull_at=LOAD_COMMANDS)  # the CREDIT reached the card, its answer not
    again = desk.run(TopUp(200), pull_at=k)
    assert isinstance(again, LoadResult)
    assert again.reason == "card_removed"
    assert isinstance(desk.run(Present()), CardView)
    assert desk.card.balance == 6000
    assert_settled(desk, 1000)


@pytest.mark.parametrize("op", ["authorize", "confirm", "void"])
def test_a_host_that_does_not_answer_leaves_nothing_unsettled_for_good(op: str) -> None:
    desk = Desk(Card(1000))
    if op == "void":  # a torn load whose CREDIT never reached the card, voided on return
        desk.run(TopUp(5000), pull_at=LOAD_COMMANDS, reached=False)
    desk.host.down = frozenset({op})
    result = desk.run(TopUp(3000))
    assert isinstance(result, LoadResult)
    expected = {"authorize": "host_unreachable", "confirm": None, "void": "host_unreachable"}
    assert result.reason == expected[op]
    desk.host.down = frozenset()
    assert isinstance(desk.run(Present()), CardView)
    assert desk.card.balance == (4000 if op == "confirm" else 1000)
    assert_settled(desk, 1000)

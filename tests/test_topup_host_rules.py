"""What the host refuses before it gives MAC2: kiosks the device registry does not know as
kiosks, cards on its hotlist, and every transfer (R6) that would move a balance onto a card that
may not take it or move one old card's balance twice — also when two requests race."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
import pytest

from farelab._cli import main
from farelab.backend._loads import ensure_schema, handle_load_message
from farelab.backend._localhost import LocalHost
from farelab.backend._registry import DeviceEntry, register, revoke
from farelab.backend._store import Store
from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    CardSnapshot,
    InProcessReader,
    Load,
    LoadAuthority,
    LoadDone,
    LoadRequest,
    MemoryStore,
    NeedAuthorization,
    Psam,
    PsamKeys,
    ReadCard,
    Reader,
    SimulatedCard,
    TacVerifier,
    drive,
    personalise,
)
from farelab.protocol import authorize_message, transfer_message
from farelab.topup import Kiosk, KioskJournal, LoadResult

T = TypeVar("T")
TERMINAL = bytes.fromhex("0000F0000001")
PG = "postgresql://postgres@127.0.0.1:5432/test"
KIOSK_1 = DeviceEntry(
    id="kiosk-1",
    role="kiosk",
    operator="kiosk-1",
    kinds=frozenset({"load", "refund"}),
    terminal=TERMINAL.hex().upper(),
)


def full_serial(serial: str) -> str:
    return serial.rjust(20, "0")


class Desk:
    """A kiosk with the in-process host (a ledger of its own) and cards kept in memory."""

    def __init__(self, folder: Path) -> None:
        self.ledger = folder / "host.db"
        self.host = LocalHost(self.ledger, "kiosk-1", terminal=TERMINAL)
        self.kiosk = Kiosk(
            kiosk_id="kiosk-1",
            terminal_id=TERMINAL,
            host=self.host,
            journal=KioskJournal(folder / "kiosk.db"),
        )
        self.cards: dict[str, SimulatedCard] = {}

    def card(self, serial: str) -> SimulatedCard:
        if serial not in self.cards:
            image = personalise(serial=serial, issued=date(2026, 1, 1))
            self.cards[serial] = SimulatedCard(image, store=MemoryStore())
        return self.cards[serial]

    def _run(self, serial: str) -> Callable[[Callable[[Reader], T]], Any]:
        reader = InProcessReader()
        reader.insert(self.card(serial))

        async def run(fn: Callable[[Reader], T]) -> T:
            return fn(reader)

        return run

    async def load(self, serial: str, amount: int) -> LoadResult:
        return await self.kiosk.load(self._run(serial), amount)

    async def transfer(self, serial: str, old: str) -> LoadResult:
        return await self.kiosk.transfer(
            self._run(serial),
            old_serial=old,
            reason="exchange",
            reported="2026-01-05",
            profile="hangzhou",
        )

    async def refund(self, serial: str) -> LoadResult:
        psam = Psam(terminal_id=TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
        return await self.kiosk.refund(self._run(serial), psam)

    def balance(self, serial: str) -> int:
        return self.card(serial).image.balance

    def hotlist(self, serial: str, reason: str) -> None:
        store = Store(f"sqlite:///{self.ledger}")
        store.execute(
            "INSERT INTO hotlist (card_serial, reason, added_ms) VALUES (?, ?, 0)",
            (full_serial(serial), reason),
        )
        store.close()


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[Desk]:
    d = Desk(tmp_path)
    yield d
    d.host.close()
    d.kiosk.journal.close()


def test_a_balance_never_moves_onto_its_own_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert main(["card", "new", "a.json", "--serial", "650001"]) == 0
    assert main(["topup", "load", "a.json", "--amount", "100"]) == 0
    capsys.readouterr()
    status = main(
        [
            "topup",
            "transfer",
            "a.json",
            "--old",
            "650001",
            "--reason",
            "exchange",
            "--reported",
            "2026-11-01",
            "--profile",
            "hangzhou",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert (status, out["result"], out["reason"]) == (1, "refused", "same_card")
    assert main(["card", "show", "a.json", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balance_fen"] == 10_000


async def test_a_transfer_is_refused_onto_a_hotlisted_card(desk: Desk) -> None:
    await desk.load("1", 5000)
    desk.hotlist("2", "lost")
    result = await desk.transfer("2", old="1")
    assert (result.result, result.reason) == ("refused", "hotlisted")
    assert desk.balance("2") == 0


async def test_a_transfer_is_refused_onto_a_card_that_was_itself_replaced(desk: Desk) -> None:
    await desk.load("1", 5000)
    await desk.load("3", 700)
    assert (await desk.transfer("2", old="1")).result == "loaded"  # card 1 is replaced by card 2
    result = await desk.transfer("1", old="3")
    assert (result.result, result.reason) == ("refused", "replaced")
    assert desk.balance("1") == 5000


async def test_a_transfer_is_refused_onto_a_card_that_already_received_one(desk: Desk) -> None:
    await desk.load("1", 5000)
    await desk.load("3", 700)
    assert (await desk.transfer("2", old="1")).result == "loaded"
    result = await desk.transfer("2", old="3")
    assert (result.result, result.reason) == ("refused", "already_received")
    assert desk.balance("2") == 5000


async def test_one_old_card_moves_once(desk: Desk) -> None:
    await desk.load("1", 5000)
    assert (await desk.transfer("2", old="1")).balance_fen == 5000
    again = await desk.transfer("4", old="1")
    assert (again.result, again.reason) == ("refused", "already_transferred")
    assert desk.balance("4") == 0


async def test_a_hotlisted_card_is_not_loaded(desk: Desk) -> None:
    desk.hotlist("9", "clone")
    result = await desk.load("9", 1000)
    assert (result.result, result.reason) == ("refused", "hotlisted")
    assert desk.balance("9") == 0


async def test_a_refunded_card_s_transfer_is_refused_as_refunded(desk: Desk) -> None:
    await desk.load("1", 5000)
    assert (await desk.refund("1")).result == "refunded"
    result = await desk.transfer("2", old="1")
    assert (result.result, result.reason) == ("refused", "refunded")
    assert "None" not in result.message
    assert desk.balance("2") == 0


def load_request(serial: str, amount: int, terminal: bytes = TERMINAL) -> LoadRequest:
    """A card's real INITIALIZE FOR LOAD answer, as a kiosk sends it to the host."""
    reader = InProcessReader()
    image = personalise(serial=serial, issued=date(2026, 1, 1))
    reader.insert(SimulatedCard(image, store=MemoryStore()))
    snapshot = drive(reader, ReadCard(records=[]))
    assert isinstance(snapshot, CardSnapshot)
    flow = Load(terminal_id=terminal, card=snapshot, amount=amount)
    event = flow.receive(reader.transmit(flow.start().apdu))
    assert isinstance(event, NeedAuthorization)
    return event.request


def ask(store: Store, kiosk: str, doc: dict[str, Any]) -> dict[str, Any]:
    return handle_load_message(
        store,
        LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS}),
        TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS}),
        kiosk,
        json.dumps(doc).encode(),
    )


VALIDATOR = DeviceEntry(
    id="gate-1",
    role="validator",
    operator="M1",
    kinds=frozenset({"entry"}),
    terminal="000000000B01",
)
LOADS_ONLY = DeviceEntry(
    id="kiosk-2", role="kiosk", operator="K2", kinds=frozenset({"load"}), terminal="0000F0000002"
)
REVOKED = DeviceEntry(
    id="kiosk-r",
    role="kiosk",
    operator="KR",
    kinds=frozenset({"load", "refund"}),
    terminal=TERMINAL.hex().upper(),
)


@pytest.mark.parametrize(
    ("kiosk", "op", "reason"),
    [
        ("kiosk-9", "authorize", "unknown_kiosk"),
        ("kiosk-r", "authorize", "revoked"),
        ("gate-1", "authorize", "wrong_role"),
        ("kiosk-2", "refund", "wrong_role"),
        ("kiosk-2", "authorize", "wrong_terminal"),
        ("kiosk-9", "transfer", "unknown_kiosk"),
        ("kiosk-9", "refund", "unknown_kiosk"),
    ],
)
def test_the_host_serves_only_registered_kiosks_at_their_own_terminal(
    tmp_path: Path, kiosk: str, op: str, reason: str
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    ensure_schema(store)
    for entry in (KIOSK_1, VALIDATOR, LOADS_ONLY, REVOKED):
        register(store, entry)
    revoke(store, REVOKED.id)
    doc = authorize_message(str(uuid.uuid4()), load_request("77", 1000))
    if op == "transfer":
        doc.update(old_serial="78", reason="exchange", reported="2026-01-05", profile="hangzhou")
    elif op == "refund":
        doc.update(tac="00000000", ttc=1, day="20260105", time="120000", balance_before=1000)
        doc.update(card_counter=0)
    doc["op"] = op
    answer = ask(store, kiosk, doc)
    assert (answer["result"], answer["reason"]) == ("refused", reason)
    assert store.execute("SELECT count(*) FROM loads").fetchone()[0] == 0
    store.close()


async def test_the_in_process_host_registers_its_kiosk_and_keeps_a_revocation(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "host.db"
    LocalHost(ledger, "kiosk-7", terminal=TERMINAL).close()
    store = Store(f"sqlite:///{ledger}")
    revoke(store, "kiosk-7")
    store.close()
    host = LocalHost(ledger, "kiosk-7", terminal=TERMINAL)
    answer = await host.call(authorize_message("r1", load_request("77", 1000)))
    host.close()
    assert (answer["result"], answer["reason"]) == ("refused", "revoked")


class PausedAfterCheck:
    """A store whose first look at the transfers table waits until the other request has
    looked too: both have seen the old card unclaimed before either claims it."""

    def __init__(self, store: Store, barrier: threading.Barrier) -> None:
        self._store = store
        self._barrier = barrier
        self._waited = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def execute(self, query: str, args: Any = ()) -> Any:
        cursor = self._store.execute(query, args)
        if "FROM transfers WHERE old_serial" in query and not self._waited:
            self._waited = True
            self._barrier.wait(10)
        return cursor


@pytest.fixture
def pg_url() -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (database test) is needed: {exc}")
    admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG}?options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def test_two_racing_transfers_of_one_old_card_move_it_once(pg_url: str) -> None:
    setup = Store(pg_url)
    ensure_schema(setup)
    register(setup, KIOSK_1)
    # The old card's history: a confirmed load of 50 yuan.
    setup.execute(
        "INSERT INTO transactions (device, seq, status, verdict, tx_type, kind, alg, card_serial, "
        "issuer, card_counter, ttc, amount, balance_before, terminal, day, time, at_ms, station, "
        "line, operator, tac, received_ms) VALUES ('kiosk-1', 1, 'completed', 'ok', 2, 'load', "
        "'3des', ?, '1310000000000000', 0, 0, 5000, 0, ?, '20260105', '120000', 1, "
        "'0000000000000000', 0, 'kiosk-1', '00000000', 1)",
        (full_serial("1"), TERMINAL.hex().upper()),
    )
    setup.close()
    barrier = threading.Barrier(2)
    answers: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def request(new_serial: str) -> None:
        store = Store(pg_url)
        try:
            doc = transfer_of_card_1(str(uuid.uuid4()), load_request(new_serial, 5000))
            answers[new_serial] = ask(cast(Store, PausedAfterCheck(store, barrier)), "kiosk-1", doc)
        except BaseException as exc:  # the test reports what the request raised
            errors.append(exc)
            barrier.abort()
        finally:
            store.close()

    threads = [threading.Thread(target=request, args=(s,)) for s in ("2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    results = sorted((a["result"], a.get("reason")) for a in answers.values())
    assert results == [("authorized", None), ("refused", "already_transferred")]


def card_request(serial: str, amount: int, *, loads_taken: int = 0) -> LoadRequest:
    """INITIALIZE FOR LOAD of a card that has taken ``loads_taken`` loads (its load counter)."""
    reader = InProcessReader()
    image = personalise(serial=serial, issued=date(2026, 1, 1)).replace(online_counter=loads_taken)
    reader.insert(SimulatedCard(image, store=MemoryStore()))
    snapshot = drive(reader, ReadCard(records=[]))
    assert isinstance(snapshot, CardSnapshot)
    flow = Load(terminal_id=TERMINAL, card=snapshot, amount=amount)
    event = flow.receive(reader.transmit(flow.start().apdu))
    assert isinstance(event, NeedAuthorization)
    return event.request


def transfer_of_card_1(request_id: str, request: LoadRequest) -> dict[str, Any]:
    return transfer_message(
        request_id,
        request,
        old_serial="1",
        reason="exchange",
        reported="2026-01-05",
        profile="hangzhou",
    )


@pytest.fixture
def host_with_old_card(tmp_path: Path) -> Iterator[Store]:
    """A host whose ledger knows card 1 took a 50-yuan load (its whole balance)."""
    store = Store(f"sqlite:///{tmp_path / 'host.db'}")
    ensure_schema(store)
    register(store, KIOSK_1)
    store.execute(
        "INSERT INTO transactions (device, seq, status, verdict, tx_type, kind, alg, card_serial, "
        "issuer, card_counter, ttc, amount, balance_before, terminal, day, time, at_ms, station, "
        "line, operator, tac, received_ms) VALUES ('kiosk-1', 1, 'completed', 'ok', 2, 'load', "
        "'3des', ?, '1310000000000000', 0, 0, 5000, 0, ?, '20260105', '120000', 1, "
        "'0000000000000000', 0, 'kiosk-1', '00000000', 1)",
        (full_serial("1"), TERMINAL.hex().upper()),
    )
    yield store
    store.close()


def test_a_voided_transfer_does_not_free_the_old_card_for_another_card(
    host_with_old_card: Store,
) -> None:
    """A kiosk that voids a transfer whose CREDIT did reach card 2 must not get the same balance
    again for card 3: the void is only the kiosk's word."""
    store = host_with_old_card
    first = ask(store, "kiosk-1", transfer_of_card_1("t1", card_request("2", 5000)))
    assert first["result"] == "authorized"
    assert ask(store, "kiosk-1", {"id": "t1", "op": "void"})["result"] == "void"
    again = ask(store, "kiosk-1", transfer_of_card_1("t2", card_request("3", 5000)))
    assert (again["result"], again["reason"]) == ("refused", "already_transferred")


def test_a_voided_transfer_is_retried_onto_its_card_while_its_load_counter_has_not_moved(
    host_with_old_card: Store,
) -> None:
    """The card pulled before the CREDIT: its load counter is unchanged, which proves the
    voided MAC2 was never used, so the same card may take the balance again — once."""
    store = host_with_old_card
    assert ask(store, "kiosk-1", transfer_of_card_1("t1", card_request("2", 5000)))["result"] == (
        "authorized"
    )
    assert ask(store, "kiosk-1", {"id": "t1", "op": "void"})["result"] == "void"
    retry = ask(store, "kiosk-1", transfer_of_card_1("t2", card_request("2", 5000)))
    assert retry["result"] == "authorized"
    third = ask(store, "kiosk-1", transfer_of_card_1("t3", card_request("2", 5000)))
    assert (third["result"], third["reason"]) == ("refused", "already_transferred")


def test_a_void_after_the_card_took_the_credit_moves_nothing_again(
    host_with_old_card: Store,
) -> None:
    """Card 2's load counter moved on since the voided MAC2: it took that CREDIT, so the void
    was false and the balance stays moved."""
    store = host_with_old_card
    assert ask(store, "kiosk-1", transfer_of_card_1("t1", card_request("2", 5000)))["result"] == (
        "authorized"
    )
    assert ask(store, "kiosk-1", {"id": "t1", "op": "void"})["result"] == "void"
    again = ask(store, "kiosk-1", transfer_of_card_1("t2", card_request("2", 5000, loads_taken=1)))
    assert (again["result"], again["reason"]) == ("refused", "already_transferred")


def _copy_of(desk: Desk, serial: str) -> SimulatedCard:
    """A byte-for-byte copy of a card's image as it is now."""
    image = desk.card(serial).image
    return SimulatedCard(type(image).from_json(image.to_json()), store=MemoryStore())


async def test_a_copied_card_is_refused_a_load_its_original_already_took(desk: Desk) -> None:
    copy = _copy_of(desk, "660001")
    assert (await desk.load("660001", 5_000)).result == "loaded"
    desk.cards["660001"] = copy  # the copy comes to the kiosk at the counter the original used
    refused = await desk.load("660001", 5_000)
    assert (refused.result, refused.reason) == ("refused", "clone")
    assert copy.image.balance == 0
    store = Store(f"sqlite:///{desk.ledger}", create=False)
    try:
        assert store.execute(
            "SELECT reason FROM hotlist WHERE card_serial = ?", (full_serial("660001"),)
        ).fetchall() == [("clone",)]
        assert store.execute(
            "SELECT count(*), sum(amount) FROM transactions WHERE tx_type = 2"
        ).fetchone() == (1, 5_000)
    finally:
        store.close()


def test_a_copy_confirmed_after_its_original_is_kept_as_a_clone(tmp_path: Path) -> None:
    """Both copies authorized before either confirms: the second TAC is genuine (the copy did
    take the money) and is kept, as a clone, with the card hotlisted, not a database error."""
    store = Store(f"sqlite:///{tmp_path / 'host.db'}")
    ensure_schema(store)
    register(store, KIOSK_1)
    keys = {DEMO_ISSUER_ID: DEMO_KEYS}
    authority, verifier = LoadAuthority(issuers=keys), TacVerifier.of(keys)
    image = personalise(serial="660002", issued=date(2026, 1, 1))
    twins = [
        SimulatedCard(type(image).from_json(image.to_json()), store=MemoryStore()) for _ in range(2)
    ]
    flows = []
    for n, twin in enumerate(twins):
        reader = InProcessReader()
        reader.insert(twin)
        snapshot = drive(reader, ReadCard(records=[]))
        assert isinstance(snapshot, CardSnapshot)
        flow = Load(terminal_id=TERMINAL, card=snapshot, amount=1_000)
        event = flow.receive(reader.transmit(flow.start().apdu))
        assert isinstance(event, NeedAuthorization)
        raw = json.dumps(authorize_message(f"twin-{n}", event.request)).encode()
        answer = handle_load_message(store, authority, verifier, "kiosk-1", raw)
        assert answer["result"] == "authorized"
        flows.append((reader, flow, f"twin-{n}", answer))
    for reader, flow, request_id, answer in flows:
        credit = flow.authorize(
            mac2=bytes.fromhex(answer["mac2"]),
            day=bytes.fromhex(answer["day"]),
            time=bytes.fromhex(answer["time"]),
        )
        done = flow.receive(reader.transmit(credit.apdu))
        assert isinstance(done, LoadDone)
        confirm = {"id": request_id, "op": "confirm", "tac": done.tac.hex().upper()}
        reply = handle_load_message(
            store, authority, verifier, "kiosk-1", json.dumps(confirm).encode()
        )
        assert reply["result"] == "confirmed"
    verdicts = store.execute(
        "SELECT verdict FROM transactions WHERE tx_type = 2 ORDER BY seq"
    ).fetchall()
    assert verdicts == [("ok",), ("clone",)]
    assert store.execute("SELECT reason FROM hotlist").fetchall() == [("clone",)]
    store.close()

"""Load authorization over MQTT: the backend (holding the load key) checks MAC1 and the cap,
answers MAC2, confirms on a verified TAC and counts the load once; every message is idempotent."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import aiomqtt

from farelab.backend._mosquitto import Mosquitto
from farelab.backend._registry import DeviceEntry, register
from farelab.backend._store import Store
from farelab.card import (
    CardSnapshot,
    InProcessReader,
    Load,
    LoadDone,
    LoadRequest,
    MemoryStore,
    NeedAuthorization,
    ReadCard,
    SimulatedCard,
    drive,
    personalise,
)
from farelab.protocol import LOAD_REQ, LOAD_RESP
from tests.cli_support import farelab
from tests.test_uplink_backend import start_backend, stop

KIOSK = "kiosk-1"
TERMINAL = bytes.fromhex("00000000F001")


def ledger_with_kiosk(tmp_path: Path) -> str:
    """A ledger whose device registry knows the kiosk these tests speak for."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    store = Store(db)
    entry = DeviceEntry(
        id=KIOSK, role="kiosk", operator="K1", kinds=frozenset({"load"}), terminal="00000000F001"
    )
    register(store, entry)
    store.close()
    return db


async def rpc(port: int, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    answers = []
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(LOAD_RESP.format(kiosk=KIOSK), qos=1)
        for doc in messages:
            await client.publish(LOAD_REQ.format(kiosk=KIOSK), json.dumps(doc), qos=1)
            async with asyncio.timeout(10):
                async for message in client.messages:
                    answer: dict[str, Any] = json.loads(bytes(message.payload))
                    if answer.get("id") == doc.get("id"):
                        answers.append(answer)
                        break
    return answers


def authorize_doc(request_id: str, req: LoadRequest) -> dict[str, Any]:
    return {
        "id": request_id,
        "op": "authorize",
        "card_serial": req.serial,
        "issuer": req.issuer_id.hex(),
        "alg": req.alg.label,
        "key_version": req.key_version,
        "balance": req.balance,
        "counter": req.counter,
        "random": req.random.hex(),
        "mac1": req.mac1.hex(),
        "amount": req.amount,
        "terminal": req.terminal.hex(),
    }


def card_and_request(
    balance: int, amount: int, cap: int = 100_000
) -> tuple[InProcessReader, Load, LoadRequest]:
    image = personalise(serial="4711", issued=date(2026, 1, 1), balance=balance)
    reader = InProcessReader()
    reader.insert(SimulatedCard(image.replace(max_balance=cap), store=MemoryStore()))
    snap = drive(reader, ReadCard(records=[]))
    assert isinstance(snap, CardSnapshot)
    flow = Load(terminal_id=TERMINAL, card=snap, amount=amount)
    event = flow.receive(reader.transmit(flow.start().apdu))
    assert isinstance(event, NeedAuthorization)
    return reader, flow, event.request


async def test_authorize_credit_confirm_counts_the_load_once(
    broker: Mosquitto, tmp_path: Path
) -> None:
    db = ledger_with_kiosk(tmp_path)
    backend = start_backend(broker, db)
    try:
        reader, flow, req = card_and_request(balance=90_000, amount=10_000)
        rid = str(uuid.uuid4())
        [answer, again] = await rpc(broker.port, [authorize_doc(rid, req)] * 2)
        assert answer["result"] == "authorized"
        assert again == answer  # idempotent: the same MAC2, nothing recorded twice
        credit = flow.authorize(
            mac2=bytes.fromhex(answer["mac2"]),
            day=bytes.fromhex(answer["day"]),
            time=bytes.fromhex(answer["time"]),
        )
        done = flow.receive(reader.transmit(credit.apdu))
        assert isinstance(done, LoadDone)
        assert done.balance_after == 100_000  # exactly 1000 yuan (R4)
        confirm = {"id": rid, "op": "confirm", "tac": done.tac.hex()}
        results = await rpc(broker.port, [{**confirm, "tac": "00000000"}, confirm, confirm])
        assert [r["result"] for r in results] == ["error", "confirmed", "confirmed"]
        assert results[0]["reason"] == "tac_invalid"
    finally:
        stop(backend)
    report = json.loads(farelab("backend", "report", "--db", db, "--json").stdout)
    assert (report["load_fen"], report["transactions"]) == (10_000, 1)


async def test_host_refuses_past_the_cap_and_forged_mac1(broker: Mosquitto, tmp_path: Path) -> None:
    db = ledger_with_kiosk(tmp_path)
    backend = start_backend(broker, db)
    try:
        # the kiosk and the card are bypassed (card cap raised): the host alone refuses
        _, _, over = card_and_request(balance=90_000, amount=10_001, cap=10**9)
        _, _, req = card_and_request(balance=0, amount=100)
        forged = replace(req, mac1=bytes(4))
        answers = await rpc(
            broker.port,
            [
                authorize_doc(str(uuid.uuid4()), over),
                authorize_doc(str(uuid.uuid4()), forged),
                {"id": "x", "op": "confirm", "tac": "00"},
                {"oops": 1},
            ],
        )
    finally:
        stop(backend)
    assert [a.get("reason") for a in answers] == [
        "cap_exceeded",
        "bad_mac1",
        "unknown_request",
        "malformed",
    ]

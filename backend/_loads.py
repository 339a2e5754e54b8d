"""Load authorization for kiosks: request/response over MQTT, the load key only here (SPEC B4).

A kiosk sends ``{"id", "op": "authorize", …the card's INITIALIZE FOR LOAD answer…}`` on
``farelab/v1/kiosk/<id>/load/req``; the backend checks MAC1, the amount and the 1000-yuan cap
(R4), records the load as *authorized* and answers MAC2 on ``…/load/resp``.  After CREDIT the
kiosk sends ``{"id", "op": "confirm", "tac"}``: a verified TAC makes the load *confirmed* and
counted in the ledger; a card that never took it is ``{"id", "op": "void"}``.  Every operation
is idempotent by request id: a repeated message gets the same answer and changes nothing.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from backend._store import Store
from backend._transfer import PROFILES, decide, last_known_balance
from card import Alg, LoadAuthority, LoadAuthorization, LoadRequest, TacVerifier

__all__ = [
    "LOAD_REQ",
    "LOAD_RESP",
    "SHARED_LOAD_REQ",
    "authorize_message",
    "ensure_schema",
    "handle_load_message",
]

CST = timezone(timedelta(hours=8))
LOAD_REQ = "farelab/v1/kiosk/{kiosk}/load/req"
LOAD_RESP = "farelab/v1/kiosk/{kiosk}/load/resp"
SHARED_LOAD_REQ = "$share/{group}/farelab/v1/kiosk/+/load/req"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loads (
    id TEXT PRIMARY KEY,
    kiosk TEXT NOT NULL,
    card_serial TEXT NOT NULL,
    issuer TEXT NOT NULL,
    alg TEXT NOT NULL,
    amount BIGINT NOT NULL,
    balance_before BIGINT NOT NULL,
    card_counter INTEGER NOT NULL,
    terminal TEXT NOT NULL,
    day TEXT NOT NULL,
    time TEXT NOT NULL,
    status TEXT NOT NULL,
    answer TEXT NOT NULL,
    tac TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'load',
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS transfers (
    old_serial TEXT PRIMARY KEY,
    load_id TEXT NOT NULL,
    amount BIGINT NOT NULL
)
"""


def ensure_schema(store: Store) -> None:
    """Create the loads and transfers tables if needed."""
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            store.execute(statement)


def authorize_message(request_id: str, req: LoadRequest) -> dict[str, Any]:
    """The kiosk's authorization request for a card's INITIALIZE FOR LOAD answer."""
    return {
        "id": request_id,
        "op": "authorize",
        "card_serial": req.serial,
        "issuer": req.issuer_id.hex().upper(),
        "alg": req.alg.label,
        "key_version": req.key_version,
        "balance": req.balance,
        "counter": req.counter,
        "random": req.random.hex().upper(),
        "mac1": req.mac1.hex().upper(),
        "amount": req.amount,
        "terminal": req.terminal.hex().upper(),
    }


def _request(doc: dict[str, Any]) -> LoadRequest:
    serial = str(doc["card_serial"]).rjust(20, "0")
    return LoadRequest(
        issuer_id=bytes.fromhex(doc["issuer"]),
        serial=serial,
        serial8=bytes.fromhex(serial)[2:],
        alg=Alg.from_label(doc["alg"]),
        key_version=int(doc.get("key_version", 1)),
        balance=int(doc["balance"]),
        counter=int(doc["counter"]),
        random=bytes.fromhex(doc["random"]),
        mac1=bytes.fromhex(doc["mac1"]),
        amount=int(doc["amount"]),
        terminal=bytes.fromhex(doc["terminal"]),
    )


def handle_load_message(
    store: Store,
    authority: LoadAuthority,
    verifier: TacVerifier,
    kiosk: str,
    payload: bytes,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """One kiosk message → the answer to publish (already stored when this returns)."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        return {"id": None, "result": "error", "reason": "malformed", "detail": str(exc)[:200]}
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not doc["id"]:
        return {"id": None, "result": "error", "reason": "malformed", "detail": "no string 'id'"}
    op = doc.get("op")
    request_id: str = doc["id"]
    try:
        with store.transaction():
            ensure_schema(store)
            row = store.execute(
                "SELECT status, answer, kiosk FROM loads WHERE id = ?", (request_id,)
            ).fetchone()
            if op in ("authorize", "transfer", "refund") and row is not None:
                answer: dict[str, Any] = json.loads(row[1])
                return answer
            if op == "authorize":
                return _authorize(store, authority, kiosk, request_id, doc, now=now)
            if op == "transfer_quote":
                return {"id": request_id, **_quote(store, doc, now)}
            if op == "transfer":
                quote = _quote(store, doc, now)
                if quote["amount_fen"] <= 0 or quote["amount_fen"] != int(doc["amount"]):
                    return {
                        "id": request_id,
                        "result": "refused",
                        "reason": "transfer_refused",
                        "detail": f"transferable now: {quote}",
                    }
                store.execute(
                    "INSERT INTO transfers (old_serial, load_id, amount) VALUES (?, ?, ?)",
                    (quote["old_serial"], request_id, quote["amount_fen"]),
                )
                return _authorize(
                    store, authority, kiosk, request_id, doc, now=now, kind="transfer"
                )
            if op == "refund":
                return _refund(store, verifier, kiosk, request_id, doc)
            if row is None or row[2] != kiosk:
                return {"id": request_id, "result": "error", "reason": "unknown_request"}
            if op == "confirm":
                return _confirm(store, verifier, request_id, row[0], doc)
            if op == "void":
                if row[0] == "authorized":
                    store.execute("UPDATE loads SET status = 'void' WHERE id = ?", (request_id,))
                    store.execute("DELETE FROM transfers WHERE load_id = ?", (request_id,))
                    return {"id": request_id, "result": "void"}
                return {"id": request_id, "result": row[0]}
            return {"id": request_id, "result": "error", "reason": "unknown_op"}
    except (KeyError, ValueError, TypeError) as exc:
        return {
            "id": request_id,
            "result": "error",
            "reason": "malformed",
            "detail": f"{type(exc).__name__}: {exc}"[:200],
        }


def _authorize(
    store: Store,
    authority: LoadAuthority,
    kiosk: str,
    request_id: str,
    doc: dict[str, Any],
    *,
    now: datetime | None,
    kind: str = "load",
) -> dict[str, Any]:
    req = _request(doc)
    decision = authority.authorize(req, when=now or datetime.now(UTC))
    if isinstance(decision, LoadAuthorization):
        answer: dict[str, Any] = {
            "id": request_id,
            "result": "authorized",
            "mac2": decision.mac2.hex().upper(),
            "day": decision.day.hex(),
            "time": decision.time.hex(),
        }
        status, day, clock = "authorized", decision.day.hex(), decision.time.hex()
    else:
        answer = {
            "id": request_id,
            "result": "refused",
            "reason": decision.reason,
            "detail": decision.detail,
        }
        status, day, clock = "refused", "", ""
    store.execute(
        "INSERT INTO loads (id, kiosk, card_serial, issuer, alg, amount, balance_before, "
        "card_counter, terminal, day, time, status, answer, created_ms, kind) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            request_id,
            kiosk,
            req.serial,
            req.issuer_id.hex().upper(),
            req.alg.label,
            req.amount,
            req.balance,
            req.counter,
            req.terminal.hex().upper(),
            day,
            clock,
            status,
            json.dumps(answer),
            int(time.time() * 1000),
            kind,
        ),
    )
    return answer


def _confirm(
    store: Store, verifier: TacVerifier, request_id: str, status: str, doc: dict[str, Any]
) -> dict[str, Any]:
    if status == "confirmed":
        return {"id": request_id, "result": "confirmed"}
    if status != "authorized":
        return {"id": request_id, "result": "error", "reason": f"load is {status}"}
    (serial, issuer, alg, amount, before, counter, terminal, day, clock, kiosk, kind) = (
        store.execute(
            "SELECT card_serial, issuer, alg, amount, balance_before, card_counter, terminal, day, "
            "time, kiosk, kind FROM loads WHERE id = ?",
            (request_id,),
        ).fetchone()
    )
    tac = str(doc["tac"]).upper()
    expected = verifier.load_tac(
        alg=Alg.from_label(alg),
        issuer_id=bytes.fromhex(issuer),
        serial8=bytes.fromhex(serial)[2:],
        balance_after=before + amount,
        counter=counter,
        amount=amount,
        terminal=bytes.fromhex(terminal),
        day=bytes.fromhex(day),
        time=bytes.fromhex(clock),
    )
    if expected is None or expected.hex().upper() != tac:
        return {"id": request_id, "result": "error", "reason": "tac_invalid"}
    store.execute("UPDATE loads SET status = 'confirmed', tac = ? WHERE id = ?", (tac, request_id))
    seq = store.execute(
        "SELECT coalesce(max(seq), 0) + 1 FROM transactions WHERE device = ?", (kiosk,)
    ).fetchone()[0]
    at_ms = int(time.time() * 1000)
    store.execute(
        "INSERT INTO transactions (device, seq, status, verdict, tx_type, kind, alg, card_serial, "
        "issuer, card_counter, ttc, amount, balance_before, terminal, day, time, at_ms, station, "
        "line, operator, tac, received_ms) VALUES (?, ?, 'completed', 'ok', 2, ?, ?, ?, ?, ?, "
        "0, ?, ?, ?, ?, ?, ?, '0000000000000000', 0, ?, ?, ?)",
        (
            kiosk,
            seq,
            kind,
            alg,
            serial,
            issuer,
            counter,
            amount,
            before,
            terminal,
            day,
            clock,
            at_ms,
            kiosk[:8],
            tac,
            at_ms,
        ),
    )
    if kind == "transfer":
        old_serial = store.execute(
            "SELECT old_serial FROM transfers WHERE load_id = ?", (request_id,)
        ).fetchone()
        if old_serial is not None:
            _hotlist(store, old_serial[0], "replaced")
    return {"id": request_id, "result": "confirmed"}


def _hotlist(store: Store, serial: str, reason: str) -> None:
    store.execute(
        "INSERT INTO hotlist (card_serial, reason, added_ms) VALUES (?, ?, ?) "
        "ON CONFLICT (card_serial) DO NOTHING",
        (serial, reason, int(time.time() * 1000)),
    )


def _quote(store: Store, doc: dict[str, Any], now: datetime | None) -> dict[str, Any]:
    """What may move from an old card to its replacement today (R6)."""
    old = str(doc["old_serial"]).rjust(20, "0")
    profile = PROFILES.get(str(doc["profile"]))
    if profile is None:
        raise ValueError(
            f"unknown issuer profile {doc['profile']!r} (nanjing, hangzhou, changzhou)"
        )
    today = (now or datetime.now(UTC)).astimezone(CST).date()
    if store.execute("SELECT 1 FROM transfers WHERE old_serial = ?", (old,)).fetchone():
        return {
            "result": "quote",
            "old_serial": old,
            "amount_fen": 0,
            "reason": "already_transferred",
            "available_on": None,
        }
    decision = decide(
        profile,
        reason=str(doc["reason"]),
        reported=date.fromisoformat(str(doc["reported"])),
        today=today,
        balance=last_known_balance(store, old),
    )
    return {
        "result": "quote",
        "old_serial": old,
        "amount_fen": decision.amount_fen,
        "reason": decision.reason,
        "available_on": decision.available_on.isoformat() if decision.available_on else None,
    }


def _refund(
    store: Store, verifier: TacVerifier, kiosk: str, request_id: str, doc: dict[str, Any]
) -> dict[str, Any]:
    """An outlet emptied a card with a purchase of its whole balance and paid it back in cash
    (Changzhou 退值): verify that purchase's TAC, count it, hotlist the card."""
    serial = str(doc["card_serial"]).rjust(20, "0")
    tac = str(doc["tac"]).upper()
    expected = verifier.purchase_tac(
        alg=Alg.from_label(doc["alg"]),
        issuer_id=bytes.fromhex(doc["issuer"]),
        serial8=bytes.fromhex(serial)[2:],
        amount=int(doc["amount"]),
        tx_type=0x06,
        terminal=bytes.fromhex(doc["terminal"]),
        ttc=int(doc["ttc"]),
        day=bytes.fromhex(doc["day"]),
        time=bytes.fromhex(doc["time"]),
    )
    if expected is None or expected.hex().upper() != tac:
        return {"id": request_id, "result": "error", "reason": "tac_invalid"}
    answer = {"id": request_id, "result": "refunded", "amount_fen": int(doc["amount"])}
    now_ms = int(time.time() * 1000)
    store.execute(
        "INSERT INTO loads (id, kiosk, card_serial, issuer, alg, amount, balance_before, "
        "card_counter, terminal, day, time, status, answer, created_ms, kind) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'confirmed', ?, ?, 'refund')",
        (
            request_id,
            kiosk,
            serial,
            doc["issuer"].upper(),
            doc["alg"],
            int(doc["amount"]),
            int(doc["balance_before"]),
            int(doc["card_counter"]),
            doc["terminal"].upper(),
            doc["day"],
            doc["time"],
            json.dumps(answer),
            now_ms,
        ),
    )
    seq = store.execute(
        "SELECT coalesce(max(seq), 0) + 1 FROM transactions WHERE device = ?", (kiosk,)
    ).fetchone()[0]
    store.execute(
        "INSERT INTO transactions (device, seq, status, verdict, tx_type, kind, alg, card_serial, "
        "issuer, card_counter, ttc, amount, balance_before, terminal, day, time, at_ms, station, "
        "line, operator, tac, received_ms) VALUES (?, ?, 'completed', 'ok', 6, 'refund', ?, ?, ?, "
        "?, ?, ?, ?, ?, ?, ?, ?, '0000000000000000', 0, ?, ?, ?)",
        (
            kiosk,
            seq,
            doc["alg"],
            serial,
            doc["issuer"].upper(),
            int(doc["card_counter"]),
            int(doc["ttc"]),
            int(doc["amount"]),
            int(doc["balance_before"]),
            doc["terminal"].upper(),
            doc["day"],
            doc["time"],
            now_ms,
            kiosk[:8],
            tac,
            now_ms,
        ),
    )
    _hotlist(store, serial, "refunded")
    return answer

"""Load authorization for kiosks: request/response over MQTT, the load key only here
(docs/card-protocol.md B4).

A kiosk sends ``{"id", "op": "authorize", …the card's INITIALIZE FOR LOAD answer…}`` on
``farelab/v1/kiosk/<id>/load/req``; the backend checks MAC1, the amount and the 1000-yuan cap
(R4), records the load as *authorized* and answers MAC2 on ``…/load/resp``.  After CREDIT the
kiosk sends ``{"id", "op": "confirm", "tac"}``: a verified TAC makes the load *confirmed* and
counted in the ledger; a card that never took it is ``{"id", "op": "void"}``.  Every operation
is idempotent by request id: a repeated message gets the same answer and changes nothing.

Only a kiosk of the device registry is served: an unknown id is refused ``unknown_kiosk``, a
revoked one ``revoked``, a validator (or a kiosk without the kind: ``load`` for loads and
transfers, ``refund`` for refunds) ``wrong_role``, and a request whose terminal is not the
registered kiosk's ``wrong_terminal``.  The host loads no card on its own hotlist: a card the
records know (``farelab cards``) is refused by its state — ``frozen``, ``replaced``,
``cancelled``, ``expired`` — with what the rider does next and its fee, any other ``hotlisted``
(a clone, say).  A transfer
(R6) moves one old card's balance once, onto another card that is neither hotlisted, replaced,
nor already given a transfer.  When the ledger records the old card's life (``farelab cards``)
its events decide: the new card must be the one that replaced it, and the balance moves from the
day the card-life core gives, whatever day the kiosk reports.  A balance that has moved is not
paid out in cash as well: a kiosk asks ``{"id", "op": "refund_check", "card_serial",
"terminal"}`` before it empties a card (``{"result": "ok"}`` or refused
``already_transferred``), and ``refund`` is refused so too.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

from farelab.backend._cards import hotlist_refusal, transfer_terms
from farelab.backend._ingest import Stored, expected_tac
from farelab.backend._registry import lookup
from farelab.backend._store import LEDGER_COLUMNS, Store, ledger_row
from farelab.backend._transfer import PROFILES, decide, decide_from, last_known_balance
from farelab.card import CST, LoadAuthority, LoadAuthorization, TacVerifier
from farelab.protocol import Record, card_serial_of, load_request_of

__all__ = [
    "ensure_schema",
    "handle_load_message",
]


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
            if op in _KIOSK_KINDS:
                refusal = _kiosk_refusal(store, kiosk, str(op), doc)
                if refusal is not None:
                    return {"id": request_id, "result": "refused", **refusal}
            row = store.execute(
                "SELECT status, answer, kiosk FROM loads WHERE id = ?", (request_id,)
            ).fetchone()
            if op in ("authorize", "transfer", "refund") and row is not None:
                answer: dict[str, Any] = json.loads(row[1])
                return answer
            if op == "authorize":
                refusal = _card_refusal(store, card_serial_of(doc["card_serial"]))
                if refusal is not None:
                    return {"id": request_id, "result": "refused", **refusal}
                return _authorize(store, authority, kiosk, request_id, doc, now=now)
            if op == "transfer_quote":
                return {"id": request_id, **_quote(store, doc, now)}
            if op == "transfer":
                return _transfer(store, authority, kiosk, request_id, doc, now=now)
            if op == "refund_check":
                serial = card_serial_of(doc["card_serial"])
                return {"id": request_id, **_refund_check(store, serial)}
            if op == "refund":
                return _refund(store, verifier, kiosk, request_id, doc)
            if row is None or row[2] != kiosk:
                return {"id": request_id, "result": "error", "reason": "unknown_request"}
            if op == "confirm":
                return _confirm(store, verifier, request_id, row[0], doc)
            if op == "void":
                if row[0] == "authorized":
                    # A voided transfer keeps its claim on the old card: only its own retry,
                    # provably not credited, may take it up again (_claim_blocks).
                    store.execute("UPDATE loads SET status = 'void' WHERE id = ?", (request_id,))
                    return {"id": request_id, "result": "void"}
                return {"id": request_id, "result": row[0]}
            return {"id": request_id, "result": "error", "reason": "unknown_op"}
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as exc:
        # A field missing, of the wrong JSON type (a number where a label goes, so no .upper())
        # or out of its range (an amount past 4 bytes): the kiosk's message, not the backend,
        # is wrong; the transaction rolled back, and the worker answers and goes on.
        return {
            "id": request_id,
            "result": "error",
            "reason": "malformed",
            "detail": f"{type(exc).__name__}: {exc}"[:200],
        }


# The registry kind each kiosk operation needs.
_KIOSK_KINDS = {
    "authorize": "load",
    "transfer": "load",
    "transfer_quote": "load",
    "refund_check": "refund",
    "refund": "refund",
}


def _kiosk_refusal(store: Store, kiosk: str, op: str, doc: dict[str, Any]) -> dict[str, str] | None:
    """Why the registry refuses this kiosk the operation, or None."""
    entry = lookup(store, kiosk)
    if entry is None:
        return {"reason": "unknown_kiosk", "detail": f"kiosk {kiosk!r} is not registered"}
    if entry.revoked:
        return {"reason": "revoked", "detail": f"kiosk {kiosk!r} is revoked"}
    if entry.role != "kiosk":
        return {"reason": "wrong_role", "detail": f"{kiosk!r} is registered as a {entry.role}"}
    if _KIOSK_KINDS[op] not in entry.kinds:
        return {
            "reason": "wrong_role",
            "detail": f"kiosk {kiosk!r} may not make {_KIOSK_KINDS[op]}s",
        }
    terminal = str(doc.get("terminal", "")).upper()
    if op != "transfer_quote" and terminal != entry.terminal:
        return {
            "reason": "wrong_terminal",
            "detail": f"kiosk {kiosk!r} is registered with terminal {entry.terminal}, "
            f"not {terminal[:12]!r}",
        }
    return None


def _hotlisted(store: Store, serial: str) -> str | None:
    row = store.execute("SELECT reason FROM hotlist WHERE card_serial = ?", (serial,)).fetchone()
    return None if row is None else str(row[0])


def _card_refusal(store: Store, serial: str) -> dict[str, str] | None:
    """Why the host loads nothing onto this card, or None."""
    why = _hotlisted(store, serial)
    if why is not None:
        # A card the records know is refused by its state, with what the rider does next.
        named = hotlist_refusal(store, serial, why)
        if named is not None:
            return {"reason": named[0], "detail": named[1]}
        return {"reason": "hotlisted", "detail": f"card {serial} is on the hotlist ({why})"}
    if store.execute("SELECT 1 FROM transfers WHERE old_serial = ?", (serial,)).fetchone():
        # Its balance is moving to a replacement card (hotlisted once that load is confirmed):
        # money loaded now would be left on a card about to be blocked.
        return {"reason": "replaced", "detail": f"card {serial} was replaced"}
    return None


def _target_refusal(store: Store, old: str, new: str) -> dict[str, str] | None:
    """Why an old card's balance may not move onto ``new``, or None."""
    if new == old:
        return {"reason": "same_card", "detail": "a balance cannot move onto its own card"}
    if store.execute("SELECT 1 FROM transfers WHERE old_serial = ?", (new,)).fetchone():
        return {"reason": "replaced", "detail": f"card {new} was itself replaced"}
    refusal = _card_refusal(store, new)
    if refusal is not None:
        return refusal
    received = store.execute(
        "SELECT 1 FROM loads WHERE card_serial = ? AND kind = 'transfer' "
        "AND status IN ('authorized', 'confirmed')",
        (new,),
    ).fetchone()
    if received:
        return {"reason": "already_received", "detail": f"card {new} already received a transfer"}
    return None


def _claim(store: Store, old: str) -> tuple[str, str, str, int] | None:
    """The claim on an old card's balance: (load id, that load's status, the card it credits,
    that card's load counter at the claim), or None."""
    row = store.execute(
        "SELECT t.load_id, l.status, l.card_serial, l.card_counter FROM transfers t "
        "JOIN loads l ON l.id = t.load_id WHERE t.old_serial = ?",
        (old,),
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]), str(row[2]), int(row[3]))


def _claim_blocks(
    claim: tuple[str, str, str, int] | None, new: str | None, counter: int | None
) -> bool:
    """Whether a claim keeps an old card's balance from moving onto ``new`` (whose load counter
    is ``counter``, when known).

    A kiosk's word that a transfer's CREDIT never reached the card (a void) is not proof: a
    void after a CREDIT that did happen would let the balance move a second time.  The card is
    the proof — it counts every load it takes — so after a void only the same card may take the
    balance again, and only while its load counter is still the one the voided MAC2 was for.
    """
    if claim is None:
        return False
    _, status, serial, claimed_counter = claim
    if status != "void" or new is None or serial != new:
        return True
    return counter is not None and counter != claimed_counter


def _transfer(
    store: Store,
    authority: LoadAuthority,
    kiosk: str,
    request_id: str,
    doc: dict[str, Any],
    *,
    now: datetime | None,
) -> dict[str, Any]:
    quote = _quote(store, doc, now)
    amount = int(doc["amount"])
    if quote["amount_fen"] <= 0 or quote["amount_fen"] != amount:
        return {
            "id": request_id,
            "result": "refused",
            "reason": quote["reason"] or "transfer_refused",
            "detail": f"transferable now: {quote['amount_fen']} fen, asked {amount} fen",
        }
    # Claimed before it is authorized: of two requests racing for one old card (two workers,
    # two kiosks), the second finds the claim — at once, or once the first commits — and is
    # refused.  A voided claim passes only to its own retry (_claim_blocks), by the same race.
    old, new = quote["old_serial"], card_serial_of(doc["card_serial"])
    claim = _claim(store, old)
    if claim is None:
        claimed = store.execute(
            "INSERT INTO transfers (old_serial, load_id, amount) VALUES (?, ?, ?) "
            "ON CONFLICT (old_serial) DO NOTHING",
            (old, request_id, quote["amount_fen"]),
        )
    elif not _claim_blocks(claim, new, int(doc["counter"])):
        claimed = store.execute(
            "UPDATE transfers SET load_id = ?, amount = ? WHERE old_serial = ? AND load_id = ?",
            (request_id, quote["amount_fen"], old, claim[0]),
        )
    else:
        claimed = None
    if claimed is None or claimed.rowcount != 1:
        return {
            "id": request_id,
            "result": "refused",
            "reason": "already_transferred",
            "detail": f"card {quote['old_serial']}'s balance has already moved",
        }
    return _authorize(store, authority, kiosk, request_id, doc, now=now, kind="transfer")


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
    req = load_request_of(doc)
    decision = authority.authorize(req, when=now or datetime.now(UTC))
    if isinstance(decision, LoadAuthorization) and _counted(store, req.serial, req.counter, 2):
        # The card asks to load at a counter the ledger has already counted a load at: a copy
        # of a card that has moved on (the original's credit was confirmed by its own TAC).
        _hotlist(store, req.serial, "clone")
        answer: dict[str, Any] = {
            "id": request_id,
            "result": "refused",
            "reason": "clone",
            "detail": f"card {req.serial} already loaded at counter {req.counter}",
        }
        status, day, clock = "refused", "", ""
    elif isinstance(decision, LoadAuthorization):
        answer = {
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
    row = store.execute(
        "SELECT card_serial, issuer, alg, amount, balance_before, card_counter, terminal, day, "
        "time, kiosk, kind FROM loads WHERE id = ?",
        (request_id,),
    ).fetchone()
    kiosk, kind = row[9], row[10]
    load = Record.from_json(
        {
            "seq": 0,
            "status": "completed",
            "tx_type": 2,
            "kind": kind,
            "ttc": 0,
            "at_ms": 0,
            "station": "",
            "line": 0,
            "operator": kiosk[:8],
            "tac": "",
            **dict(zip(_LOAD_FIELDS, row[:9], strict=True)),
        }
    )
    tac = _tac_of(doc)
    expected = expected_tac(load, verifier)
    if expected is None or expected != tac:
        return {"id": request_id, "result": "error", "reason": "tac_invalid"}
    store.execute(
        "UPDATE loads SET status = 'confirmed', tac = ? WHERE id = ?",
        (tac.hex().upper(), request_id),
    )
    _count(store, kiosk, replace(load, tac=tac))
    if kind == "transfer":
        old_serial = store.execute(
            "SELECT old_serial FROM transfers WHERE load_id = ?", (request_id,)
        ).fetchone()
        if old_serial is not None:
            _hotlist(store, old_serial[0], "replaced")
    return {"id": request_id, "result": "confirmed"}


# The loads table's columns that are a load's record's fields.
_LOAD_FIELDS = (
    "card_serial",
    "issuer",
    "alg",
    "amount",
    "balance_before",
    "card_counter",
    "terminal",
    "day",
    "time",
)


# The fields of a refund's record that its message carries as they are.
_REFUND_FIELDS = (
    "alg",
    "issuer",
    "amount",
    "balance_before",
    "card_counter",
    "terminal",
    "ttc",
    "day",
    "time",
)


def _tac_of(doc: dict[str, Any]) -> bytes:
    """The TAC a kiosk sends (hex); empty when it is not hex, which no TAC verifies."""
    try:
        return bytes.fromhex(str(doc["tac"]))
    except ValueError:
        return b""


def _counted(store: Store, serial: str, counter: int, tx_type: int) -> bool:
    """Whether the ledger counts a transaction of this card at this counter already."""
    return (
        store.execute(
            "SELECT 1 FROM transactions WHERE card_serial = ? AND card_counter = ? "
            "AND tx_type = ? AND verdict = 'ok'",
            (serial, counter, tx_type),
        ).fetchone()
        is not None
    )


def _count(store: Store, kiosk: str, record: Record) -> None:
    """Count a kiosk's verified transaction in the ledger, under the kiosk's next sequence
    number, at the time it is counted, with no station or line.  A transaction at a counter the
    ledger already counts for that card comes from a copy of the card: it is kept with the
    verdict ``clone`` (the money did move on the copy) and the card is hotlisted."""
    now_ms = int(time.time() * 1000)
    serial = record.card_serial.hex()
    verdict = "ok"
    if _counted(store, serial, record.card_counter, record.tx_type):
        verdict = "clone"
        _hotlist(store, serial, "clone")
    row = ledger_row(
        kiosk,
        0,
        Stored(replace(record, seq=_next_seq(store, kiosk), at_ms=now_ms), verdict, now_ms),
        station=bytes(8),
        line=0,
        operator=kiosk[:8],
        received_ms=now_ms,
    )
    store.insert("transactions", LEDGER_COLUMNS, [row])


def _next_seq(store: Store, kiosk: str) -> int:
    """The next sequence number of a kiosk's ledger rows (all of journal epoch 0): one probe at
    the end of the primary key, not ``max()``, which PostgreSQL may compute by reading every row
    of the kiosk's history while its statistics lag behind."""
    row = store.execute(
        "SELECT seq FROM transactions WHERE device = ? AND epoch = 0 ORDER BY seq DESC LIMIT 1",
        (kiosk,),
    ).fetchone()
    return 1 if row is None else int(row[0]) + 1


def _hotlist(store: Store, serial: str, reason: str) -> None:
    store.execute(
        "INSERT INTO hotlist (card_serial, reason, added_ms) VALUES (?, ?, ?) "
        "ON CONFLICT (card_serial) DO NOTHING",
        (serial, reason, int(time.time() * 1000)),
    )


def _quote(store: Store, doc: dict[str, Any], now: datetime | None) -> dict[str, Any]:
    """What may move from an old card to its replacement today (R6); with ``card_serial`` (the
    new card) also whether it may move onto that card."""
    old = card_serial_of(doc["old_serial"])
    profile = PROFILES.get(str(doc["profile"]))
    if profile is None:
        raise ValueError(
            f"unknown issuer profile {str(doc['profile'])[:40]!r} ({', '.join(sorted(PROFILES))})"
        )
    today = (now or datetime.now(UTC)).astimezone(CST).date()

    def nothing(reason: str) -> dict[str, Any]:
        return {
            "result": "quote",
            "old_serial": old,
            "amount_fen": 0,
            "reason": reason,
            "available_on": None,
        }

    new = card_serial_of(doc["card_serial"]) if doc.get("card_serial") is not None else None
    if _claim_blocks(_claim(store, old), new, None):
        return nothing("already_transferred")
    if _hotlisted(store, old) == "refunded":
        return nothing("refunded")
    if doc.get("card_serial") is not None:
        refusal = _target_refusal(store, old, card_serial_of(doc["card_serial"]))
        if refusal is not None:
            return nothing(refusal["reason"])
    balance = last_known_balance(store, old)
    terms = transfer_terms(store, old, new=new, reason=str(doc["reason"]), profile=profile.name)
    if terms is None:
        decision = decide(
            profile,
            reason=str(doc["reason"]),
            reported=date.fromisoformat(str(doc["reported"])),
            today=today,
            balance=balance,
        )
    elif terms[1] is None:
        return nothing(terms[0] or "no_transfer")
    else:
        # The card's life is in the ledger: its events, not the kiosk's word, say the day.
        decision = decide_from(terms[1], today=today, balance=balance)
    return {
        "result": "quote",
        "old_serial": old,
        "amount_fen": decision.amount_fen,
        "reason": decision.reason,
        "available_on": decision.available_on.isoformat() if decision.available_on else None,
    }


def _refund_check(store: Store, serial: str) -> dict[str, Any]:
    """Whether a card's balance may be paid out in cash: not once it has moved (or is moving) to
    a replacement card — the card still holds it, but it is no longer the rider's."""
    if store.execute("SELECT 1 FROM transfers WHERE old_serial = ?", (serial,)).fetchone():
        return {
            "result": "refused",
            "reason": "already_transferred",
            "detail": f"card {serial}'s balance has moved to a replacement card",
        }
    return {"result": "ok"}


def _refund(
    store: Store, verifier: TacVerifier, kiosk: str, request_id: str, doc: dict[str, Any]
) -> dict[str, Any]:
    """An outlet emptied a card with a purchase of its whole balance and paid it back in cash
    (Changzhou 退值): verify that purchase's TAC, count it, hotlist the card — unless the
    card's balance has moved to a replacement card (:func:`_refund_check`)."""
    serial = card_serial_of(doc["card_serial"])
    refund = Record.from_json(
        {
            **{name: doc[name] for name in _REFUND_FIELDS},
            "seq": 0,
            "status": "completed",
            "tx_type": 0x06,
            "kind": "refund",
            "card_serial": serial,
            "at_ms": 0,
            "station": "",
            "line": 0,
            "operator": kiosk[:8],
            "tac": "",
        }
    )
    tac = _tac_of(doc)
    expected = expected_tac(refund, verifier)
    if expected is None or expected != tac:
        return {"id": request_id, "result": "error", "reason": "tac_invalid"}
    check = _refund_check(store, serial)
    if check["result"] != "ok":
        return {"id": request_id, **check}
    answer = {"id": request_id, "result": "refunded", "amount_fen": refund.amount}
    text = refund.to_json()
    store.execute(
        "INSERT INTO loads (id, kiosk, card_serial, issuer, alg, amount, balance_before, "
        "card_counter, terminal, day, time, status, answer, created_ms, kind) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'confirmed', ?, ?, 'refund')",
        (
            request_id,
            kiosk,
            *(text[name] for name in _LOAD_FIELDS),
            json.dumps(answer),
            int(time.time() * 1000),
        ),
    )
    _count(store, kiosk, replace(refund, tac=tac))
    _hotlist(store, serial, "refunded")
    return answer

"""The kiosk's load-authorization messages, version 1: JSON objects on the kiosk's ``load/req``
topic, each answered on ``load/resp``.

Every message has a string ``id`` (the request id; a repeated message gets the same answer) and
an ``op``: ``authorize`` (the card's INITIALIZE FOR LOAD answer: MAC1 and the amount),
``confirm`` (the card's TAC after CREDIT), ``void`` (the card never took the load),
``transfer_quote`` / ``transfer`` (an old card's balance onto a new card), ``refund_check`` and
``refund``.  Answers carry the same ``id`` and a ``result`` (``ok``, ``confirmed``, ``void``,
``refused`` with a ``reason``, ``error`` with a ``reason``).
"""

from __future__ import annotations

from typing import Any

from farelab.card import Alg, LoadRequest, full_serial

__all__ = [
    "LOAD_OPS",
    "authorize_message",
    "card_serial_of",
    "confirm_message",
    "load_request_of",
    "quote_message",
    "refund_check_message",
    "refund_message",
    "refund_record",
    "transfer_message",
    "void_message",
]

LOAD_OPS = ("authorize", "confirm", "void", "transfer_quote", "transfer", "refund_check", "refund")


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


def confirm_message(request_id: str, tac: str) -> dict[str, Any]:
    """The card took load ``request_id``: its TAC (8 hex digits) for the host to verify."""
    return {"id": request_id, "op": "confirm", "tac": tac}


def void_message(request_id: str) -> dict[str, Any]:
    """Load ``request_id`` never reached the card: the host releases it."""
    return {"id": request_id, "op": "void"}


def quote_message(
    request_id: str, card_serial: str, *, old_serial: str, reason: str, reported: str, profile: str
) -> dict[str, Any]:
    """What may move from the replaced card ``old_serial`` onto ``card_serial`` (R6): ``reason``
    is ``loss`` or ``exchange``, ``reported`` the day (YYYY-MM-DD) it was reported, ``profile``
    the issuer's rules (``nanjing``, ``hangzhou``, ``changzhou``)."""
    return {
        "id": request_id,
        "op": "transfer_quote",
        "card_serial": card_serial,
        "old_serial": old_serial,
        "reason": reason,
        "reported": reported,
        "profile": profile,
    }


def transfer_message(
    request_id: str,
    req: LoadRequest,
    *,
    old_serial: str,
    reason: str,
    reported: str,
    profile: str,
) -> dict[str, Any]:
    """An authorization request (as :func:`authorize_message`) for the load that moves the old
    card's balance onto the card of ``req``; the host computes and checks the amount."""
    message = authorize_message(request_id, req)
    message.update(
        {"old_serial": old_serial, "reason": reason, "reported": reported, "profile": profile},
        op="transfer",
    )
    return message


def refund_check_message(request_id: str, card_serial: str, terminal: bytes) -> dict[str, Any]:
    """May the card be emptied for a cash refund?  Asked before its DEBIT."""
    return {
        "id": request_id,
        "op": "refund_check",
        "card_serial": card_serial,
        "terminal": terminal.hex().upper(),
    }


def refund_record(
    *,
    card_serial: str,
    issuer: bytes,
    alg: Alg,
    amount: int,
    balance_before: int,
    card_counter: int,
    ttc: int,
    terminal: bytes,
    day: bytes,
    time: bytes,
) -> dict[str, Any]:
    """The refund's purchase as the host needs it to verify its TAC: the card's INITIALIZE
    answer (``card_counter``, ``balance_before``) and the DEBIT the kiosk sent (``ttc``, the BCD
    ``day`` and ``time``); kept by the kiosk until the host has counted it."""
    return {
        "card_serial": card_serial,
        "issuer": issuer.hex().upper(),
        "alg": alg.label,
        "amount": amount,
        "balance_before": balance_before,
        "card_counter": card_counter,
        "ttc": ttc,
        "terminal": terminal.hex().upper(),
        "day": day.hex(),
        "time": time.hex(),
    }


def refund_message(request_id: str, record: dict[str, Any], tac: str) -> dict[str, Any]:
    """A completed refund (its :func:`refund_record` and the card's TAC) for the host to count."""
    return {**record, "id": request_id, "op": "refund", "tac": tac}


def load_request_of(doc: dict[str, Any]) -> LoadRequest:
    """The card's INITIALIZE FOR LOAD answer an ``authorize`` (or ``transfer``) message carries;
    KeyError, ValueError or TypeError if a field is missing or wrong."""
    serial = card_serial_of(doc["card_serial"])
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


def card_serial_of(value: object) -> str:
    """A card serial as messages carry it (up to 20 digits), padded to 20; ValueError if not."""
    serial = str(value)
    if not (serial.isascii() and serial.isdigit()) or len(serial) > 20:
        raise ValueError(f"card serial {serial[:40]!r} is not up to 20 digits")
    return full_serial(serial)

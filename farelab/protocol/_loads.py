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

__all__ = ["LOAD_OPS", "authorize_message", "card_serial_of", "load_request_of"]

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

"""Classifying an uploaded batch, record by record, before it is stored (pure).

A record's *verdict* decides whether it counts: ``ok`` (a genuine completed transaction),
``forged`` (its TAC does not verify: flagged, not counted), ``unknown_issuer``, ``void`` (the
device learnt that its DEBIT never reached the card), ``grey`` (outcome unknown until the card
returns).  De-duplication against what is already stored happens in the store, inside the same
database transaction as the insert.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend._wire import Batch, Record
from card import Alg, TacVerifier

__all__ = ["Classified", "classify", "serial8"]


@dataclass(frozen=True, slots=True)
class Classified:
    """A record with its verdict."""

    device: str
    record: Record
    verdict: str


def serial8(card_serial: str) -> bytes:
    """EF15[12:20] of a card from its 20-digit serial (the second diversification level)."""
    return bytes.fromhex(card_serial.rjust(20, "0"))[2:]


def _verdict(record: Record, verifier: TacVerifier) -> str:
    if record.status != "completed":
        return record.status
    expected = verifier.purchase_tac(
        alg=Alg.from_label(record.alg),
        issuer_id=bytes.fromhex(record.issuer),
        serial8=serial8(record.card_serial),
        amount=record.amount,
        tx_type=record.tx_type,
        terminal=bytes.fromhex(record.terminal),
        ttc=record.ttc,
        day=bytes.fromhex(record.day),
        time=bytes.fromhex(record.time),
    )
    if expected is None:
        return "unknown_issuer"
    return "ok" if expected.hex().upper() == record.tac else "forged"


def classify(batch: Batch, verifier: TacVerifier) -> list[Classified]:
    """Every record of the batch with its verdict (TACs verified here)."""
    return [Classified(batch.device, r, _verdict(r, verifier)) for r in batch.records]

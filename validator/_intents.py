"""The journal's intent log: a DEBIT's intent, made durable with one ``write`` before the
command leaves.

A tap that debits a card writes to the journal twice: the *intent* (which card, how much, which
PSAM counter) before the DEBIT leaves, so that a process killed while the card answers still
knows which card may owe a proof; then the outcome, with its outbox row, once the tap is
decided.  The intent used to be a SQLite transaction of its own (BEGIN, INSERT, COMMIT: three
WAL frames and 46 µs).  Here it is one appended record, and the tap's one SQLite transaction
writes the transaction row with its outcome.

The file (``<journal>-intents``) holds records ``length (4 bytes) · CRC-32 (4) · JSON``,
appended with ``O_APPEND``; a killed process cannot leave half a ``write`` behind, and a power
cut's torn tail fails its CRC (its DEBIT never left: it is sent after the write returns).  When
the journal opens, every intent the database does not hold is restored as ``pending``; the
journal empties the file whenever no tap is in progress and every intent in it is in the
database.

A record's JSON is ``{"device", "seq", "intent"}``, the intent in its text form
(:func:`intent_text`): the card's fields as people read them, as in the journal's
``transactions`` table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from farelab.card import describe_path
from farelab.protocol import Record
from farelab.validator._decision import Intent, Pending

__all__ = [
    "TEXT_FIELDS",
    "IntentLog",
    "IntentLogError",
    "decode",
    "encode",
    "intent_from_text",
    "intent_text",
]

log = logging.getLogger("farelab.journal")

_HEADER = struct.Struct(">II")
# An intent's JSON is ~330 bytes; anything near this is not one of ours.
_MAX_RECORD = 64 * 1024
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
#: The intent's text form, field by field (:func:`intent_text`): its device, then its record's
#: text (:meth:`Record.as_text`) without the seq, status and TAC the journal gives it, and the
#: tap's moment in ISO form in place of the record's ``at_ms``; in this order, as the log and
#: the journal's ``transactions`` table have always held them.
TEXT_FIELDS = (
    "device",
    "card_serial",
    "issuer",
    "alg",
    "tx_type",
    "kind",
    "amount",
    "balance_before",
    "card_counter",
    "ttc",
    "terminal",
    "day",
    "time",
    "at",
    "station",
    "line",
    "operator",
)


class IntentLogError(Exception):
    """The intent log cannot be written or read."""


def intent_text(intent: Intent) -> tuple[Any, ...]:
    """The intent as people read it, the values of :data:`TEXT_FIELDS` (the log's JSON, the
    ``transactions`` table's columns)."""
    doc = intent.record.to_json()
    doc["device"], doc["at"] = intent.device, intent.at.isoformat()
    return tuple(doc[name] for name in TEXT_FIELDS)


def intent_from_text(doc: Mapping[str, Any]) -> Intent:
    """An intent from its text form, by :data:`TEXT_FIELDS` (``operator`` may be left out:
    none); ValueError, KeyError or TypeError if it is not one."""
    at = datetime.fromisoformat(doc["at"])
    if at.tzinfo is None:
        raise ValueError(f"intent time {doc['at']!r} has no UTC offset")
    fields = {**doc, "seq": 0, "status": "pending", "at_ms": int(at.timestamp() * 1000), "tac": ""}
    return Intent(str(doc["device"]), replace(Record.from_json(fields), tac=b""), at)


def encode(pending: Pending, text: tuple[Any, ...] | None = None) -> bytes:
    """One record: header and JSON.  ``text``: the intent's :func:`intent_text`, if the caller
    has it already."""
    if text is None:
        text = intent_text(pending.intent)
    body = _JSON.encode(
        {
            "device": pending.device,
            "seq": pending.seq,
            "intent": dict(zip(TEXT_FIELDS, text, strict=True)),
        }
    ).encode()
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def decode(data: bytes, *, name: str = "intent log") -> Iterator[Pending]:
    """The intents in ``data``, up to the first record that is torn or damaged (logged)."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            log.warning("%s: %d-byte torn tail at %d ignored", name, len(data) - offset, offset)
            return
        length, crc = _HEADER.unpack_from(data, offset)
        body = data[offset + _HEADER.size : offset + _HEADER.size + length]
        if length > _MAX_RECORD or len(body) != length or zlib.crc32(body) != crc:
            log.warning("%s: damaged or torn record at %d; it and the rest ignored", name, offset)
            return
        try:
            doc = json.loads(body)
            yield Pending(str(doc["device"]), int(doc["seq"]), intent_from_text(doc["intent"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable record at %d ignored (%s)", name, offset, exc)
        offset += _HEADER.size + length


class IntentLog:
    """``<journal>-intents``, open for appending."""

    def __init__(self, path: Path, *, durable: bool) -> None:
        """``durable``: ``fdatasync`` after every append (the journal's ``synchronous=full``)."""
        self.path = path
        self._durable = durable
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise IntentLogError(
                f"{describe_path(path)}: cannot open the intent log: {exc.strerror}"
            ) from None
        #: bytes in the file (as this process has written them)
        self.size = os.fstat(self._fd).st_size

    def read(self) -> list[Pending]:
        """Every intent the file holds."""
        try:
            size = os.fstat(self._fd).st_size
            data = os.pread(self._fd, size, 0)
        except OSError as exc:
            raise IntentLogError(
                f"{describe_path(self.path)}: cannot read: {exc.strerror}"
            ) from None
        return list(decode(data, name=describe_path(self.path)))

    def append(self, pending: Pending, text: tuple[Any, ...] | None = None) -> None:
        """Durable when this returns (as durable as the journal's commits).  ``text``: the
        intent's :func:`intent_text`, if the caller has it already."""
        record = encode(pending, text)
        try:
            written = os.write(self._fd, record)
            if written == len(record) and self._durable:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise IntentLogError(
                f"{describe_path(self.path)}: cannot write an intent: {exc.strerror}"
            ) from None
        if written != len(record):  # a full disk: never leave half a record in front
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise IntentLogError(
                f"{describe_path(self.path)}: cannot write an intent: short write (disk full?)"
            )
        self.size += written

    def clear(self) -> None:
        """Empty the file: every intent in it is in the database."""
        if not self.size:
            return
        try:
            os.ftruncate(self._fd, 0)
            if self._durable:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise IntentLogError(
                f"{describe_path(self.path)}: cannot empty: {exc.strerror}"
            ) from None
        self.size = 0

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)

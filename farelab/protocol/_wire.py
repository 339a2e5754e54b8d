"""The uplink's wire format: versioned, compact, binary batches of journalled transactions, and
the backend's acknowledgements.  Pure encode/decode; every malformed input is a :class:`WireError`
with a reason, never another exception.

Batch v1 (big-endian)::

    "FLB" version=1 (1) · batch id (8, below 2**63) · device id length (1) · device id (UTF-8) ·
    count (2) · count × record (82 bytes)

    record: seq 4 · status 1 (0 completed, 1 void, 2 grey) · tx type 1 · kind 1 · alg 1 ·
            card serial 10 (BCD) · issuer 8 · card counter 2 · TTC 4 · amount 4 ·
            balance before 4 · terminal 6 · date 4 (BCD) · time 3 (BCD) · at (ms since the
            epoch) 8 · station 8 · line 1 · operator 8 (UTF-8, zero-padded) · TAC 4

Ack v1: "FLA" version=1 · batch id (8) · count (2) · status 1 (0 committed, 1 rejected).

The batch id is opaque to the backend, which echoes it in the ack.  farelab's uplink makes it
the journal file's random 23-bit epoch above the batch's 40-bit first outbox row id, and takes an
ack only if its id and count both match a batch in flight.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from datetime import UTC, datetime
from typing import Any

from farelab.card import full_serial

__all__ = [
    "BATCH_MAX",
    "KINDS",
    "STATUSES",
    "Ack",
    "Batch",
    "Record",
    "WireError",
    "decode_ack",
    "decode_batch",
    "decode_record",
    "encode_ack",
    "encode_batch",
    "encode_batch_records",
    "encode_record",
]

VERSION = 1
BATCH_MAX = 500
_BATCH_ID_LIMIT = 1 << 63
_MAGIC, _ACK_MAGIC = b"FLB", b"FLA"
_RECORD = struct.Struct(">IBBBB10s8sHIII6s4s3sq8sB8s4s")
RECORD_SIZE = _RECORD.size
STATUSES = ("completed", "void", "grey")
KINDS = ("bus", "entry", "exit", "load", "refund")
ALGS = ("3des", "sm4")


class WireError(ValueError):
    """A payload that is not a valid message; ``reason`` is a short word for the quarantine."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    """One journalled transaction as it travels: the decision, the journal, the wire and the
    ledger all hold this one value.

    The fields the card and the PSAM deal in are bytes, as they are on the card and the wire:
    ``card_serial`` (10, BCD: 20 digits), ``issuer`` (8), ``terminal`` (6), ``day`` (4, BCD
    ``YYYYMMDD``), ``time`` (3, BCD ``hhmmss``), ``station`` (8) and ``tac`` (4; zeros when the
    transaction has none, as a void one).  The ``operator`` is the device's operator as text (at
    most 8 bytes of UTF-8): the registry and the reports name operators, and only the wire pads
    it with zeros.  Hex is for the edges people read: :meth:`as_text`, :meth:`to_json` and
    their inverses.
    """

    seq: int
    status: str
    tx_type: int
    kind: str
    alg: str
    card_serial: bytes
    issuer: bytes
    card_counter: int
    ttc: int
    amount: int
    balance_before: int
    terminal: bytes
    day: bytes
    time: bytes
    at_ms: int
    station: bytes
    line: int
    operator: str
    tac: bytes

    @property
    def at(self) -> datetime:
        """When the tap happened."""
        return datetime.fromtimestamp(self.at_ms / 1000, tz=UTC)

    def as_text(self) -> tuple[Any, ...]:
        """The fields in order, each byte field as people read it: the card serial as its 20
        digits, the day and time as their digits, the station in lower-case hex, the issuer,
        terminal and TAC in upper-case hex (the ledger's columns and :meth:`to_json` hold
        these)."""
        return (
            self.seq,
            self.status,
            self.tx_type,
            self.kind,
            self.alg,
            self.card_serial.hex(),
            self.issuer.hex().upper(),
            self.card_counter,
            self.ttc,
            self.amount,
            self.balance_before,
            self.terminal.hex().upper(),
            self.day.hex(),
            self.time.hex(),
            self.at_ms,
            self.station.hex(),
            self.line,
            self.operator,
            self.tac.hex().upper(),
        )

    @classmethod
    def from_text(cls, values: Sequence[Any]) -> Record:
        """A record from :meth:`as_text`'s values (any case of hex; a card serial of fewer than
        20 digits is padded, an empty byte field is all zeros); ValueError if a field is not
        its text."""
        if len(values) != len(_FIELDS):
            raise ValueError(f"a record has {len(_FIELDS)} fields, not {len(values)}")
        (
            seq,
            status,
            tx_type,
            kind,
            alg,
            serial,
            issuer,
            counter,
            ttc,
            amount,
            before,
            terminal,
            day,
            time,
            at_ms,
            station,
            line,
            operator,
            tac,
        ) = values
        serial = str(serial)
        if not (serial.isascii() and serial.isdigit()) or len(serial) > 20:
            raise ValueError(f"card serial {serial[:40]!r} is not up to 20 digits")
        return cls(
            int(seq),
            str(status),
            int(tx_type),
            str(kind),
            str(alg),
            bytes.fromhex(full_serial(serial)),
            _from_hex(issuer, 8, "issuer"),
            int(counter),
            int(ttc),
            int(amount),
            int(before),
            _from_hex(terminal, 6, "terminal"),
            _from_hex(day, 4, "date"),
            _from_hex(time, 3, "time"),
            int(at_ms),
            _from_hex(station, 8, "station"),
            int(line),
            str(operator),
            _from_hex(tac, 4, "TAC"),
        )

    def to_json(self) -> dict[str, Any]:
        """The record as JSON for people and scripts: its fields by name, as :meth:`as_text`."""
        return dict(zip(_FIELDS, self.as_text(), strict=True))

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Record:
        """A record from :meth:`to_json`'s form (``operator`` may be left out: none);
        ValueError or KeyError if it is not one."""
        return cls.from_text(
            [doc.get(name, "") if name == "operator" else doc[name] for name in _FIELDS]
        )


_FIELDS = tuple(f.name for f in fields(Record))


def _quick_init(cls: type[Any], names: Sequence[str]) -> None:
    """Give a frozen, slotted dataclass an ``__init__`` of the same parameters (``names``, none
    with a default) that sets each slot through its descriptor.  The dataclass's own goes
    through ``object.__setattr__`` for every field, which made building a record twice as
    slow: a backend builds one for every transaction it ingests, a validator for every tap."""
    if any(f.default is not MISSING or f.default_factory is not MISSING for f in fields(cls)):
        raise TypeError(f"{cls.__name__}: a quick __init__ is for fields without defaults")
    namespace: dict[str, Any] = {}
    for name in names:
        namespace[f"set_{name}"] = getattr(cls, name).__set__
    params = ", ".join(names)
    body = "".join(f"    set_{name}(self, {name})\n" for name in names)
    exec(f"def __init__(self, {params}):\n{body}", namespace)  # noqa: S102 - our own field names
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init


_quick_init(Record, _FIELDS)
# The byte fields' sizes, in field order.
_SIZES = {
    "card_serial": 10,
    "issuer": 8,
    "terminal": 6,
    "day": 4,
    "time": 3,
    "station": 8,
    "tac": 4,
}
_SIZE_ROW = tuple(_SIZES.values())


def _from_hex(value: object, size: int, what: str) -> bytes:
    text = str(value)
    raw = bytes.fromhex(text) if text else bytes(size)
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes, not {text[:40]!r}")
    return raw


@dataclass(frozen=True, slots=True)
class Batch:
    """A device's batch of records."""

    batch_id: int
    device: str
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """The backend's word on a batch, published after its own commit."""

    batch_id: int
    count: int
    committed: bool


def _operator(seq: int, name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 8:
        raise ValueError(f"record {seq}: operator {name!r} is longer than 8 bytes")
    return raw.ljust(8, b"\x00")


def encode_record(r: Record) -> bytes:
    """One record's 82 bytes; ValueError if a field does not fit."""
    sizes = (
        len(r.card_serial),
        len(r.issuer),
        len(r.terminal),
        len(r.day),
        len(r.time),
        len(r.station),
        len(r.tac),
    )
    if sizes != _SIZE_ROW:
        wrong = [
            f"{name} is {got} bytes, not {want}"
            for (name, want), got in zip(_SIZES.items(), sizes, strict=True)
            if got != want
        ]
        raise ValueError(f"record {r.seq}: {'; '.join(wrong)}")
    if not r.card_serial.hex().isdigit():
        raise ValueError(f"record {r.seq}: the card serial is not BCD")
    try:
        return _RECORD.pack(
            r.seq,
            STATUSES.index(r.status),
            r.tx_type,
            KINDS.index(r.kind),
            ALGS.index(r.alg),
            r.card_serial,
            r.issuer,
            r.card_counter,
            r.ttc,
            r.amount,
            r.balance_before,
            r.terminal,
            r.day,
            r.time,
            r.at_ms,
            r.station,
            r.line,
            _operator(r.seq, r.operator),
            r.tac,
        )
    except struct.error as exc:
        raise ValueError(f"record {r.seq}: {exc}") from None


def encode_batch_records(batch_id: int, device: str, records: Sequence[bytes]) -> bytes:
    """A batch of records already encoded by :func:`encode_record` (the journal stores them
    so, and the uplink only frames them); ValueError if it cannot be a valid batch."""
    if not 1 <= len(records) <= BATCH_MAX:
        raise ValueError(f"a batch holds 1 to {BATCH_MAX} records, not {len(records)}")
    if any(len(r) != _RECORD.size for r in records):
        raise ValueError(f"encoded records are {_RECORD.size} bytes each")
    raw_device = device.encode()
    if not 1 <= len(raw_device) <= 64:
        raise ValueError("device ids are 1 to 64 bytes")
    header = _MAGIC + bytes((VERSION,)) + batch_id.to_bytes(8, "big")
    header += bytes((len(raw_device),)) + raw_device + len(records).to_bytes(2, "big")
    return header + b"".join(records)


def encode_batch(batch: Batch) -> bytes:
    """Encode a batch; ValueError if it is empty, too large or holds an unencodable record."""
    if not 1 <= len(batch.records) <= BATCH_MAX:
        raise ValueError(f"a batch holds 1 to {BATCH_MAX} records, not {len(batch.records)}")
    return encode_batch_records(
        batch.batch_id, batch.device, [encode_record(r) for r in batch.records]
    )


def decode_batch(payload: bytes, *, max_bytes: int = 64 * 1024) -> Batch:
    """Decode and check a batch; WireError names what is wrong."""
    if len(payload) > max_bytes:
        raise WireError("oversize", f"{len(payload)} bytes, at most {max_bytes}")
    if len(payload) < 15 or payload[:3] != _MAGIC:
        raise WireError("malformed", "not a farelab batch")
    if payload[3] != VERSION:
        raise WireError("unknown_version", f"version {payload[3]}, this backend speaks {VERSION}")
    batch_id = int.from_bytes(payload[4:12], "big")
    if batch_id >= _BATCH_ID_LIMIT:
        # The ledger keeps batch ids as signed 64-bit integers; farelab's uplink makes 63-bit ones.
        raise WireError("malformed", f"batch id {batch_id} is not below 2**63")
    n = payload[12]
    end = 13 + n
    if n == 0 or len(payload) < end + 2:
        raise WireError("truncated", "the header ends early")
    try:
        device = payload[13:end].decode()
    except UnicodeDecodeError:
        raise WireError("malformed", "the device id is not UTF-8") from None
    count = int.from_bytes(payload[end : end + 2], "big")
    body = payload[end + 2 :]
    if not 1 <= count <= BATCH_MAX:
        raise WireError("malformed", f"{count} records, expected 1 to {BATCH_MAX}")
    if len(body) != count * _RECORD.size:
        reason = "truncated" if len(body) < count * _RECORD.size else "malformed"
        raise WireError(reason, f"{len(body)} record bytes for {count} records")
    records = [_record(i, fields) for i, fields in enumerate(_RECORD.iter_unpack(body))]
    return Batch(batch_id, device, tuple(records))


def decode_record(raw: bytes) -> Record:
    """One record from its 82 bytes; WireError if it is not one."""
    if len(raw) != _RECORD.size:
        raise WireError("malformed", f"a record is {_RECORD.size} bytes, not {len(raw)}")
    return _record(0, _RECORD.unpack(raw))


def _record(i: int, fields: tuple[Any, ...]) -> Record:
    (
        seq,
        status,
        tx_type,
        kind,
        alg,
        serial,
        issuer,
        counter,
        ttc,
        amount,
        before,
        terminal,
        day,
        time,
        at_ms,
        station,
        line,
        operator,
        tac,
    ) = fields
    if status >= len(STATUSES) or kind >= len(KINDS) or alg >= len(ALGS):
        raise WireError("malformed", f"record {i}: unknown status, kind or algorithm")
    if not serial.hex().isdigit():
        raise WireError("malformed", f"record {i}: card serial is not BCD")
    try:
        # Strictly: a replacement character would make a record that cannot be encoded again.
        operator_name = operator.rstrip(b"\x00").decode()
    except UnicodeDecodeError:
        raise WireError("malformed", f"record {i}: the operator is not UTF-8") from None
    return Record(
        seq,
        STATUSES[status],
        tx_type,
        KINDS[kind],
        ALGS[alg],
        serial,
        issuer,
        counter,
        ttc,
        amount,
        before,
        terminal,
        day,
        time,
        at_ms,
        station,
        line,
        operator_name,
        tac,
    )


def encode_ack(ack: Ack) -> bytes:
    """Encode an acknowledgement."""
    return (
        _ACK_MAGIC
        + bytes((VERSION,))
        + ack.batch_id.to_bytes(8, "big")
        + ack.count.to_bytes(2, "big")
        + bytes((0 if ack.committed else 1,))
    )


def decode_ack(payload: bytes) -> Ack:
    """Decode an acknowledgement; WireError if it is not one."""
    if len(payload) != 15 or payload[:3] != _ACK_MAGIC or payload[3] != VERSION:
        raise WireError("malformed", "not a farelab ack")
    return Ack(
        int.from_bytes(payload[4:12], "big"),
        int.from_bytes(payload[12:14], "big"),
        payload[14] == 0,
    )

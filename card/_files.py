"""Byte layouts of the transit application's files (docs/card-protocol.md B2) and their BCD
conventions.

Amounts are 4-byte big-endian fen, dates and times BCD in China Standard Time (the card has no
clock and no zone: terminals write local CST, so aware datetimes are converted at this edge).
Layouts marked "farelab" are our definitions where the public record is silent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

__all__ = [
    "CST",
    "EF1A_LEN",
    "EF1E_LEN",
    "EF15_LEN",
    "EF16_LEN",
    "EF17_LEN",
    "EF18_LEN",
    "BusRecord",
    "CardType",
    "Industry",
    "LogRecord",
    "MetroRecord",
    "MetroStatus",
    "PublicInfo",
    "TripRecord",
    "TxType",
    "bcd",
    "bcd_date",
    "bcd_datetime",
    "bcd_time",
    "from_bcd",
    "full_serial",
    "parse_bcd_date",
    "parse_bcd_datetime",
]

CST = timezone(timedelta(hours=8), "CST")
"""China Standard Time, the zone of every date and time written on a card."""


def full_serial(serial: str) -> str:
    """A card serial as the card's public file holds it: 20 digits, zero-padded on the left."""
    return serial.rjust(20, "0")


EF15_LEN = 30
EF16_LEN = 55
EF17_LEN = 60
EF18_LEN = 23
EF1A_LEN = 128
EF1E_LEN = 48


class TxType(enum.IntEnum):
    """Transaction types of EF18 and of the MAC/TAC input."""

    LOAD = 0x02
    PURCHASE = 0x06
    CAPP_PURCHASE = 0x09


class CardType(enum.IntEnum):
    """Card type (farelab: EF15 issuer data byte 0, also EF17)."""

    ADULT = 0x01
    STUDENT = 0x02
    ELDERLY = 0x03
    TEST = 0x04
    DISABLED = 0x05

    @property
    def label(self) -> str:
        """Lower-case name as used on the command line."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> CardType:
        """Parse ``adult``/``student``/``elderly``/``disabled``/``test``."""
        try:
            return cls[label.upper()]
        except KeyError:
            names = ", ".join(t.label for t in cls)
            raise ValueError(f"unknown card type {label!r} (expected one of {names})") from None


class MetroStatus(enum.IntEnum):
    """EF1A record 1 status byte."""

    NONE = 0x00
    ENTERED = 0x01
    EXITED = 0x02


class Industry(enum.IntEnum):
    """EF1E industry byte (farelab)."""

    METRO = 0x01
    BUS = 0x02
    TOPUP = 0x03


def bcd(digits: str, nbytes: int) -> bytes:
    """Digits as packed BCD, left-padded with zeros to ``nbytes``."""
    if not digits.isdigit() and digits != "":
        raise ValueError(f"BCD takes decimal digits only, got {digits!r}")
    if len(digits) > 2 * nbytes:
        raise ValueError(f"{digits!r} does not fit {nbytes} BCD bytes")
    return bytes.fromhex(digits.rjust(2 * nbytes, "0"))


def from_bcd(data: bytes) -> str:
    """Packed BCD to digits; ValueError if a nibble is not a decimal digit."""
    text = data.hex()
    if not text.isdigit() and text != "":
        raise ValueError(f"not BCD: {text.upper()}")
    return text


def _cst(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("card times need an aware datetime, not a naive one")
    return moment.astimezone(CST)


def bcd_date(day: date) -> bytes:
    """YYYYMMDD, 4 bytes."""
    return bcd(f"{day.year:04d}{day.month:02d}{day.day:02d}", 4)


def bcd_time(moment: datetime) -> bytes:
    """hhmmss in CST, 3 bytes."""
    local = _cst(moment)
    return bcd(f"{local.hour:02d}{local.minute:02d}{local.second:02d}", 3)


def bcd_datetime(moment: datetime) -> bytes:
    """YYYYMMDDhhmmss in CST, 7 bytes."""
    local = _cst(moment)
    return bcd_date(local.date()) + bcd_time(local)


def parse_bcd_date(data: bytes) -> date | None:
    """4 BCD bytes to a date; None for all zeros; ValueError if not a date."""
    if data == bytes(4):
        return None
    text = from_bcd(data)
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def parse_bcd_datetime(data: bytes) -> datetime | None:
    """7 BCD bytes (CST) to an aware datetime; None for all zeros; ValueError if invalid."""
    if data == bytes(7):
        return None
    text = from_bcd(data)
    return datetime(
        int(text[:4]),
        int(text[4:6]),
        int(text[6:8]),
        int(text[8:10]),
        int(text[10:12]),
        int(text[12:14]),
        tzinfo=CST,
    )


class _Cursor:
    """Reads fixed-width fields from a record, front to back."""

    def __init__(self, data: bytes, length: int, what: str) -> None:
        if len(data) != length:
            raise ValueError(f"{what} must be {length} bytes, got {len(data)}")
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")


def _fixed(value: bytes, n: int, what: str) -> bytes:
    if len(value) > n:
        raise ValueError(f"{what} must be at most {n} bytes, got {len(value)}")
    return value.ljust(n, b"\x00")


@dataclass(frozen=True, slots=True)
class PublicInfo:
    """EF15, the public information file that also travels in the FCI (tag 9F0C)."""

    issuer_id: bytes
    serial: str
    start: date
    expiry: date
    card_type: CardType = CardType.ADULT
    app_type: int = 0x02
    app_version: int = 0x01

    def __post_init__(self) -> None:
        if len(self.issuer_id) != 8:
            raise ValueError(f"issuer id must be 8 bytes, got {len(self.issuer_id)}")
        if not self.serial.isdigit() or len(self.serial) != 20:
            raise ValueError(f"card serial must be 20 decimal digits, got {self.serial!r}")

    @property
    def serial8(self) -> bytes:
        """EF15[12:20], the diversification data of the second level (docs/card-protocol.md B4)."""
        return bcd(self.serial, 10)[2:]

    @property
    def city_code(self) -> str:
        """EF15 bytes 2–3 as four digits (BCD)."""
        return self.issuer_id[2:4].hex()

    def encode(self) -> bytes:
        """The 30 bytes of EF15."""
        return (
            self.issuer_id
            + bytes((self.app_type, self.app_version))
            + bcd(self.serial, 10)
            + bcd_date(self.start)
            + bcd_date(self.expiry)
            + bytes((self.card_type, 0x00))
        )

    @classmethod
    def decode(cls, data: bytes) -> PublicInfo:
        """Parse EF15; ValueError if any field is malformed."""
        cur = _cursor(data, EF15_LEN, "EF15")
        issuer_id = cur.take(8)
        app_type, version = cur.take(1)[0], cur.take(1)[0]
        serial = from_bcd(cur.take(10))
        start = parse_bcd_date(cur.take(4))
        expiry = parse_bcd_date(cur.take(4))
        if start is None or expiry is None:
            raise ValueError("EF15 has no start or expiry date")
        card_type = CardType(cur.take(1)[0])
        return cls(issuer_id, serial, start, expiry, card_type, app_type, version)


def _cursor(data: bytes, length: int, what: str) -> _Cursor:
    return _Cursor(bytes(data), length, what)


def holder_file(card_type: CardType, name: str = "", id_number: str = "") -> bytes:
    """EF16: card-type flag, staff flag, name (GBK, 20 B), id number (32 B), id type."""
    return (
        bytes((card_type, 0x00))
        + _fixed(name.encode("gbk"), 20, "holder name")
        + _fixed(id_number.encode("ascii"), 32, "id number")
        + b"\x00"
    )


def management_file(city_code: str, card_type: CardType, province: str = "0000") -> bytes:
    """EF17: country 156, province, city, interop flag 0001 (T-Union), card type, RFU."""
    return (
        bytes.fromhex("00000156")
        + bcd(province, 2)
        + bcd(city_code, 2)
        + b"\x00\x01"
        + bytes((card_type,))
        + bytes(49)
    )


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One EF18 record, written by the card on every purse change.

    ``counter`` is the counter the INITIALIZE command returned for that transaction.
    """

    counter: int
    amount: int
    tx_type: int
    terminal: bytes
    day: bytes
    time: bytes
    overdraft: int = 0

    def encode(self) -> bytes:
        """The 23 bytes of the record."""
        return (
            self.counter.to_bytes(2, "big")
            + self.overdraft.to_bytes(3, "big")
            + self.amount.to_bytes(4, "big")
            + bytes((self.tx_type,))
            + self.terminal
            + self.day
            + self.time
        )

    @classmethod
    def decode(cls, data: bytes) -> LogRecord:
        """Parse one 23-byte record."""
        cur = _cursor(data, EF18_LEN, "EF18 record")
        counter = cur.int(2)
        overdraft = cur.int(3)
        amount = cur.int(4)
        tx_type = cur.take(1)[0]
        return cls(counter, amount, tx_type, cur.take(6), cur.take(4), cur.take(3), overdraft)


@dataclass(frozen=True, slots=True)
class MetroRecord:
    """EF1A record 1, the metro journey (docs/card-protocol.md B2 layout, 128 bytes)."""

    status: MetroStatus = MetroStatus.NONE
    journey: bytes = bytes(8)
    entry_city: str = "0000"
    exit_city: str = "0000"
    entry_operator: bytes = bytes(8)
    exit_operator: bytes = bytes(8)
    entry_station: bytes = bytes(8)
    exit_station: bytes = bytes(8)
    entry_terminal: bytes = bytes(8)
    exit_terminal: bytes = bytes(8)
    entry_time: datetime | None = None
    exit_time: datetime | None = None
    marked_amount: int = 0
    entry_line: int = 0
    exit_line: int = 0
    entry_amount: int = 0
    balance_after_entry: int = 0
    exit_amount: int = 0
    valid: int = 0x01
    interop: int = 0x01
    lock: int = 0x00
    rfu: bytes = field(default=bytes(29))

    RECORD_ID = b"\x27\x01"

    def encode(self) -> bytes:
        """The 128 bytes of the record."""

        def when(moment: datetime | None) -> bytes:
            return bytes(7) if moment is None else bcd_datetime(moment)

        out = (
            self.RECORD_ID
            + b"\x7d"
            + bytes((self.valid, self.interop, self.lock))
            + _fixed(self.journey, 8, "journey")
            + bytes((self.status,))
            + bcd(self.entry_city, 2)
            + bcd(self.exit_city, 2)
            + _fixed(self.entry_operator, 8, "entry operator")
            + _fixed(self.exit_operator, 8, "exit operator")
            + _fixed(self.entry_station, 8, "entry station")
            + _fixed(self.exit_station, 8, "exit station")
            + _fixed(self.entry_terminal, 8, "entry terminal")
            + _fixed(self.exit_terminal, 8, "exit terminal")
            + when(self.entry_time)
            + when(self.exit_time)
            + self.marked_amount.to_bytes(4, "big")
            + bytes((self.entry_line, self.exit_line))
            + self.entry_amount.to_bytes(4, "big")
            + self.balance_after_entry.to_bytes(4, "big")
            + self.exit_amount.to_bytes(4, "big")
            + _fixed(self.rfu, 29, "RFU")
        )
        assert len(out) == EF1A_LEN
        return out

    @classmethod
    def decode(cls, data: bytes) -> MetroRecord:
        """Parse record 1 of EF1A; ValueError if it is not a metro record."""
        cur = _cursor(data, EF1A_LEN, "EF1A metro record")
        if cur.take(2) != cls.RECORD_ID:
            raise ValueError("EF1A record 1 does not start with 27 01")
        cur.take(1)
        valid, interop, lock = cur.take(1)[0], cur.take(1)[0], cur.take(1)[0]
        journey = cur.take(8)
        status = MetroStatus(cur.take(1)[0])
        entry_city, exit_city = from_bcd(cur.take(2)), from_bcd(cur.take(2))
        entry_op, exit_op = cur.take(8), cur.take(8)
        entry_st, exit_st = cur.take(8), cur.take(8)
        entry_term, exit_term = cur.take(8), cur.take(8)
        entry_time = parse_bcd_datetime(cur.take(7))
        exit_time = parse_bcd_datetime(cur.take(7))
        marked = cur.int(4)
        entry_line, exit_line = cur.take(1)[0], cur.take(1)[0]
        entry_amount, balance_after, exit_amount = cur.int(4), cur.int(4), cur.int(4)
        return cls(
            status,
            journey,
            entry_city,
            exit_city,
            entry_op,
            exit_op,
            entry_st,
            exit_st,
            entry_term,
            exit_term,
            entry_time,
            exit_time,
            marked,
            entry_line,
            exit_line,
            entry_amount,
            balance_after,
            exit_amount,
            valid,
            interop,
            lock,
            cur.take(29),
        )


@dataclass(frozen=True, slots=True)
class BusRecord:
    """EF1A record 2, the last bus ride (farelab layout, 128 bytes).

    id 2 (27 02) · len 1 · valid 1 · interop 1 · lock 1 · journey 8 · status 1 (00 none,
    03 boarded) · city 2 · operator 8 · route 4 · terminal 8 · time 7 · amount 4 ·
    balance after 4 · transfers 1 · RFU 75.
    """

    status: int = 0x00
    journey: bytes = bytes(8)
    city: str = "0000"
    operator: bytes = bytes(8)
    route: bytes = bytes(4)
    terminal: bytes = bytes(8)
    time: datetime | None = None
    amount: int = 0
    balance_after: int = 0
    transfers: int = 0
    valid: int = 0x01
    interop: int = 0x01
    lock: int = 0x00

    RECORD_ID = b"\x27\x02"
    BOARDED = 0x03

    def encode(self) -> bytes:
        """The 128 bytes of the record."""
        out = (
            self.RECORD_ID
            + b"\x7d"
            + bytes((self.valid, self.interop, self.lock))
            + _fixed(self.journey, 8, "journey")
            + bytes((self.status,))
            + bcd(self.city, 2)
            + _fixed(self.operator, 8, "operator")
            + _fixed(self.route, 4, "route")
            + _fixed(self.terminal, 8, "terminal")
            + (bytes(7) if self.time is None else bcd_datetime(self.time))
            + self.amount.to_bytes(4, "big")
            + self.balance_after.to_bytes(4, "big")
            + bytes((self.transfers,))
            + bytes(75)
        )
        assert len(out) == EF1A_LEN
        return out

    @classmethod
    def decode(cls, data: bytes) -> BusRecord:
        """Parse record 2 of EF1A; ValueError if it is not a bus record."""
        cur = _cursor(data, EF1A_LEN, "EF1A bus record")
        if cur.take(2) != cls.RECORD_ID:
            raise ValueError("EF1A record 2 does not start with 27 02")
        cur.take(1)
        valid, interop, lock = cur.take(1)[0], cur.take(1)[0], cur.take(1)[0]
        journey = cur.take(8)
        status = cur.take(1)[0]
        city = from_bcd(cur.take(2))
        operator, route, terminal = cur.take(8), cur.take(4), cur.take(8)
        moment = parse_bcd_datetime(cur.take(7))
        amount, balance_after = cur.int(4), cur.int(4)
        transfers = cur.take(1)[0]
        return cls(
            status,
            journey,
            city,
            operator,
            route,
            terminal,
            moment,
            amount,
            balance_after,
            transfers,
            valid,
            interop,
            lock,
        )


@dataclass(frozen=True, slots=True)
class TripRecord:
    """One EF1E trip-history record (farelab layout, 48 bytes).

    type 1 · terminal 8 · industry 1 · line 2 · station 8 · amount 4 · balance 4 · time 7 ·
    city 2 · card counter 2 · RFU 9.
    """

    tx_type: int
    terminal: bytes
    industry: Industry
    line: int
    station: bytes
    amount: int
    balance: int
    time: datetime
    city: str
    counter: int

    def encode(self) -> bytes:
        """The 48 bytes of the record."""
        out = (
            bytes((self.tx_type,))
            + _fixed(self.terminal, 8, "terminal")
            + bytes((self.industry,))
            + self.line.to_bytes(2, "big")
            + _fixed(self.station, 8, "station")
            + self.amount.to_bytes(4, "big")
            + self.balance.to_bytes(4, "big")
            + bcd_datetime(self.time)
            + bcd(self.city, 2)
            + self.counter.to_bytes(2, "big")
            + bytes(9)
        )
        assert len(out) == EF1E_LEN
        return out

    @classmethod
    def decode(cls, data: bytes) -> TripRecord:
        """Parse one 48-byte record."""
        cur = _cursor(data, EF1E_LEN, "EF1E record")
        tx_type = cur.take(1)[0]
        terminal = cur.take(8)
        industry = Industry(cur.take(1)[0])
        line = cur.int(2)
        station = cur.take(8)
        amount, balance = cur.int(4), cur.int(4)
        moment = parse_bcd_datetime(cur.take(7))
        if moment is None:
            raise ValueError("EF1E record has no time")
        city = from_bcd(cur.take(2))
        return cls(
            tx_type, terminal, industry, line, station, amount, balance, moment, city, cur.int(2)
        )

"""The byte layouts of docs/card-protocol.md B2 round-trip and reject what they cannot be."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from farelab.card import (
    CST,
    BusRecord,
    CardType,
    Industry,
    LogRecord,
    MetroRecord,
    MetroStatus,
    PublicInfo,
    TripRecord,
    TxType,
    bcd_datetime,
)


def test_ef15_layout_matches_spec_b2() -> None:
    info = PublicInfo(
        bytes.fromhex("1310000000000000"),
        "00000000000012345678",
        date(2026, 1, 2),
        date(2036, 1, 2),
        CardType.STUDENT,
    )
    raw = info.encode()
    assert len(raw) == 30
    assert raw[0:8].hex() == "1310000000000000"
    assert raw[8] == 0x02  # e-purse
    assert raw[10:20].hex() == "00000000000012345678"
    assert raw[20:24].hex() == "20260102"
    assert raw[24:28].hex() == "20360102"
    assert raw[28] == CardType.STUDENT
    assert info.serial8 == raw[12:20]
    assert PublicInfo.decode(raw) == info


def test_ef15_decode_rejects_non_bcd_serial() -> None:
    raw = bytearray(
        PublicInfo(bytes(8), "1".zfill(20), date(2026, 1, 1), date(2030, 1, 1)).encode()
    )
    raw[15] = 0xAB
    with pytest.raises(ValueError, match="BCD"):
        PublicInfo.decode(bytes(raw))


def test_log_record_is_23_bytes_in_spec_order() -> None:
    rec = LogRecord(
        7,
        200,
        TxType.PURCHASE,
        bytes.fromhex("001122334455"),
        bytes.fromhex("20261123"),
        bytes.fromhex("083000"),
    )
    raw = rec.encode()
    assert raw.hex() == "0007000000000000c80600112233445520261123083000"
    assert LogRecord.decode(raw) == rec


def test_metro_record_layout_offsets() -> None:
    entry = datetime(2026, 11, 23, 8, 30, 5, tzinfo=CST)
    rec = MetroRecord(
        status=MetroStatus.ENTERED,
        entry_station=b"\x02\x07" + bytes(6),
        entry_time=entry,
        marked_amount=600,
        entry_line=2,
        balance_after_entry=4800,
    )
    raw = rec.encode()
    assert raw[:3] == bytes.fromhex("27017D")
    assert raw[14] == MetroStatus.ENTERED
    assert raw[35:37] == b"\x02\x07"  # entry station starts after the operators
    assert raw[67:74].hex() == "20261123083005"
    assert int.from_bytes(raw[81:85], "big") == 600
    assert raw[85] == 2
    assert int.from_bytes(raw[91:95], "big") == 4800
    assert MetroRecord.decode(raw) == rec


def test_bus_and_trip_records_round_trip() -> None:
    when = datetime(2026, 11, 23, 0, 15, tzinfo=UTC)
    bus = BusRecord(status=BusRecord.BOARDED, route=b"\x00\x00\x01\x02", time=when, amount=100)
    assert BusRecord.decode(bus.encode()).time == when
    trip = TripRecord(TxType.PURCHASE, b"T1", Industry.BUS, 12, b"S", 100, 900, when, "0310", 3)
    assert len(trip.encode()) == 48
    assert TripRecord.decode(trip.encode()).time == when


def test_card_times_are_written_in_china_standard_time() -> None:
    assert bcd_datetime(datetime(2026, 11, 23, 23, 0, tzinfo=UTC)).hex() == "20261124070000"


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        bcd_datetime(datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test

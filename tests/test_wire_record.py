"""The wire's record: one frozen value with bytes where the card has bytes, one codec, and hex
only at the edges people read.  A batch encoded by the codec of version 1 as it stood when the
record's fields were hex text decodes and encodes again to the same bytes."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest

from farelab.protocol import (
    Batch,
    Record,
    WireError,
    decode_batch,
    decode_record,
    encode_batch,
    encode_record,
)

# Five records (completed, grey, void; bus, entry, exit, load, refund; 3DES and SM4; a short card
# serial, an empty TAC, station and operator, a multi-byte operator, every counter at its top)
# encoded by the earlier codec, whose record held its byte fields as hex text.
GOLDEN = bytes.fromhex(
    "464c4201000005000000007b0962656e63682d372d3000050000000100090000000700000000000000001310"
    "000000000000000000000001000000c8000f42400000b000000020261123083000000001a205cf4740000000"
    "00000000000042454e4348000000cd421c790000000202090101000700000000000000011310000000000000"
    "000000000002000000c8000f42400000b000000020261123083000000001a205cf4740035100010200000002"
    "e585ace4baa40000000000000000000301090200000000310000000042421310000000000000000100000003"
    "000000c8000f41780000b000000020261123083000000001a205cf4740000000000000000000000000000000"
    "000000000000ffffffff00020300000700000000000000001310000000000000ffffffffffff00000000ffff"
    "ffff0000b000000020261123083000ffffffffffffffff0000000000000000ff4142434445464748cd421c79"
    "0000000200060400000700000000000000010000000000000000000000000002000000c8000f424000000000"
    "000020261123083000000001a205cf474000000000000000000042454e4348000000deadbeef"
)

# What the earlier codec decoded them to: the text that the ledger's columns hold.
OLD_TEXT = [
    {
        "seq": 1,
        "status": "completed",
        "tx_type": 9,
        "kind": "bus",
        "alg": "3des",
        "card_serial": "00070000000000000000",
        "issuer": "1310000000000000",
        "card_counter": 0,
        "ttc": 1,
        "amount": 200,
        "balance_before": 1000000,
        "terminal": "0000B0000000",
        "day": "20261123",
        "time": "083000",
        "at_ms": 1795393800000,
        "station": "0000000000000000",
        "line": 0,
        "operator": "BENCH",
        "tac": "CD421C79",
    },
    {
        "seq": 2,
        "status": "grey",
        "tx_type": 9,
        "kind": "entry",
        "alg": "sm4",
        "card_serial": "00070000000000000001",
        "issuer": "1310000000000000",
        "card_counter": 0,
        "ttc": 2,
        "amount": 200,
        "balance_before": 1000000,
        "terminal": "0000B0000000",
        "day": "20261123",
        "time": "083000",
        "at_ms": 1795393800000,
        "station": "0351000102000000",
        "line": 2,
        "operator": "公交",
        "tac": "00000000",
    },
    {
        "seq": 3,
        "status": "void",
        "tx_type": 9,
        "kind": "exit",
        "alg": "3des",
        "card_serial": "00000031000000004242",
        "issuer": "1310000000000000",
        "card_counter": 1,
        "ttc": 3,
        "amount": 200,
        "balance_before": 999800,
        "terminal": "0000B0000000",
        "day": "20261123",
        "time": "083000",
        "at_ms": 1795393800000,
        "station": "0000000000000000",
        "line": 0,
        "operator": "",
        "tac": "00000000",
    },
    {
        "seq": 4294967295,
        "status": "completed",
        "tx_type": 2,
        "kind": "load",
        "alg": "3des",
        "card_serial": "00070000000000000000",
        "issuer": "1310000000000000",
        "card_counter": 65535,
        "ttc": 4294967295,
        "amount": 0,
        "balance_before": 4294967295,
        "terminal": "0000B0000000",
        "day": "20261123",
        "time": "083000",
        "at_ms": -1,
        "station": "0000000000000000",
        "line": 255,
        "operator": "ABCDEFGH",
        "tac": "CD421C79",
    },
    {
        "seq": 2,
        "status": "completed",
        "tx_type": 6,
        "kind": "refund",
        "alg": "3des",
        "card_serial": "00070000000000000001",
        "issuer": "0000000000000000",
        "card_counter": 0,
        "ttc": 2,
        "amount": 200,
        "balance_before": 1000000,
        "terminal": "000000000000",
        "day": "20261123",
        "time": "083000",
        "at_ms": 1795393800000,
        "station": "0000000000000000",
        "line": 0,
        "operator": "BENCH",
        "tac": "DEADBEEF",
    },
]


def test_a_batch_of_the_earlier_codec_decodes_and_encodes_to_the_same_bytes() -> None:
    batch = decode_batch(GOLDEN)
    assert (batch.batch_id, batch.device, len(batch.records)) == ((5 << 40) + 123, "bench-7-0", 5)
    assert encode_batch(batch) == GOLDEN


def test_the_byte_fields_are_the_cards_bytes() -> None:
    first, _, void, top, _ = decode_batch(GOLDEN).records
    assert first.card_serial == bytes.fromhex("00070000000000000000")
    assert void.card_serial == bytes.fromhex("00000031000000004242")
    assert (first.issuer, first.terminal) == (
        bytes.fromhex("1310000000000000"),
        bytes(2) + b"\xb0" + bytes(3),
    )
    assert (first.day, first.time) == (b"\x20\x26\x11\x23", b"\x08\x30\x00")
    assert (void.tac, void.station, void.operator) == (bytes(4), bytes(8), "")
    assert (top.seq, top.ttc, top.at_ms, top.operator) == (0xFFFFFFFF, 0xFFFFFFFF, -1, "ABCDEFGH")


def test_the_text_form_is_what_the_earlier_codec_gave() -> None:
    records = decode_batch(GOLDEN).records
    assert [r.to_json() for r in records] == OLD_TEXT
    assert [Record.from_json(doc) for doc in OLD_TEXT] == list(records)
    assert [Record.from_text(r.as_text()) for r in records] == list(records)


def test_the_text_form_pads_a_short_serial_and_reads_an_empty_field_as_zeros() -> None:
    doc = {**OLD_TEXT[0], "card_serial": "4242", "tac": "", "issuer": "1310000000000000"}
    del doc["operator"]
    record = Record.from_json(doc)
    assert record.card_serial == bytes.fromhex("0" * 16 + "4242")
    assert (record.tac, record.operator) == (bytes(4), "")


@pytest.mark.parametrize(
    "change",
    [{"card_serial": "12AB"}, {"card_serial": "1" * 21}, {"issuer": "1310"}, {"tac": "XYZ"}],
    ids=["serial-hex", "serial-long", "issuer-short", "tac-not-hex"],
)
def test_a_text_that_is_no_field_is_a_value_error(change: dict[str, str]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any bad field
        Record.from_json({**OLD_TEXT[0], **change})


@pytest.mark.parametrize(
    "change",
    [
        {"card_serial": bytes(9)},
        {"issuer": bytes(9)},
        {"terminal": b""},
        {"tac": bytes(3)},
        {"card_serial": b"\xaa" * 10},
        {"operator": "九个字节"},
    ],
    ids=[
        "serial-short",
        "issuer-long",
        "terminal-empty",
        "tac-short",
        "serial-not-bcd",
        "operator",
    ],
)
def test_a_field_that_does_not_fit_is_refused_not_cut_or_padded(change: dict[str, object]) -> None:
    record = replace(decode_batch(GOLDEN).records[0], **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="record 1"):
        encode_record(record)


def test_one_record_decodes_alone() -> None:
    first = decode_batch(GOLDEN).records[0]
    assert decode_record(encode_record(first)) == first
    with pytest.raises(WireError):
        decode_record(encode_record(first)[:-1])


def test_an_encoded_batch_of_records_round_trips() -> None:
    records = decode_batch(GOLDEN).records
    assert decode_batch(encode_batch(Batch(9, "d", records))).records == records


def test_a_record_is_built_by_position_or_name_and_stays_frozen() -> None:
    record = decode_batch(GOLDEN).records[0]
    values = {f.name: getattr(record, f.name) for f in dataclasses.fields(Record)}
    assert Record(**values) == record == Record(*values.values())
    assert hash(Record(**values)) == hash(record)
    assert dataclasses.replace(record, seq=9).seq == 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.seq = 9  # type: ignore[misc]
    with pytest.raises(TypeError, match="missing"):
        Record(1, "completed")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected"):
        Record(**values, colour="red")  # type: ignore[call-arg]

"""The contract's messages on their own: parameters, status, load authorization, topics."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from farelab.card import Alg, LoadRequest
from farelab.protocol import (
    LATENCY_BOUNDS_MS,
    LOAD_REQ,
    PARAMS_TOPIC,
    DeviceStatus,
    ParamsError,
    ParamsMessage,
    authorize_message,
    card_serial_of,
    check_client_id,
    decode_params,
    decode_status,
    encode_params,
    encode_status,
    load_request_of,
)

ISSUER = bytes.fromhex("1310000000000000")


def test_parameters_round_trip_and_pad_serials() -> None:
    message = ParamsMessage(7, frozenset({"00000000000000000042"}), frozenset({ISSUER}), "x = 1")
    assert decode_params(encode_params(message)) == message
    short = decode_params(b'{"version": 3, "hotlist": ["42"]}')
    assert short == ParamsMessage(3, frozenset({"00000000000000000042"}))


def test_parameters_leave_out_what_they_do_not_change() -> None:
    assert decode_params(b'{"version": 0}') == ParamsMessage(0)
    assert json.loads(encode_params(ParamsMessage(1))) == {"version": 1}


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"\xff", "not JSON"),
        (b"[]", "integer 'version'"),
        (b'{"version": true}', "integer 'version'"),
        (b'{"version": -1}', "integer 'version'"),
        (b'{"version": 1, "hotlist": "42"}', "card serials"),
        (b'{"version": 1, "hotlist": ["4a"]}', "card serials"),
        (b'{"version": 1, "hotlist": ["\xd9\xa1"]}', "card serials"),
        (b'{"version": 1, "hotlist": ["123456789012345678901"]}', "card serials"),
        (b'{"version": 1, "whitelist": ["13"]}', "issuer ids"),
        (b'{"version": 1, "whitelist": "1310000000000000"}', "issuer ids"),
        (b'{"version": 1, "whitelist": [1]}', "issuer ids"),
        (b'{"version": 1, "networks": 5}', "TOML text"),
    ],
)
def test_bad_parameters_say_what_is_wrong(payload: bytes, words: str) -> None:
    with pytest.raises(ParamsError, match=words):
        decode_params(payload)


def test_status_round_trip_and_refusals() -> None:
    status = decode_status(encode_status(DeviceStatus("bus-1", 9)))
    assert (status.device, status.params_version) == ("bus-1", 9)
    for bad in (b"", b"{}", b'{"device": 1, "params_version": 2}', b'{"device": "a"}', b"[1]"):
        with pytest.raises(ParamsError):
            decode_status(bad)


def test_the_short_status_of_older_devices_is_still_read() -> None:
    status = decode_status(b'{"device": "bus-1", "params_version": 3}')
    assert status == DeviceStatus("bus-1", 3)
    assert (status.taps, status.outbox, status.latency_counts, status.at) == (None,) * 4
    assert json.loads(encode_status(status)) == {"device": "bus-1", "params_version": 3}


def test_a_full_status_report_round_trips() -> None:
    counts = tuple(range(len(LATENCY_BOUNDS_MS) + 1))
    status = DeviceStatus(
        "gate-a",
        4,
        at=datetime(2026, 11, 23, 8, 0, 1, 250_000, tzinfo=UTC),
        taps=12,
        accepted=9,
        refused={"insufficient_balance": 2, "<script>": 1},
        outbox=5,
        latency_counts=counts,
    )
    payload = encode_status(status)
    assert decode_status(payload) == status
    doc = json.loads(payload)
    assert doc["latency_ms"] == {"bounds": list(LATENCY_BOUNDS_MS), "counts": list(counts)}
    assert doc["at"] == "2026-11-23T08:00:01.250+00:00"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"taps": -1}, "'taps'"),
        ({"outbox": True}, "'outbox'"),
        ({"accepted": "3"}, "'accepted'"),
        ({"refused": {"x": -1}}, "'refused'"),
        ({"refused": ["x"]}, "'refused'"),
        ({"refused": {"x" * 65: 1}}, "'refused'"),
        ({"latency_ms": {"bounds": [1, 2], "counts": [1, 2]}}, "'latency_ms'"),
        ({"latency_ms": {"bounds": [2, 1], "counts": [1, 2, 3]}}, "'latency_ms'"),
        ({"latency_ms": [1]}, "'latency_ms'"),
        ({"at": "2026-11-23T08:00:00"}, "'at'"),
        ({"at": "yesterday"}, "'at'"),
    ],
)
def test_a_bad_status_report_says_what_is_wrong(extra: dict[str, object], words: str) -> None:
    payload = json.dumps({"device": "bus-1", "params_version": 1, **extra}).encode()
    with pytest.raises(ParamsError, match=words):
        decode_status(payload)


def test_an_authorization_request_carries_the_card_answer_whole() -> None:
    request = LoadRequest(
        issuer_id=ISSUER,
        serial="00000000000000001234",
        serial8=bytes.fromhex("000000000000001234")[1:],
        alg=Alg.SM4,
        key_version=2,
        balance=500,
        counter=3,
        random=bytes.fromhex("01020304"),
        mac1=bytes.fromhex("A1B2C3D4"),
        amount=10_000,
        terminal=bytes.fromhex("112233445566"),
    )
    message = authorize_message("req-1", request)
    assert message["op"] == "authorize"
    assert load_request_of(json.loads(json.dumps(message))) == request


@pytest.mark.parametrize("serial", ["", "12a", "1" * 21, "١٢", None, -5])
def test_a_card_serial_is_up_to_twenty_digits(serial: object) -> None:
    with pytest.raises(ValueError, match="card serial"):
        card_serial_of(serial)


def test_topics_take_only_ids_that_are_one_level() -> None:
    assert PARAMS_TOPIC.format(device=check_client_id("bus-1")) == "farelab/v1/dev/bus-1/params"
    assert LOAD_REQ.format(kiosk="k1") == "farelab/v1/kiosk/k1/load/req"
    for bad in ("", "a/b", "+", "#", "$SYS", "x" * 65, "-a"):
        with pytest.raises(ValueError, match="must be 1-64"):
            check_client_id(bad)


def test_importing_the_contract_loads_no_mqtt_client() -> None:
    code = (
        "import sys, farelab.protocol as p; assert 'aiomqtt' not in sys.modules; "
        "p.BrokerURL; assert 'aiomqtt' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

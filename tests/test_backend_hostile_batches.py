"""What one device or kiosk can send must not stop the backend: every batch the wire decoder
accepts can be stored and encoded again, a kiosk's message of the wrong types is answered, and
only a configuration error (never a message) stops the backend."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest

import farelab.backend._service as service
from farelab.backend._loads import ensure_schema, handle_load_message
from farelab.backend._mosquitto import Mosquitto
from farelab.backend._registry import DeviceEntry, register
from farelab.backend._store import Store
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, LoadAuthority, TacVerifier
from farelab.protocol import Batch, Record, WireError, decode_batch, encode_batch
from tests.cli_support import farelab
from tests.test_uplink_backend import DEVICES, make_taps, replay, start_backend, stop

_COLUMNS = (
    "seq, status, tx_type, kind, alg, card_serial, issuer, card_counter, ttc, amount, "
    "balance_before, terminal, day, time, at_ms, station, line, operator, tac"
)


def a_record() -> Record:
    return Record(
        seq=1,
        status="completed",
        tx_type=9,
        kind="bus",
        alg="3des",
        card_serial=bytes.fromhex("00000000000000000100"),
        issuer=bytes.fromhex("1310000000000000"),
        card_counter=0,
        ttc=1,
        amount=200,
        balance_before=50_000,
        terminal=bytes.fromhex("000000000B01"),
        day=bytes.fromhex("20261123"),
        time=bytes.fromhex("080000"),
        at_ms=1_795_392_000_000,
        station=bytes(8),
        line=0,
        operator="TAIYUAN",
        tac=bytes.fromhex("01020304"),
    )


def with_operator_byte(payload: bytes, marker: str, byte: int) -> bytes:
    raw = bytearray(payload)
    raw[raw.index(marker.encode())] = byte
    return bytes(raw)


def test_a_record_whose_operator_is_not_utf8_is_malformed() -> None:
    """Decoded with replacement characters it would be a record that cannot be encoded again
    (longer than its 8 bytes), which the ledger does when it reports a conflicting duplicate."""
    payload = encode_batch(Batch(1, "bus-1", (replace(a_record(), operator="ZZZZZZZZ"),)))
    with pytest.raises(WireError) as caught:
        decode_batch(with_operator_byte(payload, "ZZZZZZZZ", 0xFF))
    assert caught.value.reason == "malformed"


def test_a_batch_id_the_ledger_cannot_hold_is_malformed() -> None:
    """The ledger keeps batch ids as signed 64-bit integers (farelab's are 63 bits)."""
    with pytest.raises(WireError) as caught:
        decode_batch(encode_batch(Batch(2**64 - 1, "bus-1", (a_record(),))))
    assert caught.value.reason == "malformed"
    assert decode_batch(encode_batch(Batch(2**63 - 1, "bus-1", (a_record(),)))).batch_id == (
        2**63 - 1
    )


def test_a_message_that_breaks_a_worker_is_no_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ValueError met while handling a message fails that worker (started again by its
    supervisor); only a ConfigurationError exits with the status that stops the backend."""

    async def failing(*args: object, **kwargs: object) -> None:
        raise ValueError("something in a message")

    monkeypatch.setattr(service, "run_worker", failing)
    with pytest.raises(ValueError, match="something in a message"):
        service._worker_main(
            "mqtt://127.0.0.1:1",
            "sqlite:///unused.db",
            issuers={DEMO_ISSUER_ID: DEMO_KEYS},
            group="farelab-backend",
            name="worker-1",
            client_id="farelab-backend-test-w1",
        )

    async def refused(*args: object, **kwargs: object) -> None:
        raise service.ConfigurationError("the broker refused the subscription")

    monkeypatch.setattr(service, "run_worker", refused)
    with pytest.raises(SystemExit) as exited:
        service._worker_main(
            "mqtt://127.0.0.1:1",
            "sqlite:///unused.db",
            issuers={DEMO_ISSUER_ID: DEMO_KEYS},
            group="farelab-backend",
            name="worker-1",
            client_id="farelab-backend-test-w1",
        )
    assert exited.value.code == service.CONFIG_ERROR


async def test_a_devices_conflicting_batch_with_a_bad_operator_byte_leaves_the_backend_running(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A registered device repeats one of its counted identities with other content and an
    operator byte that is not UTF-8: quarantined; the backend goes on and counts the next
    batches."""
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES)
    ledger = tmp_path / "ledger.db"
    db = f"sqlite:///{ledger}"
    journal = tmp_path / "j.db"
    backend = start_backend(broker, db, devices=config)
    try:
        first, _ = make_taps(tmp_path, cards=1, rounds=1)
        assert len(replay(config, first, journal, broker)) == 3
        with sqlite3.connect(ledger) as held:
            epoch, *fields = held.execute(
                f"SELECT epoch, {_COLUMNS} FROM transactions WHERE device = 'bus-1'"
            ).fetchone()
        record = replace(Record.from_text(fields), amount=fields[9] + 1, operator="ZZZZZZZZ")
        payload = encode_batch(Batch(epoch << 40 | record.seq, "bus-1", (record,)))

        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish(
                "farelab/v1/dev/bus-1/tx", with_operator_byte(payload, "ZZZZZZZZ", 0xFF), qos=1
            )
        later = tmp_path / "later"
        later.mkdir()
        second, _ = make_taps(later, cards=1, rounds=1, first_serial=200)
        assert len(replay(config, second, journal, broker, "--upload-timeout", "10")) == 3
        assert backend.poll() is None
    finally:
        stop(backend)
    report = farelab("backend", "report", "--db", db, "--json")
    assert '"transactions": 6' in report.stdout
    assert '"malformed": 1' in report.stdout


KIOSK_AUTHORIZE = {
    "op": "authorize",
    "card_serial": "650001",
    "issuer": "1310000000000000",
    "alg": "3des",
    "key_version": 1,
    "balance": 0,
    "counter": 0,
    "random": "01020304",
    "mac1": "01020304",
    "amount": 100,
    "terminal": "0000F0000001",
}
KIOSK_REFUND = {
    "op": "refund",
    "card_serial": "650001",
    "issuer": "1310000000000000",
    "alg": "3des",
    "amount": 100,
    "balance_before": 100,
    "card_counter": 1,
    "terminal": "0000F0000001",
    "ttc": 1,
    "day": "20261123",
    "time": "080000",
    "tac": "01020304",
}


@pytest.mark.parametrize(
    "message",
    [
        {**KIOSK_AUTHORIZE, "alg": None},
        {**KIOSK_AUTHORIZE, "alg": 3},
        {**KIOSK_AUTHORIZE, "counter": -1},
        {**KIOSK_AUTHORIZE, "amount": 2**70},
        {**KIOSK_REFUND, "amount": 2**70},
    ],
    ids=[
        "alg-null",
        "alg-number",
        "counter-negative",
        "amount-huge",
        "refund-huge",
    ],
)
def test_a_kiosk_message_with_values_of_the_wrong_type_or_range_is_answered_malformed(
    tmp_path: Path, message: dict[str, object]
) -> None:
    """Not an exception out of the worker (which drops what it was doing, and is started
    again): an answer, and nothing stored."""
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    ensure_schema(store)
    register(
        store,
        DeviceEntry(
            id="kiosk-1",
            role="kiosk",
            operator="K1",
            kinds=frozenset({"load", "refund"}),
            terminal="0000F0000001",
        ),
    )
    authority = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS})
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
    payload = json.dumps({"id": "r1", **message}).encode()
    answer = handle_load_message(store, authority, verifier, "kiosk-1", payload)
    assert (answer["id"], answer["result"], answer["reason"]) == ("r1", "error", "malformed")
    assert store.execute("SELECT count(*) FROM loads").fetchone()[0] == 0
    store.close()

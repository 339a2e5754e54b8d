"""The ledger, on SQLite and on PostgreSQL: replays change nothing, forged TACs are flagged and
not counted, clones go to the hotlist, gaps are found, grey transactions resolve."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest

from farelab._devices import entry_of
from farelab.backend._ingest import Stored, classify
from farelab.backend._registry import register
from farelab.backend._report import report
from farelab.backend._store import LEDGER_COLUMNS, Store, ledger_row
from farelab.bench.ingest import bench_entry, make_batches
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, TacVerifier
from farelab.protocol import Batch, Record, decode_batch, encode_batch
from tests.validator_support import Lab, bus, gate, new_card

VERIFIER = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
PG = "postgresql://postgres@127.0.0.1:5432/test"
OTHER_TERMINAL = "B00000000077"


LAB_DEVICES = (
    bus("taiyuan"),
    gate("taiyuan", "尖草坪"),
    gate("taiyuan", "西桥"),
    bus("taiyuan", device_id="bus-x", terminal="000000000B77"),
)


def register_all(s: Store) -> None:
    """The lab's devices and the bench's synthetic ones, as the backend's registry knows them."""
    for device in LAB_DEVICES:
        register(s, entry_of(device))
    for run in (1, 2):
        register(s, bench_entry(f"bench-{run}-0", 0))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/ledger.db")
        register_all(s)
        yield s
        s.close()
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (database test) is needed: {exc}")
    admin.execute(f"CREATE SCHEMA {schema}")
    s = Store(f"{PG}?options=-csearch_path%3D{schema}")
    register_all(s)
    yield s
    s.close()
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def journal_batches(size: int = 7) -> list[Batch]:
    """Real taps of three cards on Taiyuan devices, cut into batches as the uplink would."""
    lab = Lab([bus("taiyuan"), gate("taiyuan", "尖草坪"), gate("taiyuan", "西桥")])
    cards = [new_card(balance=5000, serial=str(7000 + i)) for i in range(3)]
    t = 0
    for _ in range(4):
        for card in cards:
            for device in ("bus", "gate-Jiancaoping", "gate-Xiqiao"):
                lab.tap(device, card, t)
                t += 400
    rows = lab.journal.outbox(10_000)
    by_device: dict[str, list[Record]] = {}
    for _, device, payload in rows:
        by_device.setdefault(device, []).append(payload)
    batches: list[Batch] = []
    for device, records in by_device.items():
        for i in range(0, len(records), size):
            batches.append(Batch(len(batches) + 1, device, tuple(records[i : i + size])))
    return batches


def ingest(store: Store, batch: Batch) -> None:
    decoded = decode_batch(encode_batch(batch))
    store.ingest(decoded.device, decoded.batch_id, classify(decoded, VERIFIER))


def test_every_batch_three_times_in_shuffled_order_changes_no_total(store: Store) -> None:
    batches = journal_batches()
    for batch in batches:
        ingest(store, batch)
    once = report(store)
    replays = batches * 3
    random.Random(7).shuffle(replays)
    for batch in replays:
        ingest(store, batch)
    again = report(store)
    for key in ("transactions", "purchase_fen", "forged", "gaps", "clones", "balance_anomalies"):
        assert again[key] == once[key], key
    assert once["transactions"] == 36
    assert again["duplicates"] == 3 * 36


def test_forged_tac_is_flagged_and_not_counted(store: Store) -> None:
    batch = journal_batches()[0]
    forged = replace(batch.records[0], tac=bytes.fromhex("DEADBEEF"))
    ingest(store, replace(batch, records=(forged, *batch.records[1:])))
    doc = report(store)
    assert doc["forged"] == 1
    assert doc["transactions"] == len(batch.records) - 1
    assert doc["purchase_fen"] == sum(r.amount for r in batch.records[1:])


def test_cloned_card_goes_on_the_hotlist(store: Store) -> None:
    batch = journal_batches()[0]
    ingest(store, batch)
    # Another device reports the same card counter with different, genuinely signed data:
    # take a real transaction of the same card from a second lab run at another device.
    original = batch.records[0]
    twin_lab = Lab([bus("taiyuan", device_id="bus-x", terminal="000000000B77")])
    twin = new_card(balance=5000, serial=str(int(original.card_serial.hex())))
    twin_lab.tap("bus-x", twin, 99_999)
    clone = twin_lab.journal.outbox(1)[0][2]
    assert clone.card_counter == original.card_counter
    ingest(store, Batch(500, "bus-x", (clone,)))
    doc = report(store)
    assert doc["clones"] == 1
    assert original.card_serial.hex() in doc["hotlist"]


def test_a_missing_upload_shows_as_a_sequence_gap(store: Store) -> None:
    batches = [b for b in journal_batches(size=3) if b.device == "bus"]
    for batch in batches[:1] + batches[2:]:
        ingest(store, batch)
    doc = report(store)
    assert doc["gaps"] >= len(batches[1].records)
    assert any(g["kind"] == "device_seq" and g["device"] == "bus" for g in doc["gap_details"])


def test_grey_then_completed_counts_once(store: Store) -> None:
    batch = journal_batches()[0]
    record = batch.records[0]
    ingest(store, Batch(1, batch.device, (replace(record, status="grey", tac=bytes(4)),)))
    assert report(store)["grey"] == 1
    ingest(store, Batch(2, batch.device, (record,)))
    doc = report(store)
    assert (doc["grey"], doc["transactions"]) == (0, 1)
    ingest(store, Batch(3, batch.device, (record,)))
    assert report(store)["transactions"] == 1


def test_grey_and_its_resolution_in_one_batch_count_once(store: Store) -> None:
    batch = journal_batches()[0]
    record = batch.records[0]
    grey = replace(record, status="grey", tac=bytes(4))
    ingest(store, Batch(1, batch.device, (grey, record)))
    doc = report(store)
    assert (doc["grey"], doc["transactions"], doc["purchase_fen"]) == (0, 1, record.amount)


def test_a_full_batch_is_stored_once_and_its_replay_counted_as_duplicates(store: Store) -> None:
    # 500 records span several multi-row INSERTs on PostgreSQL.
    [batch] = make_batches(500, 1, 500, run=1)["bench-1-0"]
    ingest(store, batch)
    ingest(store, batch)
    doc = report(store)
    assert doc["transactions"] == 500
    assert doc["duplicates"] == 500
    assert doc["clones"] == 0


def test_a_full_batch_of_other_transactions_under_counted_card_counters_is_all_clones(
    store: Store,
) -> None:
    [batch] = make_batches(500, 1, 500, run=2)["bench-2-0"]
    ingest(store, batch)
    # Genuinely signed transactions of another device under the same card counters, over
    # every chunk of its batch.
    register(store, replace(bench_entry("bench-2-other", 0), terminal=OTHER_TERMINAL))
    [others] = make_batches(500, 1, 500, run=2, terminal=bytes.fromhex(OTHER_TERMINAL))["bench-2-0"]
    ingest(store, Batch(1, "bench-2-other", others.records))
    doc = report(store)
    assert doc["transactions"] == 500
    assert doc["clones"] == 200


def test_a_counted_transaction_resent_under_new_sequence_numbers_is_a_replay_not_a_clone(
    store: Store,
) -> None:
    [batch] = make_batches(500, 1, 500, run=2)["bench-2-0"]
    ingest(store, batch)
    resent = tuple(replace(r, seq=r.seq + 1000) for r in batch.records)
    ingest(store, Batch(2, "bench-2-0", resent))
    doc = report(store)
    assert (doc["transactions"], doc["purchase_fen"]) == (500, 500 * 200)
    assert (doc["replays"], doc["clones"], doc["hotlist"]) == (500, 0, [])


def test_balance_breaks_of_several_cards_are_each_weighed_against_that_cards_loads(
    store: Store,
) -> None:
    # Two cards' rides at counters 0 and 1; between them one card was loaded 5 yuan at a kiosk.
    [made] = make_batches(4, 1, 4, run=1, cards_per_device=2)["bench-1-0"]
    batch = decode_batch(encode_batch(made))
    loaded, unloaded = batch.records[0].card_serial, batch.records[1].card_serial
    ingest(store, Batch(1, "bench-1-0", batch.records[:2]))
    load = replace(batch.records[0], seq=1, tx_type=2, kind="load", amount=500)
    row = ledger_row(
        "kiosk-1",
        0,
        Stored(load, "ok", load.at_ms),
        station=bytes(8),
        line=0,
        operator="OP",
        received_ms=1,
    )
    with store.transaction():
        store.insert("transactions", LEDGER_COLUMNS, [row])
    later = tuple(replace(r, balance_before=r.balance_before + 500) for r in batch.records[2:])
    ingest(store, Batch(2, "bench-1-0", later))
    breaks = store.execute(
        "SELECT card_serial FROM anomalies WHERE kind = 'balance_break'"
    ).fetchall()
    assert breaks == [(unloaded.hex(),)]
    assert loaded != unloaded


def test_a_resent_record_and_its_replay_in_one_batch_are_a_duplicate_and_a_replay(
    store: Store,
) -> None:
    [batch] = make_batches(2, 1, 2, run=1)["bench-1-0"]
    ingest(store, batch)
    first = batch.records[0]
    ingest(store, Batch(2, "bench-1-0", (first, replace(first, seq=first.seq + 1000))))
    doc = report(store)
    assert (doc["transactions"], doc["duplicates"]) == (2, 1)
    assert (doc["replays"], doc["clones"], doc["hotlist"]) == (1, 0, [])

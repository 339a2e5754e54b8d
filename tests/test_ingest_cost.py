"""What a batch costs the ledger, whatever the ledger holds: a few round trips to PostgreSQL, a
read of the batch's own keys and no more of its device's history, one row per record stored
even when two workers race on it."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import pq

from farelab.backend._ingest import LedgerView, classify, decide
from farelab.backend._registry import register
from farelab.backend._store import LEDGER_COLUMNS, IngestResult, Store, _text_array, ledger_rows
from farelab.bench.ingest import bench_entry, make_batches
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, TacVerifier
from farelab.protocol import Batch, decode_batch, encode_batch

VERIFIER = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
PG = "postgresql://postgres@127.0.0.1:5432/test"
DEVICE = "bench-7-0"


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema of the test database; yields the ledger URL that uses it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (database test) is needed: {exc}")
    admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{PG}?options=-csearch_path%3D{name}"
    finally:
        admin.execute(f"DROP SCHEMA {name} CASCADE")
        admin.close()


def batches(n: int) -> list[Batch]:
    """``n`` genuine rides of 200 cards on one bus, in batches of 200, as the wire delivers them."""
    made = make_batches(n, 1, 200, run=7)[DEVICE]
    return [decode_batch(encode_batch(b)) for b in made]


def registered(url: str) -> Store:
    store = Store(url)
    register(store, bench_entry(DEVICE, 0))
    return store


def index_entries_read(store: Store) -> int:
    """Index entries the ledger's scans of ``transactions`` have returned so far (the store's
    own session reports its counts first)."""
    store.execute("SELECT pg_stat_force_next_flush()").fetchall()
    row = store.execute(
        "SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes "
        "WHERE schemaname = current_schema() AND relname = 'transactions'"
    ).fetchone()
    return int(row[0])


def test_a_batch_reads_its_own_keys_not_its_devices_history(schema: str) -> None:
    work = batches(3000)
    store = registered(schema)
    try:
        for batch in work[:-1]:  # 2 800 rows of this device, statistics of an empty table
            store.ingest(DEVICE, batch.batch_id, classify(batch, VERIFIER))
        before = index_entries_read(store)
        result = store.ingest(DEVICE, work[-1].batch_id, classify(work[-1], VERIFIER))
        read = index_entries_read(store) - before
    finally:
        store.close()
    assert result.inserted == 200
    # Each ride's predecessor (the same card's ride before) and a probe or two per statement;
    # reading the device's history for its highest sequence number had been 2 800 more.
    assert read <= 200 + 10


def round_trips(store: Store, batch: Batch) -> int:
    """How many times the store waits for PostgreSQL while it ingests ``batch``: the protocol
    messages after which a client waits for an answer, from libpq's trace of the session."""
    pgconn = store._db.pgconn
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            store.ingest(DEVICE, batch.batch_id, classify(batch, VERIFIER))
        finally:
            pgconn.untrace()
        trace.seek(0)
        sent = [line.split("\t")[2].split()[0] for line in trace if line.startswith("F")]
    # A Flush right after a Sync asks for nothing more: the Sync's answer is awaited once.
    waits = [
        message
        for before, message in zip(["", *sent[:-1]], sent, strict=True)
        if message in {"Query", "CopyDone", "Sync"} or (message == "Flush" and before != "Sync")
    ]
    return len(waits)


def test_a_batch_is_four_round_trips_to_postgresql(schema: str) -> None:
    work = batches(1200)
    store = registered(schema)
    try:
        for batch in work[:5]:  # psycopg prepares a statement on its fifth use
            store.ingest(DEVICE, batch.batch_id, classify(batch, VERIFIER))
        # The reads with the BEGIN, the COPY's two, the other writes with the COMMIT.
        assert round_trips(store, work[5]) == 4
    finally:
        store.close()


def test_two_workers_storing_one_batch_at_once_store_it_once(schema: str) -> None:
    """The second worker's COPY waits on the first's uncommitted rows, fails on their key once
    they commit, rolls back and stores the batch again: as duplicates."""
    [batch] = batches(200)
    rows = classify(batch, VERIFIER)
    first, second = registered(schema), Store(schema)
    result: list[IngestResult] = []
    try:
        view = LedgerView(entry=bench_entry(DEVICE, 0))
        decision = decide(DEVICE, batch.batch_id, rows, view)
        first.execute("BEGIN")
        first.insert("transactions", LEDGER_COLUMNS, ledger_rows(DEVICE, decision, 1))
        worker = threading.Thread(
            target=lambda: result.append(second.ingest(DEVICE, batch.batch_id, rows))
        )
        worker.start()
        blocked = first.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ? AND wait_event_type = 'Lock'",
            (second._db.info.backend_pid,),
        )
        deadline = time.monotonic() + 30
        while blocked.fetchone() != (1,) and time.monotonic() < deadline:
            time.sleep(0.01)
            blocked = first.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ? AND wait_event_type = 'Lock'",
                (second._db.info.backend_pid,),
            )
        first.execute("COMMIT")
        worker.join(30)
        stored = first.execute("SELECT count(*) FROM transactions").fetchone()
    finally:
        first.close()
        second.close()
    [done] = result
    assert (done.inserted, done.duplicates) == (0, 200)
    assert stored == (200,)


def test_array_literals_carry_any_text() -> None:
    values = ["a,b", 'q"u', "back\\slash", "{x}", "NULL", " sp ", "", "00012345678901234567"]
    with psycopg.connect(PG, autocommit=True) as db:
        row = db.execute("SELECT %s::text[]", (_text_array(values),)).fetchone()
    assert row is not None
    assert row[0] == values


def test_the_ingest_bench_starts_its_own_broker_and_backend_on_a_ledger(tmp_path: Path) -> None:
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    command = [
        sys.executable,
        "-m",
        "farelab.bench.ingest",
        "--db",
        ledger,
        "--n",
        "400",
        "--devices",
        "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = {k.strip(): v for k, v in (line.split(":") for line in done.stdout.splitlines())}
    assert float(figures["transactions"].replace(",", "")) == 400
    store = Store(ledger, create=False)
    try:
        assert store.execute("SELECT count(*) FROM transactions").fetchone() == (400,)
    finally:
        store.close()

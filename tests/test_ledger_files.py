"""The ledger's files: marked as farelab's ledger, never created by a command that only reads,
another program's file refused untouched, old ledgers migrated to journal epochs, and no lock
file left behind by a killed writer."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from farelab.backend._ingest import classify
from farelab.backend._registry import register
from farelab.backend._report import report
from farelab.backend._store import Store
from farelab.bench.ingest import bench_entry, make_batches
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, TacVerifier
from farelab.protocol import Batch, decode_batch, encode_batch
from tests.cli_support import ROOT, farelab

PG = "postgresql://postgres@127.0.0.1:5432/test"
LEDGER_MARK = 0x464C4C47
VERIFIER = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})

# The transactions table as ledgers had it before journal epochs: (device, seq) the identity.
OLD_LEDGER = """
CREATE TABLE transactions (
    device TEXT NOT NULL, seq BIGINT NOT NULL, status TEXT NOT NULL, verdict TEXT NOT NULL,
    tx_type INTEGER NOT NULL, kind TEXT NOT NULL, alg TEXT NOT NULL, card_serial TEXT NOT NULL,
    issuer TEXT NOT NULL, card_counter INTEGER NOT NULL, ttc BIGINT NOT NULL,
    amount BIGINT NOT NULL, balance_before BIGINT NOT NULL, terminal TEXT NOT NULL,
    day TEXT NOT NULL, time TEXT NOT NULL, at_ms BIGINT NOT NULL, station TEXT NOT NULL,
    line INTEGER NOT NULL, operator TEXT NOT NULL, tac TEXT NOT NULL,
    received_ms BIGINT NOT NULL, PRIMARY KEY (device, seq)
);
CREATE UNIQUE INDEX transactions_counted
    ON transactions (card_serial, card_counter, tx_type) WHERE verdict = 'ok';
CREATE TABLE batches (device TEXT NOT NULL, batch_id BIGINT NOT NULL, records INTEGER NOT NULL,
                      worker TEXT NOT NULL, received_ms BIGINT NOT NULL)
"""
OLD_ROW = (
    "INSERT INTO transactions VALUES ('bus', 1, 'completed', 'ok', 9, 'bus', '3des', "
    "'00000000000000001001', '1310000000000000', 0, 1, 200, 5000, '000000000B01', '20261123', "
    "'083000', 0, '0000000000000000', 0, 'TAIYUAN', '01020304', 0)"
)


def batch_of(device: str, run: int, n: int = 3) -> Batch:
    [batch] = make_batches(n, 1, n, run=run)[device]
    return decode_batch(encode_batch(batch))


@pytest.mark.parametrize("command", [["report"], ["clear"], ["devices", "list"]])
def test_a_read_command_refuses_a_missing_ledger_and_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    typo = tmp_path / "typo.db"
    result = farelab("backend", *command, "--db", f"sqlite:///{typo}")
    assert result.returncode == 2
    assert "no farelab ledger" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_report_refuses_another_programs_database_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "kiosk.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE sales (id INTEGER PRIMARY KEY, amount INTEGER)")
    db.commit()
    db.close()
    before = path.read_bytes()
    result = farelab("backend", "report", "--db", f"sqlite:///{path}")
    assert result.returncode == 2
    assert "another program's database" in result.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kiosk.db"]


def test_report_refuses_another_kind_of_farelab_file(tmp_path: Path) -> None:
    path = tmp_path / "kiosk.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA application_id = {0x464C4B4A}")  # a farelab kiosk journal ("FLKJ")
    db.execute("CREATE TABLE loads (id TEXT PRIMARY KEY)")
    db.commit()
    db.close()
    result = farelab("backend", "report", "--db", f"sqlite:///{path}")
    assert result.returncode == 2
    assert "this is a farelab kiosk journal, not a backend ledger" in result.stderr


def test_a_ledger_carries_the_ledger_mark(tmp_path: Path) -> None:
    Store(f"sqlite:///{tmp_path / 'ledger.db'}").close()
    db = sqlite3.connect(tmp_path / "ledger.db")
    assert db.execute("PRAGMA application_id").fetchone()[0] == LEDGER_MARK
    db.close()


def test_a_killed_writer_leaves_no_lock_file_behind(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from backend._store import Store\n"
            f"s = Store('sqlite:///{ledger}')\n"
            "with s.transaction():\n"
            "    s.execute(\"INSERT INTO counters (name, value) VALUES ('x', 1)\")\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    Store(f"sqlite:///{ledger}").close()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")] == []


def test_an_old_sqlite_ledger_is_migrated_to_journal_epochs(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_LEDGER)
    db.execute(OLD_ROW)
    db.commit()
    db.close()
    store = Store(f"sqlite:///{path}", create=False)
    try:
        assert store.execute("SELECT device, epoch, seq FROM transactions").fetchall() == [
            ("bus", 0, 1)
        ]
        # The same (device, seq) under another epoch is another record now; not the same epoch.
        copy = (
            "INSERT INTO transactions SELECT device, {epoch}, seq, status, 'grey', tx_type, "
            "kind, alg, card_serial, issuer, card_counter, ttc, amount, balance_before, "
            "terminal, day, time, at_ms, station, line, operator, tac, received_ms "
            "FROM transactions WHERE epoch = 0"
        )
        store.execute(copy.format(epoch=5))
        with pytest.raises(sqlite3.IntegrityError):
            store.execute(copy.format(epoch=0))
        assert report(store)["transactions"] == 1
    finally:
        store.close()


def test_an_old_postgresql_ledger_is_migrated_to_journal_epochs() -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (database test) is needed: {exc}")
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        admin.execute(f"SET search_path = {schema}")
        for statement in OLD_LEDGER.split(";"):
            admin.execute(statement)
        admin.execute(OLD_ROW)
        store = Store(f"{PG}?options=-csearch_path%3D{schema}", create=False)
        try:
            register(store, bench_entry("bench-5-0", 0))
            batch = batch_of("bench-5-0", 5)
            store.ingest(batch.device, 9 << 40 | 1, classify(batch, VERIFIER))
            store.ingest(batch.device, 8 << 40 | 1, classify(batch, VERIFIER))  # a reset
            rows = store.execute(
                "SELECT device, epoch, count(*) FROM transactions GROUP BY 1, 2 ORDER BY 1, 2"
            ).fetchall()
            doc = report(store)
        finally:
            store.close()
        assert rows == [("bench-5-0", 8, 3), ("bench-5-0", 9, 3), ("bus", 0, 1)]
        assert (doc["transactions"], doc["replays"], doc["journal_resets"]) == (4, 3, 1)
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def test_a_missing_postgresql_ledger_is_refused_by_a_read_command() -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(PG, autocommit=True)
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        result = farelab("backend", "report", "--db", f"{PG}?options=-csearch_path%3D{schema}")
        tables = admin.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchone()
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()
    assert result.returncode == 2
    assert "no farelab ledger in this database/schema" in result.stderr
    assert tables == (0,)


def test_a_sequence_number_of_0xffffffff_is_one_jump_not_billions_of_gaps(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    store = Store(db)
    register(store, bench_entry("bench-6-0", 0))
    batch = batch_of("bench-6-0", 6, n=4)
    last = replace(batch.records[-1], seq=0xFFFFFFFF)
    jumped = Batch(batch.batch_id, batch.device, (*batch.records[:-1], last))
    store.ingest(jumped.device, jumped.batch_id, classify(jumped, VERIFIER))
    store.close()
    doc = json.loads(farelab("backend", "report", "--db", db, "--json").stdout)
    assert (doc["transactions"], doc["gaps"], doc["seq_jumps"]) == (4, 0, 1)
    text = farelab("backend", "report", "--db", db).stdout
    gaps = next(line for line in text.splitlines() if line.startswith("gaps"))
    assert gaps.split() == ["gaps", "0"]


def test_a_database_url_too_long_to_open_is_one_short_line(tmp_path: Path) -> None:
    """The URL and the system's own error (which repeats the path) are both cut."""
    url = f"sqlite:///{tmp_path}/{'x' * 100_000}.db"
    result = farelab("backend", "report", "--db", url)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr) < 600, result.stderr[:300]

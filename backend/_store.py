"""The backend's ledger: SQLite (``sqlite:///path``) or PostgreSQL (``postgresql://…``), the
same schema and the same behaviour.

Idempotence comes from the database, not from luck: a record's identity ``(device, journal
epoch, seq)`` is unique, and a counted transaction ``(card serial, card counter, type)`` is
unique among counted ones.  A batch is one database transaction; two workers racing on the same
records hit a constraint, roll back and retry, and the retry sees the other's rows as
duplicates.  The rules — what a batch does to the ledger — are :mod:`backend._ingest`'s pure
functions; the store fetches what they need and writes what they decide.

An SQLite ledger carries farelab's ledger mark (``application_id``), so another program's
database or another kind of farelab file is refused before anything is written to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from farelab.backend._ingest import (
    Anomaly,
    Classified,
    Counted,
    Decision,
    LedgerView,
    Stored,
    balance_breaks,
    batch_epoch,
    counter_ranges,
    decide,
    own_keys,
    records_wanted,
)
from farelab.backend._registry import ENTRY_COLUMNS, entry_of_row
from farelab.card import describe_path
from farelab.protocol import ForeignFileError, Record, claim

__all__ = ["LEDGER_COLUMNS", "IngestResult", "Store", "StoreError", "ledger_row", "ledger_rows"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions (
    device TEXT NOT NULL,
    epoch BIGINT NOT NULL DEFAULT 0,
    seq BIGINT NOT NULL,
    status TEXT NOT NULL,
    verdict TEXT NOT NULL,
    tx_type INTEGER NOT NULL,
    kind TEXT NOT NULL,
    alg TEXT NOT NULL,
    card_serial TEXT NOT NULL,
    issuer TEXT NOT NULL,
    card_counter INTEGER NOT NULL,
    ttc BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    balance_before BIGINT NOT NULL,
    terminal TEXT NOT NULL,
    day TEXT NOT NULL,
    time TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    station TEXT NOT NULL,
    line INTEGER NOT NULL,
    operator TEXT NOT NULL,
    tac TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    PRIMARY KEY (device, epoch, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS transactions_counted
    ON transactions (card_serial, card_counter, tx_type) WHERE verdict = 'ok';
DROP INDEX IF EXISTS transactions_card;
CREATE TABLE IF NOT EXISTS batches (
    device TEXT NOT NULL,
    batch_id BIGINT NOT NULL,
    records INTEGER NOT NULL,
    worker TEXT NOT NULL,
    received_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    received_ms BIGINT NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    payload BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS anomalies (
    kind TEXT NOT NULL,
    card_serial TEXT NOT NULL,
    device TEXT NOT NULL,
    seq BIGINT NOT NULL,
    detail TEXT NOT NULL,
    found_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS hotlist (card_serial TEXT PRIMARY KEY, reason TEXT NOT NULL,
                                    added_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    operator TEXT NOT NULL,
    kinds TEXT NOT NULL,
    terminal TEXT NOT NULL,
    station TEXT NOT NULL,
    line INTEGER NOT NULL,
    secret_hash TEXT NOT NULL,
    revoked INTEGER NOT NULL,
    changed_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS cards (
    serial TEXT PRIMARY KEY,
    issuer TEXT NOT NULL,
    profile TEXT NOT NULL,
    issued TEXT NOT NULL,
    replaces TEXT NOT NULL,
    issued_after TEXT NOT NULL,
    valid_until TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS card_events (
    id TEXT PRIMARY KEY,
    card_serial TEXT NOT NULL,
    n BIGINT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT NOT NULL,
    new_serial TEXT NOT NULL,
    at TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    result TEXT NOT NULL,
    reason TEXT NOT NULL,
    answer TEXT NOT NULL,
    recorded_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS card_events_card ON card_events (card_serial, at_ms, n);
"""

SQLITE_PAGE_SIZE = 1024
SQLITE_CACHE_KB = 65_536
SQLITE_CHECKPOINT_PAGES = 40_000

# A ledger from before journal epochs: a record's identity was (device, seq).  Its rows keep
# epoch 0, as the kiosk path's rows do.
_MIGRATE_EPOCH_SQLITE = (
    "ALTER TABLE transactions RENAME TO transactions_before_epochs",
    "DROP INDEX IF EXISTS transactions_counted",
    "{create}",
    "INSERT INTO transactions ({columns}) SELECT {columns} FROM transactions_before_epochs",
    "DROP TABLE transactions_before_epochs",
    "{index}",
)
_MIGRATE_EPOCH_PG = (
    "ALTER TABLE transactions ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE transactions DROP CONSTRAINT transactions_pkey",
    "ALTER TABLE transactions ADD PRIMARY KEY (device, epoch, seq)",
)
# A record's columns: the ledger names them as the record names its fields, and holds them as
# Record.as_text() gives them, for people reading the ledger with sqlite3 or psql.
_RECORD_COLUMNS = tuple(f.name for f in fields(Record))
_TAC = _RECORD_COLUMNS.index("tac")

#: The columns of the ``transactions`` table, in the order :func:`ledger_row` gives them: a
#: record's, its verdict after its status, and the time it was received.
LEDGER_COLUMNS = ", ".join(
    ("device", "epoch", *_RECORD_COLUMNS[:2], "verdict", *_RECORD_COLUMNS[2:], "received_ms")
)
_OLD_COLUMNS = LEDGER_COLUMNS.replace("epoch, ", "")


def ledger_row(
    device: str,
    epoch: int,
    stored: Stored,
    *,
    station: bytes,
    line: int,
    operator: str,
    received_ms: int,
) -> tuple[Any, ...]:
    """A record as a row of :data:`LEDGER_COLUMNS`: its fields as text (:meth:`Record.as_text`),
    its verdict after its status, and the time, station, line and operator the ledger keeps."""
    return _rows(device, epoch, (stored,), station.hex(), line, operator, received_ms)[0]


def ledger_rows(device: str, decision: Decision, received_ms: int) -> list[tuple[Any, ...]]:
    """The rows of :data:`LEDGER_COLUMNS` that ``decision`` (of a batch of ``device``) inserts."""
    return _rows(
        device,
        decision.epoch,
        decision.inserts,
        decision.station.hex(),
        decision.line,
        decision.operator,
        received_ms,
    )


def _rows(  # noqa: PLR0917 - one call per batch, by the two functions above
    device: str,
    epoch: int,
    records: Sequence[Stored],
    station: str,
    line: int,
    operator: str,
    received_ms: int,
) -> list[tuple[Any, ...]]:
    # One loop, each row's fields as Record.as_text() gives them but made here: a batch's
    # issuers, terminals, days and times repeat, so their text is made once per batch (as_text
    # per record, and slices of it, had been 0.6 µs a record, inside the SQLite writer's lock).
    out = []
    upper: dict[bytes, str] = {}
    lower: dict[bytes, str] = {}
    for record, verdict, at_ms in records:
        issuer, terminal, day, clock = record.issuer, record.terminal, record.day, record.time
        issuer_text = upper.get(issuer)
        if issuer_text is None:
            issuer_text = upper[issuer] = issuer.hex().upper()
        terminal_text = upper.get(terminal)
        if terminal_text is None:
            terminal_text = upper[terminal] = terminal.hex().upper()
        day_text = lower.get(day)
        if day_text is None:
            day_text = lower[day] = day.hex()
        time_text = lower.get(clock)
        if time_text is None:
            time_text = lower[clock] = clock.hex()
        out.append(
            (
                device,
                epoch,
                record.seq,
                record.status,
                verdict,
                record.tx_type,
                record.kind,
                record.alg,
                record.card_serial.hex(),
                issuer_text,
                record.card_counter,
                record.ttc,
                record.amount,
                record.balance_before,
                terminal_text,
                day_text,
                time_text,
                at_ms,  # the record's time as the ledger keeps it, then the registry's place
                station,
                line,
                operator,
                record.tac.hex().upper(),
                received_ms,
            )
        )
    return out


# What the ledger knows of a batch's device, in one statement: its registry entry (NULLs if it
# has none); the highest sequence number of its journal epoch; only when that has none (a new
# journal, rare), the nearest other epochs; and the rows under the batch's sequence numbers
# (none, usually: one row then).  Each a probe of a primary key (CASE runs a branch's subquery
# only when it takes it).  ORDER BY … LIMIT 1, not max(): PostgreSQL's planner, with statistics
# older than the rows a backend just wrote, computed max() by reading every row of the device's
# epoch, a cost that grew with its history (measured: 1.8 ms of server time per batch at 10 000
# rows of a device, 0.06 ms so).
_JOURNAL = (
    "WITH s (top) AS MATERIALIZED (SELECT (SELECT seq FROM transactions "
    "WHERE device = ? AND epoch = ? ORDER BY seq DESC LIMIT 1)) "
    "SELECT " + ", ".join(f"d.{column}" for column in ENTRY_COLUMNS) + ", top, "
    "CASE WHEN top IS NULL THEN (SELECT epoch FROM transactions WHERE device = ? AND epoch < ? "
    "ORDER BY epoch DESC LIMIT 1) END, "
    "CASE WHEN top IS NULL THEN (SELECT epoch FROM transactions WHERE device = ? AND epoch > ? "
    "ORDER BY epoch LIMIT 1) END, "
    + ", ".join(f"h.{column}" for column in _RECORD_COLUMNS)
    + " FROM s LEFT JOIN devices d ON d.id = ? "
    "LEFT JOIN transactions h ON h.device = ? AND h.epoch = ? AND h.seq BETWEEN ? AND ?"
)
_ENTRY = len(ENTRY_COLUMNS)  # where the journal's own columns start in its rows
# What the ingest rules read of a counted transaction: the balance chain needs its balance
# and time, the replay and clone checks its identity and, only when a record of the batch has
# its key under another identity (rare), the transaction itself, read then by a second lookup.
# Each column fetched costs: the proof's seven had made the lookup twice as long on SQLite.
_COUNTED_COLUMNS = (
    "card_serial",
    "card_counter",
    "tx_type",
    "device",
    "epoch",
    "seq",
    "balance_before",
    "amount",
    "at_ms",
)


def _range_lookup(names: Sequence[str], *, postgres: bool) -> str:
    """The lookup of the counted transactions in (card, lowest counter, highest counter)
    ranges: their columns ``names``.

    One range of the counted index per run of a card's counters (:func:`counter_ranges`) holds
    both the batch's own keys and the predecessors the balance chain needs, a third of the
    probes of one per key and type.  SQLite probes the index per range.  PostgreSQL's planner,
    left to choose, hash-joins the ranges against the whole table once it holds ~100 000 rows
    (measured: 44 000 tx/s at 20 000 rows, 8 700 at 200 000); a LATERAL subquery it may not
    flatten (OFFSET 0) makes it one index range scan per range at any size.
    """
    if not postgres:
        return (
            "WITH k (card_serial, low, high) AS (VALUES {marks}) SELECT "
            + ", ".join(f"t.{name}" for name in names)
            + " FROM k JOIN transactions t ON t.card_serial = k.card_serial "
            "AND t.card_counter BETWEEN k.low AND k.high WHERE t.verdict = 'ok'"
        )
    return (
        "SELECT "
        + ", ".join(f"t.{name}" for name in names)
        + " FROM unnest(%s::text[], %s::integer[], %s::integer[]) AS k (card_serial, low, high) "
        "CROSS JOIN LATERAL (SELECT "
        + ", ".join(f"c.{name}" for name in names)
        + " FROM transactions c WHERE c.card_serial = k.card_serial "
        "AND c.card_counter BETWEEN k.low AND k.high AND c.verdict = 'ok' OFFSET 0) AS t"
    )


_COUNTED_LOOKUP = {db: _range_lookup(_COUNTED_COLUMNS, postgres=db) for db in (False, True)}
_RECORD_LOOKUP = {db: _range_lookup(_RECORD_COLUMNS, postgres=db) for db in (False, True)}
_LOADS = "SELECT card_serial, at_ms, amount FROM transactions WHERE tx_type = 2 AND verdict = 'ok' "
_LOADS_SQLITE = _LOADS + "AND card_serial IN ({marks})"
_LOADS_PG = _LOADS + "AND card_serial = ANY(%s::text[])"


class _Keys(NamedTuple):
    """A batch's card keys, worked out before its transaction: the :func:`counter_ranges` to
    look up, and its :func:`own_keys`."""

    ranges: list[tuple[bytes, int, int]]
    own: dict[tuple[bytes, int, int], int | None]


class StoreError(Exception):
    """The database cannot be opened or used; the message names the URL (without password)."""


@dataclass
class IngestResult:
    """What one batch did to the ledger."""

    inserted: int = 0
    duplicates: int = 0
    resolved: int = 0
    forged: int = 0
    clones: list[str] = field(default_factory=list)
    anomalies: int = 0
    #: the quarantine reason when the batch was refused (nothing written), else ""
    rejected: str = ""


def _now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    """One connection to the ledger."""

    _db: Any  # sqlite3 or psycopg: the same calls on both

    def __init__(self, url: str, *, create: bool = True) -> None:
        """
        Args:
            url: ``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or ``postgresql://…``.
            create: make the ledger if there is none; False for commands that only read it
                (they then fail with "no farelab ledger" instead of reporting an empty one).
        """
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self._writer_lock: int | None = None
        self._types: dict[tuple[str, str], list[str]] = {}
        if not self.postgres and not url.startswith("sqlite:///"):
            raise StoreError(
                f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://…"
            )
        try:
            if self.postgres:
                self._open_postgres(url, create=create)
            else:
                self._open_sqlite(url.removeprefix("sqlite:///"), create=create)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot open {_redact(url)}: {describe_path(str(exc))}") from exc

    def _open_postgres(self, url: str, *, create: bool) -> None:
        import psycopg  # noqa: PLC0415 - only the PostgreSQL path needs it

        self._db = psycopg.connect(url, autocommit=True)
        self._integrity: tuple[type[Exception], ...] = (psycopg.errors.IntegrityError,)
        have = self._db.execute("SELECT to_regclass('transactions')").fetchone()[0]
        if have is None and not create:
            self._db.close()
            raise StoreError(f"{_redact(url)}: no farelab ledger in this database/schema")
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(4607066436251305543)")
            old = self._db.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = 'transactions'"
            ).fetchone()
            epochs = self._db.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = 'transactions' AND column_name = 'epoch'"
            ).fetchone()
            if old is not None and epochs is None:
                for statement in _MIGRATE_EPOCH_PG:
                    self._db.execute(statement)
            self._execute_script(_SCHEMA)

    def _open_sqlite(self, path: str, *, create: bool) -> None:
        memory = path == ":memory:"
        if not memory and not create and not Path(path).is_file():
            raise StoreError(
                f"{describe_path(path)}: no farelab ledger there (this command does not create one)"
            )
        if not memory and create:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        target = path if memory or create else f"file:{Path(path).absolute()}?mode=rw"
        self._db = sqlite3.connect(
            target, isolation_level=None, check_same_thread=False, uri=not (memory or create)
        )
        self._integrity = (sqlite3.IntegrityError,)
        # Before anything writes: a new file takes its page size from the first write.
        self._db.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
        self._db.execute("PRAGMA busy_timeout=10000")
        if not memory and not create and not self._has_tables():
            self._db.close()
            raise StoreError(f"{describe_path(path)}: no farelab ledger there (an empty database)")
        try:
            if not memory:
                claim(self._db, path, "ledger")
        except ForeignFileError as exc:
            self._db.close()
            raise StoreError(str(exc)) from None
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # The counted-transaction index is keyed by card, so every batch dirties pages
        # all over it: a bounded page cache of its own keeps them out of the reads,
        # and rarer checkpoints write a page touched by several batches once.
        self._db.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KB}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={SQLITE_CHECKPOINT_PAGES}")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(transactions)")}
            if columns and "epoch" not in columns:
                self._migrate_sqlite()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.executescript(_SCHEMA.replace("BYTEA", "BLOB"))
        if not memory:
            # Writers serialise on a file lock of the ledger's own write-ahead log, which
            # SQLite keeps while any connection is open and never locks itself (closing our
            # descriptor of it cannot drop SQLite's locks), so nothing is left behind.
            self._writer_lock = os.open(f"{path}-wal", os.O_RDWR | os.O_CREAT)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}-writer.lock")  # left by earlier versions

    def _has_tables(self) -> bool:
        try:
            row = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError:
            return True  # not a database at all: claim() says what it is
        return bool(row[0])

    def _migrate_sqlite(self) -> None:
        create, index = (
            f"{statement.strip()}"
            for statement in _SCHEMA.split(";")[:2]  # the transactions table, its counted index
        )
        for statement in _MIGRATE_EPOCH_SQLITE:
            self._db.execute(statement.format(create=create, index=index, columns=_OLD_COLUMNS))

    def _execute_script(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s") if self.postgres else query

    def execute(self, query: str, args: Sequence[Any] = ()) -> Any:
        """Run one statement (``?`` placeholders on both databases)."""
        return self._db.execute(self._sql(query), tuple(args))

    def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for many rows."""
        if not rows:
            return
        if self.postgres:
            with self._db.cursor() as cur:
                cur.executemany(self._sql(query), rows)
        else:
            self._db.executemany(query, rows)

    def insert(self, table: str, columns: str, rows: Sequence[Sequence[Any]]) -> None:
        """Insert many rows (``columns``: comma-separated names).  On PostgreSQL with COPY, one
        stream instead of one statement per row; a constraint violation still fails the
        statement, and with it the transaction, as a row-by-row insert would."""
        if not rows:
            return
        if not self.postgres:
            marks = ",".join("?" * len(rows[0]))
            self._db.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
            return
        types = self._column_types(table, columns)
        statement = f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)"
        with self._db.cursor() as cur, cur.copy(statement) as copy:
            # Binary rows of the table's own column types: psycopg formats them in C, a third
            # faster than text (measured: 1.6-2.3 against 2.4-3.3 µs per ledger row).
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)

    def _column_types(self, table: str, columns: str) -> list[str]:
        """The PostgreSQL types of ``columns`` of ``table``, as the ledger has them (a ledger made
        by an earlier version keeps its own), read once per connection."""
        key = (table, columns)
        types = self._types.get(key)
        if types is None:
            found = dict(
                self._db.execute(
                    "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
                    (table,),
                ).fetchall()
            )
            types = self._types[key] = [found[name.strip()] for name in columns.split(",")]
        return types

    @property
    def integrity_errors(self) -> tuple[type[Exception], ...]:
        """What the driver raises when a write breaks a key: another writer got there first."""
        return self._integrity

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One database transaction (writers serialise on SQLite)."""
        if self.postgres:
            with self._db.transaction():
                yield
            return
        if self._writer_lock is not None:
            # SQLite's busy handler polls with sleeps of up to 100 ms, leaving a waiting worker
            # asleep long after the lock is free; a file lock wakes it at once.
            fcntl.flock(self._writer_lock, fcntl.LOCK_EX)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        finally:
            if self._writer_lock is not None:
                fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the connection."""
        if self._writer_lock is not None:
            os.close(self._writer_lock)
            self._writer_lock = None
        self._db.close()

    # --- ingest --------------------------------------------------------------------------

    def ingest(
        self, device: str, batch_id: int, rows: Sequence[Classified], *, worker: str = ""
    ) -> IngestResult:
        """Store a classified batch in one transaction, retrying if another worker raced us to
        the same records.  A batch from a device the registry does not admit writes nothing:
        its result's ``rejected`` names the quarantine reason."""
        # Pure, so outside the transaction: on SQLite, the other workers wait for none of it.
        keys = _Keys(counter_ranges(rows), own_keys(rows))
        for attempt in range(5):
            try:
                if self.postgres:
                    return self._ingest_postgres(device, batch_id, rows, worker, keys)
                with self.transaction():
                    view = self._read(device, batch_epoch(batch_id), rows, keys)()
                    return self._ingest(device, batch_id, rows, worker, view)
            except self._integrity:
                if attempt == 4:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise RuntimeError("unreachable")

    def _ingest_postgres(
        self,
        device: str,
        batch_id: int,
        rows: Sequence[Classified],
        worker: str,
        keys: _Keys,
    ) -> IngestResult:
        """:meth:`_ingest` in four round trips to the server, whatever the batch: every read
        with the BEGIN in one pipeline, the records in one COPY (two), the other writes with the
        COMMIT in another pipeline (one round trip per statement had been twice the time)."""
        db = self._db
        try:
            with db.pipeline():
                db.execute("BEGIN")
                read = self._read(device, batch_epoch(batch_id), rows, keys)
            view = read()  # the pipeline has brought every result
            return self._ingest(device, batch_id, rows, worker, view)
        except BaseException:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            raise

    def _read(
        self,
        device: str,
        epoch: int,
        rows: Sequence[Classified],
        keys: _Keys,
    ) -> Callable[[], LedgerView]:
        """Send the reads of one batch: the device's registry entry and what the ingest rules
        need of the ledger (``keys``: the batch's card keys).  The returned function fetches
        their results (on PostgreSQL, inside a pipeline, every statement goes out before the
        first result is waited for; after it, the rare lookup of :func:`records_wanted`)."""
        seqs = [c.record.seq for c in rows]
        journal = self.execute(
            _JOURNAL, (device, epoch) * 3 + (device, device, epoch, min(seqs), max(seqs))
        )
        counted = self._lookup(_COUNTED_LOOKUP[self.postgres], keys.ranges)

        def fetch() -> LedgerView:
            found = journal.fetchall()
            first = found[0]
            last, below, above = first[_ENTRY : _ENTRY + 3]
            held = _ENTRY + 3
            # The cards' serials as the batch has them: found by their text, not parsed again.
            serial = {card.hex(): card for card, _, _ in keys.ranges}
            rows_counted = {
                (serial.get(row[0]) or bytes.fromhex(row[0]), row[1], row[2]): Counted(
                    row[3], row[4], row[5], row[6], row[7], row[8]
                )
                for cursor in counted
                for row in cursor.fetchall()
            }
            wanted = records_wanted(device, epoch, keys.own, rows_counted)
            for record in self._records(wanted):
                key = (record.card_serial, record.card_counter, record.tx_type)
                known = rows_counted.get(key)
                if known is not None:  # else counted since the first lookup: the rules skip it
                    rows_counted[key] = known._replace(record=record)
            return LedgerView(
                entry=None if first[0] is None else entry_of_row(first[:_ENTRY]),
                held={
                    row[held]: Record.from_text(row[held:])
                    for row in found
                    if row[held] is not None
                },
                counted=rows_counted,
                top_seq=last,
                other_epochs=frozenset(e for e in (below, above) if e is not None),
            )

        return fetch

    def _records(self, wanted: Sequence[tuple[bytes, int, int]]) -> list[Record]:
        """The counted transactions in these (card, lowest counter, highest counter) ranges,
        in full."""
        return [
            Record.from_text(row)
            for cursor in self._lookup(_RECORD_LOOKUP[self.postgres], wanted)
            for row in cursor.fetchall()
        ]

    def _lookup(self, statement: str, ranges: Sequence[tuple[bytes, int, int]]) -> list[Any]:
        """Send a lookup of the ledger's counted transactions in these (card, lowest counter,
        highest counter) ranges; the cursors to fetch them from."""
        if not ranges:
            return []
        if self.postgres:
            # Three arrays: the statement's text is the same for every batch, so psycopg
            # converts it once and PostgreSQL plans it once (prepared after a few uses).
            # Converting a VALUES list of a batch's 600 placeholders had been 13 % of a worker's
            # py-spy samples, and psycopg's dumping of Python lists a tenth of the rest.
            serials, lows, highs = zip(*ranges, strict=True)
            args = (_text_array(s.hex() for s in serials), _int_array(lows), _int_array(highs))
            return [self._db.execute(statement, args)]
        cursors = []
        for start in range(0, len(ranges), 300):
            chunk = ranges[start : start + 300]
            marks = ",".join(["(?, ?, ?)"] * len(chunk))
            values = [v for card, low, high in chunk for v in (card.hex(), low, high)]
            cursors.append(self._db.execute(statement.format(marks=marks), values))
        return cursors

    def _loads_of(self, serials: set[bytes]) -> dict[bytes, list[tuple[int, int]]]:
        """The counted loads (at_ms, amount) of these cards, by card."""
        out: dict[bytes, list[tuple[int, int]]] = {serial: [] for serial in serials}
        texts = sorted(serial.hex() for serial in serials)
        if self.postgres:
            found = self._db.execute(_LOADS_PG, (_text_array(texts),)).fetchall()
        else:
            marks = ",".join("?" * len(texts))
            found = self._db.execute(_LOADS_SQLITE.format(marks=marks), texts).fetchall()
        for serial, at, amount in found:
            out[bytes.fromhex(serial)].append((int(at), int(amount)))
        return out

    def _ingest(
        self,
        device: str,
        batch_id: int,
        rows: Sequence[Classified],
        worker: str,
        view: LedgerView,
    ) -> IngestResult:
        """Decide one batch on what the ledger knows (``view``) and write the decision, inside
        the open transaction (committed here on PostgreSQL; by :meth:`transaction` on
        SQLite)."""
        decision = decide(device, batch_id, rows, view)
        if decision.rejected:
            if self.postgres:
                self._db.execute("ROLLBACK")
            return IngestResult(rejected=decision.rejected)
        anomalies = decision.anomalies
        if decision.chain:
            # Rare (a balance that does not chain): only then the card's loads are read.
            loads = self._loads_of({check.card_serial for check in decision.chain})
            anomalies = anomalies + balance_breaks(decision.chain, loads)
        self._write(
            device, batch_id, decision, records=len(rows), worker=worker, anomalies=anomalies
        )
        return IngestResult(
            inserted=len(decision.inserts),
            duplicates=decision.duplicates,
            resolved=decision.resolved,
            forged=decision.forged,
            clones=[serial.hex() for serial in decision.clones],
            anomalies=len(anomalies),
        )

    def _write(
        self,
        device: str,
        batch_id: int,
        decision: Decision,
        *,
        records: int,
        worker: str,
        anomalies: Sequence[Anomaly],
    ) -> None:
        """Write what a batch does: its records, anomalies, updates, hotlisted cards, the
        batch itself and the duplicates counter, each as the ledger's text columns hold it."""
        now = _now_ms()
        epoch = decision.epoch
        self.insert("transactions", LEDGER_COLUMNS, ledger_rows(device, decision, now))
        self.insert(
            "anomalies",
            "kind, card_serial, device, seq, detail, found_ms",
            [(a.kind, a.card_serial.hex(), a.device, a.seq, a.detail, now) for a in anomalies],
        )
        with self._db.pipeline() if self.postgres else contextlib.nullcontext():
            self.executemany(
                "UPDATE transactions SET status = ?, verdict = ?, tac = ? "
                "WHERE device = ? AND epoch = ? AND seq = ?",
                [
                    (
                        s.record.status,
                        s.verdict,
                        s.record.as_text()[_TAC],
                        device,
                        epoch,
                        s.record.seq,
                    )
                    for s in decision.updates
                ],
            )
            self.executemany(
                "INSERT INTO hotlist (card_serial, reason, added_ms) VALUES (?, 'clone', ?) "
                "ON CONFLICT (card_serial) DO NOTHING",
                [(serial.hex(), now) for serial in decision.hotlist],
            )
            self.execute(
                "INSERT INTO batches (device, batch_id, records, worker, received_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (device, batch_id, records, worker, now),
            )
            self._bump("duplicates", decision.duplicates)
            if self.postgres:
                self._db.execute("COMMIT")

    def _bump(self, name: str, by: int) -> None:
        if by:
            self.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
                (name, by),
            )

    def quarantine(self, topic: str, reason: str, detail: str, payload: bytes) -> None:
        """Keep a rejected message with its reason."""
        with self.transaction():
            self.execute(
                "INSERT INTO quarantine (received_ms, topic, reason, detail, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                (_now_ms(), topic, reason, detail[:500], payload[:65536]),
            )

    def hotlist(self) -> list[str]:
        """Card serials on the hotlist."""
        rows = self.execute("SELECT card_serial FROM hotlist ORDER BY card_serial").fetchall()
        return [r[0] for r in rows]

    def dashboard_totals(self) -> dict[str, Any]:
        """The counted transactions: how many, fares and loads (fen; a transfer between cards
        is neither), and transactions and fen by operator and by issuer."""
        count, fares, loads = self.execute(
            "SELECT count(*), "
            "coalesce(sum(CASE WHEN tx_type IN (6, 9) THEN amount ELSE 0 END), 0), "
            "coalesce(sum(CASE WHEN tx_type = 2 AND kind <> 'transfer' THEN amount ELSE 0 END), 0) "
            "FROM transactions WHERE verdict = 'ok'"
        ).fetchone()
        doc: dict[str, Any] = {
            "transactions": int(count),
            "fares_fen": int(fares),
            "loads_fen": int(loads),
        }
        for key, query in (
            (
                "by_operator",
                "SELECT operator, count(*), coalesce(sum(amount), 0) FROM transactions "
                "WHERE verdict = 'ok' GROUP BY operator ORDER BY operator",
            ),
            (
                "by_issuer",
                "SELECT issuer, count(*), coalesce(sum(amount), 0) FROM transactions "
                "WHERE verdict = 'ok' GROUP BY issuer ORDER BY issuer",
            ),
        ):
            rows = self.execute(query).fetchall()
            doc[key] = {str(k): {"transactions": int(n), "fen": int(f)} for k, n, f in rows}
        return doc

    def dashboard_alerts(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` cloned cards and forged TACs, newest first, then every device
        journal with missing sequence numbers: ``{"at", "kind", "card", "device", "detail"}``,
        ``at`` in milliseconds since the epoch."""
        found = self.execute(
            "SELECT found_ms, 'clone', card_serial, device, detail FROM anomalies "
            "WHERE kind = 'clone' ORDER BY found_ms DESC LIMIT ?",
            (limit,),
        ).fetchall()
        found += self.execute(
            "SELECT received_ms, 'forged', card_serial, device, 'seq ' || seq FROM transactions "
            "WHERE verdict = 'forged' ORDER BY received_ms DESC LIMIT ?",
            (limit,),
        ).fetchall()
        found.sort(key=lambda row: -row[0])
        alerts = [
            {"at": int(at), "kind": kind, "card": card, "device": device, "detail": str(detail)}
            for at, kind, card, device, detail in found[:limit]
        ]
        for device, epoch, missing, at in self.execute(
            "SELECT device, epoch, max(seq) - count(*), max(received_ms) FROM transactions "
            "GROUP BY device, epoch HAVING max(seq) > count(*) ORDER BY device, epoch"
        ).fetchall()[:limit]:
            alerts.append(
                {
                    "at": int(at),
                    "kind": "gap",
                    "card": None,
                    "device": device,
                    "detail": f"{int(missing)} sequence number(s) missing in journal {epoch}",
                }
            )
        return alerts

    def last_batch_ms(self) -> int | None:
        """When the ledger received its newest batch (milliseconds since the epoch)."""
        row = self.execute("SELECT max(received_ms) FROM batches").fetchone()
        return None if row is None or row[0] is None else int(row[0])


def _text_array(values: Iterable[str]) -> str:
    """A PostgreSQL array literal of ``values``, every element quoted (any text is safe)."""
    quoted = (v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'"{v}"' for v in quoted) + "}"


def _int_array(values: Iterable[int]) -> str:
    """A PostgreSQL array literal of integers."""
    return "{" + ",".join(map(str, values)) + "}"


def _redact(url: str) -> str:
    """The URL as a message shows it: no password, a long one cut in the middle."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://…@{rest.split('@', 1)[1]}"
    return describe_path(url)

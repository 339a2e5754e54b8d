"""The validator's journal: every tap and every card transaction, durably, before the rider sees
the result — with the outbox row the uplink will send, in the same SQLite transaction.

SQLite in WAL mode.  ``synchronous="normal"`` (the default) survives ``kill -9`` at any instant —
a committed transaction is in the WAL before ``commit`` returns; ``"full"`` also survives a power
cut, at the cost of an fsync per commit (``validator run`` writes the images of the simulated
cards tapped on its ``sim`` readers to the same standard: replaced atomically always, fsync'd
only with ``"full"`` — see :func:`farelab.card.save_image`).  A DEBIT is preceded by an
*intent*, appended to the intent log (``<journal>-intents``, :mod:`validator._intents`) before
the command leaves, so that a process killed between the two still knows which card may owe a
proof: the next open restores it as a ``pending`` transaction.  The tap's one SQLite transaction
then writes the transaction row with its outcome.  The outbox is bounded: the journal warns
loudly from ``warn_ratio`` of its bound on, and at the bound the validator stops accepting taps
rather than lose a record.

Outbox rows hold the record exactly as it travels (:func:`farelab.protocol.encode_record`, 82
bytes), so that the uplink only frames stored bytes: draining a backlog costs the tap threads
next to nothing.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from farelab.card import describe_path
from farelab.protocol import (
    ForeignFileError,
    Record,
    claim,
    decode_record,
    encode_record,
)
from farelab.validator._decision import Accepted, Intent, Pending, Rejected, TapResult
from farelab.validator._intents import (
    TEXT_FIELDS,
    IntentLog,
    IntentLogError,
    intent_from_text,
    intent_text,
)
from farelab.validator._priority import TapGate

__all__ = ["Journal", "JournalError"]

log = logging.getLogger("farelab.journal")

SCHEMA_VERSION = 2
# Journal epochs are 1 to 2**23 - 1: with 40 bits of outbox row id they make a batch id that
# fits a signed 64-bit integer (the backend's BIGINT).
EPOCHS = 2**23
# Rows deleted per transaction when the backend acknowledges: short enough that a tap waiting
# for the journal's lock never waits long.
_ACK_CHUNK = 50
# The intent log is emptied by checkpoints; a tap empties it past this size if none has.
_INTENT_LOG_LIMIT = 1 << 20
_NO_TAC = bytes(4)
# The transactions table's columns for an intent's text form (TEXT_FIELDS), amounts in fen.
_INTENT_COLUMNS = ", ".join(
    {"amount": "amount_fen", "balance_before": "balance_before_fen"}.get(name, name)
    for name in TEXT_FIELDS
)
_INSERT_TRANSACTION = (
    f"INSERT INTO transactions ({_INTENT_COLUMNS}, seq, status, tac)"  # noqa: S608
    f" VALUES ({', '.join('?' * (len(TEXT_FIELDS) + 3))})"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL DEFAULT 1,
    next_ttc INTEGER NOT NULL DEFAULT 1,
    params_version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS transactions (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'completed', 'void')),
    card_serial TEXT NOT NULL,
    issuer TEXT NOT NULL,
    alg TEXT NOT NULL,
    tx_type INTEGER NOT NULL,
    kind TEXT NOT NULL,
    amount_fen INTEGER NOT NULL,
    balance_before_fen INTEGER NOT NULL,
    card_counter INTEGER NOT NULL,
    ttc INTEGER NOT NULL,
    terminal TEXT NOT NULL,
    day TEXT NOT NULL,
    time TEXT NOT NULL,
    at TEXT NOT NULL,
    station TEXT NOT NULL,
    line INTEGER NOT NULL,
    operator TEXT NOT NULL DEFAULT '',
    tac TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (device, seq)
);
CREATE INDEX IF NOT EXISTS transactions_pending ON transactions (card_serial)
    WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS taps (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    at TEXT NOT NULL,
    card_serial TEXT NOT NULL,
    result TEXT NOT NULL,
    reason TEXT,
    fare_fen INTEGER NOT NULL,
    balance_fen INTEGER,
    tac TEXT NOT NULL,
    grey INTEGER NOT NULL,
    seq INTEGER,
    detail TEXT NOT NULL DEFAULT ''
);
"""
# AUTOINCREMENT: ids are never reused, even after the uplink has emptied the outbox.  The
# uplink reads rows after the last id it sent and names a batch by its first id: a reused id
# would leave new rows behind its cursor, and could match a late ack of an old batch.
_OUTBOX = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, record BLOB NOT NULL
)
"""


class JournalError(Exception):
    """The journal cannot be used (unreadable file, wrong schema) or is full."""


class Journal:
    """One SQLite journal shared by the devices of one validator process."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: Literal["normal", "full"] = "normal",
        max_outbox: int = 1_000_000,
        warn_ratio: float = 0.8,
        gate: TapGate | None = None,
    ) -> None:
        """
        Args:
            path: the SQLite file (created if missing), or ``":memory:"`` for tests.
            synchronous: ``normal`` survives a killed process, ``full`` also a power cut.
            max_outbox: the bound on rows waiting for the uplink.
            warn_ratio: from this share of the bound on, every tap logs a warning.
            gate: taps in progress, for an application that runs an uplink beside its taps
                (``validator run`` and the bench do): the journal's background work — outbox
                reads, deletes, checkpoints — waits for them.  None (the default): a plain
                journal, that waits for nothing and changes no process-wide setting.
        """
        if max_outbox < 1 or not 0 < warn_ratio <= 1:
            raise ValueError("max_outbox must be ≥ 1 and warn_ratio in (0, 1]")
        where = describe_path(path)
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise JournalError(f"{where}: cannot open the journal: {exc}") from None
        try:
            # Before anything else writes: a file that is not a validator journal (the
            # backend's ledger, another program's database) is refused untouched.
            claim(self._db, path, "journal")
        except ForeignFileError as exc:
            self._db.close()
            raise JournalError(str(exc)) from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA busy_timeout=5000")
            # Checkpoints copy the WAL into the database: tens of milliseconds that must not land
            # inside a tap. The owner calls checkpoint() off the tap path instead.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is not None and row[0] == "1":
                raise JournalError(
                    f"{where}: a journal of format version 1 (JSON outbox rows, from before "
                    "farelab's first release), which this farelab does not read: start a new "
                    "journal file"
                )
            if row is not None and row[0] != str(SCHEMA_VERSION):
                raise JournalError(f"{where}: journal schema {row[0]}, expected {SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA + ";" + _OUTBOX)
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            epoch = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            if epoch is None:
                epoch = (str(secrets.randbelow(EPOCHS - 1) + 1),)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", epoch)
            #: This journal file's random identity: the uplink puts it in its batch ids, so
            #: that an ack meant for the batches of an earlier file (its ids restart at 1) can
            #: never match this one's.
            self.epoch = int(epoch[0])
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise JournalError(f"{where}: not a usable journal: {exc}") from None
        self.path = path
        #: ``normal`` or ``full``: what a commit survives (a killed process; also a power cut).
        #: ``validator run`` writes its simulated cards' images to the same standard.
        self.synchronous = synchronous
        self._where = where
        self._checkpointer: sqlite3.Connection | None = None
        # the main connection's total_changes after checkpoint() last started the WAL over
        self._changes_at_restart = -1
        self._read_db: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        # The tap threads and the uplink share this connection: one statement group at a time.
        self._lock = threading.RLock()
        #: Taps in progress on this journal's devices, if the application counts them: the
        #: validators hold it during a tap, the uplink and this journal's background work
        #: yield to it.  Set before the taps and the uplink start.
        self.gate = gate
        self.max_outbox = max_outbox
        self.warn_ratio = warn_ratio
        # Intents written to the log whose tap has not committed yet (only there, so far).
        self._logged: dict[tuple[str, int], Pending] = {}
        self._last_text: tuple[Pending | None, tuple[Any, ...]] = (None, ())
        self._intents: IntentLog | None = None
        if str(path) != ":memory:":
            try:
                self._intents = IntentLog(Path(f"{path}-intents"), durable=synchronous == "full")
                self._restore_intents(self._intents.read())
            except IntentLogError as exc:
                self._db.close()
                raise JournalError(str(exc)) from None
            except sqlite3.Error as exc:
                self._db.close()
                raise JournalError(f"{where}: cannot write: {exc}") from None
        # Taps whose transactions the database could not take (a full disk): their intents
        # are in the intent log; each is written when the journal can write again, and until
        # then no tap starts.
        self._unwritten: list[tuple[TapResult, str, Pending | None]] = []
        self._write_failure: str | None = None
        self._outbox: int = self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        self._counters: dict[str, list[int]] = {}
        # One process owns a journal, so the pending set is kept in memory: every tap consults it.
        self._pending = self._load_pending()

    def close(self) -> None:
        """Close the database (a checkpoint folds the WAL back in).  What a full disk keeps
        from being written stays in the intent log, restored as pending by the next open."""
        with self._lock:
            try:
                self.write_failure()
                if self._intents is not None:
                    self._park_logged_locked()
            except (sqlite3.Error, IntentLogError) as exc:
                log.warning("%s: closed with intents only in the intent log: %s", self._where, exc)
            if self._intents is not None:
                self._intents.close()
        self._db.close()
        for extra in (self._checkpointer, self._read_db):
            if extra is not None:
                extra.close()

    def checkpoint(self) -> None:
        """Fold the WAL back into the database, on a connection of its own so that taps on the
        main connection are not held up (PASSIVE: it never waits for a writer)."""
        if str(self.path) == ":memory:":
            return
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(str(self.path), check_same_thread=False)
        try:
            self._checkpoint()
        except (sqlite3.Error, IntentLogError) as exc:
            # A full disk: the taps say so (out_of_service); the next checkpoint tries again.
            log.debug("%s: checkpoint not done: %s", self._where, exc)

    def _checkpoint(self) -> None:
        assert self._checkpointer is not None
        self._wait_for_taps()
        with self._lock:
            # No tap in progress, so no intent is waiting for its tap's commit: any still only
            # in the log belongs to a tap that ended without one (an exception); it becomes
            # pending, and the log starts empty again.  A tap that has begun holds the gate
            # before it can write an intent, and writing one needs this lock.  With no intent
            # waiting, the log is only emptied.  Without a gate an intent may be parked while
            # its tap runs: that tap's commit then updates the pending row (only slower).
            taps_running = self.gate is not None and self.gate.busy
            if self._intents is not None and (not taps_running or not self._logged):
                self._park_logged_locked()
        busy, frames, copied = self._checkpointer.execute(
            "PRAGMA wal_checkpoint(PASSIVE)"
        ).fetchone()
        if busy or frames <= 0 or copied < frames:
            return
        if self._db.total_changes == self._changes_at_restart:
            return  # nothing written since this did it last: an idle validator writes nothing
        # Every frame is in the database now, so the next write starts the WAL over — and with
        # synchronous=NORMAL or FULL, SQLite syncs the new WAL header in that write: an fsync
        # (0.4–1 ms on this machine's disk, more on a gate's flash) that would land in the next
        # tap.  This small write takes it instead, once no tap is in progress.
        if self._wait_for_taps():
            with self._tx():
                self._db.execute(
                    "INSERT INTO meta VALUES ('checkpoints', '1') ON CONFLICT (key)"
                    " DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                )
            self._changes_at_restart = self._db.total_changes

    def _restore_intents(self, intents: list[Pending]) -> None:
        """Intents the log holds and the database does not: their taps never committed, so
        their DEBITs may have reached the card.  They become pending, then the log is emptied."""
        missing = [
            p
            for p in intents
            if self._db.execute(
                "SELECT 1 FROM transactions WHERE device=? AND seq=?", (p.device, p.seq)
            ).fetchone()
            is None
        ]
        if missing:
            log.warning(
                "%s: %d DEBIT(s) in flight when the journal was last closed; kept as pending: %s",
                describe_path(self.path),
                len(missing),
                ", ".join(f"{p.device}#{p.seq} card {p.intent.card_serial}" for p in missing),
            )
        self._logged.update(((p.device, p.seq), p) for p in missing)
        self._park_logged_locked()

    def _park_logged_locked(self) -> None:
        """Every intent still only in the log into the database (pending); empty the log."""
        if self._logged:
            with self._tx():
                for p in self._logged.values():
                    self._insert_transaction(p, "pending", b"")
            self._logged.clear()
        if self._intents is not None:
            self._intents.clear()

    # --- device state --------------------------------------------------------------------

    def _device(self, device: str) -> list[int]:
        """[next seq, next TTC] of a device, kept in memory (one process owns a journal) and
        derived on first use from its newest transaction: an intent that used a TTC is in the
        intent log before the DEBIT leaves, and opening the journal restores any the database
        lacks, so nothing journals the counters twice per tap."""
        counters = self._counters.get(device)
        if counters is None:
            newest = self._db.execute(
                "SELECT seq, ttc FROM transactions WHERE device=? ORDER BY seq DESC LIMIT 1",
                (device,),
            ).fetchone()
            # journals written before the counters lived in memory kept them in ``devices``
            kept = self._db.execute(
                "SELECT next_seq, next_ttc FROM devices WHERE device=?", (device,)
            ).fetchone()
            seq, ttc = (newest[0] + 1, newest[1] + 1) if newest else (1, 1)
            if kept is not None:
                seq, ttc = max(seq, kept[0]), max(ttc, kept[1])
            counters = self._counters[device] = [seq, ttc]
        return counters

    def next_ttc(self, device: str) -> int:
        """The PSAM TTC the device must use next (TTCs never repeat across restarts)."""
        with self._lock:
            return self._device(device)[1]

    def pending(self) -> dict[str, Pending]:
        """Transactions whose DEBIT answer never arrived, by card serial."""
        return dict(self._pending)

    def _load_pending(self) -> dict[str, Pending]:
        rows = self._db.execute(
            f"SELECT seq, {_INTENT_COLUMNS} FROM transactions"  # noqa: S608
            " WHERE status='pending' ORDER BY device, seq"
        )
        out: dict[str, Pending] = {}
        for seq, *text in rows.fetchall():
            try:
                intent = intent_from_text(dict(zip(TEXT_FIELDS, text, strict=True)))
            except (ValueError, TypeError) as exc:
                # Not a row this journal wrote: left as it is, for people to settle.
                log.warning(
                    "%s: pending transaction %s#%s is unreadable and stays unresolved: %s",
                    self._where,
                    text[0],
                    seq,
                    exc,
                )
                continue
            out[intent.card_serial] = Pending(intent.device, seq, intent)
        return out

    # --- writing -------------------------------------------------------------------------

    @property
    def outbox_rows(self) -> int:
        """Rows waiting for the uplink."""
        return int(self._outbox)

    def has_room(self) -> bool:
        """False when the outbox is at its bound: taps must stop until the uplink drains it."""
        used = self._outbox / self.max_outbox
        if used >= self.warn_ratio:
            log.warning(
                "journal outbox at %.0f%% of its bound (%d of %d rows): the uplink is not "
                "draining; at 100%% this validator stops accepting taps",
                used * 100,
                self._outbox,
                self.max_outbox,
            )
        return bool(self._outbox < self.max_outbox)

    def record_intent(self, intent: Intent) -> Pending:
        """Journal a DEBIT about to be sent (durable when this returns)."""
        with self._lock:
            counters = self._device(intent.device)
            seq = counters[0]
            pending = Pending(intent.device, seq, intent)
            text = intent_text(intent)
            if self._intents is not None:
                try:
                    self._intents.append(pending, text)
                except IntentLogError as exc:
                    raise JournalError(str(exc)) from None
            self._last_text = (pending, text)
            counters[0], counters[1] = seq + 1, max(counters[1], intent.record.ttc + 1)
            self._logged[(intent.device, seq)] = pending
            self._pending[intent.card_serial] = pending
        return pending

    def _insert_transaction(self, pending: Pending, status: str, tac: bytes) -> None:
        # The table is for people: the intent's text form, as the intent log holds it.
        # The text the intent log was given, if this is the intent journalled last (a tap's
        # own): one rendering of it a tap, not two.
        last, text = self._last_text
        if last is not pending:
            text = intent_text(pending.intent)
        self._db.execute(_INSERT_TRANSACTION, (*text, pending.seq, status, tac.hex().upper()))

    def _write_status(self, pending: Pending, status: str, tac: bytes) -> None:
        """The transaction row's outcome: inserted if its intent is only in the log so far."""
        if (pending.device, pending.seq) in self._logged:
            self._insert_transaction(pending, status, tac)
        elif status != "pending":
            self._db.execute(
                "UPDATE transactions SET status=?, tac=? WHERE device=? AND seq=?",
                (status, tac.hex().upper(), pending.device, pending.seq),
            )

    def record_tap(self, result: TapResult, *, at: str, pending: Pending | None) -> None:
        """Journal a tap's result, its transaction and any resolution, with their outbox rows,
        in one SQLite transaction.  ``pending``: this tap's own journalled intent, if any.

        JournalError if the database cannot take it (a full disk).  A tap that moved money
        (its own intent, or a resolution) is then kept and written when the journal can write
        again (:meth:`write_failure`); its intent is in the intent log meanwhile, so a process
        stopped before then restores it as pending.
        """
        with self._lock:
            if self.write_failure() is None:
                try:
                    self._write_tap(result, at, pending)
                except sqlite3.Error as exc:
                    self._failed(exc)
                else:
                    return
            if pending is not None or result.resolution is not None:
                self._unwritten.append((result, at, pending))
            raise JournalError(f"{self._where}: cannot write: {self._write_failure}")

    def write_failure(self) -> str | None:
        """None when the journal can write; else why not.  Writes first what a failed write
        left over, so that taps resume once space returns."""
        with self._lock:
            while self._unwritten:
                result, at, pending = self._unwritten[0]
                try:
                    self._write_tap(result, at, pending)
                except sqlite3.Error as exc:
                    self._failed(exc)
                    return self._write_failure
                self._unwritten.pop(0)
            if self._write_failure is not None:
                log.warning("%s: the journal writes again", self._where)
                self._write_failure = None
            return None

    def _failed(self, exc: sqlite3.Error) -> None:
        if self._write_failure is None:
            log.error(
                "%s: cannot write (%s): taps are refused (out_of_service) until it can",
                self._where,
                exc,
            )
        self._write_failure = str(exc)

    def _write_tap(self, result: TapResult, at: str, pending: Pending | None) -> None:
        resolution = result.resolution
        settled: list[Pending] = []
        rows = 0
        with self._tx():
            if resolution is not None:
                status = "completed" if resolution.completed else "void"
                rows += self._settle(resolution.pending, status, resolution.tac)
                settled.append(resolution.pending)
            seq = None
            if pending is not None:
                seq = pending.seq
                if isinstance(result, Accepted):
                    rows += self._settle(pending, "completed", result.tac_bytes)
                    settled.append(pending)
                elif not result.grey:
                    rows += self._settle(pending, "void", b"")
                    settled.append(pending)
                else:
                    self._write_status(pending, "pending", b"")
                    rows += self._enqueue(pending, "grey", b"")
            self._db.execute(
                "INSERT INTO taps (device, at, card_serial, result, reason, fare_fen, balance_fen,"
                " tac, grey, seq, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    result.device,
                    at,
                    result.card_serial,
                    result.result,
                    result.reason,
                    result.fare_fen,
                    result.balance_fen,
                    result.tac,
                    int(result.grey),
                    seq,
                    result.detail if isinstance(result, Rejected) else ",".join(result.notes),
                ),
            )
        # Committed: only now does memory follow (a failed commit changed nothing).
        self._outbox += rows
        for settled_one in settled:
            if self._pending.get(settled_one.intent.card_serial) == settled_one:
                del self._pending[settled_one.intent.card_serial]
        # These transactions are in the database now, not only in the intent log.
        for written in (pending, resolution.pending if resolution is not None else None):
            if written is not None:
                self._logged.pop((written.device, written.seq), None)
        # The run loop's checkpoints empty the log; this bounds it where nothing calls them
        # (one ftruncate every few thousand taps).
        if (
            self._intents is not None
            and self._intents.size > _INTENT_LOG_LIMIT
            and not self._logged
        ):
            with contextlib.suppress(IntentLogError):  # emptied by the next checkpoint instead
                self._intents.clear()

    def _settle(self, pending: Pending, status: str, tac: bytes) -> int:
        self._write_status(pending, status, tac)
        return self._enqueue(pending, status, tac)

    def _enqueue(self, pending: Pending, status: str, tac: bytes) -> int:
        # On the wire a transaction without a TAC (void, grey) has four zero bytes.
        record = replace(pending.intent.record, seq=pending.seq, status=status, tac=tac or _NO_TAC)
        self._db.execute(
            "INSERT INTO outbox (device, record) VALUES (?, ?)",
            (pending.device, encode_record(record)),
        )
        return 1

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def _wait_for_taps(self) -> bool:
        """Before a step of background work: wait a moment for the taps in progress, if the
        application counts them; True if none is in progress (as far as this journal knows)."""
        return self.gate is None or self.gate.wait_idle()

    # --- reading -------------------------------------------------------------------------

    def transactions(self, *, card_serial: str | None = None) -> list[dict[str, Any]]:
        """Journalled transactions (oldest first), optionally of one card."""
        query = "SELECT * FROM transactions"
        args: tuple[str, ...] = ()
        if card_serial is not None:
            query += " WHERE card_serial=?"
            args = (card_serial,)
        with self._lock:
            cur = self._db.execute(query + " ORDER BY at, device, seq", args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def taps(self) -> list[dict[str, Any]]:
        """Journalled taps, oldest first."""
        with self._lock:
            cur = self._db.execute("SELECT * FROM taps ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def outbox(
        self, limit: int = 500, *, device: str | None = None, after: int = 0
    ) -> list[tuple[int, str, Record]]:
        """The oldest outbox rows (of one device, after an id): (id, device, record)."""
        return [
            (row_id, dev, decode_record(raw))
            for row_id, dev, raw in self._outbox_rows(limit, device, after)
        ]

    def outbox_count(self, *, device: str | None = None) -> int:
        """Rows waiting for the uplink (of one device)."""
        if device is None:
            return self.outbox_rows
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM outbox WHERE device=?", (device,))
            return int(row.fetchone()[0])

    def outbox_wire(self, limit: int, *, device: str, after: int = 0) -> list[tuple[int, bytes]]:
        """The oldest outbox rows of one device after an id, as (id, encoded record): what the
        uplink frames into a batch without decoding anything."""
        return [(row_id, raw) for row_id, _, raw in self._outbox_rows(limit, device, after)]

    def _outbox_rows(
        self, limit: int, device: str | None, after: int
    ) -> list[tuple[int, str, bytes]]:
        query = "SELECT id, device, record FROM outbox WHERE id > ?"
        args: tuple[Any, ...] = (after,)
        if device is not None:
            query += " AND device = ?"
            args += (device,)
        query += " ORDER BY id LIMIT ?"
        self._wait_for_taps()
        reader = self._reader()
        if reader is None:
            with self._lock:
                return self._db.execute(query, (*args, limit)).fetchall()
        # WAL: a second connection reads without holding up the taps' connection.  Its own
        # lock: the uplinks of several devices read from their own threads, and two threads
        # must never step the connection's one cached statement for this query at once.
        with self._read_lock:
            return reader.execute(query, (*args, limit)).fetchall()

    def _reader(self) -> sqlite3.Connection | None:
        if str(self.path) == ":memory:":
            return None
        if self._read_db is None:
            self._read_db = sqlite3.connect(str(self.path), check_same_thread=False)
        return self._read_db

    def acknowledge(self, ids: list[int]) -> None:
        """Remove rows the backend has committed, a few at a time: each short transaction
        holds the journal only briefly, so taps in between are not delayed."""
        for start in range(0, len(ids), _ACK_CHUNK):
            chunk = ids[start : start + _ACK_CHUNK]
            marks = ",".join("?" * len(chunk))
            self._wait_for_taps()
            try:
                with self._tx():
                    cursor = self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)  # noqa: S608
            except sqlite3.Error as exc:
                # The backend has these rows: kept here, they are sent again by a later run
                # and de-duplicated there.
                log.warning("%s: acknowledged rows not removed: %s", self._where, exc)
                return
            self._outbox = max(self._outbox - cursor.rowcount, 0)


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on an exception)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    # A COMMIT that failed (a full disk) may leave the transaction open: end
                    # it, or every later BEGIN fails.
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            else:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
        finally:
            self._lock.release()

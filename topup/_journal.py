"""The kiosk's own journal: every load it asked the host for, so that a load torn by a pulled
card or a killed kiosk is settled when the card comes back — never lost, never doubled.

States: ``authorized`` (the host gave MAC2; CREDIT may or may not have reached the card),
``credited`` (the card answered with its TAC; the host has not confirmed yet), ``confirmed``,
``void`` (the card never took it).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from farelab.card import describe_path
from farelab.protocol import ForeignFileError, claim

__all__ = ["KioskJournal", "KioskJournalError", "PendingLoad"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loads (
    id TEXT PRIMARY KEY,
    card_serial TEXT NOT NULL,
    counter INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    status TEXT NOT NULL,
    tac TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'load',
    detail TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL
)
"""


# What every kiosk journal's loads table has had; a "loads" table without them is someone else's.
_COLUMNS = frozenset({"id", "card_serial", "counter", "amount", "status", "tac", "created_ms"})


@dataclass(frozen=True, slots=True)
class PendingLoad:
    """A load not yet settled with the host."""

    id: str
    card_serial: str
    counter: int
    amount: int
    status: str
    tac: str
    kind: str = "load"
    detail: str = ""


class KioskJournalError(Exception):
    """The journal file cannot be used."""


def _refuse_foreign_loads(db: sqlite3.Connection, where: str) -> None:
    """An unmarked file with a ``loads`` table passes for an old kiosk journal only if the table
    is a kiosk journal's (:func:`backend._dbfile.claim` looks at table names alone)."""
    if db.execute("PRAGMA application_id").fetchone()[0] != 0:
        return
    columns = {row[1] for row in db.execute("PRAGMA table_info(loads)")}
    if columns and not columns >= _COLUMNS:
        raise ForeignFileError(
            f"{where}: another program's database (its loads table is not a kiosk's)"
        )


class KioskJournal:
    """SQLite (WAL, synchronous FULL: a kiosk handles money one load at a time)."""

    def __init__(self, path: Path | str) -> None:
        """Open or create the journal; KioskJournalError for a file that is not one (another
        program's database, a validator journal, a ledger, a folder), left untouched."""
        where = describe_path(path)
        try:
            folder = Path(path).is_dir()
        except OSError as exc:  # a name too long to be a file, say
            raise KioskJournalError(
                f"{where}: not a usable kiosk journal: {exc.strerror}"
            ) from None
        if folder:
            raise KioskJournalError(f"{where}: not a usable kiosk journal: it is a folder")
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise KioskJournalError(f"{where}: not a usable kiosk journal: {exc}") from None
        try:
            _refuse_foreign_loads(self._db, where)
            claim(self._db, path, "kiosk")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(loads)")}
            # Journals written before refunds were journalled lack these columns.
            for column in ("kind TEXT NOT NULL DEFAULT 'load'", "detail TEXT NOT NULL DEFAULT ''"):
                if column.split()[0] not in columns:
                    self._db.execute(f"ALTER TABLE loads ADD COLUMN {column}")
        except ForeignFileError as exc:
            self._db.close()
            raise KioskJournalError(f"not a usable kiosk journal: {exc}") from None
        except sqlite3.Error as exc:
            self._db.close()
            raise KioskJournalError(f"{where}: not a usable kiosk journal: {exc}") from None
        self._lock = threading.Lock()

    def _set(self, load_id: str, status: str, tac: str = "") -> None:
        with self._lock:
            self._db.execute(
                "UPDATE loads SET status = ?, tac = ? WHERE id = ?", (status, tac, load_id)
            )

    def authorized(self, load_id: str, serial: str, counter: int, amount: int) -> None:
        """The host said yes: from now on the card may take the load at any instant."""
        with self._lock:
            self._db.execute(
                "INSERT INTO loads (id, card_serial, counter, amount, status, created_ms) "
                "VALUES (?, ?, ?, ?, 'authorized', ?)",
                (load_id, serial, counter, amount, int(time.time() * 1000)),
            )

    def refund_intent(
        self, load_id: str, serial: str, counter: int, amount: int, detail: str
    ) -> None:
        """A refund's DEBIT is about to leave; ``detail`` holds the record the host will need."""
        with self._lock:
            self._db.execute(
                "INSERT INTO loads (id, card_serial, counter, amount, status, kind, detail, "
                "created_ms) VALUES (?, ?, ?, ?, 'authorized', 'refund', ?, ?)",
                (load_id, serial, counter, amount, detail, int(time.time() * 1000)),
            )

    def credited(self, load_id: str, tac: str) -> None:
        """The card took it (its TAC is the proof)."""
        self._set(load_id, "credited", tac)

    def confirmed(self, load_id: str) -> None:
        """The host has it."""
        self._set(load_id, "confirmed")

    def void(self, load_id: str) -> None:
        """The card never took it."""
        self._set(load_id, "void")

    def refused(self, load_id: str) -> None:
        """The host will never count it (a refund of a balance that had moved elsewhere)."""
        self._set(load_id, "refused")

    def unsettled(self, serial: str | None = None) -> list[PendingLoad]:
        """Loads still authorized or credited (of one card)."""
        query = (
            "SELECT id, card_serial, counter, amount, status, tac, kind, detail FROM loads "
            "WHERE status IN ('authorized', 'credited')"
        )
        args: tuple[str, ...] = ()
        if serial is not None:
            query += " AND card_serial = ?"
            args = (serial,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_ms", args).fetchall()
        return [PendingLoad(*row) for row in rows]

    def close(self) -> None:
        """Close the database."""
        self._db.close()

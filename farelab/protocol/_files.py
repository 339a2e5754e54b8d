"""Which of farelab's SQLite files a file is: each kind carries its own ``application_id``
(SQLite's header field for exactly this), so a command handed another program's database, or
another of farelab's own files, refuses it before it writes anything.

Files made before the mark existed are recognised by their tables and marked when opened.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from farelab.card import describe_path

__all__ = ["FileKind", "ForeignFileError", "claim"]

FileKind = Literal["journal", "ledger", "kiosk"]


@dataclass(frozen=True, slots=True)
class _Mark:
    application_id: int
    name: str
    required: frozenset[str]  # tables an unmarked file of this kind always has
    allowed: frozenset[str]  # tables an unmarked file of this kind may have


_MARKS: dict[str, _Mark] = {
    "journal": _Mark(
        0x464C564A,  # "FLVJ"
        "validator journal",
        frozenset({"meta", "outbox"}),
        frozenset({"meta", "devices", "transactions", "taps", "outbox"}),
    ),
    "ledger": _Mark(
        0x464C4C47,  # "FLLG"
        "backend ledger",
        frozenset({"transactions", "batches"}),
        frozenset(
            {
                "transactions",
                "batches",
                "quarantine",
                "anomalies",
                "counters",
                "hotlist",
                "loads",
                "transfers",
                "devices",
            }
        ),
    ),
    "kiosk": _Mark(
        0x464C4B4A,  # "FLKJ"
        "kiosk journal",
        frozenset({"loads"}),
        frozenset({"loads"}),
    ),
}


class ForeignFileError(Exception):
    """The file is not the farelab file the command needs; the message says what it is."""


def claim(db: sqlite3.Connection, path: Path | str, kind: FileKind) -> None:
    """Check that ``db`` is farelab's ``kind`` file, or a new empty one, and mark it as such.

    Raises :class:`ForeignFileError` for another program's database, another kind of farelab
    file, or a file that is no SQLite database at all; nothing has been written then.
    """
    mark = _MARKS[kind]
    where = describe_path(path)
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if app_id == mark.application_id:
            return
        for other in _MARKS.values():
            if app_id == other.application_id:
                raise ForeignFileError(
                    f"{where}: this is a farelab {other.name}, not a {mark.name}"
                )
        if app_id != 0:
            raise ForeignFileError(
                f"{where}: another program's database (application_id {app_id:#010x}), "
                f"not a farelab {mark.name}"
            )
        tables = {
            row[0]
            for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        if tables and not (mark.required <= tables <= mark.allowed):
            for other in _MARKS.values():
                if other is not mark and other.required <= tables <= other.allowed:
                    raise ForeignFileError(
                        f"{where}: this is a farelab {other.name}, not a {mark.name}"
                    )
            shown = ", ".join(sorted(tables)[:8]) + (", …" if len(tables) > 8 else "")
            raise ForeignFileError(
                f"{where}: another program's database (tables {shown}), not a farelab {mark.name}"
            )
        db.execute(f"PRAGMA application_id = {mark.application_id}")
    except sqlite3.DatabaseError as exc:
        raise ForeignFileError(f"{where}: not a farelab {mark.name}: {exc}") from None

"""The backend's device registry: every validator and kiosk it will hear from, and what the
backend itself — not the device's own upload — knows of each: its role, the operator clearing
pays for its rides, the kinds of transaction it may make, its PSAM terminal id and, for a gate,
its station and line.  The broker's accounts are made from it, and ingest and load
authorization check every message against it; a revoked device is refused everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from farelab.protocol import check_client_id

if TYPE_CHECKING:  # the store looks devices up while it ingests: no import cycle at run time
    from farelab.backend._store import Store

__all__ = [
    "ENTRY_COLUMNS",
    "ROLES",
    "DeviceEntry",
    "entries",
    "entry_of_row",
    "hash_secret",
    "lookup",
    "register",
    "revoke",
]

ROLES = ("validator", "kiosk")
_KINDS_BY_ROLE = {
    "validator": frozenset({"bus", "entry", "exit"}),
    "kiosk": frozenset({"load", "refund"}),
}


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One registered device.

    Attributes:
        id: the device id (its MQTT username and topic level).
        role: ``validator`` or ``kiosk``.
        operator: who clearing pays for this device's transactions (at most 8 bytes).
        kinds: the record kinds it may make (``bus``; ``entry``/``exit``; ``load``/``refund``).
        terminal: its PSAM terminal id, 12 upper-case hex digits.
        station: a gate's station as records carry it (16 hex digits), else ``""``.
        line: a gate's line number, else 0.
        revoked: refused everywhere once true.
    """

    id: str
    role: str
    operator: str
    kinds: frozenset[str]
    terminal: str
    station: str = ""
    line: int = 0
    revoked: bool = False

    def __post_init__(self) -> None:
        check_client_id(self.id)
        if self.role not in ROLES:
            raise ValueError(f"device {self.id}: role must be one of {', '.join(ROLES)}")
        if not self.kinds or not self.kinds <= _KINDS_BY_ROLE[self.role]:
            allowed = ", ".join(sorted(_KINDS_BY_ROLE[self.role]))
            raise ValueError(f"device {self.id}: a {self.role}'s kinds are among {allowed}")
        if len(self.operator.encode()) > 8 or not self.operator:
            raise ValueError(f"device {self.id}: operator must be 1-8 bytes")
        if len(self.terminal) != 12 or self.terminal.upper() != self.terminal:
            raise ValueError(f"device {self.id}: terminal must be 12 upper-case hex digits")
        bytes.fromhex(self.terminal)
        if self.station and (len(self.station) != 16 or self.station.upper() != self.station):
            raise ValueError(f"device {self.id}: station must be 16 upper-case hex digits")


SECRET_ITERATIONS = 101  # Mosquitto's own default for its PBKDF2-SHA512 password hashes


def hash_secret(password: str, *, salt: bytes | None = None) -> str:
    """A broker password as the registry keeps it: ``pbkdf2-sha512$ITERATIONS$SALT$HASH`` (salt
    and hash in base64), the scheme Mosquitto's password file (``$7$``) and its dynamic-security
    plugin both use, so either can be generated from the registry without the password."""
    if not password:
        raise ValueError("a broker password must not be empty")
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SECRET_ITERATIONS)
    b64 = base64.b64encode
    return f"pbkdf2-sha512${SECRET_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


#: The ``devices`` columns :func:`entry_of_row` reads, in its order (for a query that reads an
#: entry along with other rows, as ingest does).
ENTRY_COLUMNS = ("id", "role", "operator", "kinds", "terminal", "station", "line", "revoked")
_SELECT = "SELECT id, role, operator, kinds, terminal, station, line, revoked FROM devices"


def entry_of_row(row: Sequence[object]) -> DeviceEntry:
    """The entry a row of :data:`ENTRY_COLUMNS` describes."""
    device, role, operator, kinds, terminal, station, line, revoked = row
    return DeviceEntry(
        id=str(device),
        role=str(role),
        operator=str(operator),
        kinds=frozenset(str(kinds).split(",")),
        terminal=str(terminal),
        station=str(station),
        line=int(str(line)),
        revoked=bool(revoked),
    )


def register(store: Store, entry: DeviceEntry, *, secret_hash: str = "") -> None:
    """Add or replace a device (a revoked one stays revoked until registered again)."""
    with store.transaction():
        store.execute(
            "INSERT INTO devices (id, role, operator, kinds, terminal, station, line, "
            "secret_hash, revoked, changed_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?) "
            "ON CONFLICT (id) DO UPDATE SET role = excluded.role, operator = excluded.operator, "
            "kinds = excluded.kinds, terminal = excluded.terminal, station = excluded.station, "
            "line = excluded.line, secret_hash = excluded.secret_hash, revoked = 0, "
            "changed_ms = excluded.changed_ms",
            (
                entry.id,
                entry.role,
                entry.operator,
                ",".join(sorted(entry.kinds)),
                entry.terminal,
                entry.station,
                entry.line,
                secret_hash,
                int(time.time() * 1000),
            ),
        )


def lookup(store: Store, device_id: str) -> DeviceEntry | None:
    """The registered device, revoked or not; None if the backend never heard of it."""
    row = store.execute(f"{_SELECT} WHERE id = ?", (device_id,)).fetchone()
    return None if row is None else entry_of_row(row)


def entries(store: Store) -> list[DeviceEntry]:
    """Every registered device, by id."""
    return [entry_of_row(row) for row in store.execute(f"{_SELECT} ORDER BY id").fetchall()]


def revoke(store: Store, device_id: str) -> bool:
    """Refuse the device from now on; False if it is not registered."""
    with store.transaction():
        cur = store.execute(
            "UPDATE devices SET revoked = 1, changed_ms = ? WHERE id = ?",
            (int(time.time() * 1000), device_id),
        )
        return bool(cur.rowcount)

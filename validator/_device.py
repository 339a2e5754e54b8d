"""A validator device as the decision core sees it, and the parameters the backend updates."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from farelab.validator._network import Line, Network, Station

__all__ = ["Device", "Direction", "Kind", "Parameters"]


class Kind(enum.StrEnum):
    """What the device is."""

    BUS = "bus"
    METRO_GATE = "metro-gate"


class Direction(enum.StrEnum):
    """Which way a metro gate lets riders through (``both``: decided by the card's trip)."""

    ENTRY = "entry"
    EXIT = "exit"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class Parameters:
    """What the backend can replace at run time, applied atomically as one versioned value:
    hotlist, issuer whitelist, and fare tables (networks by key) that supersede the shipped
    ones for the devices on them."""

    version: int = 0
    hotlist: frozenset[str] = frozenset()
    whitelist: frozenset[bytes] = frozenset()
    networks: Mapping[str, Network] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Device:
    """One configured validator."""

    id: str
    kind: Kind
    network: Network
    terminal_id: bytes
    reader: str = "sim"
    line: Line | None = None
    station: Station | None = None
    direction: Direction = Direction.BOTH
    route_fare_fen: int | None = None
    route: str = ""
    operator: bytes = field(default=b"")

    @property
    def operator_id(self) -> bytes:
        """The 8-byte operator id written into card records."""
        return (self.operator or self.network.key.upper().encode()[:8]).ljust(8, b"\x00")[:8]

    @property
    def station_code(self) -> bytes:
        """This gate's station as the card's 8-byte station field (farelab): city code BCD 2 ·
        line 1 · station id 2 · zeros."""
        if self.station is None or self.line is None:
            return bytes(8)
        return (
            bytes.fromhex(self.network.city_code)
            + bytes((self.line.number,))
            + self.station.id.to_bytes(2, "big")
            + bytes(3)
        )

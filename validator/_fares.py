"""Fare rules as pure functions: who pays what for a bus ride or a metro trip.

Order of application, the same for every network: the undiscounted fare (distance band or bus
base fare) → a transfer reduction inside the window (floored at zero) → the rider's share (free
types, student share, card discount; local/non-local where the network distinguishes) rounded
half up to the fen.  Penalties (exit without entry, entry while entered, over-time) are charged
undiscounted, as fares for an irregular trip rather than a ride.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from farelab.card import CardType, Industry
from farelab.validator._network import Network, apply_share

__all__ = [
    "PreviousRide",
    "Quote",
    "Rider",
    "bus_fare",
    "metro_entry_minimum",
    "metro_share",
    "metro_trip_fare",
]

ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class Rider:
    """What the fare depends on about the card: its type, and whether it is a local card."""

    card_type: CardType
    local: bool


@dataclass(frozen=True, slots=True)
class PreviousRide:
    """The card's last ride (from EF1E), for transfer discounts."""

    industry: Industry
    at: datetime


@dataclass(frozen=True, slots=True)
class Quote:
    """A fare and how it was reached (``notes`` are short words for the journal)."""

    fare_fen: int
    base_fen: int
    notes: tuple[str, ...] = ()


def metro_share(net: Network, rider: Rider) -> Decimal:
    """The share of a metro fare this rider pays (0 for free riders)."""
    rules = net.rules
    if rider.card_type in rules.free_types or rider.card_type in rules.free_types_metro:
        return Decimal(0)
    if rider.card_type is CardType.STUDENT and rules.student_metro is not None:
        return rules.student_metro
    discount = rules.metro_card_discount
    if discount is not None and (rules.metro_discount_for_all or rider.local):
        return discount
    return ONE


def _bus_share(net: Network, rider: Rider) -> Decimal:
    rules = net.rules
    if rider.card_type in rules.free_types:
        return Decimal(0)
    if rider.card_type is CardType.STUDENT and rules.student_bus is not None:
        return rules.student_bus
    if rules.bus_card_discount is not None:
        return rules.bus_card_discount
    local_rate = rules.bus_local_card_discount
    if local_rate is not None and (rider.local or not rules.bus_nonlocal_pays_cash):
        return local_rate
    return ONE


def _in_window(net: Network, previous: PreviousRide | None, now: datetime) -> bool:
    window = net.rules.transfer_window_s
    if previous is None or window <= 0:
        return False
    elapsed = (now - previous.at).total_seconds()
    return 0 <= elapsed <= window


def _priced(base: int, off: int, share: Decimal, notes: list[str]) -> Quote:
    reduced = max(base - off, 0)
    if off:
        notes.append(f"transfer-{off}")
    if share != ONE:
        notes.append("free" if share == 0 else f"share-{share}")
    return Quote(apply_share(reduced, share), base, tuple(notes))


def bus_fare(
    net: Network,
    rider: Rider,
    *,
    route_fare_fen: int | None,
    previous: PreviousRide | None,
    now: datetime,
) -> Quote:
    """The fare of a bus ride (flat or per-route base fare)."""
    base = route_fare_fen if route_fare_fen is not None else net.rules.bus_base_fen
    if base is None:
        raise ValueError(f"network {net.key!r} has no bus fare: set route_fare on the device")
    off = net.rules.transfer_off_to_bus_fen if _in_window(net, previous, now) else 0
    return _priced(base, off, _bus_share(net, rider), [])


def metro_trip_fare(
    net: Network,
    rider: Rider,
    *,
    entry: int,
    exit_: int,
    entered_at: datetime | None,
    now: datetime,
    previous: PreviousRide | None,
    transfer_at: datetime | None = None,
) -> Quote:
    """The fare charged at the exit gate for a trip from ``entry`` to ``exit_``; a bus ride
    (``previous``) inside the transfer window of ``transfer_at`` (the entry; ``now`` if not
    given) takes the transfer reduction."""
    base = net.fare(entry, exit_)
    notes: list[str] = []
    transfer = (
        previous is not None
        and previous.industry is Industry.BUS
        and _in_window(net, previous, transfer_at or now)
    )
    off = net.rules.transfer_off_to_metro_fen if transfer else 0
    quote = _priced(base, off, metro_share(net, rider), notes)
    rules = net.rules
    overtime = (
        rules.overtime_s is not None
        and rules.overtime is not None
        and entered_at is not None
        and (now - entered_at).total_seconds() > rules.overtime_s
    )
    if overtime and rules.overtime is not None:
        penalty = rules.overtime.amount(net.max_fare_fen)
        fare = max(quote.fare_fen, penalty) if rules.overtime.max_fare else quote.fare_fen + penalty
        return Quote(fare, base, (*quote.notes, "overtime"))
    return quote


def metro_entry_minimum(net: Network, rider: Rider) -> int:
    """R3: the balance a card needs at the entry gate — the maximum single-trip fare, at this
    rider's share (a free rider needs nothing)."""
    return apply_share(net.max_fare_fen, metro_share(net, rider))

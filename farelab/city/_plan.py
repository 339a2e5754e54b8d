"""The city's plan, pure and seeded: its devices, its riders and their cards, and each rider's
trips of a day.

Nothing here touches a file, a clock or a process: :func:`plan_city` turns a network, a seed and
a size into a :class:`CityPlan`, and :func:`day_trips` turns a rider and a day into the trips the
rider means to make.  The shell (:mod:`farelab.city._run`) writes the plan out, starts the
processes and plays the trips at the chosen speed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from farelab.card import CST, DEMO_ISSUER_ID, Alg, CardType
from farelab.validator import Network

__all__ = [
    "FOREIGN_LISTED",
    "FOREIGN_UNLISTED",
    "KIOSK_ID",
    "RIDERS_PER_KIOSK",
    "CityDevice",
    "CityPlan",
    "Rider",
    "Trip",
    "day_trips",
    "kiosk_ids",
    "kiosk_terminal",
    "plan_city",
]

FOREIGN_LISTED = bytes.fromhex("2100099900000001")
"""The issuer of another T-Union city that every device's whitelist names."""
FOREIGN_UNLISTED = bytes.fromhex("2200088800000002")
"""The issuer of another T-Union city that no whitelist names (its riders are refused)."""
KIOSK_ID = "kiosk-1"
KIOSK_TERMINAL = "0000F0000001"
RIDERS_PER_KIOSK = 2_000
"""``farelab city``'s default: a kiosk for every 2 000 riders (one at least).  A load takes a
kiosk some 20–50 ms, and a city of 12 000 riders tops up some 50 cards a second at its peak:
one kiosk for all of them had the riders queueing for seconds and the day running late."""


def kiosk_ids(count: int) -> tuple[str, ...]:
    """The ids of a city's ``count`` kiosks: ``kiosk-1``, ``kiosk-2``…"""
    return tuple(f"kiosk-{n}" for n in range(1, count + 1))


def kiosk_terminal(kiosk: str) -> str:
    """A city kiosk's terminal number (hex): ``0000F00000NN`` for ``kiosk-NN``."""
    return f"0000F{int(kiosk.rsplit('-', 1)[1]):07X}"


BUSES = 3
CAP_FEN = 100_000


@dataclass(frozen=True, slots=True)
class CityDevice:
    """One validator of the city: a gate (a station's entry or exit) or a bus."""

    id: str
    kind: str  # "metro-gate" | "bus"
    terminal: str  # 12 hex digits
    line: str = ""  # a gate's line key
    station: str = ""  # a gate's station (pinyin)
    station_id: int = -1
    direction: str = ""  # "entry" | "exit"
    route: str = ""  # a bus route

    def toml(self, network: str, whitelist: Sequence[bytes], hotlist: Sequence[str]) -> str:
        """This device's ``[[validator]]`` table (without its password)."""
        lines = [
            "[[validator]]",
            f'id = "{self.id}"',
            f'kind = "{self.kind}"',
            f'network = "{network}"',
            f'terminal_id = "{self.terminal}"',
            "whitelist = [" + ", ".join(f'"{w.hex().upper()}"' for w in whitelist) + "]",
            "hotlist = [" + ", ".join(f'"{h}"' for h in hotlist) + "]",
            'reader = "sim"',
        ]
        if self.kind == "bus":
            lines.append(f'route = "{self.route}"')
        else:
            lines += [
                f'line = "{self.line}"',
                f'station = "{self.station}"',
                f'direction = "{self.direction}"',
            ]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Rider:
    """A person with a card and habits.

    Attributes:
        id: ``r0001`` …
        card: the card file's stem (a cloned card's copy has its own file, the same serial).
        serial: the card number (20 digits).
        issuer: the card's issuer id.
        alg: the card's purse algorithm.
        card_type: adult, student, elderly, disabled.
        balance_fen: the balance the card is issued with.
        home, work: station ids (-1: a rider who only takes the bus).
        bus: whether the rider's commute starts with a bus ride.
        extra_trip: whether the rider makes a trip at midday too.
        role: what the rider is there to show (``regular``, ``foreign_listed``,
            ``foreign_unlisted``, ``hotlisted``, ``clone``, ``cloned``).
    """

    id: str
    card: str
    serial: str
    issuer: bytes
    alg: Alg
    card_type: CardType
    balance_fen: int
    home: int
    work: int
    bus: bool
    extra_trip: bool
    role: str = "regular"


@dataclass(frozen=True, slots=True)
class Trip:
    """One journey: a bus ride (``exit`` empty) or a metro ride from ``entry`` to ``exit``,
    leaving at ``at``; ``ride_s``: the time between the two taps."""

    rider: str
    at: datetime
    entry: str
    exit: str = ""
    ride_s: int = 0


@dataclass(frozen=True, slots=True)
class CityPlan:
    """Everything the city is made of, decided by the seed."""

    network: str
    seed: int
    day: date
    devices: tuple[CityDevice, ...]
    riders: tuple[Rider, ...]
    whitelist: tuple[bytes, ...]
    hotlist: tuple[str, ...]
    gates: Mapping[tuple[int, str], str] = field(default_factory=dict)  # (station, dir) → id
    buses: tuple[str, ...] = ()

    @property
    def kiosk(self) -> str:
        """The kiosk's id."""
        return KIOSK_ID

    def lines(self) -> dict[str, list[str]]:
        """Device ids by line key (buses under ``bus``): how station computers group them."""
        out: dict[str, list[str]] = {}
        for d in self.devices:
            out.setdefault(d.line or "bus", []).append(d.id)
        return out


def _stations(network: Network, limit: int | None) -> list[tuple[str, int]]:
    """(line, station id) of each station with gates: every station, or the first ``limit``
    taken from the lines in turn (so a small city still has each line); an interchange once,
    on the first line that reaches it."""
    queues = [[(key, sid) for sid, _ in line.stops] for key, line in network.lines.items()]
    picked: list[tuple[str, int]] = []
    seen: set[int] = set()
    while any(queues) and (limit is None or len(picked) < limit):
        for queue in queues:
            while queue and queue[0][1] in seen:
                queue.pop(0)
            if queue and (limit is None or len(picked) < limit):
                key, sid = queue.pop(0)
                seen.add(sid)
                picked.append((key, sid))
    return picked


def _gates(network: Network, limit: int | None) -> list[CityDevice]:
    devices: list[CityDevice] = []
    for key, station_id in _stations(network, limit):
        station = network.stations[station_id]
        for n, direction in ((1, "entry"), (2, "exit")):
            devices.append(
                CityDevice(
                    id=f"gate-{station_id:02d}-{'in' if n == 1 else 'out'}",
                    kind="metro-gate",
                    terminal=f"00000002{station_id:02X}{n:02X}",
                    line=key,
                    station=station.name_en,
                    station_id=station_id,
                    direction=direction,
                )
            )
    return devices


def plan_city(
    network: Network, *, riders: int, seed: int, day: date, stations: int | None = None
) -> CityPlan:
    """The city: a gate pair at each station (or at ``stations`` of them, taken from the lines
    in turn), three buses, a kiosk, and ``riders`` riders with their cards.

    Among the riders (when there are at least 12): one of another city whose issuer is
    whitelisted, one whose issuer is not, one with a hotlisted card, and a cloned card (two
    riders carrying the same serial).  Card types, algorithms and balances are drawn from the
    seed; a tenth of the riders start below the network's maximum fare and top up first.
    """
    if riders < 1:
        raise ValueError("a city needs at least one rider")
    if not network.has_stations:
        raise ValueError(f"network {network.key} has no stations shipped: no gates to build")
    rnd = random.Random(seed)
    gates = _gates(network, stations)
    buses = [
        CityDevice(id=f"bus-{n}", kind="bus", terminal=f"000000000B{n:02X}", route=str(n))
        for n in range(1, BUSES + 1)
    ]
    devices = (*gates, *buses)
    station_ids = sorted({g.station_id for g in gates})
    people: list[Rider] = []
    specials = ["foreign_listed", "foreign_unlisted", "hotlisted", "clone"] if riders >= 12 else []
    for i in range(riders):
        role = specials[i] if i < len(specials) else "regular"
        serial = f"31{network.city_code}{seed % 10000:04d}{i + 1:010d}"[-20:]
        issuer = {"foreign_listed": FOREIGN_LISTED, "foreign_unlisted": FOREIGN_UNLISTED}.get(
            role, DEMO_ISSUER_ID
        )
        draw = rnd.random()
        card_type = (
            CardType.STUDENT
            if draw < 0.10
            else CardType.ELDERLY
            if draw < 0.15
            else CardType.DISABLED
            if draw < 0.18
            else CardType.ADULT
        )
        low = rnd.random() < 0.10
        balance = (
            rnd.randrange(0, network.max_fare_fen)
            if low
            else rnd.randrange(network.max_fare_fen, 8_000)
        )
        home, work = rnd.sample(station_ids, 2) if len(station_ids) >= 2 else (-1, -1)
        bus_only = rnd.random() < 0.08
        people.append(
            Rider(
                id=f"r{i + 1:04d}",
                card=f"r{i + 1:04d}",
                serial=serial,
                issuer=issuer,
                alg=Alg.SM4 if rnd.random() < 0.5 else Alg.TDES,
                card_type=card_type,
                balance_fen=balance,
                home=-1 if bus_only else home,
                work=-1 if bus_only else work,
                bus=bus_only or rnd.random() < 0.25,
                extra_trip=rnd.random() < 0.3,
                role=role,
            )
        )
    # The clone: a second rider carrying a copy of the first clone's card (same serial, keys
    # and balance), living elsewhere.
    clones = [r for r in people if r.role == "clone"]
    if clones:
        original = clones[0]
        home, work = rnd.sample(station_ids, 2)
        people.append(
            Rider(
                id=f"r{len(people) + 1:04d}",
                card=f"r{len(people) + 1:04d}",
                serial=original.serial,
                issuer=original.issuer,
                alg=original.alg,
                card_type=original.card_type,
                balance_fen=original.balance_fen,
                home=home,
                work=work,
                bus=False,
                extra_trip=True,
                role="cloned",
            )
        )
    hotlist = tuple(r.serial for r in people if r.role == "hotlisted")
    gate_ids = {(g.station_id, g.direction): g.id for g in gates}
    return CityPlan(
        network=network.key,
        seed=seed,
        day=day,
        devices=devices,
        riders=tuple(people),
        whitelist=(DEMO_ISSUER_ID, FOREIGN_LISTED),
        hotlist=hotlist,
        gates=gate_ids,
        buses=tuple(b.id for b in buses),
    )


def _at(day: date, hours: float) -> datetime:
    start = datetime(day.year, day.month, day.day, tzinfo=CST)
    return start + timedelta(seconds=round(hours * 3600))


def _ride_seconds(network: Network, entry: int, exit_: int) -> int:
    """Platform to platform: 2 minutes a kilometre plus 3 minutes of walking and waiting."""
    metres = int(network.distance_m[entry, exit_])
    return 180 + metres * 120 // 1000


def _metro(
    plan: CityPlan, network: Network, rider: Rider, at: datetime, *, entry: int, exit_: int
) -> Trip:
    return Trip(
        rider=rider.id,
        at=at,
        entry=plan.gates[(entry, "entry")],
        exit=plan.gates[(exit_, "exit")],
        ride_s=_ride_seconds(network, entry, exit_),
    )


def day_trips(plan: CityPlan, network: Network, rider: Rider, day: int) -> list[Trip]:
    """The trips ``rider`` means to make on day ``day`` (0 = the plan's first), in order: the
    morning commute around 08:00, the evening one around 18:00, maybe a midday trip; a bus ride
    first for bus riders (inside the transfer window of the metro entry that follows)."""
    rnd = random.Random(f"{plan.seed}/{rider.id}/{day}")
    today = plan.day + timedelta(days=day)
    trips: list[Trip] = []
    bus = plan.buses[rnd.randrange(len(plan.buses))]

    def leg(hours: float, origin: int, dest: int) -> None:
        at = _at(today, hours)
        if rider.bus:
            trips.append(Trip(rider=rider.id, at=at, entry=bus))
            at += timedelta(minutes=rnd.randint(8, 25))
        if origin >= 0 and dest >= 0:
            trips.append(_metro(plan, network, rider, at, entry=origin, exit_=dest))

    leg(min(max(rnd.gauss(8.0, 0.6), 6.0), 10.5), rider.home, rider.work)
    if rider.extra_trip and rider.work >= 0:
        others = [s for s in {k for k, _ in plan.gates} if s not in (rider.home, rider.work)]
        if others:
            there = rnd.choice(sorted(others))
            noon = rnd.uniform(11.5, 13.0)
            trips.append(
                _metro(plan, network, rider, _at(today, noon), entry=rider.work, exit_=there)
            )
            back = _at(today, noon + 1.0)
            trips.append(_metro(plan, network, rider, back, entry=there, exit_=rider.work))
    leg(min(max(rnd.gauss(18.0, 0.7), 15.5), 21.5), rider.work, rider.home)
    return trips

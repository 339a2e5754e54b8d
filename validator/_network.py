"""Fare networks: stations, lines, fare rules and the numpy fare matrix of each network.

A network is read from TOML (the shipped ``networks.toml``, or a file of the same shape).  Distances
are kept in whole metres so that band edges compare exactly; station-to-station distance is the
shortest path over the line graph, interchanges (same Chinese name on two lines) joining lines at
zero distance.  Money is integer fen; discounts are Decimals applied with half-up rounding.
"""

from __future__ import annotations

import functools
import itertools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from farelab.card import CardType, describe_path
from farelab.validator import _values as values

__all__ = [
    "Line",
    "Network",
    "NetworkError",
    "Penalty",
    "Rules",
    "Station",
    "apply_share",
    "band_fare_fen",
    "load_networks",
    "parse_networks",
    "shipped_networks",
]

UNREACHABLE = np.iinfo(np.int64).max // 4


class NetworkError(ValueError):
    """A network definition that cannot be used; the message names the network and key."""


def apply_share(fen: int, share: Decimal) -> int:
    """``fen × share``, rounded half up to whole fen."""
    return int((Decimal(fen) * share).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def band_fare_fen(metres: int, bands: tuple[tuple[int, int], ...], extra_m_per_yuan: int) -> int:
    """The distance fare: the first band whose limit (metres) covers the trip, then +1 yuan per
    ``extra_m_per_yuan`` metres (rounded up) beyond the last band."""
    for limit, fen in bands:
        if metres <= limit:
            return fen
    last_limit, last_fen = bands[-1]
    beyond = metres - last_limit
    return last_fen + 100 * (-(-beyond // extra_m_per_yuan))


@dataclass(frozen=True, slots=True)
class Penalty:
    """A penalty charge: the network's maximum fare, or a fixed amount."""

    max_fare: bool
    fen: int = 0

    def amount(self, max_fare_fen: int) -> int:
        """The charge in fen."""
        return max_fare_fen if self.max_fare else self.fen


@dataclass(frozen=True, slots=True)
class Station:
    """A physical station; an interchange is one station on several lines."""

    id: int
    name_zh: str
    name_en: str
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Line:
    """A metro line: ``number`` is what the card's line byte holds."""

    key: str
    number: int
    name: str
    length_km: float
    stops: tuple[tuple[int, int], ...]  # (station id, metres from the line's first station)


@dataclass(frozen=True, slots=True)
class Rules:
    """The fare rules of a network (money in fen, shares as Decimals)."""

    fare_bands: tuple[tuple[int, int], ...]
    extra_m_per_yuan: int
    metro_card_discount: Decimal | None = None
    metro_discount_for_all: bool = True
    bus_base_fen: int | None = None
    bus_card_discount: Decimal | None = None
    bus_local_card_discount: Decimal | None = None
    bus_nonlocal_pays_cash: bool = False
    student_metro: Decimal | None = None
    student_bus: Decimal | None = None
    free_types: frozenset[CardType] = frozenset()
    free_types_metro: frozenset[CardType] = frozenset()
    transfer_window_s: int = 0
    transfer_off_to_bus_fen: int = 0
    transfer_off_to_metro_fen: int = 0
    overtime_s: int | None = None
    overtime: Penalty | None = None
    exit_without_entry: Penalty = Penalty(max_fare=True)
    entry_while_entered: Penalty = Penalty(max_fare=True)
    antipassback_s: int = 60
    local_issuers: frozenset[bytes] = frozenset()


@dataclass(frozen=True, eq=False)
class Network:
    """One city's network: rules, stations, lines and the fare matrix."""

    key: str
    name: str
    city_code: str
    rules: Rules
    stations: tuple[Station, ...]
    lines: Mapping[str, Line]
    distance_m: npt.NDArray[np.int64]
    fare_fen: npt.NDArray[np.int64]
    max_fare_fen: int

    @property
    def has_stations(self) -> bool:
        """False for networks shipped with fare rules only (Nanjing, Beijing)."""
        return bool(self.stations)

    def station(self, name: str) -> Station:
        """Look a station up by Chinese or pinyin name (case, spaces and marks ignored)."""
        wanted = _fold(name)
        for station in self.stations:
            if wanted in (_fold(station.name_zh), _fold(station.name_en)):
                return station
        raise NetworkError(f"network {self.key!r} has no station {values.shown(name)}")

    def line(self, key: str) -> Line:
        """A line by key (``L2``) or number (``2``)."""
        for line in self.lines.values():
            if key in (line.key, str(line.number)):
                return line
        known = ", ".join(self.lines) or "none"
        raise NetworkError(f"network {self.key!r} has no line {values.shown(key)} (lines: {known})")

    def fare(self, entry: int, exit_: int) -> int:
        """The undiscounted distance fare between two stations, in fen."""
        return int(self.fare_fen[entry, exit_])

    def is_local(self, issuer_id: bytes) -> bool:
        """A local card: its EF15 city code is this network's, or its issuer is listed local."""
        return issuer_id in self.rules.local_issuers or issuer_id[2:4].hex() == self.city_code


def _fold(name: str) -> str:
    return re.sub(r"[\s'’\-·]", "", name).casefold().replace("ü", "u")


class _Table:
    """Typed access to one network's TOML table, with errors naming network and key."""

    def __init__(self, key: str, doc: Mapping[str, Any]) -> None:
        self.key = key
        self.doc = doc

    def error(self, name: str, want: str) -> NetworkError:
        return NetworkError(f"network {self.key!r}: {name!r} must be {want}")

    def number(self, name: str) -> Decimal | None:
        value = self.doc.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            raise self.error(name, "a number")
        try:
            return values.number(value, "a number")
        except ValueError as exc:
            raise self.error(name, str(exc).removeprefix("a number must be ")) from None

    def share(self, name: str) -> Decimal | None:
        value = self.number(name)
        if value is not None and value > 1:
            raise self.error(name, "a share between 0 and 1")
        return value

    def fen(self, name: str) -> int | None:
        value = self.doc.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            raise self.error(name, "an amount in yuan")
        try:
            return values.fen(value, "an amount")
        except ValueError as exc:
            raise self.error(name, str(exc).removeprefix("an amount must be ")) from None

    def minutes(self, name: str) -> int | None:
        value = self.number(name)
        return None if value is None else int(value * 60)

    def flag(self, name: str) -> bool:
        value = self.doc.get(name, False)
        if not isinstance(value, bool):
            raise self.error(name, "true or false")
        return value

    def types(self, name: str) -> frozenset[CardType]:
        value = self.doc.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, "a list of card types")
        try:
            return frozenset(CardType.from_label(v) for v in value)
        except ValueError as exc:
            raise NetworkError(f"network {self.key!r}: {name!r}: {exc}") from None

    def penalty(self, name: str, default: Penalty) -> Penalty:
        value = self.doc.get(name)
        if value is None:
            return default
        if value == "max_fare":
            return Penalty(max_fare=True)
        fen = self.fen(name)
        if fen is None:
            raise self.error(name, '"max_fare" or an amount in yuan')
        return Penalty(max_fare=False, fen=fen)


def _rules(t: _Table) -> Rules:
    bands_raw = t.doc.get("fare_bands")
    if not isinstance(bands_raw, list) or not bands_raw:
        raise t.error("fare_bands", "a list of [max_km, fare_yuan] pairs")
    bands: list[tuple[int, int]] = []
    for pair in bands_raw:
        ok = isinstance(pair, list) and len(pair) == 2
        ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in pair)
        if not ok:
            raise t.error("fare_bands", "a list of [max_km, fare_yuan] pairs")
        try:
            km = values.number(pair[0], "a distance")
            fare = values.fen(pair[1], "a fare")
        except ValueError as exc:
            raise NetworkError(f"network {t.key!r}: 'fare_bands': {exc}") from None
        bands.append((round(km * 1000), fare))
    if any(b[0] <= a[0] or b[1] < a[1] for a, b in itertools.pairwise(bands)):
        raise t.error("fare_bands", "increasing in distance and fare")
    extra = t.number("extra_km_per_yuan")
    if extra is None or extra <= 0:
        raise t.error("extra_km_per_yuan", "a positive number")
    discount_for = t.doc.get("metro_discount_for", "all")
    if discount_for not in ("all", "local"):
        raise t.error("metro_discount_for", '"all" or "local"')
    overtime_charge = t.doc.get("overtime_charge")
    overtime: Penalty | None = None
    if overtime_charge == "max_fare":
        overtime = Penalty(max_fare=True)
    elif overtime_charge is not None:
        raise t.error("overtime_charge", '"max_fare" (or use overtime_charge_yuan)')
    overtime_fen = t.fen("overtime_charge_yuan")
    if overtime_fen is not None:
        overtime = Penalty(max_fare=False, fen=overtime_fen)
    issuers_raw = t.doc.get("local_issuers", [])
    try:
        local = frozenset(bytes.fromhex(x) for x in issuers_raw)
    except (TypeError, ValueError):
        raise t.error("local_issuers", "a list of 16-digit hex issuer ids") from None
    if any(len(x) != 8 for x in local):
        raise t.error("local_issuers", "a list of 16-digit hex issuer ids")
    antipassback = t.number("antipassback_seconds")
    return Rules(
        fare_bands=tuple(bands),
        extra_m_per_yuan=int(extra * 1000),
        metro_card_discount=t.share("card_discount_metro") or t.share("card_discount"),
        metro_discount_for_all=discount_for == "all",
        bus_base_fen=t.fen("bus_base_fare_yuan") or t.fen("bus_flat_fare_cash_yuan"),
        bus_card_discount=t.share("card_discount_bus"),
        bus_local_card_discount=t.share("bus_local_card_discount"),
        bus_nonlocal_pays_cash=t.flag("bus_nonlocal_pays_cash"),
        student_metro=t.share("student_discount"),
        student_bus=t.share("student_discount_bus"),
        free_types=t.types("free_types"),
        free_types_metro=t.types("free_types_metro"),
        transfer_window_s=t.minutes("transfer_window_minutes") or 0,
        transfer_off_to_bus_fen=t.fen("transfer_off_to_bus_yuan") or 0,
        transfer_off_to_metro_fen=t.fen("transfer_off_to_metro_yuan") or 0,
        overtime_s=t.minutes("overtime_minutes"),
        overtime=overtime,
        exit_without_entry=t.penalty("penalty_exit_without_entry", Penalty(max_fare=True)),
        entry_while_entered=t.penalty("penalty_entry_while_entered", Penalty(max_fare=True)),
        antipassback_s=60 if antipassback is None else int(antipassback),
        local_issuers=local,
    )


def _lines(t: _Table) -> tuple[tuple[Station, ...], dict[str, Line]]:
    lines_raw = t.doc.get("lines", {})
    if not isinstance(lines_raw, dict):
        raise t.error("lines", "a table of lines")
    by_name: dict[str, int] = {}
    names: list[tuple[str, str]] = []
    on_lines: list[list[str]] = []
    lines: dict[str, Line] = {}
    for line_key, raw in lines_raw.items():
        where = f"lines.{line_key}"
        if not isinstance(raw, dict) or not isinstance(raw.get("stations"), list):
            raise t.error(where, "a table with a 'stations' list")
        digits = re.sub(r"\D", "", line_key)
        if not digits or not 0 < int(digits) < 256:
            raise t.error(where, "named like L<number> (the card's line byte)")
        stops: list[tuple[int, int]] = []
        previous = -1
        for entry in raw["stations"]:
            ok = isinstance(entry, list) and len(entry) == 3
            ok = ok and isinstance(entry[0], str) and isinstance(entry[1], str)
            ok = ok and isinstance(entry[2], int | float) and not isinstance(entry[2], bool)
            if not ok:
                raise t.error(f"{where}.stations", "[chinese name, pinyin, km] entries")
            try:
                metres = round(values.number(entry[2], "a station's km") * 1000)
            except ValueError as exc:
                raise NetworkError(f"network {t.key!r}: {where}.stations: {exc}") from None
            if metres <= previous:
                raise t.error(f"{where}.stations", "in increasing km order")
            previous = metres
            sid = by_name.get(entry[0])
            if sid is None:
                sid = by_name[entry[0]] = len(names)
                names.append((entry[0], entry[1]))
                on_lines.append([])
            on_lines[sid].append(line_key)
            stops.append((sid, metres))
        if len(stops) < 2:
            raise t.error(f"{where}.stations", "at least two stations")
        name = raw.get("name", line_key)
        try:
            length = values.number(raw.get("length_km", stops[-1][1] / 1000), "'length_km'")
        except ValueError as exc:
            raise NetworkError(f"network {t.key!r}: {where}: {exc}") from None
        lines[line_key] = Line(line_key, int(digits), str(name), float(length), tuple(stops))
    stations = tuple(Station(i, zh, en, tuple(on_lines[i])) for i, (zh, en) in enumerate(names))
    return stations, lines


def _distances(n: int, lines: Mapping[str, Line]) -> npt.NDArray[np.int64]:
    """All-pairs shortest distances (Floyd–Warshall, vectorised per pivot)."""
    dist = np.full((n, n), UNREACHABLE, dtype=np.int64)
    np.fill_diagonal(dist, 0)
    for line in lines.values():
        for (a, ma), (b, mb) in itertools.pairwise(line.stops):
            dist[a, b] = dist[b, a] = min(dist[a, b], mb - ma)
    for k in range(n):
        np.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :], out=dist)
    return dist


def _network(key: str, doc: Any) -> Network:
    if not isinstance(doc, dict):
        raise NetworkError(f"network {key!r} must be a table")
    t = _Table(key, doc)
    rules = _rules(t)
    stations, lines = _lines(t)
    dist = _distances(len(stations), lines)
    if (dist >= UNREACHABLE).any():
        raise NetworkError(f"network {key!r}: some stations cannot be reached from others")
    bands = rules.fare_bands
    fares = np.zeros(dist.shape, dtype=np.int64)
    for metres in np.unique(dist):
        fares[dist == metres] = band_fare_fen(int(metres), bands, rules.extra_m_per_yuan)
    configured = t.fen("max_single_fare_yuan") or t.fen("max_fare_yuan")
    computed = int(fares.max()) if fares.size else 0
    max_fare = configured if configured is not None else computed
    if max_fare <= 0:
        raise t.error("max_single_fare_yuan", "given when the network has no station data")
    city = doc.get("city_code", "0000")
    if not isinstance(city, str) or not re.fullmatch(r"\d{4}", city):
        raise t.error("city_code", "four digits")
    return Network(
        key=key,
        name=str(doc.get("name", key)),
        city_code=city,
        rules=rules,
        stations=stations,
        lines=lines,
        distance_m=dist,
        fare_fen=fares,
        max_fare_fen=max(max_fare, computed),
    )


def load_networks(path: Path) -> dict[str, Network]:
    """Every network of a TOML file, keyed by table name."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise NetworkError(f"{describe_path(path)}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise NetworkError(f"{describe_path(path)}: not valid TOML: {exc}") from exc
    return {key: _network(key, value) for key, value in doc.items()}


def parse_networks(text: str) -> dict[str, Network]:
    """Every network of a TOML document (a fare table sent as parameters)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise NetworkError(f"fare tables are not valid TOML: {exc}") from None
    return {key: _network(key, value) for key, value in doc.items()}


@functools.cache
def shipped_networks() -> Mapping[str, Network]:
    """The networks farelab ships (Taiyuan, Changzhou, Nanjing, Beijing)."""
    with resources.as_file(resources.files("farelab.validator") / "networks.toml") as path:
        return load_networks(path)

"""The card zoo: card images for the edge states a terminal must get right, with an
answer key computed by farelab's own validator.

:func:`build_zoo` issues the cards (their history made by farelab's own taps at other devices,
so every record on them is one a real terminal wrote) and the devices they are meant for;
:func:`write_zoo` writes them, ``validator.toml`` (the devices in farelab's configuration format)
and ``manifest.json``, whose answer key is what farelab's validator, configured from that very
``validator.toml``, decides for each card at the zoo's moment.  A kiosk's cards (``kiosk=True``)
are keyed by the kiosk's amount rules (R4).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from farelab.card import (
    CST,
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    Alg,
    CardImage,
    CardType,
    ImageError,
    InProcessReader,
    IssuerKeys,
    SimulatedCard,
    describe_path,
    personalise,
    save_image,
    shown,
    step_of,
)
from farelab.topup import AmountRules, check_amount, room
from farelab.validator import (
    Config,
    ConfigError,
    Device,
    DeviceConfig,
    Direction,
    Journal,
    Kind,
    Network,
    NetworkError,
    Parameters,
    Rider,
    TapResult,
    Validator,
    bus_fare,
    load_config,
    metro_entry_minimum,
)

__all__ = [
    "FOREIGN_LISTED",
    "FOREIGN_UNLISTED",
    "KIOSK",
    "Expect",
    "Zoo",
    "ZooCard",
    "ZooError",
    "answer",
    "build_zoo",
    "parse_moment",
    "write_zoo",
]

FOREIGN_LISTED = bytes.fromhex("2100099900000001")
"""An issuer of another city that the zoo's whitelist names."""
FOREIGN_UNLISTED = bytes.fromhex("2200088800000002")
"""An issuer of another city that the zoo's whitelist leaves out."""

CAP_FEN = 100_000
BALANCE_FEN = 5_000
"""What a card holds when its balance is not what the case is about."""

ENTRY, EXIT, BUS = "zoo-entry", "zoo-exit", "zoo-bus"
KIOSK = "zoo-kiosk"
"""The device name of a kiosk's cards in the manifest (not a device of ``validator.toml``)."""
_TERMINALS = {ENTRY: "0A0000000001", EXIT: "0A0000000002", BUS: "0B0000000001"}
# Devices elsewhere on the network that wrote the cards' history; not in validator.toml.
_ELSEWHERE_GATE = bytes.fromhex("0C0000000001")
_ELSEWHERE_BUS = bytes.fromhex("0C0000000002")
_SECOND = timedelta(seconds=1)


class ZooError(ValueError):
    """A zoo that cannot be built or written; the message says which argument or file."""


@dataclass(frozen=True, slots=True)
class Expect:
    """What a correct terminal does with a card: ``result`` is ``accepted`` (with ``fare_fen``
    debited, ``balance_fen`` after), ``rejected`` (``reason``; ``balance_fen`` as the card
    holds it when the terminal read it, else None) or ``loaded`` (a kiosk loads ``fare_fen``,
    the most it may, leaving ``balance_fen``).  A kiosk's refused load names the amount it
    refused in ``fare_fen``."""

    result: str
    reason: str | None
    fare_fen: int
    balance_fen: int | None

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``expect`` object."""
        return {
            "result": self.result,
            "reason": self.reason,
            "fare_fen": self.fare_fen,
            "balance_fen": self.balance_fen,
        }

    @classmethod
    def of(cls, result: TapResult) -> Expect:
        """A validator's decision as an expectation."""
        return cls(result.result, result.reason, result.fare_fen, result.balance_fen)


@dataclass(frozen=True, slots=True)
class ZooCard:
    """One card of the zoo: its image file's name, the case it stands for and the device
    (an id of ``validator.toml``, or the kiosk) it is meant for."""

    file: str
    case: str
    device: str
    image: CardImage
    serial: str


@dataclass(frozen=True, slots=True)
class Zoo:
    """The cards and the devices of one zoo, at the moment its answer key assumes."""

    network: Network
    at: datetime
    devices: tuple[DeviceConfig, ...]
    cards: tuple[ZooCard, ...]
    keys_file: Path | None = None
    kiosk: bool = False
    reader: str = "sim"
    loads: dict[str, int] = field(default_factory=dict)
    """A kiosk card's file → the amount its case asks the kiosk to load."""
    valid_until: datetime | None = None
    """The last moment every expectation still holds (a re-tap window closes, the day ends)."""

    @property
    def day(self) -> date:
        """The calendar day (China time) the answer key assumes."""
        return self.at.astimezone(CST).date()

    def device_json(self) -> dict[str, Any]:
        """The manifest's ``device`` object: the set-up a terminal under test must share."""
        first = self.devices[0].device
        return {
            "kind": first.kind.value,
            "network": self.network.key,
            "line": first.line.key if first.line is not None else None,
            "station": first.station.name_en if first.station is not None else None,
            "route_fare_fen": first.route_fare_fen,
            "day": self.day.isoformat(),
            "at": self.at.isoformat(),
            "valid_until": (self.valid_until or self.at).isoformat(),
            "whitelist": sorted(i.hex().upper() for i in self.devices[0].params.whitelist),
            "hotlist": sorted(self.devices[0].params.hotlist),
            "keys": str(self.keys_file) if self.keys_file is not None else "demo",
            "devices": [
                {
                    "id": dc.device.id,
                    "direction": dc.device.direction.value
                    if dc.device.kind is Kind.METRO_GATE
                    else None,
                    "terminal_id": dc.device.terminal_id.hex().upper(),
                }
                for dc in self.devices
            ],
            "kiosk": self.kiosk,
        }

    def config_toml(self) -> str:
        """``validator.toml``: the zoo's devices in farelab's configuration format."""
        out = [
            "# farelab card zoo: the devices its answer key (manifest.json) assumes,",
            f"# on {self.day.isoformat()} at {self.at.isoformat()} (China time).",
            "",
        ]
        if self.keys_file is not None:
            out += ["[psam]", f"keys = {json.dumps(str(self.keys_file))}", ""]
        for dc in self.devices:
            dev = dc.device
            out += [
                "[[validator]]",
                f'id = "{dev.id}"',
                f'kind = "{dev.kind.value}"',
                f'network = "{dev.network.key}"',
                f'terminal_id = "{dev.terminal_id.hex().upper()}"',
                f"reader = {json.dumps(self.reader)}",
            ]
            if dev.line is not None and dev.station is not None:
                out += [
                    f'line = "{dev.line.key}"',
                    f"station = {json.dumps(dev.station.name_en)}",
                    f'direction = "{dev.direction.value}"',
                ]
            if dev.route_fare_fen is not None:
                out.append(
                    f'route_fare = "{dev.route_fare_fen // 100}.{dev.route_fare_fen % 100:02d}"'
                )
            whitelist = ", ".join(f'"{i.hex().upper()}"' for i in sorted(dc.params.whitelist))
            hotlist = ", ".join(f'"{s}"' for s in sorted(dc.params.hotlist))
            out += [f"whitelist = [{whitelist}]", f"hotlist = [{hotlist}]", ""]
        return "\n".join(out)


class _Issuer:
    """Issues the zoo's cards: serials from the seed, the day's dates, the given keys."""

    def __init__(self, *, rng: random.Random, day: date, keys: IssuerKeys) -> None:
        self._rng = rng
        self._day = day
        self._keys = keys

    def card(
        self,
        *,
        balance: int = BALANCE_FEN,
        card_type: CardType = CardType.ADULT,
        alg: Alg = Alg.TDES,
        issuer: bytes = DEMO_ISSUER_ID,
        issued: date | None = None,
        expires: date | None = None,
        transit: bool = True,
    ) -> CardImage:
        serial = f"{self._rng.randrange(10**19, 10**20)}"
        return personalise(
            serial=serial,
            issued=issued if issued is not None else self._day - timedelta(days=365),
            alg=alg,
            card_type=card_type,
            balance=balance,
            expires=expires,
            issuer_id=issuer,
            keys=self._keys,
            transit=transit,
        )


def _ride(
    image: CardImage,
    dc: DeviceConfig,
    at: datetime,
    rng: random.Random,
    *,
    tear: bool = False,
) -> CardImage:
    """The card after a tap at ``dc`` (torn right after its DEBIT reached the card)."""
    card = SimulatedCard(image, entropy=rng.randbytes, today=lambda: at.astimezone(CST).date())
    reader = InProcessReader()
    reader.insert(card)
    if tear:
        reader.pull_after(lambda apdu: step_of(apdu) == "DEBIT")
    journal = Journal(":memory:")
    try:
        result = Validator(config=dc, journal=journal).tap(reader, at)
    finally:
        journal.close()
        card.close()
    if result.result != "accepted" and not (tear and result.grey):
        raise RuntimeError(f"a zoo card's history tap at {dc.device.id} failed: {result}")
    return card.image


def _device(
    network: Network,
    device_id: str,
    kind: Kind,
    *,
    terminal: bytes,
    params: Parameters,
    keys: IssuerKeys,
    station: str | None = None,
    line: str | None = None,
    direction: Direction = Direction.BOTH,
    route_fare_fen: int | None = None,
) -> DeviceConfig:
    device = Device(
        id=device_id,
        kind=kind,
        network=network,
        terminal_id=terminal,
        line=network.line(line) if line is not None else None,
        station=network.station(station) if station is not None else None,
        direction=direction,
        route_fare_fen=route_fare_fen,
    )
    return DeviceConfig(device, params, dict.fromkeys(params.whitelist, keys))


def _far_station(network: Network, station: str, line: str) -> str:
    """The station of ``line`` whose trip to ``station`` costs most (the first such)."""
    here = network.station(station).id
    stops = network.line(line).stops
    far = max(stops, key=lambda stop: (network.fare(stop[0], here), -stop[0]))[0]
    if far == here:
        far = stops[0][0] if stops[0][0] != here else stops[-1][0]
    return network.stations[far].name_en


@dataclass(frozen=True, slots=True)
class _Site:
    """The devices a zoo's cards are meant for, and those elsewhere that made their history."""

    devices: tuple[DeviceConfig, ...]
    main: str
    """The device for cases about the card itself."""
    trip: str
    """The device where a ride is priced (the exit gate, the bus)."""
    least: int
    """The balance an adult card needs at ``main`` (R3's maximum fare, the bus fare)."""
    history_bus: DeviceConfig
    history_gate: DeviceConfig | None = None

    @property
    def main_device(self) -> DeviceConfig:
        return next(dc for dc in self.devices if dc.device.id == self.main)


def _gate_site(
    network: Network, station: str, lists: Parameters, keys: IssuerKeys, history: Parameters
) -> _Site:
    if not network.has_stations:
        raise ZooError(f"network {network.key!r} ships no stations: use --bus")
    try:
        where = network.station(station)
    except NetworkError as exc:
        raise ZooError(str(exc)) from None
    line = where.lines[0]
    entry, exit_ = (
        _device(
            network,
            name,
            Kind.METRO_GATE,
            terminal=bytes.fromhex(_TERMINALS[name]),
            station=where.name_en,
            line=line,
            direction=direction,
            params=lists,
            keys=keys,
        )
        for name, direction in ((ENTRY, Direction.ENTRY), (EXIT, Direction.EXIT))
    )
    far = _far_station(network, where.name_en, line)
    elsewhere = _device(
        network,
        "zoo-history-gate",
        Kind.METRO_GATE,
        terminal=_ELSEWHERE_GATE,
        station=far,
        line=network.station(far).lines[0],
        direction=Direction.ENTRY,
        params=history,
        keys=keys,
    )
    adult = Rider(CardType.ADULT, network.is_local(DEMO_ISSUER_ID))
    return _Site(
        (entry, exit_),
        main=ENTRY,
        trip=EXIT,
        least=metro_entry_minimum(network, adult),
        history_bus=_history_bus(network, None, history, keys),
        history_gate=elsewhere,
    )


def _bus_site(
    network: Network,
    fare: int,
    *,
    lists: Parameters,
    keys: IssuerKeys,
    history: Parameters,
    at: datetime,
) -> _Site:
    bus = _device(
        network,
        BUS,
        Kind.BUS,
        terminal=bytes.fromhex(_TERMINALS[BUS]),
        route_fare_fen=fare,
        params=lists,
        keys=keys,
    )
    adult = Rider(CardType.ADULT, network.is_local(DEMO_ISSUER_ID))
    least = bus_fare(network, adult, route_fare_fen=fare, previous=None, now=at).fare_fen
    return _Site((bus,), BUS, BUS, least, _history_bus(network, fare, history, keys))


def _history_bus(
    network: Network, fare: int | None, history: Parameters, keys: IssuerKeys
) -> DeviceConfig:
    return _device(
        network,
        "zoo-history-bus",
        Kind.BUS,
        terminal=_ELSEWHERE_BUS,
        route_fare_fen=fare or network.rules.bus_base_fen or 200,
        params=history,
        keys=keys,
    )


class _Cases:
    """The zoo's cards as they are added, each with its case and device; and the last moment
    their expectations hold."""

    def __init__(self, *, site: _Site, at: datetime, rng: random.Random, issue: _Issuer) -> None:
        self.site = site
        self.at = at
        self.rng = rng
        self.issue = issue
        self.cards: list[ZooCard] = []
        self.loads: dict[str, int] = {}
        self.until = [datetime.combine(at.date() + timedelta(days=1), time(), CST) - _SECOND]

    def add(self, case: str, device: str, image: CardImage) -> ZooCard:
        card = ZooCard(f"{len(self.cards) + 1:02d}-{case}.json", case, device, image, image.serial)
        self.cards.append(card)
        return card

    def ride(
        self, image: CardImage, dc: DeviceConfig, ago: timedelta, *, tear: bool = False
    ) -> CardImage:
        return _ride(image, dc, self.at - ago, self.rng, tear=tear)

    def entered(self, image: CardImage, minutes: float) -> CardImage:
        """The card with a trip entered at a gate elsewhere ``minutes`` ago (a gate zoo)."""
        gate = self.site.history_gate
        return image if gate is None else self.ride(image, gate, timedelta(minutes=minutes))

    def torn(self) -> None:
        """First, since its answer holds only inside the re-tap window: a DEBIT at this device
        that reached the card (committed) and whose answer never came back."""
        ago = timedelta(seconds=10)
        image = self.ride(self.issue.card(), self.site.main_device, ago, tear=True)
        self.add("torn_last_transaction", self.site.main, image)
        window = timedelta(seconds=self.site.main_device.device.network.rules.antipassback_s)
        self.until.append(self.at - ago + window - _SECOND)

    def the_card(self, gate: bool) -> None:
        """Balance, validity, issuer, lists, blocking: what the card is, at the main device."""
        main, issue, day = self.site.main, self.issue, self.at.date()
        need, least = ("max_fare" if gate else "fare"), self.site.least
        # Balance: under, at and far from what the tap needs; at the cap (R4).
        if least > 0:
            self.add(f"balance_one_fen_under_{need}", main, issue.card(balance=least - 1))
        self.add(f"balance_at_{need}", main, issue.card(balance=least))
        self.add("balance_zero", main, issue.card(balance=0))
        self.add("balance_one_fen_under_cap", main, issue.card(balance=CAP_FEN - 1))
        self.add("balance_at_cap", main, issue.card(balance=CAP_FEN))
        # Validity (R9).
        long_ago = day - timedelta(days=3650)
        yesterday = day - timedelta(days=1)
        self.add("expired_yesterday", main, issue.card(issued=long_ago, expires=yesterday))
        self.add("expiring_today", main, issue.card(issued=long_ago, expires=day))
        self.add("valid_from_tomorrow", main, issue.card(issued=day + timedelta(days=1)))
        # Issuers and the lists.
        self.add("foreign_issuer_whitelisted", main, issue.card(issuer=FOREIGN_LISTED))
        self.add("foreign_issuer_not_whitelisted", main, issue.card(issuer=FOREIGN_UNLISTED))
        self.add("application_blocked", main, issue.card().replace(blocked=True))

    def riders(self) -> None:
        """Each card type but adult, each purse algorithm, priced where the fare is charged."""
        trip, issue = self.site.trip, self.issue
        for card_type in CardType:
            if card_type is not CardType.ADULT:
                image = self.entered(issue.card(card_type=card_type), 20)
                self.add(f"type_{card_type.label}", trip, image)
        self.add("alg_3des", trip, self.entered(issue.card(alg=Alg.TDES), 20))
        self.add("alg_sm4", trip, self.entered(issue.card(alg=Alg.SM4), 20))

    def trips(self, network: Network) -> None:
        """The metro trip's rules: entry while entered, exit without entry, over time."""
        self.add("already_entered", ENTRY, self.entered(self.issue.card(), 30))
        self.add("exit_without_entry", EXIT, self.issue.card())
        overtime = network.rules.overtime_s
        if overtime is not None:
            self.add("over_time", EXIT, self.entered(self.issue.card(), overtime / 60 + 10))
            # The other trips, entered 30 minutes before, go over time then.
            self.until.append(self.at + timedelta(seconds=overtime - 30 * 60))

    def transfer(self, network: Network) -> None:
        """A bus ride half a transfer window ago (and, at a gate, an entry after it)."""
        window = network.rules.transfer_window_s
        if window <= 0:
            return
        rode = self.ride(self.issue.card(), self.site.history_bus, timedelta(seconds=window / 2))
        if self.site.history_gate is not None:
            rode = self.ride(rode, self.site.history_gate, timedelta(seconds=window / 4))
        self.add("inside_transfer_window", self.site.trip, rode)
        self.until.append(self.at + timedelta(seconds=window / 2))

    def broken(self) -> None:
        """A card that wore out (its purchase counter at its end), or broke (EF15); a card
        issued without the transit application (only the bank and social security)."""
        main = self.site.main
        self.add("counter_exhausted", main, self.issue.card().replace(offline_counter=0xFFFF))
        image = self.issue.card()
        damaged = image.replace(ef15=image.ef15[:20] + b"\xff" * 10, ef15_damaged=True)
        self.add("damaged_ef15", main, damaged)
        self.add("bank_and_social_only", main, self.issue.card(transit=False))

    def kiosk(self) -> None:
        """R4 at the kiosk: the most that may be loaded, one fen more, one fen on a full card."""
        most = room(CAP_FEN - 1000, AmountRules())
        for case, balance, amount in (
            ("kiosk_most_loadable", CAP_FEN - 1000, most),
            ("kiosk_one_fen_over_cap", CAP_FEN - 1000, most + 1),
            ("kiosk_at_cap_one_fen", CAP_FEN, 1),
        ):
            card = self.add(case, KIOSK, self.issue.card(balance=balance))
            self.loads[card.file] = amount


def build_zoo(
    *,
    network: Network,
    at: datetime,
    station: str | None = None,
    bus_fare_fen: int | None = None,
    kiosk: bool = False,
    seed: int = 0,
    keys: IssuerKeys = DEMO_KEYS,
    keys_file: Path | None = None,
    reader: str = "sim",
) -> Zoo:
    """The zoo's cards and devices: a metro gate pair at ``station`` (an entry and an exit
    gate) or a bus charging ``bus_fare_fen``; with ``kiosk``, cards for a top-up kiosk too.

    Args:
        network: the fare network the devices belong to.
        at: the moment the answer key assumes (an aware datetime).
        station: the gates' station (Chinese or pinyin name); exactly one of it and
            ``bus_fare_fen``.
        bus_fare_fen: the bus's route fare.
        kiosk: add the kiosk's cards (the most that may be loaded, one fen more).
        seed: the seed of the serials and the cards' random numbers: the same seed and
            moment give the same zoo, byte for byte.
        keys: the issuer master keys the cards carry (the terminal's PSAM holds them).
        keys_file: where ``keys`` came from, named in ``validator.toml``.
        reader: the devices' reader in ``validator.toml`` (``sim`` or ``pcsc:NAME``).

    ZooError when the arguments do not fit the network.
    """
    if at.tzinfo is None:
        raise ZooError("the zoo's moment needs a UTC offset")
    if (station is None) == (bus_fare_fen is None):
        raise ZooError("a zoo is for a metro gate (--station) or a bus (--bus), not both")
    if bus_fare_fen is not None and not 0 < bus_fare_fen <= CAP_FEN:
        raise ZooError(
            f"the bus fare must be more than 0 and at most 1000 yuan, got {bus_fare_fen} fen"
        )
    at = at.astimezone(CST).replace(microsecond=0)
    rng = random.Random(seed)
    issue = _Issuer(rng=rng, day=at.date(), keys=keys)
    hot = issue.card()
    whitelist = frozenset({DEMO_ISSUER_ID, FOREIGN_LISTED})
    lists = Parameters(0, frozenset({hot.serial}), whitelist)
    history = Parameters(0, frozenset(), whitelist | {FOREIGN_UNLISTED})
    if station is not None:
        site = _gate_site(network, station, lists, keys, history)
    else:
        assert bus_fare_fen is not None  # narrowed by the check above
        site = _bus_site(network, bus_fare_fen, lists=lists, keys=keys, history=history, at=at)
    cases = _Cases(site=site, at=at, rng=rng, issue=issue)
    cases.torn()
    cases.the_card(gate=station is not None)
    cases.add("hotlisted", site.main, hot)
    cases.riders()
    if station is not None:
        cases.trips(network)
    cases.transfer(network)
    cases.broken()
    if kiosk:
        cases.kiosk()
    return Zoo(
        network,
        at,
        site.devices,
        tuple(cases.cards),
        keys_file,
        kiosk,
        reader,
        cases.loads,
        min(cases.until),
    )


def answer(config: DeviceConfig, image: CardImage, at: datetime) -> Expect:
    """What farelab's validator, configured as ``config``, decides for a card at ``at``."""
    card = SimulatedCard(image, today=lambda: at.astimezone(CST).date())
    reader = InProcessReader()
    reader.insert(card)
    journal = Journal(":memory:")
    try:
        return Expect.of(Validator(config=config, journal=journal).tap(reader, at))
    finally:
        journal.close()
        card.close()


def _kiosk_answer(image: CardImage, amount: int) -> Expect:
    """What a kiosk must do when asked to load ``amount`` onto this card (R4)."""
    rules = AmountRules()
    refused = check_amount(amount, image.balance, rules)
    if refused is not None:
        return Expect("rejected", refused[0], amount, image.balance)
    return Expect("loaded", None, amount, image.balance + amount)


def write_zoo(directory: Path, zoo: Zoo) -> dict[str, Any]:
    """Write the card images, ``validator.toml`` and ``manifest.json`` into ``directory``
    (created if missing; ZooError if it holds a manifest already) and return the manifest.

    The answer key is computed by farelab's validator configured from the ``validator.toml``
    just written, so the file and the key cannot disagree."""
    where = describe_path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "manifest.json").exists():
            raise ZooError(f"{where} already holds a zoo (manifest.json); choose another folder")
        config_path = directory / "validator.toml"
        config_path.write_text(zoo.config_toml(), encoding="utf-8")
        for card in zoo.cards:
            save_image(directory / card.file, card.image)
    except OSError as exc:
        raise ZooError(f"{where}: cannot write the zoo: {exc.strerror or exc}") from None
    except ImageError as exc:
        raise ZooError(str(exc)) from None
    try:
        config: Config = load_config(config_path)
    except ConfigError as exc:
        raise RuntimeError(f"the zoo's own validator.toml does not load: {exc}") from None
    entries = []
    for card in zoo.cards:
        if card.device == KIOSK:
            expect = _kiosk_answer(card.image, zoo.loads[card.file])
        else:
            expect = answer(config.device(card.device), card.image, zoo.at)
        entries.append(
            {
                "file": card.file,
                "serial": card.serial,
                "case": card.case,
                "device": card.device,
                "expect": expect.to_json(),
            }
        )
    manifest = {"network": zoo.network.key, "device": zoo.device_json(), "cards": entries}
    try:
        (directory / "manifest.json").write_text(
            json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
    except OSError as exc:
        raise ZooError(f"{where}: cannot write manifest.json: {exc.strerror or exc}") from None
    return manifest


def parse_moment(text: str | None) -> datetime:
    """``--at``: an ISO-8601 time with its offset; None for now (China time, whole seconds)."""
    if text is None:
        return datetime.now(CST).replace(microsecond=0)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ZooError(f"--at {shown(text)} is not an ISO-8601 time") from None
    if moment.tzinfo is None:
        raise ZooError(f"--at {shown(text)} has no UTC offset (say +08:00)")
    return moment

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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
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
        )


def _entropy(rng: random.Random) -> Callable[[int], bytes]:
    return rng.randbytes


def _ride(
    image: CardImage,
    dc: DeviceConfig,
    at: datetime,
    rng: random.Random,
    *,
    tear: bool = False,
) -> CardImage:
    """The card after a tap at ``dc`` (torn right after its DEBIT reached the card)."""
    card = SimulatedCard(image, entropy=_entropy(rng), today=lambda: at.astimezone(CST).date())
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
    station: str | None = None,
    line: str | None = None,
    direction: Direction = Direction.BOTH,
    route_fare_fen: int | None = None,
    whitelist: frozenset[bytes],
    hotlist: frozenset[str] = frozenset(),
    keys: IssuerKeys,
) -> DeviceConfig:
    return DeviceConfig(
        Device(
            id=device_id,
            kind=kind,
            network=network,
            terminal_id=terminal,
            line=network.line(line) if line is not None else None,
            station=network.station(station) if station is not None else None,
            direction=direction,
            route_fare_fen=route_fare_fen,
        ),
        Parameters(0, hotlist, whitelist),
        dict.fromkeys(whitelist, keys),
    )


def _far_station(network: Network, station: str, line: str) -> str:
    """The station of ``line`` whose trip to ``station`` costs most (the first such)."""
    here = network.station(station).id
    stops = network.line(line).stops
    far = max(stops, key=lambda stop: (network.fare(stop[0], here), -stop[0]))[0]
    if far == here:
        far = stops[0][0] if stops[0][0] != here else stops[-1][0]
    return network.stations[far].name_en


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
    day = at.date()
    rng = random.Random(seed)
    issue = _Issuer(rng=rng, day=day, keys=keys)
    whitelist = frozenset({DEMO_ISSUER_ID, FOREIGN_LISTED})
    history_list = frozenset({DEMO_ISSUER_ID, FOREIGN_LISTED, FOREIGN_UNLISTED})
    local = network.is_local(DEMO_ISSUER_ID)
    adult = Rider(CardType.ADULT, local)
    cards: list[tuple[str, str, CardImage]] = []
    hot = issue.card()
    hotlist = frozenset({hot.public.serial})

    if station is not None:
        if not network.has_stations:
            raise ZooError(f"network {network.key!r} ships no stations: use --bus")
        try:
            where = network.station(station)
        except NetworkError as exc:
            raise ZooError(str(exc)) from None
        line = where.lines[0]
        gate_kw: dict[str, Any] = {"station": where.name_en, "line": line, "keys": keys}
        entry = _device(
            network, ENTRY, Kind.METRO_GATE, terminal=bytes.fromhex(_TERMINALS[ENTRY]),
            direction=Direction.ENTRY, whitelist=whitelist, hotlist=hotlist, **gate_kw,
        )  # fmt: skip
        exit_ = _device(
            network, EXIT, Kind.METRO_GATE, terminal=bytes.fromhex(_TERMINALS[EXIT]),
            direction=Direction.EXIT, whitelist=whitelist, hotlist=hotlist, **gate_kw,
        )  # fmt: skip
        devices: tuple[DeviceConfig, ...] = (entry, exit_)
        far = _far_station(network, where.name_en, line)
        far_line = network.station(far).lines[0]
        elsewhere = _device(
            network, "zoo-history-gate", Kind.METRO_GATE, terminal=_ELSEWHERE_GATE,
            station=far, line=far_line, direction=Direction.ENTRY, whitelist=history_list,
            keys=keys,
        )  # fmt: skip
        main, least = ENTRY, metro_entry_minimum(network, adult)

        def entered(image: CardImage, minutes: float) -> CardImage:
            return _ride(image, elsewhere, at - timedelta(minutes=minutes), rng)

        trip_device = EXIT
    else:
        assert bus_fare_fen is not None
        bus = _device(
            network, BUS, Kind.BUS, terminal=bytes.fromhex(_TERMINALS[BUS]),
            route_fare_fen=bus_fare_fen, whitelist=whitelist, hotlist=hotlist, keys=keys,
        )  # fmt: skip
        devices = (bus,)
        main = trip_device = BUS
        least = bus_fare(
            network, adult, route_fare_fen=bus_fare_fen, previous=None, now=at
        ).fare_fen

        def entered(image: CardImage, minutes: float) -> CardImage:
            return image

    history_bus = _device(
        network, "zoo-history-bus", Kind.BUS, terminal=_ELSEWHERE_BUS,
        route_fare_fen=bus_fare_fen or network.rules.bus_base_fen or 200,
        whitelist=history_list, keys=keys,
    )  # fmt: skip
    main_dc = next(dc for dc in devices if dc.device.id == main)

    def add(case: str, device: str, image: CardImage) -> None:
        cards.append((case, device, image))

    # First, since its answer holds only inside the re-tap window: a DEBIT that reached the
    # card (committed) whose answer never reached this device.
    torn_at = at - timedelta(seconds=10)
    add("torn_last_transaction", main, _ride(issue.card(), main_dc, torn_at, rng, tear=True))
    second = timedelta(seconds=1)
    until = [
        torn_at + timedelta(seconds=network.rules.antipassback_s) - second,
        datetime.combine(day + timedelta(days=1), datetime.min.time(), CST) - second,
    ]
    # Balance: under, at and far from what the tap needs; at the cap (R4).
    if least > 0:
        add("balance_one_fen_under_" + ("max_fare" if station else "fare"), main,
            issue.card(balance=least - 1))  # fmt: skip
    add("balance_at_" + ("max_fare" if station else "fare"), main, issue.card(balance=least))
    add("balance_zero", main, issue.card(balance=0))
    add("balance_one_fen_under_cap", main, issue.card(balance=CAP_FEN - 1))
    add("balance_at_cap", main, issue.card(balance=CAP_FEN))
    # Validity (R9).
    add("expired_yesterday", main, issue.card(
        issued=day - timedelta(days=3650), expires=day - timedelta(days=1)))  # fmt: skip
    add("expiring_today", main, issue.card(issued=day - timedelta(days=3650), expires=day))
    add("valid_from_tomorrow", main, issue.card(issued=day + timedelta(days=1)))
    # Issuers and the lists.
    add("foreign_issuer_whitelisted", main, issue.card(issuer=FOREIGN_LISTED))
    add("foreign_issuer_not_whitelisted", main, issue.card(issuer=FOREIGN_UNLISTED))
    add("hotlisted", main, hot)
    add("application_blocked", main, issue.card().replace(blocked=True))
    # Who rides: each card type, each purse algorithm (priced where the fare is charged).
    for card_type in CardType:
        if card_type is not CardType.ADULT:
            add(f"type_{card_type.label}", trip_device,
                entered(issue.card(card_type=card_type), 20))  # fmt: skip
    add("alg_3des", trip_device, entered(issue.card(alg=Alg.TDES), 20))
    add("alg_sm4", trip_device, entered(issue.card(alg=Alg.SM4), 20))
    # The trip's rules.
    if station is not None:
        add("already_entered", ENTRY, entered(issue.card(), 30))
        add("exit_without_entry", EXIT, issue.card())
        overtime = network.rules.overtime_s
        if overtime is not None:
            add("over_time", EXIT, entered(issue.card(), overtime / 60 + 10))
            until.append(at + timedelta(seconds=overtime - 30 * 60))
    window = network.rules.transfer_window_s
    if window > 0:
        rode = _ride(issue.card(), history_bus, at - timedelta(seconds=window / 2), rng)
        if station is not None:
            rode = _ride(rode, elsewhere, at - timedelta(seconds=window / 4), rng)
        add("inside_transfer_window", trip_device, rode)
        until.append(at + timedelta(seconds=window / 2))
    # A card that wore out, or broke.
    add("counter_exhausted", main, issue.card().replace(offline_counter=0xFFFF))
    damaged = issue.card()
    add("damaged_ef15", main, damaged.replace(
        ef15=damaged.ef15[:20] + b"\xff" * 10, ef15_damaged=True))  # fmt: skip

    loads: dict[str, int] = {}
    zoo_cards: list[ZooCard] = []
    for n, (case, device, image) in enumerate(cards, 1):
        zoo_cards.append(ZooCard(f"{n:02d}-{case}.json", case, device, image, _serial(image)))
    if kiosk:
        most = room(CAP_FEN - 1000, AmountRules())
        for case, balance, amount in (
            ("kiosk_most_loadable", CAP_FEN - 1000, most),
            ("kiosk_one_fen_over_cap", CAP_FEN - 1000, most + 1),
            ("kiosk_at_cap_one_fen", CAP_FEN, 1),
        ):
            image = issue.card(balance=balance)
            name = f"{len(zoo_cards) + 1:02d}-{case}.json"
            zoo_cards.append(ZooCard(name, case, KIOSK, image, _serial(image)))
            loads[name] = amount
    return Zoo(network, at, devices, tuple(zoo_cards), keys_file, kiosk, reader, loads, min(until))


def _serial(image: CardImage) -> str:
    """The 20-digit serial of EF15; for a damaged EF15, the digits it still holds."""
    return image.ef15[10:20].hex()


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

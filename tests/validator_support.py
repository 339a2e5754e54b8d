"""Helpers for validator tests: devices on the shipped networks, cards, and a tap driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from farelab.card import (
    CST,
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    Alg,
    CardImage,
    CardType,
    InProcessReader,
    MemoryStore,
    SimulatedCard,
    personalise,
    step_of,
)
from farelab.validator import (
    Device,
    DeviceConfig,
    Direction,
    Journal,
    Kind,
    Network,
    Parameters,
    TapResult,
    Validator,
    shipped_networks,
)

NON_LOCAL_ISSUER = bytes.fromhex("2150000000000000")
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=CST)


def network(key: str) -> Network:
    return shipped_networks()[key]


def bus(
    key: str,
    *,
    device_id: str = "bus",
    route_fare_fen: int | None = None,
    terminal: str = "000000000B01",
) -> Device:
    return Device(
        id=device_id,
        kind=Kind.BUS,
        network=network(key),
        terminal_id=bytes.fromhex(terminal),
        route_fare_fen=route_fare_fen,
        route="1",
    )


def gate(
    key: str,
    station: str,
    *,
    line: str | None = None,
    device_id: str | None = None,
    direction: Direction = Direction.BOTH,
    terminal: str | None = None,
) -> Device:
    net = network(key)
    st = net.station(station)
    ln = net.line(line or st.lines[0])
    return Device(
        id=device_id or f"gate-{st.name_en}",
        kind=Kind.METRO_GATE,
        network=net,
        terminal_id=bytes.fromhex(
            terminal or f"0000{ln.number:02X}{st.id:02X}{int(direction == Direction.EXIT):04X}"
        ),
        line=ln,
        station=st,
        direction=direction,
    )


def new_card(
    *,
    balance: int = 5000,
    card_type: CardType = CardType.ADULT,
    issuer: bytes = DEMO_ISSUER_ID,
    alg: Alg = Alg.TDES,
    serial: str = "1001",
    issued: date = date(2026, 1, 1),
    expires: date | None = None,
) -> SimulatedCard:
    image = personalise(
        serial=serial,
        issued=issued,
        balance=balance,
        card_type=card_type,
        issuer_id=issuer,
        alg=alg,
        expires=expires,
    )
    return SimulatedCard(image, store=MemoryStore(), entropy=bytes)


@dataclass
class Lab:
    """Devices sharing one in-memory journal; taps cards at given times."""

    devices: list[Device]
    hotlist: frozenset[str] = frozenset()
    whitelist: frozenset[bytes] = frozenset({DEMO_ISSUER_ID, NON_LOCAL_ISSUER})
    journal: Journal = field(default_factory=lambda: Journal(":memory:"))

    def __post_init__(self) -> None:
        params = Parameters(1, self.hotlist, self.whitelist)
        keys = dict.fromkeys(self.whitelist, DEMO_KEYS)
        self.validators = {
            d.id: Validator(config=DeviceConfig(d, params, keys), journal=self.journal)
            for d in self.devices
        }

    def tap(
        self,
        device: str | Device,
        card: SimulatedCard,
        at: datetime | float,
        *,
        pull_after: str | None = None,
    ) -> TapResult:
        when = at if isinstance(at, datetime) else T0 + timedelta(seconds=at)
        reader = InProcessReader()
        reader.insert(card)
        if pull_after is not None:
            reader.pull_after(lambda apdu: step_of(apdu) == pull_after)
        key = device if isinstance(device, str) else device.id
        return self.validators[key].tap(reader, when)

    def charged(self, serial: str) -> int:
        """Sum of completed transactions of a card in the journal."""
        rows = self.journal.transactions(card_serial=serial.rjust(20, "0"))
        return sum(r["amount_fen"] for r in rows if r["status"] == "completed")


def image_of(card: SimulatedCard) -> CardImage:
    return card.image


def save(card: SimulatedCard, path: Path) -> None:
    from farelab.card import save_image  # noqa: PLC0415

    save_image(path, card.image)

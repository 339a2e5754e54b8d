"""Fare rules on the shipped Taiyuan and Changzhou data, with every expected fare computed here
from the published bands and station kilometres (not from the code under test)."""

from __future__ import annotations

import itertools
import math
import tomllib
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources

import pytest

from farelab.card import CardType, Industry
from farelab.validator._fares import (
    PreviousRide,
    Rider,
    bus_fare,
    metro_entry_minimum,
    metro_trip_fare,
)
from farelab.validator._network import shipped_networks
from tests.validator_support import T0

DATA = tomllib.loads(
    (resources.files("farelab.validator") / "networks.toml").read_text(encoding="utf-8")
)


def published_fare_fen(city: str, km: float) -> int:
    """The fare of the band rule (docs/rules.md, the shipped networks), straight from the data
    file."""
    doc = DATA[city]
    bands: list[list[float]] = doc["fare_bands"]
    for max_km, yuan in bands:
        if km <= max_km + 1e-9:
            return round(yuan * 100)
    last_km, last_yuan = bands[-1]
    extra: float = doc["extra_km_per_yuan"]
    return round((last_yuan + math.ceil((km - last_km) / extra - 1e-9)) * 100)


def share(fen: int, factor: float) -> int:
    return int((Decimal(fen) * Decimal(str(factor))).quantize(Decimal(1), ROUND_HALF_UP))


def stations(city: str, line: str) -> list[tuple[str, float]]:
    return [(zh, km) for zh, _, km in DATA[city]["lines"][line]["stations"]]


@pytest.mark.parametrize("city", ["taiyuan", "changzhou"])
def test_every_same_line_pair_pays_the_published_band_fare(city: str) -> None:
    net = shipped_networks()[city]
    checked = 0
    for line in DATA[city]["lines"]:
        for (a, ka), (b, kb) in itertools.combinations(stations(city, line), 2):
            expected = published_fare_fen(city, abs(kb - ka))
            assert net.fare(net.station(a).id, net.station(b).id) == expected, (a, b)
            checked += 1
    assert checked > 200


@pytest.mark.parametrize(
    ("a", "b", "km", "yuan"),
    [
        ("尖草坪", "府西街", 4.94, 2),  # just under the 5 km edge
        ("尖草坪", "开化寺街", 5.60, 3),  # just over it
        ("尖草坪", "王村南街", 9.47, 3),
        ("尖草坪", "长风街", 10.94, 4),
        ("尖草坪", "西桥", 23.65, 6),  # end to end: the line's maximum
    ],
)
def test_taiyuan_band_edges(a: str, b: str, km: float, yuan: int) -> None:
    net = shipped_networks()["taiyuan"]
    assert published_fare_fen("taiyuan", km) == yuan * 100
    assert net.fare(net.station(a).id, net.station(b).id) == yuan * 100


def test_changzhou_interchange_takes_the_shortest_path_through_wenhuagong() -> None:
    net = shipped_networks()["changzhou"]
    l1 = dict(stations("changzhou", "L1"))
    l2 = dict(stations("changzhou", "L2"))
    # 青枫公园 (L2) to 南夏墅 (L1): along L2 to 文化宫, change, along L1 to the end.
    km = (l2["文化宫"] - l2["青枫公园"]) + (l1["南夏墅"] - l1["文化宫"])
    a, b = net.station("青枫公园").id, net.station("Nanxiashu").id
    assert net.distance_m[a, b] == round(km * 1000)
    assert net.fare(a, b) == published_fare_fen("changzhou", km) == 600
    # 五一路 (L2 end) to 森林公园 (L1 start) crosses at 文化宫 too
    km2 = (l2["五一路"] - l2["文化宫"]) + (l1["文化宫"] - l1["森林公园"])
    assert net.fare(net.station("五一路").id, net.station("森林公园").id) == published_fare_fen(
        "changzhou", km2
    )


def test_changzhou_beyond_the_last_band_adds_a_yuan_per_9_km() -> None:
    net = shipped_networks()["changzhou"]
    a, b = net.station("森林公园").id, net.station("南夏墅").id
    assert published_fare_fen("changzhou", 34.24) == 700
    assert net.fare(a, b) == 700
    assert net.max_fare_fen == 700


@pytest.mark.parametrize(
    ("card_type", "local", "expected"),
    [
        (CardType.ADULT, True, share(300, 0.90)),  # local stored-value card discount
        (CardType.ADULT, False, 300),  # T-Union card from elsewhere: no Taiyuan card discount
        (CardType.STUDENT, True, share(300, 0.50)),
        (CardType.ELDERLY, True, 0),  # 65+ ride free
        (CardType.DISABLED, False, 0),  # free on the metro
    ],
)
def test_taiyuan_metro_concessions(card_type: CardType, local: bool, expected: int) -> None:
    net = shipped_networks()["taiyuan"]
    a, b = net.station("尖草坪").id, net.station("大南门").id  # 6.40 km: 3 yuan
    quote = metro_trip_fare(
        net, Rider(card_type, local), entry=a, exit_=b, entered_at=T0, now=T0, previous=None
    )
    assert quote.fare_fen == expected


@pytest.mark.parametrize(
    ("card_type", "local", "expected"),
    [
        (CardType.ADULT, True, 50),  # local adult card pays 50% of 1 yuan
        (CardType.ADULT, False, 100),  # cards from elsewhere pay the cash fare
        (CardType.ELDERLY, True, 0),
        (CardType.DISABLED, True, 50),  # free only on the metro
    ],
)
def test_taiyuan_bus_fares(card_type: CardType, local: bool, expected: int) -> None:
    net = shipped_networks()["taiyuan"]
    quote = bus_fare(net, Rider(card_type, local), route_fare_fen=None, previous=None, now=T0)
    assert quote.fare_fen == expected


def test_changzhou_bus_transfer_within_60_minutes_takes_a_yuan_then_the_card_discount() -> None:
    net = shipped_networks()["changzhou"]
    rider = Rider(CardType.ADULT, local=False)
    alone = bus_fare(net, rider, route_fare_fen=None, previous=None, now=T0)
    assert alone.fare_fen == share(200, 0.95)
    metro_before = PreviousRide(Industry.METRO, T0)
    within = bus_fare(
        net, rider, route_fare_fen=None, previous=metro_before, now=T0.replace(minute=59, second=59)
    )
    assert within.fare_fen == share(200 - 100, 0.95)
    late = bus_fare(
        net,
        rider,
        route_fare_fen=None,
        previous=metro_before,
        now=T0.replace(hour=9, minute=0, second=1),
    )
    assert late.fare_fen == share(200, 0.95)


def test_changzhou_metro_after_bus_is_a_transfer_but_metro_after_metro_is_not() -> None:
    net = shipped_networks()["changzhou"]
    rider = Rider(CardType.ADULT, local=True)
    a, b = net.station("森林公园").id, net.station("南夏墅").id
    after_bus = metro_trip_fare(
        net, rider, entry=a, exit_=b, entered_at=T0, now=T0, previous=PreviousRide(Industry.BUS, T0)
    )
    after_metro = metro_trip_fare(
        net,
        rider,
        entry=a,
        exit_=b,
        entered_at=T0,
        now=T0,
        previous=PreviousRide(Industry.METRO, T0),
    )
    assert after_bus.fare_fen == share(700 - 100, 0.95)
    assert after_metro.fare_fen == share(700, 0.95)


def test_nanjing_bus_transfer_takes_1_60_before_the_80_percent_card_rate() -> None:
    net = shipped_networks()["nanjing"]
    rider = Rider(CardType.ADULT, local=True)
    previous = PreviousRide(Industry.METRO, T0)
    quote = bus_fare(
        net, rider, route_fare_fen=200, previous=previous, now=T0.replace(hour=9, minute=29)
    )
    assert quote.fare_fen == share(200 - 160, 0.80)


def test_overtime_in_the_paid_area_is_charged_the_maximum_fare() -> None:
    net = shipped_networks()["taiyuan"]
    rider = Rider(CardType.ADULT, local=True)
    a, b = net.station("尖草坪").id, net.station("涧河").id
    within = metro_trip_fare(
        net, rider, entry=a, exit_=b, entered_at=T0, now=T0.replace(hour=11), previous=None
    )
    over = metro_trip_fare(
        net,
        rider,
        entry=a,
        exit_=b,
        entered_at=T0,
        now=T0.replace(hour=11, second=1),
        previous=None,
    )
    assert within.fare_fen == share(200, 0.90)
    assert over.fare_fen == 600
    assert "overtime" in over.notes


def test_R3_entry_minimum_is_the_maximum_fare_at_the_riders_share() -> None:
    taiyuan = shipped_networks()["taiyuan"]
    assert metro_entry_minimum(taiyuan, Rider(CardType.ADULT, local=True)) == share(600, 0.90)
    assert metro_entry_minimum(taiyuan, Rider(CardType.ADULT, local=False)) == 600
    assert metro_entry_minimum(taiyuan, Rider(CardType.ELDERLY, local=True)) == 0

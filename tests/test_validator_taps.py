"""Whole taps through the decision core with in-process cards: every rejection reason, R3 at
the gate, penalties, anti-passback, torn taps — and the rider's money conserved throughout."""

from __future__ import annotations

from datetime import date

import pytest

from farelab.card import Alg, CardType, MetroRecord, MetroStatus, SimulatedCard
from farelab.validator._device import Device, Direction
from tests.validator_support import NON_LOCAL_ISSUER, Lab, bus, gate, new_card


def conserved(lab: Lab, card: SimulatedCard, initial: int) -> None:
    """The card's balance is its initial balance less exactly what the journal charged."""
    assert card.image.balance == initial - lab.charged(card.image.public.serial)


@pytest.mark.parametrize("alg", [Alg.TDES, Alg.SM4])
def test_bus_ride_is_charged_once_and_journalled_with_its_tac(alg: Alg) -> None:
    lab = Lab([bus("taiyuan")])
    card = new_card(balance=1000, alg=alg)
    result = lab.tap("bus", card, 0)
    assert (result.result, result.fare_fen, result.balance_fen) == ("accepted", 50, 950)
    assert len(result.tac) == 8
    [tx] = lab.journal.transactions()
    assert (tx["status"], tx["tac"], tx["amount_fen"]) == ("completed", result.tac, 50)
    conserved(lab, card, 1000)


def test_bus_refuses_a_balance_below_this_rides_fare_R3() -> None:
    lab = Lab([bus("changzhou")])
    card = new_card(balance=189)  # the fare is 1.90
    result = lab.tap("bus", card, 0)
    assert (result.result, result.reason) == ("rejected", "insufficient_balance")
    assert card.image.balance == 189
    assert lab.tap("bus", new_card(balance=190), 0).result == "accepted"


def test_metro_entry_refused_below_max_fare_R3() -> None:
    lab = Lab([gate("taiyuan", "大南门")])
    # local adult: the maximum single fare 6 yuan at the 90% card rate = 5.40
    refused = lab.tap("gate-Dananmen", new_card(balance=539), 0)
    assert (refused.result, refused.reason, refused.balance_fen) == (
        "rejected",
        "insufficient_balance",
        539,
    )
    entered = lab.tap("gate-Dananmen", new_card(balance=540), 0)
    assert (entered.result, entered.fare_fen) == ("accepted", 0)


def test_metro_entry_writes_the_entry_record_and_exit_charges_the_distance_fare() -> None:
    entry, exit_ = gate("taiyuan", "尖草坪"), gate("taiyuan", "长风街")
    lab = Lab([entry, exit_])
    card = new_card(balance=2000)
    assert lab.tap(entry, card, 0).result == "accepted"
    record = MetroRecord.decode(card.image.metro)
    assert record.status is MetroStatus.ENTERED
    assert record.entry_station == entry.station_code
    out = lab.tap(exit_, card, 1800)  # 10.94 km: 4 yuan, local card 90%
    assert (out.result, out.fare_fen, out.balance_fen) == ("accepted", 360, 1640)
    assert MetroRecord.decode(card.image.metro).status is MetroStatus.EXITED
    conserved(lab, card, 2000)


def test_changzhou_trip_across_the_interchange_is_priced_by_the_shortest_path() -> None:
    entry, exit_ = gate("changzhou", "青枫公园"), gate("changzhou", "南夏墅")
    lab = Lab([entry, exit_])
    card = new_card(balance=2000, issuer=NON_LOCAL_ISSUER)
    lab.tap(entry, card, 0)
    out = lab.tap(exit_, card, 3000)
    assert out.fare_fen == 570  # 24.65 km → 6 yuan, 95% for T-Union cards too


def test_exit_without_entry_pays_the_configured_penalty() -> None:
    exit_gate = gate("taiyuan", "大南门", direction=Direction.EXIT)
    lab = Lab([exit_gate])
    card = new_card(balance=2000)
    result = lab.tap(exit_gate, card, 0)
    assert (result.result, result.reason, result.fare_fen) == (
        "accepted",
        "exit_without_entry",
        600,
    )
    conserved(lab, card, 2000)


def test_entry_while_already_entered_closes_the_open_trip_with_the_penalty() -> None:
    a = gate("taiyuan", "尖草坪", direction=Direction.ENTRY)
    b = gate("taiyuan", "大南门", direction=Direction.ENTRY)
    lab = Lab([a, b])
    card = new_card(balance=2000)
    lab.tap(a, card, 0)
    result = lab.tap(b, card, 600)
    assert (result.reason, result.fare_fen) == ("entry_while_entered", 600)
    assert MetroRecord.decode(card.image.metro).entry_station == b.station_code
    conserved(lab, card, 2000)


def test_retap_at_the_same_gate_within_the_window_is_not_charged_again() -> None:
    g = gate("taiyuan", "大南门")
    lab = Lab([g, bus("taiyuan")])
    card = new_card(balance=2000)
    lab.tap(g, card, 0)
    again = lab.tap(g, card, 30)
    assert (again.result, again.reason) == ("rejected", "already_processed")
    lab.tap("bus", card, 100)
    assert lab.tap("bus", card, 120).reason == "already_processed"
    assert lab.tap("bus", card, 170).result == "accepted"  # outside the 60 s window
    conserved(lab, card, 2000)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"expires": date(2026, 11, 22)}, "expired"),  # R9
        ({"issued": date(2026, 11, 24)}, "expired"),  # not yet valid
        ({"issuer": bytes.fromhex("9999000000000000")}, "not_whitelisted"),  # R10
    ],
)
def test_refusals_before_any_debit(kwargs: dict[str, object], reason: str) -> None:
    lab = Lab([bus("taiyuan")])
    card = new_card(balance=2000, **kwargs)  # type: ignore[arg-type]
    result = lab.tap("bus", card, 0)
    assert (result.result, result.reason) == ("rejected", reason)
    assert card.image.balance == 2000
    assert card.image.offline_counter == 0


def test_hotlisted_card_is_refused_and_its_application_blocked() -> None:
    lab = Lab([bus("taiyuan")], hotlist=frozenset({"1001".rjust(20, "0")}))
    card = new_card(balance=2000)
    result = lab.tap("bus", card, 0)
    assert (result.reason, result.blocked) == ("hotlisted", True)  # type: ignore[union-attr]
    assert card.image.blocked
    assert lab.tap("bus", card, 100).reason == "blocked"
    assert Lab([bus("taiyuan")]).tap("bus", card, 200).reason == "blocked"


class _Garbage:
    """A card that answers every command with 6F00 (no precise diagnosis)."""

    def power_on(self) -> bytes:
        return b"\x3b\x00"

    def power_off(self) -> None:
        return None

    def atr(self) -> bytes:
        return b"\x3b\x00"

    def transmit(self, apdu: bytes) -> bytes:
        return b"\x6f\x00"


def test_unreadable_card_is_a_card_error() -> None:
    lab = Lab([bus("taiyuan")])
    result = lab.tap("bus", _Garbage(), 0)  # type: ignore[arg-type]
    assert (result.result, result.reason) == ("rejected", "card_error")


@pytest.mark.parametrize(
    ("card_type", "fare"), [(CardType.ELDERLY, 0), (CardType.STUDENT, 150), (CardType.ADULT, 270)]
)
def test_concession_cards_at_the_exit_gate(card_type: CardType, fare: int) -> None:
    a, b = gate("taiyuan", "尖草坪"), gate("taiyuan", "大南门")
    lab = Lab([a, b])
    card = new_card(balance=2000, card_type=card_type)
    assert lab.tap(a, card, 0).result == "accepted"
    assert lab.tap(b, card, 900).fare_fen == fare


@pytest.mark.parametrize("step", ["SELECT", "READ", "INIT", "UPDATE_CAPP"])
def test_card_pulled_before_the_debit_leaves_no_transaction(step: str) -> None:
    lab = Lab([bus("taiyuan")])
    card = new_card(balance=2000)
    result = lab.tap("bus", card, 0, pull_after=step)
    assert (result.reason, result.grey) == ("card_removed", False)
    assert card.image.balance == 2000
    assert lab.tap("bus", card, 10).fare_fen == 50
    conserved(lab, card, 2000)


def test_card_pulled_after_debit_is_grey_then_recovered_not_charged_twice() -> None:
    g1, g2 = gate("taiyuan", "尖草坪"), gate("taiyuan", "长风街")
    lab = Lab([g1, g2])
    card = new_card(balance=2000)
    lab.tap(g1, card, 0)
    torn = lab.tap(g2, card, 1800, pull_after="DEBIT")
    assert (torn.result, torn.reason, torn.grey) == ("rejected", "card_removed", True)
    assert card.image.balance == 1640  # the card did complete it
    again = lab.tap(g2, card, 1805)
    assert (again.result, again.reason, again.fare_fen, again.balance_fen) == (
        "accepted",
        "recovered",
        360,
        1640,
    )
    assert card.image.balance == 1640
    statuses = [t["status"] for t in lab.journal.transactions()]
    assert statuses == ["completed", "completed"]
    conserved(lab, card, 2000)


def test_a_debit_that_never_reached_the_card_is_voided_on_the_next_tap() -> None:
    lab = Lab([bus("taiyuan"), bus("taiyuan", device_id="bus-2", terminal="000000000B02")])

    class LosesDebit(SimulatedCard):
        """The DEBIT is lost on the air: the card never sees it."""

        armed = True

        def transmit(self, apdu: bytes) -> bytes:
            if self.armed and apdu[1] == 0x54:
                self.armed = False
                from farelab.card import CardRemovedError  # noqa: PLC0415

                raise CardRemovedError("lost on the air")
            return super().transmit(apdu)

    base = new_card(balance=2000)
    card = LosesDebit(base.image, entropy=bytes)
    torn = lab.tap("bus", card, 0)
    assert torn.grey
    # the next tap, at another bus sharing the journal, resolves it: the card never debited
    result = lab.tap("bus-2", card, 100)
    assert (result.result, result.fare_fen, result.balance_fen) == ("accepted", 50, 1950)
    assert [t["status"] for t in lab.journal.transactions()] == ["void", "completed"]
    conserved(lab, card, 2000)


def test_money_is_conserved_across_a_day_of_mixed_taps() -> None:
    g1, g2, g3 = (
        gate("changzhou", "森林公园"),
        gate("changzhou", "文化宫"),
        gate("changzhou", "五一路"),
    )
    lab = Lab([g1, g2, g3, bus("changzhou")])
    cards = [new_card(balance=b, serial=str(i)) for i, b in enumerate([3000, 800, 150, 10_000])]
    plan: list[tuple[str | Device, int]] = [
        ("bus", 0),
        (g1, 300),
        (g3, 2400),
        (g3, 2500),
        ("bus", 3000),
        (g2, 5000),
        (g1, 9000),
    ]
    for card in cards:
        for i, (device, t) in enumerate(plan):
            pull = "DEBIT" if i == 3 else None
            lab.tap(device, card, t, pull_after=pull)
    for card, initial in zip(cards, [3000, 800, 150, 10_000], strict=True):
        assert card.image.balance >= 0
        conserved(lab, card, initial)


def test_a_torn_entry_is_completed_and_the_exit_elsewhere_is_still_charged_its_fare() -> None:
    """Entry torn after its DEBIT reached the card; the exit at another gate 30 minutes later
    settles it (completed, with the card's TAC) and is a ride of its own: the distance fare,
    journalled; the card is in step, so the evening's entry is an ordinary entry."""
    entry, exit_ = gate("taiyuan", "尖草坪"), gate("taiyuan", "长风街")
    lab = Lab([entry, exit_])
    card = new_card(balance=2000)
    torn = lab.tap(entry, card, 0, pull_after="DEBIT")
    assert (torn.reason, torn.grey) == ("card_removed", True)
    out = lab.tap(exit_, card, 1800)
    assert (out.result, out.reason, out.fare_fen, out.balance_fen) == ("accepted", None, 360, 1640)
    assert MetroRecord.decode(card.image.metro).status is MetroStatus.EXITED
    rows = lab.journal.transactions(card_serial=card.image.public.serial)
    assert [(r["kind"], r["status"], r["amount_fen"]) for r in rows] == [
        ("entry", "completed", 0),
        ("exit", "completed", 360),
    ]
    entry_proof = card.image.proofs[1]  # the newest first: the exit's, then the entry's
    assert rows[0]["tac"] == entry_proof.tac.hex().upper()
    assert rows[1]["tac"] == out.tac
    assert lab.journal.pending() == {}
    evening = lab.tap(entry, card, 10 * 3600)
    assert (evening.result, evening.reason, evening.fare_fen) == ("accepted", None, 0)
    conserved(lab, card, 2000)


def test_a_torn_bus_ride_settled_at_another_bus_charges_that_ride_too() -> None:
    lab = Lab([bus("taiyuan"), bus("taiyuan", device_id="bus-2", terminal="000000000B02")])
    card = new_card(balance=2000)
    assert lab.tap("bus", card, 0, pull_after="DEBIT").grey
    second = lab.tap("bus-2", card, 1800)
    assert (second.result, second.reason, second.fare_fen) == ("accepted", None, 50)
    assert [r["status"] for r in lab.journal.transactions()] == ["completed", "completed"]
    assert card.image.balance == 1900
    conserved(lab, card, 2000)


def test_the_riders_retry_at_the_same_gate_is_answered_by_the_torn_transaction() -> None:
    entry = gate("taiyuan", "尖草坪")
    lab = Lab([entry])
    card = new_card(balance=2000)
    assert lab.tap(entry, card, 0, pull_after="DEBIT").grey
    again = lab.tap(entry, card, 5)
    assert (again.result, again.reason, again.fare_fen) == ("accepted", "recovered", 0)
    assert card.image.offline_counter == 1
    assert MetroRecord.decode(card.image.metro).status is MetroStatus.ENTERED
    assert [r["status"] for r in lab.journal.transactions()] == ["completed"]
    conserved(lab, card, 2000)


def test_the_same_device_after_the_retap_window_is_a_new_ride() -> None:
    lab = Lab([bus("taiyuan")])
    card = new_card(balance=2000)
    assert lab.tap("bus", card, 0, pull_after="DEBIT").grey
    later = lab.tap("bus", card, 600)
    assert (later.result, later.reason, later.fare_fen) == ("accepted", None, 50)
    assert card.image.balance == 1900
    conserved(lab, card, 2000)


def test_a_metro_trip_after_a_bus_ride_gets_the_transfer_off_at_the_exit() -> None:
    """Bus → metro inside the window: the entry writes its own trip record over the bus ride's
    place at the top of EF1E, so the exit must look past it, and judge the window at the entry."""
    ride, entry, exit_ = (
        bus("changzhou"),
        gate("changzhou", "森林公园"),
        gate("changzhou", "南夏墅"),
    )
    lab = Lab([ride, entry, exit_])
    card = new_card(balance=5000)
    assert lab.tap(ride, card, 0).result == "accepted"
    assert lab.tap(entry, card, 50 * 60).result == "accepted"  # 50 minutes after the bus
    transfer = lab.tap(exit_, card, 50 * 60 + 40 * 60)  # the trip ends outside the window
    plain = Lab([entry, exit_])
    other = new_card(balance=5000)
    assert plain.tap(entry, other, 50 * 60).result == "accepted"
    no_transfer = plain.tap(exit_, other, 50 * 60 + 40 * 60)
    assert no_transfer.fare_fen - transfer.fare_fen == 95  # 1 yuan off before the 95 % card rate
    conserved(lab, card, 5000)


def test_no_transfer_when_the_metro_entry_is_outside_the_bus_ride_window() -> None:
    ride, entry, exit_ = (
        bus("changzhou"),
        gate("changzhou", "森林公园"),
        gate("changzhou", "南夏墅"),
    )
    lab = Lab([ride, entry, exit_])
    card = new_card(balance=5000)
    assert lab.tap(ride, card, 0).result == "accepted"
    assert lab.tap(entry, card, 61 * 60).result == "accepted"
    late = lab.tap(exit_, card, 61 * 60 + 20 * 60)
    plain = Lab([entry, exit_])
    other = new_card(balance=5000)
    assert plain.tap(entry, other, 61 * 60).result == "accepted"
    assert late.fare_fen == plain.tap(exit_, other, 61 * 60 + 20 * 60).fare_fen

"""R9 through ``farelab cards``: the validity the card carries from its issue, the renewal window
in its last months, the balance moving onto the renewed card once, and an expired card refused
but refundable."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

from farelab.card import load_image, personalise, save_image
from tests.test_cards_cli import cards, hotlist, rode_a_bus
from tests.test_cards_cli import transfer_on as cli_transfer_on

OLD = "00000000000000005150"  # rode_a_bus rides this card number
NEW = "00000000000000005171"


def image(folder: Path, serial: str, issued: date) -> Path:
    path = folder / f"card-{serial}.json"
    save_image(path, personalise(serial=serial, issued=issued))
    return path


def transfer_on(folder: Path, at: str, new: Path) -> dict[str, Any]:
    """A renewal's balance moves at the kiosk as an exchange's does."""
    return cli_transfer_on(folder, at, new, reported=at[:10], reason="exchange")


def test_a_card_is_renewed_in_its_last_months_and_its_balance_moves_once(tmp_path: Path) -> None:
    old = image(tmp_path, OLD, date(2016, 4, 1))
    last_day = load_image(old).public.expiry  # written on the card at issue
    issued = cards(tmp_path, "issue", str(old), "--profile", "nanjing", at="2016-04-01T10:00+08:00")
    assert issued["result"] == "done"
    balance = rode_a_bus(tmp_path, OLD)
    new = image(tmp_path, NEW, date(2026, 3, 1))
    # Too early: more than the renewal window (3 months) before the card expires.
    early = cards(tmp_path, "renew", OLD, "--new", str(new), at="2025-11-30T10:00+08:00")
    assert (early["result"], early["reason"]) == ("refused", "not_due")
    renewed = cards(tmp_path, "renew", OLD, "--new", str(new), at="2026-03-01T10:00+08:00")
    assert renewed["result"] == "done"
    status = cards(tmp_path, "status", OLD, at="2026-03-01T11:00+08:00")
    assert (status["state"], status["balance_fen"], status["balance_moves_on"]) == (
        "replaced",
        balance,
        "2026-03-01",
    )
    assert hotlist(tmp_path) == {OLD: "replaced"}
    moved = transfer_on(tmp_path, "2026-03-01T12:00+08:00", new)
    assert (moved["result"], moved["amount_fen"]) == ("loaded", balance)
    again = transfer_on(tmp_path, "2026-03-01T12:05+08:00", new)
    assert (again["result"], again["reason"]) == ("refused", "already_transferred")
    assert load_image(new).balance == balance
    assert last_day.year == 2026  # the old card's own expiry, ten years on


def test_an_expired_card_is_not_usable_but_its_balance_is_refundable(tmp_path: Path) -> None:
    old = image(tmp_path, OLD, date(2016, 4, 1))
    last_day = load_image(old).public.expiry
    cards(tmp_path, "issue", str(old), "--profile", "changzhou", at="2016-04-01T10:00+08:00")
    on_last_day = cards(tmp_path, "status", OLD, at=f"{last_day}T23:00+08:00")
    assert (on_last_day["state"], on_last_day["transit_usable"]) == ("active", True)
    after = cards(
        tmp_path, "status", OLD, at=f"{date.fromordinal(last_day.toordinal() + 1)}T00:00+08:00"
    )
    assert (after["state"], after["transit_usable"]) == ("expired", False)
    late = cards(
        tmp_path,
        "renew",
        OLD,
        "--new",
        str(image(tmp_path, NEW, date(2026, 5, 1))),
        at="2026-05-01T10:00+08:00",
    )
    assert (late["result"], late["reason"]) == ("refused", "expired")
    refunded = cards(tmp_path, "refund", OLD, at="2026-05-01T11:00+08:00")
    assert refunded["result"] == "done"

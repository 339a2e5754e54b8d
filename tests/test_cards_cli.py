"""``farelab cards``: a card's life through the command line, each command its own process (so
nothing lapses by a timer and a restart changes no outcome), the moment given with ``--at``;
its effects on the ledger's hotlist and on ``topup transfer`` (R5–R7, R12; docs/card-life.md).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

from farelab._devices import entry_of
from farelab.backend import Store, classify, load_profiles, register
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, TacVerifier, load_image, personalise, save_image
from farelab.protocol import Batch
from tests.cli_support import ROOT
from tests.cli_support import farelab as run_farelab
from tests.validator_support import Lab, bus, new_card

STATUS_KEYS = {
    "serial",
    "profile",
    "state",
    "transit_usable",
    "social_security_usable",
    "balance_fen",
    "balance_moves_on",
    "ecard",
}
OLD = "00000000000000005150"
NEW = "00000000000000005151"


def ledger(folder: Path) -> str:
    return f"sqlite:///{folder / 'ledger.db'}"


def cards(folder: Path, *args: str, at: str, status: int | None = None) -> dict[str, Any]:
    """``farelab cards ARGS --at AT --db … --json``: its JSON answer (exit status checked
    against ``status``, or against the answer's result)."""
    out = run_farelab("cards", *args, "--at", at, "--db", ledger(folder), "--json")
    assert out.stdout, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    expected = status if status is not None else (0 if doc["result"] == "done" else 1)
    assert out.returncode == expected, out.stderr
    return doc


def card_image(folder: Path, serial: str) -> Path:
    """A new card's image (no balance), saved as ``folder/card-SERIAL.json``."""
    path = folder / f"card-{serial}.json"
    save_image(path, personalise(serial=serial, issued=date(2026, 1, 1)))
    return path


def issue(folder: Path, serial: str, profile: str, at: str = "2026-01-02T10:00+08:00") -> None:
    done = cards(folder, "issue", str(card_image(folder, serial)), "--profile", profile, at=at)
    assert done["result"] == "done"


def hotlist(folder: Path) -> dict[str, str]:
    store = Store(ledger(folder))
    try:
        rows = store.execute("SELECT card_serial, reason FROM hotlist").fetchall()
    finally:
        store.close()
    return {str(serial): str(reason) for serial, reason in rows}


def rode_a_bus(folder: Path, serial: str) -> int:
    """The card rode a bus; the ride is in the ledger. Its balance after the ride."""
    device = bus("taiyuan")
    lab = Lab([device])
    card = new_card(balance=3000, serial=serial.lstrip("0"))
    lab.tap("bus", card, 0)
    store = Store(ledger(folder))
    register(store, entry_of(device))
    records = tuple(r for _, _, r in lab.journal.outbox(100))
    store.ingest(
        "bus", 1, classify(Batch(1, "bus", records), TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS}))
    )
    store.close()
    return card.image.balance


# ``topup transfer`` with the in-process host's clock set to argv[1]: the host's transfer rules
# read the day from its clock, and a year cannot be waited for in a test.
_ON_DAY = """
import sys
from datetime import datetime

import farelab.backend._loads as loads
from farelab._cli import main


class Clock(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.fromisoformat(sys.argv[1]).astimezone(tz)


loads.datetime = Clock
sys.exit(main(sys.argv[2:]))
"""


def transfer_on(
    folder: Path, at: str, new: Path, *, reported: str, reason: str = "loss"
) -> dict[str, Any]:
    """``farelab topup transfer NEW --old 5150 --reason REASON`` (nanjing) on the host's ledger
    — the same one ``cards`` keeps — with the host's clock at ``at``."""
    args = (
        *("topup", "transfer", str(new), "--old", OLD, "--reason", reason),
        *("--reported", reported, "--profile", "nanjing"),
        *("--db", str(folder / "ledger.db"), "--journal", str(folder / "kiosk.db"), "--json"),
    )
    out = subprocess.run(
        [sys.executable, "-c", _ON_DAY, at, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_nanjing_formal_loss_freezes_and_the_balance_moves_once_a_year_later(
    tmp_path: Path,
) -> None:
    issue(tmp_path, OLD, "nanjing")
    balance = rode_a_bus(tmp_path, OLD)
    cards(tmp_path, "report-loss", OLD, "--formal", at="2026-03-10T10:00+08:00")
    frozen = cards(tmp_path, "status", OLD, at="2026-03-11T10:00+08:00")
    assert (frozen["state"], frozen["transit_usable"]) == ("frozen", False)
    assert hotlist(tmp_path) == {OLD: "frozen"}

    new = card_image(tmp_path, NEW)
    replaced = cards(tmp_path, "replace", OLD, "--new", str(new), at="2026-03-12T10:00+08:00")
    assert (replaced["result"], replaced["new_serial"], replaced["fee_fen"]) == ("done", NEW, 3000)
    old = cards(tmp_path, "status", OLD, at="2026-03-12T11:00+08:00")
    assert (old["state"], old["balance_fen"], old["balance_moves_on"]) == (
        "replaced",
        balance,
        "2027-03-10",
    )
    fresh = cards(tmp_path, "status", NEW, at="2026-03-12T11:00+08:00")
    assert (fresh["state"], fresh["profile"], fresh["transit_usable"]) == (
        "active",
        "nanjing",
        True,
    )
    assert hotlist(tmp_path) == {OLD: "replaced"}

    # The kiosk's word (a report two years back) does not move the day: the records do.
    early = transfer_on(tmp_path, "2027-03-09T16:00+08:00", new, reported="2025-01-01")
    assert (early["result"], early["reason"]) == ("refused", "not_yet")
    assert load_image(new).balance == 0
    moved = transfer_on(tmp_path, "2027-03-10T09:00+08:00", new, reported="2026-03-10")
    assert (moved["result"], moved["amount_fen"]) == ("loaded", balance)
    again = transfer_on(tmp_path, "2027-03-10T09:05+08:00", new, reported="2026-03-10")
    assert (again["result"], again["reason"]) == ("refused", "already_transferred")
    assert load_image(new).balance == balance


def test_a_transfer_onto_a_card_that_did_not_replace_the_old_one_is_refused(
    tmp_path: Path,
) -> None:
    issue(tmp_path, OLD, "nanjing")
    rode_a_bus(tmp_path, OLD)
    cards(tmp_path, "report-loss", OLD, "--formal", at="2026-03-10T10:00+08:00")
    cards(
        tmp_path,
        "replace",
        OLD,
        "--new",
        str(card_image(tmp_path, NEW)),
        at="2026-03-12T10:00+08:00",
    )
    other = card_image(tmp_path, "5199")
    refused = transfer_on(tmp_path, "2027-03-10T09:00+08:00", other, reported="2026-03-10")
    assert (refused["result"], refused["reason"]) == ("refused", "not_the_replacement")


def test_a_nanjing_phone_report_lapses_after_three_working_days_across_a_weekend(
    tmp_path: Path,
) -> None:
    issue(tmp_path, OLD, "nanjing")
    cards(tmp_path, "report-loss", OLD, "--phone", at="2026-11-20T15:00+08:00")  # a Friday
    during = cards(tmp_path, "status", OLD, at="2026-11-25T14:59+08:00")
    assert (during["state"], during["transit_usable"], during["social_security_usable"]) == (
        "reported",
        True,
        False,
    )
    lapsed = cards(tmp_path, "status", OLD, at="2026-11-25T15:00+08:00")  # the Wednesday
    assert (lapsed["state"], lapsed["social_security_usable"]) == ("active", True)
    late = cards(tmp_path, "make-formal", OLD, at="2026-11-25T15:01+08:00")
    assert (late["result"], late["reason"]) == ("refused", "no_phone_report")


def test_a_shanxi_card_rides_on_after_a_loss_report_while_social_security_is_blocked(
    tmp_path: Path,
) -> None:
    """R5: the transit account cannot be reported lost: no hotlist entry, the card rides."""
    issue(tmp_path, OLD, "shanxi")
    cards(tmp_path, "report-loss", OLD, "--formal", at="2026-05-06T09:00+08:00")
    status = cards(tmp_path, "status", OLD, at="2026-05-06T09:30+08:00")
    assert set(status) >= STATUS_KEYS
    assert {key: status[key] for key in STATUS_KEYS} == {
        "serial": OLD,
        "profile": "shanxi",
        "state": "frozen",
        "transit_usable": True,
        "social_security_usable": False,
        "balance_fen": None,
        "balance_moves_on": None,
        "ecard": "none",
    }
    assert hotlist(tmp_path) == {}


def test_the_ecard_stops_on_loss_and_is_issued_again_after_replacement(tmp_path: Path) -> None:
    issue(tmp_path, OLD, "nanjing")
    cards(tmp_path, "ecard-issue", OLD, at="2026-02-01T10:00+08:00")
    usable = cards(tmp_path, "ecard-status", OLD, at="2026-02-01T10:01+08:00")
    assert (usable["result"], usable["ecard"]) == ("done", "usable")
    cards(tmp_path, "report-loss", OLD, "--phone", at="2026-02-02T10:00+08:00")
    assert cards(tmp_path, "ecard-status", OLD, at="2026-02-02T10:01+08:00")["ecard"] == "suspended"
    cards(
        tmp_path,
        "replace",
        OLD,
        "--new",
        str(card_image(tmp_path, NEW)),
        at="2026-02-03T10:00+08:00",
    )
    assert cards(tmp_path, "ecard-status", OLD, at="2026-02-03T10:01+08:00")["ecard"] == "none"
    assert cards(tmp_path, "ecard-status", NEW, at="2026-02-03T10:01+08:00")["ecard"] == "none"
    cards(tmp_path, "ecard-issue", NEW, at="2026-02-03T10:05+08:00")
    assert cards(tmp_path, "ecard-status", NEW, at="2026-02-03T10:06+08:00")["ecard"] == "usable"


def test_an_unfrozen_nanjing_wallet_leaves_the_hotlist_after_seven_working_days(
    tmp_path: Path,
) -> None:
    issue(tmp_path, OLD, "nanjing")
    cards(tmp_path, "report-loss", OLD, "--formal", at="2026-11-12T10:00+08:00")
    assert hotlist(tmp_path) == {OLD: "frozen"}
    cards(tmp_path, "unfreeze", OLD, at="2026-11-13T10:00+08:00")  # a Friday
    assert hotlist(tmp_path) == {OLD: "transit_waiting"}
    waiting = cards(tmp_path, "status", OLD, at="2026-11-24T09:59+08:00")
    assert (waiting["state"], waiting["transit_usable"]) == ("active", False)
    usable = cards(tmp_path, "status", OLD, at="2026-11-24T10:00+08:00")
    assert usable["transit_usable"] is True
    assert hotlist(tmp_path) == {}


def test_wrong_state_actions_are_refused_with_the_core_reason(tmp_path: Path) -> None:
    issue(tmp_path, OLD, "changzhou")
    assert cards(tmp_path, "unfreeze", OLD, at="2026-02-01T10:00+08:00")["reason"] == "not_frozen"
    exchange = cards(
        tmp_path,
        "exchange",
        OLD,
        "--new",
        str(card_image(tmp_path, NEW)),
        at="2026-02-01T10:01+08:00",
    )
    assert exchange["reason"] == "refund_first"
    assert cards(tmp_path, "refund", OLD, at="2026-02-01T10:02+08:00")["result"] == "done"
    assert hotlist(tmp_path) == {OLD: "refunded"}
    twice = cards(tmp_path, "refund", OLD, at="2026-02-01T10:03+08:00")
    assert (twice["result"], twice["reason"]) == ("refused", "already_refunded")
    cards(tmp_path, "cancel", OLD, at="2026-02-01T10:04+08:00")
    replace = cards(
        tmp_path,
        "replace",
        OLD,
        "--new",
        str(card_image(tmp_path, NEW)),
        at="2026-02-01T10:05+08:00",
    )
    assert (replace["result"], replace["reason"]) == ("refused", "cancelled")
    unknown = cards(tmp_path, "status", "42", at="2026-02-01T10:06+08:00")
    assert (unknown["result"], unknown["reason"]) == ("refused", "unknown_card")
    found = cards(tmp_path, "found", "42", at="2026-02-01T10:06+08:00")
    assert (found["result"], found["reason"]) == ("refused", "unknown_card")


def test_bad_options_exit_2(tmp_path: Path) -> None:
    issue(tmp_path, OLD, "nanjing")
    naive = run_farelab(
        "cards", "status", OLD, "--at", "2026-02-01T10:00", "--db", ledger(tmp_path)
    )
    assert naive.returncode == 2
    assert "offset" in naive.stderr
    missing = run_farelab(
        "cards",
        "issue",
        str(tmp_path / "none.json"),
        "--profile",
        "nanjing",
        "--db",
        ledger(tmp_path),
    )
    assert missing.returncode == 2


def test_a_repeated_action_is_answered_the_same_and_recorded_once(tmp_path: Path) -> None:
    issue(tmp_path, OLD, "hangzhou")
    first = cards(tmp_path, "report-loss", OLD, "--formal", at="2026-04-01T08:00+08:00")
    again = cards(tmp_path, "report-loss", OLD, "--formal", at="2026-04-01T08:00+08:00")
    assert first == again
    assert (first["result"], first["state"]) == ("done", "frozen")
    later = cards(tmp_path, "report-loss", OLD, "--formal", at="2026-04-01T08:01+08:00")
    assert (later["result"], later["reason"]) == ("refused", "already_reported")
    store = Store(ledger(tmp_path))
    done = store.execute(
        "SELECT count(*) FROM card_events WHERE action = 'report_loss' AND result = 'done'"
    ).fetchone()[0]
    store.close()
    assert done == 1


def test_json_keys(tmp_path: Path) -> None:
    out = run_farelab(
        "cards",
        "issue",
        str(card_image(tmp_path, OLD)),
        "--profile",
        "haining",
        "--at",
        "2026-01-02T10:00+08:00",
        "--db",
        ledger(tmp_path),
        "--json",
    )
    issued = json.loads(out.stdout)
    assert set(issued) == {"result", "reason", "action", "fee_fen", *STATUS_KEYS}
    assert issued["fee_fen"] == 2000
    status = cards(tmp_path, "status", OLD, at="2026-01-03T10:00+08:00")
    assert set(status) == {"result", "reason", *STATUS_KEYS}
    refused = cards(tmp_path, "found", OLD, at="2026-01-03T10:00+08:00")
    assert set(refused) == {"result", "reason", "detail", "serial", "action"}


def test_backend_report_counts_cards_by_state(tmp_path: Path) -> None:
    issue(tmp_path, OLD, "nanjing")
    issue(tmp_path, "5152", "hangzhou")
    cards(tmp_path, "cancel", "5152", at="2026-01-05T10:00+08:00")
    out = run_farelab("backend", "report", "--db", ledger(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)["cards_by_state"]
    assert counts == {
        "active": 1,
        "reported": 0,
        "frozen": 0,
        "replaced": 0,
        "cancelled": 1,
        "expired": 0,
    }


def test_a_hotlist_entry_the_host_made_stays(tmp_path: Path) -> None:
    """A card the host hotlisted itself (a clone, a refund counted at a kiosk) stays on the
    hotlist whatever its recorded life says."""
    issue(tmp_path, OLD, "changzhou")
    store = Store(ledger(tmp_path))
    store.execute(
        "INSERT INTO hotlist (card_serial, reason, added_ms) VALUES (?, 'clone', 0)", (OLD,)
    )
    store.close()
    status = cards(tmp_path, "status", OLD, at="2026-02-01T10:00+08:00")
    assert (status["state"], status["transit_usable"]) == ("active", True)
    assert hotlist(tmp_path) == {OLD: "clone"}


# --- the outlet's PIN reset (R8) -----------------------------------------------------------------


def locked_card(folder: Path, serial: str, profile: str) -> Path:
    """An issued card image whose PIN the holder changed (271828), then locked with the
    profile's try limit of wrong entries."""
    limits = load_profiles()[profile]
    image = personalise(
        serial=serial,
        issued=date(2026, 1, 1),
        initial_pin=limits.initial_pin,
        pin_try_limit=limits.pin_tries_per_day,
    )
    social = dataclasses.replace(
        image.social,
        pin="271828",
        failures=limits.pin_tries_per_day,
        failure_day=date(2026, 3, 2),
        locked=True,
    )
    path = folder / f"locked-{serial}.json"
    save_image(path, image.replace(social=social))
    return path


def pin_reset(folder: Path, card: Path, pin: str, *args: str, at: str) -> dict[str, Any]:
    return cards(folder, "pin-reset", OLD, "--card", str(card), "--new-pin", pin, *args, at=at)


def done_rows(folder: Path, action: str) -> int:
    store = Store(ledger(folder))
    try:
        count: int = store.execute(
            "SELECT count(*) FROM card_events WHERE action = ? AND result = 'done'", (action,)
        ).fetchone()[0]
    finally:
        store.close()
    return count


def test_pin_reset_unlocks_the_card_and_is_journalled_once_R8(tmp_path: Path) -> None:
    issue(tmp_path, OLD, "nanjing")
    card = locked_card(tmp_path, OLD, "nanjing")
    out = run_farelab(
        *("cards", "pin-reset", OLD, "--card", str(card), "--new-pin", "314159"),
        *("--at", "2026-03-02T15:00+08:00", "--db", ledger(tmp_path), "--json"),
    )
    assert out.returncode == 0, out.stderr
    assert "314159" not in out.stdout + out.stderr
    done = json.loads(out.stdout)
    assert (done["result"], done["reason"], done["action"]) == ("done", None, "pin_reset")
    assert set(done) == {"result", "reason", "action", *STATUS_KEYS}
    social = load_image(card).social
    assert (social.locked, social.failures, social.pin) == (False, 0, "314159")
    again = pin_reset(tmp_path, card, "314159", at="2026-03-02T15:00+08:00")
    assert again == done
    assert done_rows(tmp_path, "pin_reset") == 1
    words = run_farelab(
        *("cards", "pin-reset", OLD, "--card", str(card), "--new-pin", "271828"),
        *("--at", "2026-03-02T15:05+08:00", "--db", ledger(tmp_path)),
    )
    assert words.returncode == 0, words.stderr
    assert "271828" not in words.stdout
    assert load_image(card).social.pin == "271828"


def test_pin_reset_of_a_cancelled_or_replaced_card_is_refused_with_its_reason(
    tmp_path: Path,
) -> None:
    issue(tmp_path, OLD, "haining")
    card = locked_card(tmp_path, OLD, "haining")
    cards(tmp_path, "report-loss", OLD, "--formal", at="2026-03-01T09:00+08:00")
    new = card_image(tmp_path, NEW)
    cards(tmp_path, "replace", OLD, "--new", str(new), at="2026-03-01T09:10+08:00")
    replaced = pin_reset(tmp_path, card, "314159", at="2026-03-02T15:00+08:00")
    assert (replaced["result"], replaced["reason"]) == ("refused", "replaced")
    assert NEW in replaced["detail"]
    cards(tmp_path, "cancel", NEW, at="2026-03-03T09:00+08:00")
    cancelled = cards(
        tmp_path,
        *("pin-reset", NEW, "--card", str(new), "--new-pin", "314159"),
        at="2026-03-03T10:00+08:00",
    )
    assert (cancelled["result"], cancelled["reason"]) == ("refused", "cancelled")
    assert load_image(card).social.locked
    assert load_image(new).social.pin == "888888"
    assert done_rows(tmp_path, "pin_reset") == 0


def test_pin_reset_under_other_keys_is_refused_by_the_card(tmp_path: Path) -> None:
    issue(tmp_path, OLD, "nanjing")
    card = locked_card(tmp_path, OLD, "nanjing")
    keys = tmp_path / "other-keys.toml"
    keys.write_text(
        'purchase = "000102030405060708090A0B0C0D0E0F"\n'
        'load = "101112131415161718191A1B1C1D1E1F"\n'
        'tac = "202122232425262728292A2B2C2D2E2F"\n'
        'maintenance = "404142434445464748494A4B4C4D4E4F"\n'
    )
    refused = pin_reset(tmp_path, card, "314159", "--keys", str(keys), at="2026-03-02T15:00+08:00")
    assert (refused["result"], refused["reason"]) == ("refused", "mac_invalid")
    assert load_image(card).social.locked
    assert done_rows(tmp_path, "pin_reset") == 0


def test_pin_reset_refuses_a_weak_pin_and_exits_2_on_a_bad_one(tmp_path: Path) -> None:
    issue(tmp_path, OLD, "nanjing")
    card = locked_card(tmp_path, OLD, "nanjing")
    weak = pin_reset(tmp_path, card, "666666", at="2026-03-02T15:00+08:00")
    assert (weak["result"], weak["reason"]) == ("refused", "weak_pin")
    assert load_image(card).social.locked
    for bad in ("31415", "31415a"):
        out = run_farelab(
            *("cards", "pin-reset", OLD, "--card", str(card), "--new-pin", bad),
            *("--at", "2026-03-02T15:00+08:00", "--db", ledger(tmp_path)),
        )
        assert out.returncode == 2
    other = card_image(tmp_path, NEW)
    wrong = pin_reset(tmp_path, other, "314159", at="2026-03-02T15:01+08:00")
    assert (wrong["result"], wrong["reason"]) == ("refused", "wrong_card")


def test_a_lapsed_hotlist_entry_is_not_published_though_nobody_asked_the_card(
    tmp_path: Path,
) -> None:
    """The entry of an un-frozen wallet waits its 7 working days; a parameters version made
    after them leaves the card out even if no one looked at the card since (the core decides
    at publishing time, not a timer and not the next status query)."""
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    from farelab.backend import next_params  # noqa: PLC0415

    now = datetime.now(UTC)

    def ago(days: int) -> str:
        return (now - timedelta(days=days)).isoformat(timespec="seconds")

    issue(tmp_path, OLD, "nanjing", at=ago(60))
    cards(tmp_path, "report-loss", OLD, "--formal", at=ago(50))
    cards(tmp_path, "unfreeze", OLD, at=ago(30))
    assert hotlist(tmp_path) == {OLD: "transit_waiting"}  # as it was at the un-freezing
    store = Store(ledger(tmp_path))
    try:
        published = next_params(store)
    finally:
        store.close()
    assert published.hotlist is not None
    assert OLD not in published.hotlist
    assert hotlist(tmp_path) == {}

"""Why a kiosk refuses a card: the host names the state the card records know — frozen,
replaced, cancelled, expired — and says what the rider does next with the profile's fee for it
(R13); a hotlist entry the records do not explain (a clone) stays ``hotlisted``."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pexpect
import pytest

from farelab.backend import NewCard, Store, card_action, issue_card
from farelab.backend._localhost import LocalHost
from farelab.card import (
    InProcessReader,
    MemoryStore,
    SimulatedCard,
    full_serial,
    load_image,
    personalise,
    save_image,
)
from farelab.topup import Kiosk, KioskJournal, LoadResult
from tests.cli_support import ROOT
from tests.cli_support import farelab as run_farelab

TERMINAL = bytes.fromhex("0000F0000001")
OLD = full_serial("5150")
NEW = full_serial("5151")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def fresh(serial: str) -> NewCard:
    return NewCard(serial=serial, issuer="1310000000000000", balance_fen=0)


class Desk:
    """A kiosk with the in-process host, whose ledger also keeps the card records."""

    def __init__(self, folder: Path) -> None:
        self.ledger = folder / "host.db"
        host = LocalHost(self.ledger, "kiosk-1", terminal=TERMINAL)
        self.kiosk = Kiosk(
            kiosk_id="kiosk-1",
            terminal_id=TERMINAL,
            host=host,
            journal=KioskJournal(folder / "kiosk.db"),
        )
        self.card = SimulatedCard(
            personalise(serial="5150", issued=date(2026, 1, 1), balance=2000),
            store=MemoryStore(),
        )
        self.store = Store(f"sqlite:///{self.ledger}")

    def records(self, *actions: tuple[str, str, dict[str, Any]], profile: str) -> None:
        """Issue card 5150 with ``profile``, then take each (action, moment, arguments)."""
        assert issue_card(self.store, fresh(OLD), profile=profile, at=at("2026-01-02T10:00+08:00"))
        for action, moment, kwargs in actions:
            done = card_action(self.store, OLD, action, at(moment), **kwargs)
            assert done["result"] == "done", done

    async def load(self, amount: int) -> LoadResult:
        reader = InProcessReader()
        reader.insert(self.card)

        async def run(fn: Any) -> Any:
            return fn(reader)

        return await self.kiosk.load(run, amount)

    def hotlist(self, reason: str) -> None:
        self.store.execute(
            "INSERT INTO hotlist (card_serial, reason, added_ms) VALUES (?, ?, 0)", (OLD, reason)
        )


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[Desk]:
    d = Desk(tmp_path)
    yield d
    d.store.close()


FORMAL = ("report_loss", "2026-03-01T09:00+08:00", {"kind": "formal"})


async def test_a_frozen_nanjing_card_is_refused_frozen_with_the_replacement_fee(
    desk: Desk,
) -> None:
    desk.records(FORMAL, profile="nanjing")
    result = await desk.load(1000)
    assert (result.result, result.reason) == ("refused", "frozen")
    assert "reported lost on 2026-03-01" in result.message
    assert "a replacement card costs 30.00 yuan (nanjing)" in result.message
    assert desk.card.image.balance == 2000


async def test_a_replaced_card_is_refused_replaced_and_names_its_replacement(
    desk: Desk,
) -> None:
    desk.records(
        FORMAL,
        ("replace", "2026-03-02T09:00+08:00", {"new": fresh(NEW)}),
        profile="nanjing",
    )
    result = await desk.load(1000)
    assert (result.result, result.reason) == ("refused", "replaced")
    assert f"replaced by card {NEW} on 2026-03-02" in result.message
    assert "a replacement card costs 30.00 yuan (nanjing)" in result.message
    assert desk.card.image.balance == 2000


async def test_a_cancelled_card_is_refused_cancelled_with_the_new_card_fee(desk: Desk) -> None:
    desk.records(("cancel", "2026-03-05T09:00+08:00", {}), profile="hangzhou")
    result = await desk.load(1000)
    assert (result.result, result.reason) == ("refused", "cancelled")
    assert "cancelled on 2026-03-05" in result.message
    assert "a new card costs 20.00 yuan (hangzhou)" in result.message


async def test_an_expired_card_is_refused_expired(desk: Desk) -> None:
    desk.records(profile="changzhou")
    desk.hotlist("expired")
    result = await desk.load(1000)
    assert (result.result, result.reason) == ("refused", "expired")
    assert "expired on 2036-01-02 (R9)" in result.message


async def test_a_recorded_card_hotlisted_as_a_clone_stays_hotlisted(desk: Desk) -> None:
    desk.records(profile="nanjing")
    desk.hotlist("clone")
    result = await desk.load(1000)
    assert (result.result, result.reason) == ("refused", "hotlisted")
    assert "clone" in result.message


async def test_a_frozen_card_that_rides_on_is_loaded(desk: Desk) -> None:
    """Haining's transit account is not reportable (R5): frozen, it is not on the hotlist."""
    desk.records(FORMAL, profile="haining")
    result = await desk.load(1000)
    assert result.result == "loaded"


def test_topup_load_json_and_words_name_the_state(tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    save_image(card, personalise(serial="5150", issued=date(2026, 1, 1)))
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    for args in (
        ("issue", str(card), "--profile", "nanjing", "--at", "2026-01-02T10:00+08:00"),
        ("report-loss", OLD, "--formal", "--at", "2026-03-01T09:00+08:00"),
    ):
        assert run_farelab("cards", *args, "--db", db).returncode == 0
    load = (
        *("topup", "load", str(card), "--amount", "10"),
        *("--db", str(tmp_path / "ledger.db"), "--journal", str(tmp_path / "kiosk.db")),
    )
    out = run_farelab(*load, "--json")
    assert out.returncode == 1, out.stderr
    assert (json.loads(out.stdout)["reason"]) == "frozen"
    words = run_farelab(*load)
    assert words.returncode == 1
    assert "a replacement card costs 30.00 yuan (nanjing)" in words.stdout
    assert load_image(card).balance == 0


def test_the_interactive_kiosk_shows_why(tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    save_image(card, personalise(serial="5150", issued=date(2026, 1, 1), balance=500))
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    db = f"sqlite:///{tmp_path / 'data' / 'farelab' / 'farelab-host.db'}"
    (tmp_path / "data" / "farelab").mkdir(parents=True)
    for args in (
        ("issue", str(card), "--profile", "nanjing", "--at", "2026-01-02T10:00+08:00"),
        ("report-loss", OLD, "--formal", "--at", "2026-03-01T09:00+08:00"),
    ):
        assert run_farelab("cards", *args, "--db", db).returncode == 0
    child = pexpect.spawn(
        sys.executable,
        ["-m", "farelab", "topup", "kiosk"],
        cwd=str(tmp_path),
        env={**env, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "TERM": "xterm"},
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 200),
    )
    try:
        child.expect("Card image to present")
        child.sendline(str(card))
        child.expect("Amount in yuan")
        child.sendline("10")
        child.expect(r"Refused \(frozen\)")
        child.expect(r"\(nanjing\)")
        screen = ANSI.sub("", child.before)
        child.expect("Amount in yuan")
        child.sendline("")
        child.expect("Card image to present")
        child.sendline("")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert "reported lost on 2026-03-01" in screen
    assert "a replacement card costs 30.00 yuan" in screen
    assert load_image(card).balance == 500


def test_a_card_outside_its_validity_is_not_loaded_but_its_balance_is_still_refunded(
    tmp_path: Path,
) -> None:
    """R9 at the kiosk, from the card's own dates (no record of it needed): an expired card and
    one not yet valid are refused ``expired`` before the host is asked; the expired card's
    balance can still be refunded."""
    old, future = tmp_path / "old.json", tmp_path / "future.json"
    save_image(
        old,
        personalise(
            serial="5162", issued=date(2016, 1, 1), expires=date(2025, 12, 31), balance=1234
        ),
    )
    save_image(future, personalise(serial="5163", issued=date(2099, 1, 1)))
    common = ("--db", str(tmp_path / "host.db"), "--journal", str(tmp_path / "kiosk.db"), "--json")
    for card, words in ((old, "expired on 2025-12-31"), (future, "valid only from 2099-01-01")):
        out = run_farelab("topup", "load", str(card), "--amount", "1", *common)
        assert out.returncode == 1, out.stderr
        assert json.loads(out.stdout)["reason"] == "expired"
        text = run_farelab("topup", "load", str(card), "--amount", "1", *common[:-1])
        assert words in text.stdout
    assert load_image(old).balance == 1234
    refund = run_farelab("topup", "refund", str(old), *common)
    assert refund.returncode == 0, refund.stderr
    assert json.loads(refund.stdout)["result"] == "refunded"
    assert load_image(old).balance == 0

"""Replacement cards (R6): refund before replacement (Changzhou), and the old balance moved to
the new card by issuer profile (Nanjing, Hangzhou), computed by the host from its records."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest

from farelab._devices import entry_of
from farelab.backend._ingest import classify
from farelab.backend._loads import ensure_schema
from farelab.backend._registry import register
from farelab.backend._store import Store
from farelab.backend._transfer import (
    PROFILES,
    CardTransaction,
    balance_after_history,
    decide,
    last_known_balance,
    working_days_after,
)
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, TacVerifier, load_image, personalise, save_image
from farelab.protocol import Batch
from tests.cli_support import ROOT
from tests.cli_support import farelab as run_farelab
from tests.validator_support import Lab, bus, new_card

TODAY = date(2026, 11, 24)


def test_working_days_skip_weekends() -> None:
    assert working_days_after(date(2026, 11, 20), 7) == date(2026, 12, 1)  # Fri + 7 → Tue


@pytest.mark.parametrize(
    ("profile", "reason", "reported", "amount", "why"),
    [
        ("nanjing", "loss", TODAY - timedelta(days=365), 800, None),
        ("nanjing", "loss", TODAY - timedelta(days=364), 0, "not_yet"),
        ("nanjing", "exchange", date(2026, 11, 13), 800, None),
        ("nanjing", "exchange", date(2026, 11, 17), 0, "not_yet"),
        ("hangzhou", "loss", date(2025, 1, 1), 0, "no_transfer_after_loss"),
        ("hangzhou", "exchange", TODAY, 800, None),
        ("changzhou", "exchange", date(2025, 1, 1), 0, "refund_instead"),
    ],
)
def test_profiles(profile: str, reason: str, reported: date, amount: int, why: str | None) -> None:
    decision = decide(PROFILES[profile], reason=reason, reported=reported, today=TODAY, balance=800)
    assert (decision.amount_fen, decision.reason) == (amount, why)


def farelab(cwd: Path, *args: str) -> dict[str, object]:
    """``farelab topup …`` in ``cwd``, with the host's ledger ``cwd/farelab-host.db``."""
    ledger = ["--db", str(cwd / "farelab-host.db"), "--journal", str(cwd / "farelab-kiosk.db")]
    out = run_farelab(*args, *ledger, "--json", cwd=cwd)
    assert out.stdout, out.stderr
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def old_card_with_history(folder: Path) -> tuple[Path, int]:
    """A card that rode a bus; its history is in the host's ledger (farelab-host.db)."""
    device = bus("taiyuan")
    lab = Lab([device])
    card = new_card(balance=3000, serial="5150")
    lab.tap("bus", card, 0)
    store = Store(f"sqlite:///{folder / 'farelab-host.db'}")
    ensure_schema(store)
    register(store, entry_of(device))  # the ledger takes batches only from registered devices
    records = tuple(r for _, _, r in lab.journal.outbox(100))
    store.ingest(
        "bus", 1, classify(Batch(1, "bus", records), TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS}))
    )
    store.close()
    path = folder / "old.json"
    save_image(path, card.image)
    return path, card.image.balance


def test_balance_moves_once_to_the_replacement_card(tmp_path: Path) -> None:
    _, balance = old_card_with_history(tmp_path)
    new = tmp_path / "new.json"
    save_image(new, personalise(serial="5151", issued=date(2026, 1, 1)))
    args = (
        "topup",
        "transfer",
        str(new),
        "--old",
        "5150",
        "--reason",
        "exchange",
        "--reported",
        "2026-01-05",
        "--profile",
        "nanjing",
    )
    moved = farelab(tmp_path, *args)
    assert (moved["result"], moved["amount_fen"]) == ("loaded", balance)
    assert load_image(new).balance == balance
    again = farelab(tmp_path, *args)
    assert (again["result"], again["reason"]) == ("refused", "already_transferred")
    assert load_image(new).balance == balance
    store = Store(f"sqlite:///{tmp_path / 'farelab-host.db'}")
    assert "00000000000000005150" in store.hotlist()
    store.close()


def test_hangzhou_loss_moves_nothing(tmp_path: Path) -> None:
    old_card_with_history(tmp_path)
    new = tmp_path / "new.json"
    save_image(new, personalise(serial="5152", issued=date(2026, 1, 1)))
    result = farelab(
        tmp_path,
        "topup",
        "transfer",
        str(new),
        "--old",
        "5150",
        "--reason",
        "loss",
        "--reported",
        "2025-01-05",
        "--profile",
        "hangzhou",
    )
    assert (result["result"], result["reason"]) == ("refused", "no_transfer_after_loss")
    assert load_image(new).balance == 0


def test_changzhou_refund_empties_the_card_and_counts_the_cash(tmp_path: Path) -> None:
    old, balance = old_card_with_history(tmp_path)
    result = farelab(tmp_path, "topup", "refund", str(old))
    assert (result["result"], result["amount_fen"], result["balance_fen"]) == (
        "refunded",
        balance,
        0,
    )
    assert load_image(old).balance == 0
    report = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "farelab",
                "backend",
                "report",
                "--db",
                f"sqlite:///{tmp_path / 'farelab-host.db'}",
                "--json",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert report["purchase_fen"] == 50 + balance  # the bus ride and the refund
    assert "00000000000000005150" in report["hotlist"]


def test_the_moved_balance_follows_the_cards_counters_not_device_clocks() -> None:
    """A kiosk whose clock runs a week ahead of the validators' must not make the host take the
    load for the card's last transaction: the ride after it would be moved as money again."""
    week = 7 * 24 * 3600 * 1000
    history = [
        CardTransaction(tx_type=0x02, counter=0, amount=1000, balance_before=0, at_ms=2 * week),
        CardTransaction(tx_type=0x06, counter=0, amount=50, balance_before=1000, at_ms=week),
        CardTransaction(tx_type=0x09, counter=1, amount=200, balance_before=950, at_ms=week + 9),
        CardTransaction(tx_type=0x02, counter=1, amount=100, balance_before=750, at_ms=3 * week),
    ]
    assert balance_after_history(history) == 850
    assert balance_after_history(list(reversed(history))) == 850
    assert balance_after_history([]) is None


def test_a_hole_in_the_history_falls_back_to_time_order() -> None:
    history = [  # the purchase at counter 1 has not been uploaded yet
        CardTransaction(tx_type=0x06, counter=0, amount=50, balance_before=1000, at_ms=1),
        CardTransaction(tx_type=0x06, counter=2, amount=50, balance_before=800, at_ms=3),
    ]
    assert balance_after_history(history) == 750


def test_last_known_balance_ignores_the_kiosk_clock(tmp_path: Path) -> None:
    device = bus("taiyuan")
    lab = Lab([device])
    card = new_card(balance=3000, serial="5160")
    lab.tap("bus", card, 0)  # validators' clock: 2026-11-23
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    register(store, entry_of(device))
    records = tuple(r for _, _, r in lab.journal.outbox(100))
    store.ingest(
        "bus", 1, classify(Batch(1, "bus", records), TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS}))
    )
    ride = records[0]
    # an earlier load (the card's load counter 0, its balance before the ride's) journalled by a
    # kiosk whose clock is a month ahead
    store.execute(
        "INSERT INTO transactions (device, seq, status, verdict, tx_type, kind, alg, card_serial,"
        " issuer, card_counter, ttc, amount, balance_before, terminal, day, time, at_ms, station,"
        " line, operator, tac, received_ms) VALUES ('kiosk-1', 1, 'completed', 'ok', 2, 'load',"
        " '3des', ?, ?, 0, 0, 1000, ?, '0000F0000001', '20261223', '080000', ?, "
        "'0000000000000000', 0, 'kiosk-1', '00000000', 0)",
        (
            ride.card_serial.hex(),
            ride.issuer.hex().upper(),
            ride.balance_before - 1000,
            ride.at_ms + 30 * 86_400_000,
        ),
    )
    assert last_known_balance(store, ride.card_serial.hex()) == card.image.balance
    store.close()

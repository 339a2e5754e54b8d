"""The journal: intents before debits, results with their outbox rows, bounded and loud, and
intact after kill -9 of a real process at any instant."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.validator_support import Lab, bus, new_card
from validator._journal import Journal, JournalError

WORKER = """
import sys
from datetime import timedelta
from tests.validator_support import Lab, T0, bus, new_card
from validator._journal import Journal
journal = Journal(sys.argv[1])
lab = Lab([bus("taiyuan")], journal=journal)
card = new_card(balance=100_000)
print("ready", flush=True)
for i in range(1_000_000):
    lab.tap("bus", card, T0 + timedelta(minutes=2 * i))
"""


def test_each_completed_tap_has_its_transaction_and_outbox_row(tmp_path: Path) -> None:
    lab = Lab([bus("taiyuan")], journal=Journal(tmp_path / "j.db"))
    card = new_card(balance=1000)
    for i in range(3):
        lab.tap("bus", card, 120 * i)
    outbox = lab.journal.outbox()
    assert [p["status"] for _, _, p in outbox] == ["completed"] * 3
    assert [p["seq"] for _, _, p in outbox] == [1, 2, 3]
    assert len({p["ttc"] for _, _, p in outbox}) == 3
    assert len(lab.journal.taps()) == 3


def test_ttc_and_sequence_continue_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    card = new_card(balance=1000)
    first = Lab([bus("taiyuan")], journal=Journal(path))
    first.tap("bus", card, 0)
    first.journal.close()
    again = Lab([bus("taiyuan")], journal=Journal(path))
    again.tap("bus", card, 200)
    ttcs = [t["ttc"] for t in again.journal.transactions()]
    seqs = [t["seq"] for t in again.journal.transactions()]
    assert ttcs == [1, 2]
    assert seqs == [1, 2]


def test_bounded_outbox_warns_loudly_then_stops_taps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lab = Lab([bus("taiyuan")], journal=Journal(tmp_path / "j.db", max_outbox=5, warn_ratio=0.6))
    card = new_card(balance=10_000)
    with caplog.at_level(logging.WARNING, logger="farelab.journal"):
        results = [lab.tap("bus", card, 120 * i) for i in range(6)]
    assert [r.result for r in results] == ["accepted"] * 5 + ["rejected"]
    assert results[-1].reason == "out_of_service"
    assert any("of its bound" in r.message for r in caplog.records)
    assert card.image.balance == 10_000 - 5 * 50
    lab.journal.acknowledge([row[0] for row in lab.journal.outbox()])
    assert lab.tap("bus", card, 10_000).result == "accepted"


def test_a_file_that_is_not_a_journal_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match="not a usable journal"):
        Journal(path)


def test_journal_survives_kill_9_at_any_instant(tmp_path: Path) -> None:
    """A real process taps as fast as it can; SIGKILL at random instants, many times. After each
    kill the journal opens, and every transaction is either pending (its DEBIT was in flight) or
    settled with an outbox row — never half-written."""
    path = tmp_path / "j.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    kills = 0
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31, 0.37, 0.43, 0.5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path)], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        journal = Journal(path)
        rows = journal.transactions()
        outbox = {(p["device"], p["seq"]) for _, _, p in journal.outbox(limit=10**9)}
        settled = [r for r in rows if r["status"] != "pending"]
        assert all((r["device"], r["seq"]) in outbox for r in settled)
        assert sum(r["status"] == "pending" for r in rows) <= 1 * kills
        journal.close()
    assert kills == 8

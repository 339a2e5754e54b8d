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
    assert [r.status for _, _, r in outbox] == ["completed"] * 3
    assert [r.seq for _, _, r in outbox] == [1, 2, 3]
    assert len({r.ttc for _, _, r in outbox}) == 3
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
        outbox = {(device, r.seq) for _, device, r in journal.outbox(limit=10**9)}
        settled = [r for r in rows if r["status"] != "pending"]
        assert all((r["device"], r["seq"]) in outbox for r in settled)
        assert sum(r["status"] == "pending" for r in rows) <= 1 * kills
        journal.close()
    assert kills == 8


def _as_version_1(path: Path, rows: list[tuple[int, str, int]]) -> list[tuple[int, str, str]]:
    """Rewrite a journal's outbox rows (id, device, seq) as version 1 kept them (JSON)."""
    import json  # noqa: PLC0415
    import sqlite3  # noqa: PLC0415

    with sqlite3.connect(path) as db:
        names = [d[1] for d in db.execute("PRAGMA table_info(transactions)")]
        payloads = []
        for row_id, device, seq in rows:
            tx = dict(
                zip(
                    names,
                    db.execute(
                        "SELECT * FROM transactions WHERE device=? AND seq=?", (device, seq)
                    ).fetchone(),
                    strict=True,
                )
            )
            payload = {
                "device": device,
                "card_serial": tx["card_serial"],
                "issuer": tx["issuer"],
                "alg": tx["alg"],
                "tx_type": tx["tx_type"],
                "kind": tx["kind"],
                "amount": tx["amount_fen"],
                "balance_before": tx["balance_before_fen"],
                "card_counter": tx["card_counter"],
                "ttc": tx["ttc"],
                "terminal": tx["terminal"],
                "day": tx["day"],
                "time": tx["time"],
                "at": tx["at"],
                "station": tx["station"],
                "line": tx["line"],
                "operator": tx["operator"],
                "seq": seq,
                "status": tx["status"],
                "tac": tx["tac"],
            }
            payloads.append((row_id, device, json.dumps(payload)))
        db.execute("DROP TABLE outbox")
        db.execute(
            "CREATE TABLE outbox (id INTEGER PRIMARY KEY, device TEXT NOT NULL,"
            " payload TEXT NOT NULL)"
        )
        db.executemany("INSERT INTO outbox VALUES (?, ?, ?)", payloads)
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    return payloads


def test_version_1_journal_outbox_is_converted_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    lab = Lab([bus("taiyuan")], journal=Journal(path))
    card = new_card(balance=1000)
    for i in range(3):
        lab.tap("bus", card, 120 * i)
    before = lab.journal.outbox()
    lab.journal.close()
    assert len(_as_version_1(path, [(i, d, r.seq) for i, d, r in before])) == 3

    converted = Journal(path)
    assert converted.outbox() == before
    assert converted.outbox_rows == 3


def test_a_version_1_outbox_that_cannot_be_converted_is_a_clear_error(tmp_path: Path) -> None:
    import sqlite3  # noqa: PLC0415

    path = tmp_path / "j.db"
    Journal(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE outbox")
        db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, device TEXT, payload TEXT)")
        db.execute("INSERT INTO outbox VALUES (1, 'bus', '{\"seq\": 1}')")
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    with pytest.raises(JournalError, match="version-1 outbox"):
        Journal(path)
    with sqlite3.connect(path) as db:  # nothing was lost
        assert db.execute("SELECT payload FROM outbox").fetchone() == ('{"seq": 1}',)


def test_acknowledge_removes_exactly_the_rows_named(tmp_path: Path) -> None:
    lab = Lab([bus("taiyuan")], journal=Journal(tmp_path / "j.db"))
    card = new_card(balance=100_000)
    for i in range(120):
        lab.tap("bus", card, 120 * i)
    ids = [row[0] for row in lab.journal.outbox(1000)]
    lab.journal.acknowledge(ids[:55] + ids[60:117])
    assert [row[0] for row in lab.journal.outbox(1000)] == ids[55:60] + ids[117:]
    assert lab.journal.outbox_rows == 8


def test_outbox_ids_are_never_reused_after_the_outbox_drains(tmp_path: Path) -> None:
    """The uplink reads after the last id it sent and names batches by their first id: an id
    reused after a full drain would strand the new rows behind its cursor."""
    lab = Lab([bus("taiyuan")], journal=Journal(tmp_path / "j.db"))
    card = new_card(balance=100_000)
    for i in range(3):
        lab.tap("bus", card, 120 * i)
    first = [row[0] for row in lab.journal.outbox()]
    lab.journal.acknowledge(first)
    assert lab.journal.outbox() == []
    lab.tap("bus", card, 1000)
    lab.journal.close()
    reopened = Journal(tmp_path / "j.db")
    Lab([bus("taiyuan")], journal=reopened).tap("bus", card, 2000)
    later = [row[0] for row in reopened.outbox()]
    assert len(later) == 2
    assert min(later) > max(first)
    assert later == sorted(later)


def test_a_journal_file_keeps_its_epoch_and_another_file_has_another(tmp_path: Path) -> None:
    from validator._journal import EPOCHS  # noqa: PLC0415

    first = Journal(tmp_path / "a.db")
    epoch = first.epoch
    first.close()
    again = Journal(tmp_path / "a.db")
    assert again.epoch == epoch
    again.close()
    others = {Journal(tmp_path / f"b{i}.db").epoch for i in range(8)}
    assert all(0 < e < EPOCHS for e in others | {epoch})
    assert len(others | {epoch}) > 1  # random: eight equal draws of 2**23 would be a bug
    assert EPOCHS << 40 <= 2**63  # a batch id fits the backend's signed BIGINT

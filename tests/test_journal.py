"""The journal: intents before debits, results with their outbox rows, bounded and loud, and
intact after kill -9 of a real process at any instant."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from farelab.card import CST
from farelab.protocol import Record
from farelab.validator._decision import Intent, Pending
from farelab.validator._intents import decode, encode
from farelab.validator._journal import Journal, JournalError
from farelab.validator._priority import TapGate
from tests.validator_support import Lab, bus, gate, new_card

WORKER = """
import sys
from datetime import timedelta
from tests.validator_support import Lab, T0, bus, new_card
from farelab.validator._journal import Journal
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
    with pytest.raises(JournalError, match="not a farelab validator journal"):
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


def test_a_version_1_journal_is_refused_untouched(tmp_path: Path) -> None:
    """Version 1 (JSON outbox rows, never released) is not read: a clear error, and the rows
    stay as they were."""
    import sqlite3  # noqa: PLC0415

    path = tmp_path / "j.db"
    lab = Lab([bus("taiyuan")], journal=Journal(path))
    card = new_card(balance=1000)
    for i in range(3):
        lab.tap("bus", card, 120 * i)
    before = lab.journal.outbox()
    lab.journal.close()
    payloads = _as_version_1(path, [(i, d, r.seq) for i, d, r in before])
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA application_id = 0")  # version 1 predates the file mark
    with pytest.raises(JournalError, match="format version 1"):
        Journal(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT * FROM outbox ORDER BY id").fetchall() == payloads


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
    from farelab.validator._journal import EPOCHS  # noqa: PLC0415

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


# --- the intent log --------------------------------------------------------------------------


def _intent(card_serial: str = "00001310000000004242", ttc: int = 7) -> Intent:
    at = datetime(2026, 11, 23, 8, 30, tzinfo=CST)
    record = Record(
        seq=0,
        status="pending",
        tx_type=6,
        kind="bus",
        alg="3des",
        card_serial=bytes.fromhex(card_serial),
        issuer=bytes.fromhex("1310000000000000"),
        card_counter=12,
        ttc=ttc,
        amount=200,
        balance_before=5000,
        terminal=bytes.fromhex("000000021601"),
        day=bytes.fromhex("20261123"),
        time=bytes.fromhex("083000"),
        at_ms=int(at.timestamp() * 1000),
        station=bytes(8),
        line=9,
        operator="",
        tac=b"",
    )
    return Intent("bus-1", record, at)


def _statuses(journal: Journal) -> list[tuple[str, int, str]]:
    return [(r["device"], r["seq"], r["status"]) for r in journal.transactions()]


def test_an_intent_whose_tap_never_committed_is_pending_when_the_journal_next_opens(
    tmp_path: Path,
) -> None:
    """The process dies between the intent and the tap's commit: the intent was only in the log,
    and the next open restores it as pending (the card may owe a proof), then empties the log."""
    path = tmp_path / "j.db"
    crashed = Journal(path)
    crashed.record_intent(_intent())
    assert _statuses(crashed) == []  # only in the log so far
    # No close(): a second process opens the files as a killed one left them.
    journal = Journal(path)
    assert _statuses(journal) == [("bus-1", 1, "pending")]
    assert set(journal.pending()) == {"00001310000000004242"}
    assert journal.next_ttc("bus-1") == 8  # the TTC the lost DEBIT used is never reused
    assert Path(f"{path}-intents").stat().st_size == 0
    journal.close()


def test_a_settled_tap_leaves_nothing_to_restore(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    lab = Lab([bus("taiyuan")], journal=Journal(path))
    card = new_card(balance=10_000)
    assert lab.tap("bus", card, 0).result == "accepted"
    # no close(): what the log still holds is only what the database already has
    again = Journal(path)
    assert [s for _, _, s in _statuses(again)] == ["completed"]
    assert again.pending() == {}
    again.close()


def test_a_torn_intent_record_is_ignored_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A power cut can tear the last record: its DEBIT never left (it is sent once the write
    has returned), so it is dropped with a warning; the whole records before it are kept."""
    path = tmp_path / "j.db"
    crashed = Journal(path)
    crashed.record_intent(_intent())
    whole = encode(Pending("bus-1", 2, _intent("00001310000000005555", ttc=8)))
    with open(f"{path}-intents", "ab") as log_file:
        log_file.write(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="farelab.journal"):
        journal = Journal(path)
    assert _statuses(journal) == [("bus-1", 1, "pending")]
    assert "damaged or torn record" in caplog.text
    journal.close()


# Written by the journal while its intents held the card's fields as text (before they carried
# a protocol.Record): a metro entry at 尖草坪 (Taiyuan) at 08:00, torn after its DEBIT reached
# the card — its intent log record, and the pending row its tap committed.
_OLD_INTENT_RECORD = (
    b"\x00\x00\x01\x86]\x90\xbcN"
    b'{"device":"gate-Jiancaoping","seq":1,"intent":{"device":"gate-Jiancaoping",'
    b'"card_serial":"00000000000000001001","issuer":"1310000000000000","alg":"3des",'
    b'"tx_type":9,"kind":"entry","amount":0,"balance_before":2000,"card_counter":0,"ttc":1,'
    b'"terminal":"000002000000","day":"20261123","time":"080000",'
    b'"at":"2026-11-23T08:00:00+08:00","station":"0310020000000000","line":2,'
    b'"operator":"TAIYUAN"}}'
)
_OLD_PENDING_ROW = (
    "gate-Jiancaoping",
    1,
    "pending",
    "00000000000000001001",
    "1310000000000000",
    "3des",
    9,
    "entry",
    0,
    2000,
    0,
    1,
    "000002000000",
    "20261123",
    "080000",
    "2026-11-23T08:00:00+08:00",
    "0310020000000000",
    2,
    "TAIYUAN",
    "",
)
# What that journal held once the card's exit at 长风街 at 08:30 had settled the entry.
_SETTLED_ROWS = [
    ("gate-Jiancaoping", 1, "completed", "entry", 0, 0, 1, "000002000000", "080000",
     "2026-11-23T08:00:00+08:00", "0310020000000000", "5E80478A"),
    ("gate-Changfengjie", 1, "completed", "exit", 360, 1, 1, "0000020B0000", "083000",
     "2026-11-23T08:30:00+08:00", "031002000b000000", "BDA36D02"),
]  # fmt: skip
_SETTLED_OUTBOX = {
    "gate-Jiancaoping": "000000010009010000000000000000001001131000000000000000000000000100000000"
    "000007d000000200000020261123080000000001a205b3d0000310020000000000025441495955414e005e80478a",
    "gate-Changfengjie": "00000001000902000000000000000000100113100000000000000001000000010000"
    "0168000007d00000020b000020261123083000000001a205cf4740031002000b000000025441495955414e00bda3"
    "6d02",
}


def _settled(journal: Journal) -> list[tuple[object, ...]]:
    names = ("device", "seq", "status", "kind", "amount_fen", "card_counter", "ttc", "terminal")
    more = ("time", "at", "station", "tac")
    return [tuple(r[n] for n in names + more) for r in journal.transactions()]


@pytest.mark.parametrize("kept_in", ["intent log", "transactions"])
def test_a_torn_tap_journalled_in_the_earlier_text_form_is_resolved_as_before(
    tmp_path: Path, kept_in: str
) -> None:
    """A journal written before intents carried a Record: its torn entry — only in the intent
    log (the process was killed), or a pending row — is restored, and the card's exit settles
    it with the card's TAC; the rows and the records sent are those that journal wrote."""
    entry, exit_ = gate("taiyuan", "尖草坪"), gate("taiyuan", "长风街")
    card = new_card(balance=2000)
    assert Lab([entry]).tap(entry, card, 0, pull_after="DEBIT").grey  # the card, as it was left
    path = tmp_path / "j.db"
    if kept_in == "intent log":
        Path(f"{path}-intents").write_bytes(_OLD_INTENT_RECORD)
    else:
        Journal(path).close()
        db = sqlite3.connect(path)
        with db:
            db.execute(f"INSERT INTO transactions VALUES ({', '.join('?' * 20)})", _OLD_PENDING_ROW)
        db.close()
    lab = Lab([entry, exit_], journal=Journal(path))
    assert set(lab.journal.pending()) == {"00000000000000001001"}
    out = lab.tap(exit_, card, 1800)
    assert (out.result, out.reason, out.fare_fen, out.balance_fen) == ("accepted", None, 360, 1640)
    assert out.tac == "BDA36D02"
    assert out.resolution is not None
    assert (out.resolution.completed, out.resolution.tac.hex().upper()) == (True, "5E80478A")
    assert _settled(lab.journal) == _SETTLED_ROWS
    wire = {
        d: [raw.hex() for _, raw in lab.journal.outbox_wire(9, device=d)] for d in _SETTLED_OUTBOX
    }
    assert wire == {d: [record] for d, record in _SETTLED_OUTBOX.items()}
    assert lab.journal.pending() == {}
    lab.journal.close()


def test_a_pending_row_that_is_not_a_transaction_is_reported_and_left_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row no journal wrote (its terminal is not 6 bytes): the journal opens, says which row,
    and leaves it for people; the other pending transactions are restored."""
    path = tmp_path / "j.db"
    Journal(path).close()
    damaged = (*_OLD_PENDING_ROW[:12], "0000020000", *_OLD_PENDING_ROW[13:])
    sound = ("gate-Jiancaoping", 2, "pending", "00000000000000002002", *_OLD_PENDING_ROW[4:])
    db = sqlite3.connect(path)
    with db:
        db.executemany(f"INSERT INTO transactions VALUES ({', '.join('?' * 20)})", [damaged, sound])
    db.close()
    with caplog.at_level(logging.WARNING, logger="farelab.journal"):
        journal = Journal(path)
    assert set(journal.pending()) == {"00000000000000002002"}
    assert "pending transaction gate-Jiancaoping#1 is unreadable" in caplog.text
    assert _statuses(journal) == [
        ("gate-Jiancaoping", 1, "pending"),
        ("gate-Jiancaoping", 2, "pending"),
    ]
    journal.close()


def test_a_torn_taps_intent_is_logged_as_the_earlier_journal_logged_it(tmp_path: Path) -> None:
    """The intent log's records keep their form: the same tap writes the same bytes."""
    entry = gate("taiyuan", "尖草坪")
    path = tmp_path / "j.db"
    lab = Lab([entry], journal=Journal(path))
    assert lab.tap(entry, new_card(balance=2000), 0, pull_after="DEBIT").grey
    assert Path(f"{path}-intents").read_bytes() == _OLD_INTENT_RECORD
    assert _statuses(lab.journal) == [("gate-Jiancaoping", 1, "pending")]
    [row] = lab.journal.transactions()
    assert tuple(row.values()) == _OLD_PENDING_ROW
    (restored,) = decode(_OLD_INTENT_RECORD)
    assert encode(restored) == _OLD_INTENT_RECORD
    lab.journal.close()


def test_decode_stops_at_a_damaged_record() -> None:
    first = encode(Pending("bus-1", 1, _intent()))
    second = bytearray(encode(Pending("bus-1", 2, _intent(ttc=8))))
    second[-3] ^= 0xFF  # fails its CRC
    third = encode(Pending("bus-1", 3, _intent(ttc=9)))
    assert [p.seq for p in decode(first + bytes(second) + third)] == [1]
    assert [p.seq for p in decode(first + third)] == [1, 3]
    assert list(decode(first[:5])) == []


def test_checkpoint_parks_an_intent_whose_tap_ended_without_a_commit(tmp_path: Path) -> None:
    """A tap that raised after its intent: once no tap is in progress, checkpoint() moves the
    intent into the database as pending and empties the log; the card's next tap resolves it
    like any pending transaction."""
    path = tmp_path / "j.db"
    journal = Journal(path)
    pending = journal.record_intent(_intent())
    journal.checkpoint()
    assert _statuses(journal) == [("bus-1", 1, "pending")]
    assert Path(f"{path}-intents").stat().st_size == 0
    assert journal.pending() == {"00001310000000004242": pending}
    journal.close()
    assert _statuses(Journal(path)) == [("bus-1", 1, "pending")]


def test_a_plain_journal_changes_no_process_wide_setting(tmp_path: Path) -> None:
    """Tuning is the application's: a journal a library user opens has no tap gate, and its
    taps, checkpoints and deletes leave the collector and the interpreter as they were."""
    enabled, interval, frozen = gc.isenabled(), sys.getswitchinterval(), gc.get_freeze_count()
    gc.enable()
    try:
        journal = Journal(tmp_path / "j.db")
        assert journal.gate is None
        lab = Lab([bus("taiyuan")], journal=journal)
        card = new_card(balance=10_000)
        for i in range(3):
            assert lab.tap("bus", card, 120 * i).result == "accepted"
            assert gc.isenabled()
        journal.checkpoint()
        journal.acknowledge([row_id for row_id, _, _ in journal.outbox()])
        assert journal.outbox_rows == 0
        journal.close()
        assert gc.isenabled()
        assert sys.getswitchinterval() == interval
        assert gc.get_freeze_count() == frozen
    finally:
        if not enabled:
            gc.disable()


def test_checkpoint_leaves_the_log_alone_while_a_tap_is_in_progress(tmp_path: Path) -> None:
    """An intent whose tap is still running is waiting for that tap's own commit."""
    path = tmp_path / "j.db"
    gate = TapGate()
    journal = Journal(path, gate=gate)
    with gate.tap():
        journal.record_intent(_intent())
        journal.checkpoint()  # waits a moment for the tap, then goes ahead without it
        assert Path(f"{path}-intents").stat().st_size > 0
        assert _statuses(journal) == []
    journal.close()


def test_an_intent_that_cannot_be_written_stops_the_tap_before_its_debit(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    journal = Journal(path)
    assert journal._intents is not None
    os.close(journal._intents._fd)  # the file is gone from under the journal
    journal._intents._fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(JournalError, match="cannot write an intent"):
        journal.record_intent(_intent())
    assert journal.pending() == {}


def test_the_intent_log_stays_bounded_where_nothing_calls_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("farelab.validator._journal._INTENT_LOG_LIMIT", 1000)
    path = tmp_path / "j.db"
    lab = Lab([bus("taiyuan")], journal=Journal(path))
    card = new_card(balance=100_000)
    sizes = []
    for i in range(12):
        assert lab.tap("bus", card, 120 * i).result == "accepted"
        sizes.append(Path(f"{path}-intents").stat().st_size)
    assert max(sizes) <= 1000 + 400  # one record past the limit at most
    assert 0 in sizes


def _wal_restarts(path: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time a write starts
    the WAL over."""
    with open(f"{path}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


def test_a_checkpoint_starts_the_wal_over_itself_so_the_next_tap_does_not(tmp_path: Path) -> None:
    """The first write after a complete checkpoint starts the WAL over and syncs its header (an
    fsync); checkpoint() makes that write, so that the next tap's commit only appends."""
    path = tmp_path / "j.db"
    lab = Lab([bus("taiyuan")], journal=Journal(path))
    card = new_card(balance=100_000)
    lab.tap("bus", card, 0)
    before = _wal_restarts(path)
    lab.journal.checkpoint()
    after = _wal_restarts(path)
    assert after == before + 1
    assert lab.tap("bus", card, 120).result == "accepted"
    assert _wal_restarts(path) == after
    lab.journal.checkpoint()
    assert _wal_restarts(path) == after + 1
    lab.journal.checkpoint()  # nothing written since: an idle journal is left alone
    lab.journal.checkpoint()
    assert _wal_restarts(path) == after + 1

"""``farelab city``: the seeded plan, the reconciliation's verdicts, and a small city end to end
(every device a process, a Mosquitto and a backend of its own) that must reconcile exactly."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from farelab.card import CardType
from farelab.city import (
    CARD_FOLDERS,
    FOREIGN_LISTED,
    CardBalance,
    JournalTx,
    LedgerTx,
    LoadRow,
    card_folder,
    day_trips,
    kiosk_ids,
    kiosk_terminal,
    plan_city,
    reconcile,
)
from farelab.validator import shipped_networks
from tests.cli_support import farelab, start_farelab

DAY = date(2026, 11, 23)
SUMMARY_KEYS = {
    "riders",
    "devices",
    "taps",
    "accepted",
    "refused",
    "loads",
    "fares_fen",
    "loads_fen",
    "reconciled",
    "differences",
    "faults",
    "taps_per_s",
    "duration_s",
}


# --- the plan ------------------------------------------------------------------------------------


def test_the_plan_is_the_seeds_and_has_every_kind_of_rider() -> None:
    network = shipped_networks()["taiyuan"]
    plan = plan_city(network, riders=200, seed=7, day=DAY)
    assert plan == plan_city(network, riders=200, seed=7, day=DAY)
    assert plan.riders != plan_city(network, riders=200, seed=8, day=DAY).riders
    stations = len(network.stations)
    gates = [d for d in plan.devices if d.kind == "metro-gate"]
    assert len(gates) == 2 * stations
    assert len({d.terminal for d in plan.devices}) == len(plan.devices)
    assert {r.card_type for r in plan.riders} == {
        CardType.ADULT,
        CardType.STUDENT,
        CardType.ELDERLY,
        CardType.DISABLED,
    }
    roles = [r.role for r in plan.riders]
    for role in ("foreign_listed", "foreign_unlisted", "hotlisted", "clone", "cloned"):
        assert roles.count(role) == 1, role
    clone = next(r for r in plan.riders if r.role == "clone")
    copy = next(r for r in plan.riders if r.role == "cloned")
    assert (copy.serial, copy.balance_fen) == (clone.serial, clone.balance_fen)
    assert copy.card != clone.card
    assert FOREIGN_LISTED in plan.whitelist
    assert plan.hotlist == (next(r.serial for r in plan.riders if r.role == "hotlisted"),)
    assert any(r.balance_fen < network.max_fare_fen for r in plan.riders)  # some top up first


def test_a_smaller_city_has_gates_at_some_stations_of_every_line() -> None:
    plan = plan_city(shipped_networks()["changzhou"], riders=20, seed=1, day=DAY, stations=4)
    assert len([d for d in plan.devices if d.kind == "metro-gate"]) == 8
    assert {line: len(ids) for line, ids in plan.lines().items()} == {"L1": 4, "L2": 4, "bus": 3}
    assert all(r.home in {s for s, _ in plan.gates} for r in plan.riders if r.home >= 0)


def test_a_network_without_stations_or_a_city_without_riders_is_refused() -> None:
    with pytest.raises(ValueError, match="no stations"):
        plan_city(shipped_networks()["beijing"], riders=10, seed=1, day=DAY)
    with pytest.raises(ValueError, match="at least one rider"):
        plan_city(shipped_networks()["taiyuan"], riders=0, seed=1, day=DAY)


def test_a_riders_day_commutes_at_the_peaks_in_order_with_the_bus_first() -> None:
    network = shipped_networks()["changzhou"]
    plan = plan_city(network, riders=300, seed=3, day=DAY)
    bus_riders = [r for r in plan.riders if r.bus and r.home >= 0]
    assert bus_riders
    for rider in [*plan.riders[:60], *bus_riders[:10]]:
        trips = day_trips(plan, network, rider, 0)
        assert trips == day_trips(plan, network, rider, 0)
        assert [t.at for t in trips] == sorted(t.at for t in trips)
        assert all(t.at.date() == DAY for t in trips)
        morning = trips[0].at.hour + trips[0].at.minute / 60
        assert 6.0 <= morning <= 10.5
    rider = bus_riders[0]
    first, second = day_trips(plan, network, rider, 0)[:2]
    assert first.entry.startswith("bus-")
    assert not first.exit
    assert second.entry.endswith("-in")
    assert timedelta(0) < second.at - first.at <= timedelta(minutes=60)  # inside the window
    assert day_trips(plan, network, rider, 1)[0].at.date() == DAY + timedelta(days=1)


# --- the reconciliation --------------------------------------------------------------------------


def _ledger(device: str, seq: int, card: str, amount: int, tx_type: int = 6, **kw: str) -> LedgerTx:
    return LedgerTx(
        device=device,
        seq=seq,
        verdict=kw.get("verdict", "ok"),
        status="completed",
        card_serial=card,
        amount_fen=amount,
        tx_type=tx_type,
        kind=kw.get("kind", "bus"),
    )


A, B = "1".zfill(20), "2".zfill(20)


def _balanced() -> tuple[list[CardBalance], list[JournalTx], list[LedgerTx]]:
    cards = [CardBalance("a.json", A, 1000, 1000 + 5000 - 200), CardBalance("b.json", B, 300, 250)]
    journals = [
        JournalTx("bus-1", 1, "completed", A, 200, 6),
        JournalTx("bus-1", 2, "completed", B, 50, 6),
        JournalTx("bus-1", 3, "void", B, 50, 6),
    ]
    ledger = [
        _ledger("bus-1", 1, A, 200),
        _ledger("bus-1", 2, B, 50),
        _ledger("kiosk-1", 1, A, 5000, tx_type=2, kind="load"),
    ]
    return cards, journals, ledger


def test_cards_journals_ledger_and_clearing_that_agree_reconcile() -> None:
    cards, journals, ledger = _balanced()
    result = reconcile(cards, journals, ledger, clearing_fen=5250, clearing_net=[5250, -5250])
    assert result.differences == []
    assert result.reconciled
    assert result.counted_fen == 5250


def test_a_fen_missing_from_a_card_is_named_with_its_card_and_transactions() -> None:
    cards, journals, ledger = _balanced()
    cards[1] = CardBalance("b.json", B, 300, 249)
    result = reconcile(cards, journals, ledger)
    assert not result.reconciled
    [diff] = result.differences
    assert (diff["kind"], diff["card"], diff["files"]) == ("card_balance", B, ["b.json"])
    assert "holds 249" in diff["detail"]
    assert [t["seq"] for t in diff["transactions"]] == [2]


def test_journal_and_ledger_disagreements_are_each_named() -> None:
    cards, journals, ledger = _balanced()
    journals.append(JournalTx("bus-1", 4, "pending", A, 200, 6))  # torn, never settled
    journals.append(JournalTx("bus-1", 5, "completed", A, 0, 6))  # never uploaded
    ledger.append(_ledger("bus-1", 9, A, 0))  # no journal has it
    ledger.append(_ledger("bus-1", 2, B, 50))  # twice: card B is charged twice in the ledger
    found = [
        (d["kind"], d.get("seq"), d.get("card"))
        for d in reconcile(cards, journals, ledger).differences
    ]
    assert sorted(found, key=str) == sorted(
        [
            ("card_balance", None, B),
            ("ledger_twice", 2, B),
            ("grey_unresolved", 4, A),
            ("not_in_ledger", 5, A),
            ("not_in_journal", 9, None),
        ],
        key=str,
    )


def test_a_clones_uncounted_spending_is_explained_and_forgery_or_clearing_drift_is_not() -> None:
    cards, journals, ledger = _balanced()
    # The clone's copy of card A spent 100 fen under a counter the original had used: the
    # ledger records it, verdict clone, uncounted.
    cards.append(CardBalance("a-copy.json", A, 1000, 900))
    journals.append(JournalTx("bus-2", 1, "completed", A, 100, 6))
    ledger.append(_ledger("bus-2", 1, A, 100, verdict="clone"))
    cards[0] = CardBalance("a.json", A, 0, 5000 - 200)  # the copy's start is the original's
    result = reconcile(cards, journals, ledger)
    assert result.reconciled, result.differences
    assert result.explained == {"clone": 1}
    bad = reconcile(
        *_balanced(), clearing_fen=5000, clearing_net=[1, 0], verdicts={"ok": 3, "forged": 1}
    )
    assert sorted(d["kind"] for d in bad.differences) == [
        "clearing_net",
        "clearing_total",
        "forged",
    ]


def test_a_load_authorized_but_never_settled_is_a_difference() -> None:
    cards, journals, ledger = _balanced()
    loads = [LoadRow("L1", A, 5000, "confirmed"), LoadRow("L2", B, 1000, "authorized")]
    [diff] = reconcile(cards, journals, ledger, loads).differences
    assert (diff["kind"], diff["card"], diff["load"]) == ("load_unsettled", B, "L2")


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--riders", "0"], "must be more than 0"),
        (["--speed", "fast"], "is not a number"),
        (["--network", "atlantis"], "invalid choice"),
        (["--duration", "5", "--days", "1"], "not allowed with"),
    ],
)
def test_city_refuses_bad_options_in_one_line(options: list[str], message: str) -> None:
    result = farelab("city", *options)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_city_refuses_a_work_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("mine")
    result = farelab("city", "--dir", str(tmp_path), "--riders", "5")
    assert result.returncode == 2
    assert "is not empty" in result.stderr
    assert (tmp_path / "something").read_text() == "mine"


def small_city(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """``farelab city ARGS`` in ``tmp_path/city``: its result and its JSON summary."""
    summary_file = tmp_path / "summary.json"
    result = farelab(
        "city", *args, "--dir", str(tmp_path / "city"), "--json", str(summary_file), timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(summary_file.read_text())


def test_a_small_city_runs_every_device_as_a_process_and_reconciles(tmp_path: Path) -> None:
    result, summary = small_city(
        tmp_path, "--riders", "30", "--stations", "4", "--duration", "12", "--seed", "5"
    )
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["reconciled"] is True
    assert summary["differences"] == []
    assert summary["devices"] == 4 * 2 + 3 + 1  # gates, buses, the kiosk
    assert summary["taps"] > 20
    assert summary["accepted"] + sum(summary["refused"].values()) == summary["taps"]
    assert summary["refused"].get("not_whitelisted", 0) >= 1  # the unlisted city's rider
    assert summary["ledger"]["forged"] == 0
    assert summary["journalled"] > 0
    assert "reconciled: every card" in result.stdout
    # every device had a journal of its own
    journals = list((tmp_path / "city" / "devices").glob("*.db"))
    assert len(journals) == 4 * 2 + 3
    # the card images, spread over two-hex-digit folders by their name
    cards = tmp_path / "city" / "cards"
    assert len({p.name for p in cards.iterdir()}) == CARD_FOLDERS
    images = list(cards.glob("*/*.json"))
    assert len(images) == summary["riders"]
    assert all(p.parent.name == card_folder(p.stem) for p in images)


def test_a_chaos_city_behind_bridged_station_computers_reconciles(tmp_path: Path) -> None:
    """Two lines, each behind its own station computer bridged to the central broker, and the
    chaos: brokers, workers, devices and the kiosk killed, cards pulled, links cut, delayed and
    reset. Not a fen may go astray."""
    summary_file = tmp_path / "summary.json"
    result = farelab(
        "city",
        "--network",
        "changzhou",
        "--topology",
        "bridged",
        "--chaos",
        "--riders",
        "50",
        "--stations",
        "4",
        "--duration",
        "30",
        "--seed",
        "3",
        "--dir",
        str(tmp_path / "city"),
        "--json",
        str(summary_file),
        timeout=300,
    )
    summary = json.loads(summary_file.read_text())
    assert result.returncode == 0, json.dumps(summary["differences"])[:3000] + result.stderr
    assert summary["reconciled"] is True
    kinds = {f["kind"] for f in summary["faults"]}
    assert len(summary["faults"]) >= 4
    assert kinds & {"kill_broker", "kill_device", "kill_backend_worker", "kill_kiosk"}
    assert all({"at", "kind", "target"} <= f.keys() for f in summary["faults"])
    brokers = sorted(p.name for p in (tmp_path / "city" / "brokers").iterdir())
    assert brokers == ["central", "line-L1", "line-L2"]


def test_a_city_on_the_embedded_broker_reconciles(tmp_path: Path) -> None:
    """Without Mosquitto (or with ``--broker embedded``) the city runs on the in-process amqtt
    broker: MQTT 3.1.1, one backend worker."""
    summary_file = tmp_path / "summary.json"
    result = farelab(
        "city",
        "--broker",
        "embedded",
        "--riders",
        "20",
        "--stations",
        "3",
        "--duration",
        "10",
        "--dir",
        str(tmp_path / "city"),
        "--json",
        str(summary_file),
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the embedded broker (amqtt, MQTT 3.1.1" in result.stderr
    summary = json.loads(summary_file.read_text())
    assert summary["reconciled"] is True
    assert summary["taps"] > 0
    assert summary["journalled"] > 0
    assert summary["differences"] == []


def _processes_of(folder: Path) -> list[str]:
    """Command lines of the live (not zombie) processes that name ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            zombie = "State:\tZ" in (entry / "status").read_text()
        except OSError:
            continue
        if str(folder) in cmdline and not zombie:
            found.append(cmdline)
    return found


def _start_riding(folder: Path) -> subprocess.Popen[str]:
    proc = start_farelab(
        "city",
        "--riders",
        "15",
        "--stations",
        "2",
        "--duration",
        "120",
        "--dir",
        str(folder),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "riding:" in line:
            return proc
    raise AssertionError("the city ended before riding: " + proc.communicate()[1])


def _gone(folder: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _processes_of(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_an_interrupted_city_stops_every_process_and_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "city"
    proc = _start_riding(folder)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted (SIGINT)" in err
    assert "Traceback" not in err
    assert _gone(folder, 10) == []


def test_a_city_killed_outright_leaves_no_process_behind(tmp_path: Path) -> None:
    folder = tmp_path / "city"
    proc = _start_riding(folder)
    assert _processes_of(folder)  # devices, backend, kiosk, broker
    proc.kill()
    proc.communicate(timeout=10)
    assert _gone(folder, 30) == []


def test_kiosks_each_have_a_terminal_and_riders_are_spread_over_them() -> None:
    assert kiosk_ids(3) == ("kiosk-1", "kiosk-2", "kiosk-3")
    assert kiosk_terminal("kiosk-1") == "0000F0000001"  # a one-kiosk city's, as before
    terminals = {kiosk_terminal(k) for k in kiosk_ids(20)}
    assert len(terminals) == 20
    assert all(len(bytes.fromhex(t)) == 6 for t in terminals)


def test_a_city_with_several_kiosks_tops_up_at_each_and_reconciles(tmp_path: Path) -> None:
    _, summary = small_city(
        tmp_path,
        *("--riders", "60", "--stations", "2", "--duration", "10", "--seed", "3"),
        *("--kiosks", "3"),
    )
    assert summary["reconciled"] is True, summary["differences"]
    assert summary["devices"] == 2 * 2 + 3 + 3  # gates, buses, the kiosks
    folder = tmp_path / "city"
    assert sorted(p.name for p in folder.glob("kiosk*.db")) == [
        "kiosk-2.db",
        "kiosk-3.db",
        "kiosk.db",
    ]
    with sqlite3.connect(folder / "ledger.db") as db:
        kiosks = {
            row[0]
            for row in db.execute("SELECT DISTINCT device FROM transactions WHERE tx_type = 2")
        }
    assert len(kiosks) >= 2, kiosks  # the riders topped up at their own kiosks

"""Faults a validator meets in the field: a damaged card image, a card image that cannot be
written, a full disk under the journal, a gate clock behind the entry gate's, and bad values in
its configuration — each is that tap's result or a one-line error, never a dead process, a lost
transaction or a wrong fare."""

from __future__ import annotations

import errno
import io
import json
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from farelab.card import MetroRecord, MetroStatus, load_image, save_image
from farelab.protocol import ParamsError
from farelab.validator import (
    ConfigError,
    Journal,
    Parameters,
    ReplayError,
    load_config,
    parse_params,
    parse_taps,
    replay,
    run,
)
from tests.cli_support import farelab as run_farelab
from tests.disk_faults import full_disk_under
from tests.validator_support import Lab, bus, gate, new_card

TWO_BUSES = """
[[validator]]
id = "bus-1"
kind = "bus"
network = "taiyuan"
terminal_id = "000000000B01"
whitelist = ["1310000000000000"]

[[validator]]
id = "bus-2"
kind = "bus"
network = "taiyuan"
terminal_id = "000000000B02"
whitelist = ["1310000000000000"]
"""


def farelab(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return run_farelab(*args, stdin=stdin)


def card_file(path: Path, balance: int = 2000, serial: str = "1001") -> Path:
    save_image(path, new_card(balance=balance, serial=serial).image)
    return path


async def run_loop(config_text: str, tmp_path: Path, requests: list[tuple[str, Path]]) -> list[Any]:
    config_path = tmp_path / "devices.toml"
    config_path.write_text(config_text)
    lines = "".join(json.dumps({"device": d, "card": str(c)}) + "\n" for d, c in requests)
    out = io.StringIO()
    journal = Journal(tmp_path / "j.db")
    try:
        await run(load_config(config_path), journal, source=io.StringIO(lines), out=out)
    finally:
        journal.close()
    return [json.loads(x) for x in out.getvalue().splitlines()]


# --- a bad card is that tap's card_error; the other devices go on -----------------------------


async def test_an_unreadable_card_image_is_that_taps_card_error_and_the_other_device_goes_on(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(bytes(range(256)) * 4)  # random bytes, not UTF-8
    good = card_file(tmp_path / "good.json")
    lines = await run_loop(TWO_BUSES, tmp_path, [("bus-1", bad), ("bus-2", good), ("bus-1", good)])
    assert [(x["device"], x["result"], x["reason"]) for x in lines] == [
        ("bus-1", "rejected", "card_error"),
        ("bus-2", "accepted", None),
        ("bus-1", "accepted", None),
    ]
    assert load_image(good).balance == 2000 - 2 * 50
    # the two devices tap at once: their rows are journalled in whichever order the taps end
    taps = Journal(tmp_path / "j.db").taps()
    [failed] = [t for t in taps if t["reason"] == "card_error"]
    assert failed["device"] == "bus-1"
    assert "bad.json" in failed["detail"]


async def test_a_card_image_that_cannot_be_written_is_card_error_and_its_debit_resolved_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under the card image: the DEBIT cannot commit, so the card answers nothing.
    That tap is a grey card_error (its outcome unknown), the other device goes on, and the
    card's next tap finds the DEBIT never happened (void) and charges its own ride once."""
    broken = tmp_path / "broken.json"
    card_file(broken, serial="7")
    other = card_file(tmp_path / "other.json", serial="8")
    full_disk_under(monkeypatch, broken)
    lines = await run_loop(TWO_BUSES, tmp_path, [("bus-1", broken), ("bus-2", other)])
    assert [(x["result"], x["reason"], x["grey"]) for x in lines] == [
        ("rejected", "card_error", True),
        ("accepted", None, False),
    ]
    assert load_image(broken).balance == 2000
    monkeypatch.undo()
    [again] = await run_loop(TWO_BUSES, tmp_path, [("bus-2", broken)])
    assert (again["result"], again["fare_fen"]) == ("accepted", 50)
    assert load_image(broken).balance == 1950
    rows = Journal(tmp_path / "j.db").transactions(card_serial="7".rjust(20, "0"))
    assert [r["status"] for r in rows] == ["void", "completed"]


def test_replay_turns_an_unreadable_card_image_into_that_taps_card_error(tmp_path: Path) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(TWO_BUSES)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    good = card_file(tmp_path / "good.json")
    taps = [
        {"device": "bus-1", "card": str(bad), "at": "2026-11-23T09:00:00+08:00"},
        {"device": "bus-2", "card": str(good), "at": "2026-11-23T09:00:10+08:00"},
    ]
    result = farelab(
        "validator",
        "replay",
        "--config",
        str(config),
        "--taps",
        "-",
        stdin="".join(json.dumps(t) + "\n" for t in taps),
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [(x["device"], x["reason"]) for x in lines] == [("bus-1", "card_error"), ("bus-2", None)]
    assert load_image(good).balance == 1950


# --- a full disk under the journal ------------------------------------------------------------


def test_a_full_disk_for_the_intent_refuses_the_tap_out_of_service_with_the_card_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "j.db")
    lab = Lab([bus("taiyuan")], journal=journal)
    card = new_card(balance=2000)
    intents_fd = journal._intents._fd  # type: ignore[union-attr]
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if fd == intents_fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    refused = lab.tap("bus", card, 0)
    assert (refused.result, refused.reason) == ("rejected", "out_of_service")
    assert "No space left on device" in refused.detail  # type: ignore[union-attr]
    assert (card.image.balance, card.image.offline_counter) == (2000, 0)
    assert journal.transactions() == []
    monkeypatch.setattr(os, "write", real_write)  # space returns
    assert lab.tap("bus", card, 10).fare_fen == 50
    assert [r["status"] for r in journal.transactions()] == ["completed"]


class _FullAfter:
    """The journal's connection, whose COMMITs fail as SQLite's do on a full disk while
    ``full`` is set."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.full = False

    def execute(self, sql: str, *args: Any) -> Any:
        if self.full and sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_a_full_disk_after_the_debit_loses_nothing_refuses_the_next_taps_and_recovers(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j.db")
    db = _FullAfter(journal._db)
    journal._db = db  # type: ignore[assignment]
    lab = Lab([bus("taiyuan"), bus("taiyuan", device_id="bus-2", terminal="000000000B02")])
    lab = Lab(lab.devices, journal=journal)
    first, second = new_card(balance=2000, serial="1"), new_card(balance=2000, serial="2")
    db.full = True
    paid = lab.tap("bus", first, 0)  # the card was debited: the rider's ride stands
    assert (paid.result, paid.fare_fen, first.image.balance) == ("accepted", 50, 1950)
    assert journal.write_failure() == "database or disk is full"
    refused = lab.tap("bus-2", second, 10)
    assert (refused.result, refused.reason) == ("rejected", "out_of_service")
    assert (second.image.balance, second.image.offline_counter) == (2000, 0)
    db.full = False  # space returns: the kept transaction is written, taps resume
    assert lab.tap("bus-2", second, 20).fare_fen == 50
    rows = journal.transactions()
    assert [(r["card_serial"][-1], r["status"]) for r in rows] == [
        ("1", "completed"),
        ("2", "completed"),
    ]
    assert rows[0]["tac"] == paid.tac
    assert [r.status for _, _, r in journal.outbox()] == ["completed", "completed"]
    assert journal.pending() == {}


def test_a_validator_stopped_while_the_disk_is_full_keeps_the_debit_as_pending(
    tmp_path: Path,
) -> None:
    """Killed before space returned: the intent log restores the DEBIT as pending, and the
    card's next tap (at another bus) completes it with its TAC and charges its own ride."""
    path = tmp_path / "j.db"
    journal = Journal(path)
    db = _FullAfter(journal._db)
    journal._db = db  # type: ignore[assignment]
    devices = [bus("taiyuan"), bus("taiyuan", device_id="bus-2", terminal="000000000B02")]
    card = new_card(balance=2000)
    db.full = True
    paid = Lab(devices, journal=journal).tap("bus", card, 0)
    assert paid.fare_fen == 50
    again = Journal(path)  # the process died: nothing closed
    assert [r["status"] for r in again.transactions()] == ["pending"]
    lab = Lab(devices, journal=again)
    later = lab.tap("bus-2", card, 1800)
    assert (later.result, later.fare_fen, later.balance_fen) == ("accepted", 50, 1900)
    rows = again.transactions()
    assert [(r["status"], r["tac"]) for r in rows] == [
        ("completed", paid.tac),
        ("completed", later.tac),
    ]


# --- a clock behind the entry gate's ----------------------------------------------------------


def test_an_exit_timed_before_its_entry_is_refused_and_charges_nothing() -> None:
    entry, exit_ = gate("taiyuan", "尖草坪"), gate("taiyuan", "长风街")
    lab = Lab([entry, exit_])
    card = new_card(balance=2000)
    assert lab.tap(entry, card, 3600).result == "accepted"
    behind = lab.tap(exit_, card, 1800)  # this gate's clock is an hour behind the entry's
    assert (behind.result, behind.reason, behind.fare_fen) == ("rejected", "clock_error", 0)
    assert card.image.balance == 2000
    assert MetroRecord.decode(card.image.metro).status is MetroStatus.ENTERED
    assert lab.tap(exit_, card, 5400).fare_fen == 360  # the clock put right: the trip's fare


# --- values that become money, time or ids ----------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e30", "-1", "0.001", '"x"', "true"])
def test_a_route_fare_that_is_no_amount_is_a_config_error(tmp_path: Path, value: str) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(TWO_BUSES.replace('kind = "bus"', f'kind = "bus"\nroute_fare = {value}', 1))
    with pytest.raises(ConfigError, match="key 'route_fare'"):
        load_config(config)


@pytest.mark.parametrize("device_id", ["bus/1", "bus#", "bus+1", "$SYS", "", "x" * 65])
def test_a_device_id_that_cannot_be_a_topic_level_is_a_config_error(
    tmp_path: Path, device_id: str
) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(TWO_BUSES.replace('id = "bus-1"', f"id = {json.dumps(device_id)}"))
    with pytest.raises(ConfigError, match="key 'id'"):
        load_config(config)


@pytest.mark.parametrize(
    "patch",
    [
        ("antipassback_seconds = 60", "antipassback_seconds = nan"),
        ("antipassback_seconds = 60", "antipassback_seconds = inf"),
        ("fare_bands = [[6, 2]", "fare_bands = [[nan, 2]"),
        ("fare_bands = [[6, 2]", "fare_bands = [[6, inf]"),
        ("overtime_minutes = 180", "overtime_minutes = 1e300"),
    ],
)
def test_a_fare_table_with_numbers_that_are_not_finite_is_refused_in_one_line(
    tmp_path: Path, patch: tuple[str, str]
) -> None:
    table = _fare_table()
    assert patch[0] in table
    (tmp_path / "net.toml").write_text(table.replace(*patch, 1))
    config = tmp_path / "devices.toml"
    config.write_text(
        TWO_BUSES.replace('"taiyuan"', '"net.toml"').replace("\n[[validator]]", "", 0)
    )
    with pytest.raises(ConfigError, match="network 'testnet'"):
        load_config(config)
    with pytest.raises(ParamsError):
        parse_params(json.dumps({"version": 2, "networks": table.replace(*patch, 1)}), Parameters())


def _fare_table() -> str:
    return """
[testnet]
name = "test"
city_code = "0351"
fare_bands = [[6, 2], [12, 3]]
extra_km_per_yuan = 10
bus_base_fare_yuan = 1
antipassback_seconds = 60
overtime_minutes = 180
overtime_charge = "max_fare"
max_single_fare_yuan = 6
"""


@pytest.mark.parametrize(
    "doc",
    [
        {"version": True},
        {"version": 2, "hotlist": ["1" * 21]},
        {"version": 2, "whitelist": ["13"]},
    ],
)
def test_parameters_with_values_the_config_would_refuse_are_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(ParamsError):
        parse_params(json.dumps(doc), Parameters())


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_replay_refuses_an_upload_timeout_that_is_not_a_positive_time(
    tmp_path: Path, timeout: str
) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(TWO_BUSES)
    good = card_file(tmp_path / "good.json")
    tap = {"device": "bus-1", "card": str(good), "at": "2026-11-23T09:00:00+08:00"}
    result = farelab(
        "validator",
        "replay",
        "--config",
        str(config),
        "--taps",
        "-",
        "--journal",
        str(tmp_path / "j.db"),
        "--broker",
        "mqtt://127.0.0.1:9",
        f"--upload-timeout={timeout}",
        stdin=json.dumps(tap) + "\n",
    )
    assert result.returncode == 2
    assert "--upload-timeout" in result.stderr
    assert "Traceback" not in result.stderr
    assert load_image(good).balance == 2000


def test_run_refuses_a_parameters_file_that_is_not_there(tmp_path: Path) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(TWO_BUSES)
    result = farelab(
        "validator",
        "run",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "j.db"),
        "--params",
        str(tmp_path / "missing.json"),
    )
    assert result.returncode == 2
    assert "missing.json: no such parameters file" in result.stderr
    assert not (tmp_path / "j.db").exists()


def test_long_paths_and_values_are_cut_in_error_messages(tmp_path: Path) -> None:
    config_path = tmp_path / "devices.toml"
    config_path.write_text(TWO_BUSES)
    config = load_config(config_path)
    huge = "x" * 1_000_000
    with pytest.raises(ReplayError) as bad_time:
        parse_taps(iter([json.dumps({"device": "bus-1", "card": "c", "at": huge})]), config)
    with pytest.raises(ReplayError) as bad_device:
        parse_taps(iter([json.dumps({"device": huge, "card": "c", "at": "x"})]), config)
    assert len(str(bad_time.value)) < 400
    assert len(str(bad_device.value)) < 400
    [tap] = parse_taps(
        iter([json.dumps({"device": "bus-1", "card": huge, "at": "2026-11-23T09:00:00+08:00"})]),
        config,
    )
    journal = Journal(":memory:")
    [result] = replay(config, [tap], journal)
    assert result.reason == "card_error"
    assert len(result.detail) < 400  # type: ignore[union-attr]
    config_path.write_text(TWO_BUSES.replace('"taiyuan"', json.dumps(huge), 1))
    with pytest.raises(ConfigError) as bad_network:
        load_config(config_path)
    assert len(str(bad_network.value)) < 400


def test_an_empty_device_id_is_named_once_in_its_error(tmp_path: Path) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(TWO_BUSES.replace('id = "bus-1"', 'id = ""'))
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert str(refused.value).endswith("validator[0] (id ''): key 'id' must be a non-empty string")
    assert str(refused.value).count("devices.toml") == 1

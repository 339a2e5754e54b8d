"""``farelab validator run`` and ``replay`` as testbeds script them: sim readers fed on stdin,
a card tapped through pcscd with ``farelab card tap``, parameters applied while running, and
bad configuration reported by key."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from farelab.card import load_image
from tests.cli_support import DEVICES, card, farelab, start_farelab


def test_run_with_sim_readers_taps_cards_named_on_stdin(tmp_path: Path) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="sim"))
    path = card(tmp_path)
    requests = "".join(
        json.dumps({"device": d, "card": str(path)}) + "\n" for d in ("bus-1", "gate-in")
    )
    result = farelab(
        "validator",
        "run",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "j.db"),
        stdin=requests + "garbage\n",
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [(x["device"], x["result"], x["fare_fen"]) for x in lines] == [
        ("bus-1", "accepted", 50),
        ("gate-in", "accepted", 0),
    ]
    assert "ignored tap request 'garbage'" in result.stderr
    assert load_image(path).balance == 1950


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_run_with_a_pcsc_reader_and_farelab_card_tap(tmp_path: Path) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="pcsc:Virtual PCD 00 00"))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"version": 1}))
    path = card(tmp_path)
    proc = start_farelab(
        "validator",
        "run",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "j.db"),
        "--params",
        str(params),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        time.sleep(1.0)
        tap = farelab("card", "tap", str(path), "--hold", "1.5")
        assert tap.returncode == 0, tap.stderr
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready
        first = json.loads(proc.stdout.readline())
        assert (first["device"], first["result"], first["fare_fen"]) == ("bus-1", "accepted", 50)
        assert "20.00 -> 19.50" in tap.stdout
        # the backend (here: a file) hotlists the card; the next tap is refused and blocks it
        params.write_text(json.dumps({"version": 2, "hotlist": ["31"]}))
        time.sleep(1.5)
        farelab("card", "tap", str(path), "--hold", "1.5")
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready
        second = json.loads(proc.stdout.readline())
        assert second["reason"] == "hotlisted"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert load_image(path).blocked
    assert load_image(path).balance == 1950


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (('kind = "bus"', 'kind = "tram"'), 'key \'kind\' must be "bus" or "metro-gate"'),
        (('terminal_id = "000000000B01"', 'terminal_id = "B01"'), "key 'terminal_id'"),
        (('station = "Senlin Gongyuan"', 'station = "Nowhere"'), "no station 'Nowhere'"),
        (('network = "taiyuan"', 'network = "atlantis"'), "key 'network'"),
        (('whitelist = ["1310000000000000"]\nreader', "reader"), "key 'whitelist' is missing"),
        (("[[validator]]", "[[validator"), "not valid TOML"),
    ],
)
def test_bad_configuration_names_the_key(
    tmp_path: Path, patch: tuple[str, str], message: str
) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="sim").replace(*patch, 1))
    result = farelab("validator", "replay", "--config", str(config), "--taps", "-", stdin="")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_replay_contract_and_torn_tap(tmp_path: Path) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="sim"))
    path = card(tmp_path)
    taps = [
        {"device": "gate-in", "card": str(path), "at": "2026-11-23T08:00:00+08:00"},
        {
            "device": "bus-1",
            "card": str(path),
            "at": "2026-11-23T09:00:00+08:00",
            "pull_after": "DEBIT",
        },
        {"device": "bus-1", "card": str(path), "at": "2026-11-23T09:00:09+08:00"},
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
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    keys = {"device", "card_serial", "result", "reason", "fare_fen", "balance_fen", "tac", "grey"}
    assert all(set(x) == keys for x in lines)
    assert [(x["result"], x["reason"], x["grey"]) for x in lines] == [
        ("accepted", None, False),
        ("rejected", "card_removed", True),
        ("accepted", "recovered", False),
    ]
    assert load_image(path).balance == 2000 - 50


def test_replay_checks_every_line_before_the_first_tap(tmp_path: Path) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="sim"))
    path = card(tmp_path)
    good = json.dumps({"device": "bus-1", "card": str(path), "at": "2026-11-23T09:00:00+08:00"})
    bad = [
        "{not json",
        json.dumps({"device": "bus-1", "card": str(path), "at": "2026-11-23T09:00:00"}),
        json.dumps({"device": "bus-1", "card": str(path), "at": "x", "pull_after": "LATER"}),
    ]
    result = farelab(
        "validator",
        "replay",
        "--config",
        str(config),
        "--taps",
        "-",
        stdin="\n".join([good, *bad]) + "\n",
    )
    assert result.returncode == 2
    assert "line 2: not JSON" in result.stderr
    assert "line 3" in result.stderr
    assert "has no UTC offset" in result.stderr
    assert "line 4" in result.stderr
    assert load_image(path).balance == 2000


def test_replay_refuses_the_backend_ledger_as_its_journal_before_any_card_is_touched(
    tmp_path: Path,
) -> None:
    from farelab.backend._store import Store  # noqa: PLC0415

    ledger = tmp_path / "farelab-host.db"
    Store(f"sqlite:///{ledger}").close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(ledger.name)}
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="sim"))
    path = card(tmp_path)
    tap = {"device": "bus-1", "card": str(path), "at": "2026-11-23T09:00:00+08:00"}
    result = farelab(
        "validator",
        "replay",
        "--config",
        str(config),
        "--taps",
        "-",
        "--journal",
        str(ledger),
        stdin=json.dumps(tap) + "\n",
    )
    assert result.returncode == 2
    assert "this is a farelab backend ledger, not a validator journal" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(ledger.name)}
    assert after == before  # nothing written, no intent log beside it
    assert load_image(path).balance == 2000
    assert load_image(path).offline_counter == 0

"""Parameters from the backend reach a running validator over MQTT, are applied atomically, and
the validator reports the version it runs."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import time
from datetime import date
from pathlib import Path

from farelab.backend._mosquitto import Mosquitto
from farelab.card import load_image, personalise, save_image
from tests.cli_support import farelab, start_farelab

CONFIG = """
[[validator]]
id = "bus-7"
kind = "bus"
network = "taiyuan"
terminal_id = "000000000B07"
whitelist = ["1310000000000000"]
"""


def register_devices(config: Path, tmp_path: Path) -> None:
    """The backend's ledger, with the config's devices registered (``params`` only reads it)."""
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    command = ["backend", "devices", "add", "--config", str(config), "--db", ledger]
    added = farelab(*command, timeout=30)
    assert added.returncode == 0, added.stderr


def test_hotlist_published_by_the_backend_reaches_a_running_validator(
    broker: Mosquitto, tmp_path: Path
) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(CONFIG)
    register_devices(config, tmp_path)
    card = tmp_path / "card.json"
    save_image(card, personalise(serial="55", issued=date(2026, 1, 1), balance=1000))
    validator = start_farelab(
        "validator",
        "run",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "j.db"),
        "--broker",
        broker.url,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert validator.stdin is not None
    assert validator.stdout is not None
    try:
        time.sleep(1.5)
        published = farelab(
            "backend",
            "params",
            "--broker",
            broker.url,
            "--db",
            f"sqlite:///{tmp_path / 'ledger.db'}",
            "--device",
            "bus-7",
            "--hotlist",
            "55",
            "--wait",
            "5",
            timeout=30,
        )
        assert published.returncode == 0, published.stderr
        assert "published parameters version 1 to 1 device(s)" in published.stdout
        assert "bus-7: running version 1" in published.stdout
        validator.stdin.write(json.dumps({"device": "bus-7", "card": str(card)}) + "\n")
        validator.stdin.flush()
        ready, _, _ = select.select([validator.stdout], [], [], 10)
        assert ready
        result = json.loads(validator.stdout.readline())
        assert (result["result"], result["reason"]) == ("rejected", "hotlisted")
    finally:
        validator.stdin.close()
        validator.send_signal(signal.SIGTERM)
        validator.wait(15)
    assert load_image(card).blocked
    assert load_image(card).balance == 1000


def test_new_fare_table_from_the_backend_applies_at_the_next_tap(
    broker: Mosquitto, tmp_path: Path
) -> None:
    from importlib import resources  # noqa: PLC0415

    config = tmp_path / "devices.toml"
    config.write_text(CONFIG)
    register_devices(config, tmp_path)
    cards = {}
    for step, serial in (("before", "56"), ("after", "57")):  # two riders: no anti-passback
        cards[step] = tmp_path / f"{step}.json"
        save_image(cards[step], personalise(serial=serial, issued=date(2026, 1, 1), balance=1000))
    shipped = (resources.files("farelab.validator") / "networks.toml").read_text(encoding="utf-8")
    tables = tmp_path / "fares.toml"
    tables.write_text(
        shipped.replace("bus_flat_fare_cash_yuan = 1.0", "bus_flat_fare_cash_yuan = 2.0")
    )
    validator = start_farelab(
        "validator",
        "run",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "j.db"),
        "--broker",
        broker.url,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert validator.stdin is not None
    assert validator.stdout is not None
    fares = []
    try:
        time.sleep(1.5)
        for step in ("before", "after"):
            if step == "after":
                published = farelab(
                    "backend",
                    "params",
                    "--broker",
                    broker.url,
                    "--db",
                    f"sqlite:///{tmp_path / 'ledger.db'}",
                    "--device",
                    "bus-7",
                    "--networks",
                    str(tables),
                    "--wait",
                    "5",
                    timeout=30,
                )
                assert "bus-7: running version 1" in published.stdout, published.stderr
            request = {"device": "bus-7", "card": str(cards[step])}
            validator.stdin.write(json.dumps(request) + "\n")
            validator.stdin.flush()
            ready, _, _ = select.select([validator.stdout], [], [], 10)
            assert ready
            fares.append(json.loads(validator.stdout.readline())["fare_fen"])
            time.sleep(0.1)
    finally:
        validator.stdin.close()
        validator.send_signal(signal.SIGTERM)
        validator.wait(15)
    assert fares == [50, 100]  # local adult card: 50% of 1 yuan, then 50% of 2 yuan


def test_a_wait_that_is_no_time_is_refused() -> None:
    """``nan`` would never wait (and say nothing), ``-1`` neither, ``1e300`` would never end."""
    for wait, says in (
        ("nan", "a wait must be a finite number, not 'nan'"),
        ("-1", "a wait must be a positive number of seconds"),
        ("1e300", "a wait must be a positive number of seconds"),
    ):
        command = ["backend", "params", "--broker", "mqtt://127.0.0.1:1", "--db", "sqlite:///x.db"]
        refused = farelab(*command, "--device", "bus-7", "--wait", wait, timeout=30)
        assert refused.returncode == 2
        assert says in refused.stderr
        assert "Traceback" not in refused.stderr

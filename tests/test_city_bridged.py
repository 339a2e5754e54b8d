"""Station computers in front of a central broker, for real: validators behind their line's
Mosquitto, the backend on the central one, the bridges between them.  The central broker killed
for a minute while the taps go on loses nothing, and the backend's parameters reach a device
behind a line broker."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from farelab.backend._brokerconfig import BACKEND_ACCOUNT, accounts
from farelab.backend._mosquitto import Mosquitto, free_port
from farelab.backend._params import read_status
from farelab.backend._registry import DeviceEntry, hash_secret, register
from farelab.backend._store import Store
from farelab.card import personalise, save_image
from farelab.city import CENTRAL, BridgedTopology, line_broker
from farelab.protocol import BrokerURL
from tests.cli_support import farelab, start_farelab
from tests.test_uplink_backend import stop

BACKEND_PASSWORD = "backend-pw"
LINES = {"L1": ("bus-1", "bus-2"), "L2": ("bus-3", "bus-4")}
VALIDATOR = """
[[validator]]
id = "{id}"
kind = "bus"
network = "taiyuan"
operator = "TYBUS"
terminal_id = "{terminal}"
whitelist = ["1310000000000000"]
mqtt_password = "{id}-pw"
"""
CHINA = timezone(timedelta(hours=8))


def terminal(device: str) -> str:
    return f"000000000B0{device[-1]}"


@dataclass
class City:
    """The brokers, the ledger and the backend of one test."""

    tmp: Path
    db: str
    topology: BridgedTopology
    central: Mosquitto
    lines: dict[str, Mosquitto]
    backend: subprocess.Popen[str]

    @property
    def backend_url(self) -> str:
        return f"mqtt://{BACKEND_ACCOUNT}:{BACKEND_PASSWORD}@127.0.0.1:{self.central.port}"

    def validators(self, line: str) -> Path:
        """The device config of a line's validators."""
        config = self.tmp / f"{line}.toml"
        config.write_text(
            "".join(VALIDATOR.format(id=d, terminal=terminal(d)) for d in LINES[line])
        )
        return config

    def run_validators(self, line: str) -> subprocess.Popen[str]:
        """``farelab validator run`` for a line's validators, on its line broker, taps on stdin."""
        port = self.topology.device_broker(LINES[line][0])
        return start_farelab(
            "validator",
            "run",
            "--config",
            str(self.validators(line)),
            "--journal",
            str(self.tmp / f"{line}-journal.db"),
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )


@pytest.fixture
def city(tmp_path: Path) -> Iterator[City]:
    """Two line brokers bridged to a central one, the registry's accounts on them, and
    ``farelab backend run`` on the central broker."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    store = Store(db)
    try:
        for device in (d for devices in LINES.values() for d in devices):
            entry = DeviceEntry(device, "validator", "TYBUS", frozenset({"bus"}), terminal(device))
            register(store, entry, secret_hash=hash_secret(f"{device}-pw"))
        logins, _ = accounts(store, BACKEND_PASSWORD)
    finally:
        store.close()
    folder = tmp_path / "brokers"
    topology = BridgedTopology(
        central_port=free_port(),
        lines={line: (free_port(), devices) for line, devices in LINES.items()},
        folder=folder,
        logins=logins,
        bridge_passwords={line: f"bridge-{line}-pw" for line in LINES},
    )
    for name, text in topology.configs().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    files = topology.configs()

    def broker(name: str, port: int) -> Mosquitto:
        return Mosquitto(folder / name, config=files[f"{name}/mosquitto.conf"], port=port)

    central = broker(CENTRAL, topology.central_port)
    lines = {line: broker(line_broker(line), port) for line, (port, _) in topology.lines.items()}
    started: list[Mosquitto] = []
    try:
        for mosquitto in (central, *lines.values()):
            mosquitto.start()
            started.append(mosquitto)
        backend = start_farelab(
            "backend",
            "run",
            "--broker",
            f"mqtt://{BACKEND_ACCOUNT}:{BACKEND_PASSWORD}@127.0.0.1:{central.port}",
            "--db",
            db,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield City(tmp_path, db, topology, central, lines, backend)
        finally:
            stop(backend)
    finally:
        for mosquitto in started:
            mosquitto.stop()


class Tapper:
    """Taps a line's validators, one device after the other, with a card of their own each, a
    simulated 400 s apart; reads every result the process prints."""

    def __init__(self, proc: subprocess.Popen[str], tmp: Path, line: str) -> None:
        self.proc = proc
        self.devices = LINES[line]
        self.cards = {}
        for n, device in enumerate(self.devices):
            path = tmp / f"card-{device}.json"
            save_image(
                path, personalise(serial=f"9{line[-1]}{n}", issued=date(2026, 1, 1), balance=50_000)
            )
            self.cards[device] = path
        self.results: list[dict[str, object]] = []
        self.sent = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.results.append(json.loads(line))

    def tap(self) -> None:
        assert self.proc.stdin is not None
        at = datetime(2026, 11, 23, 6, tzinfo=CHINA) + timedelta(seconds=400 * self.sent)
        device = self.devices[self.sent % len(self.devices)]
        request = {"device": device, "card": str(self.cards[device]), "at": at.isoformat()}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        self.sent += 1

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        self._reader.join(10)


def outbox_rows(journal: Path) -> int:
    with sqlite3.connect(journal) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


def journalled(journal: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(journal) as db:
        rows = db.execute("SELECT device, seq FROM transactions").fetchall()
    return sorted((str(d), int(s)) for d, s in rows)


def ledger_rows(db: str) -> list[tuple[str, int]]:
    store = Store(db, create=False)
    try:
        rows = store.execute("SELECT device, seq FROM transactions").fetchall()
    finally:
        store.close()
    return sorted((str(d), int(s)) for d, s in rows)


@pytest.mark.slow
def test_the_central_broker_down_for_a_minute_loses_no_transaction(city: City) -> None:
    """SIGKILL the central broker for 60 s while validators behind both line brokers go on
    tapping: when it is back, every journalled transaction reaches the ledger exactly once and
    every outbox empties (the acks came back through the bridges)."""
    procs = {line: city.run_validators(line) for line in LINES}
    tappers = {line: Tapper(proc, city.tmp, line) for line, proc in procs.items()}
    journals = {line: city.tmp / f"{line}-journal.db" for line in LINES}
    try:

        def tap_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for tapper in tappers.values():
                    tapper.tap()
                time.sleep(0.25)

        tap_for(4)
        city.central.kill()
        tap_for(60)
        city.central.start()
        tap_for(4)
        # the backend reconnects within its 10 s backoff cap, and a batch the centre dropped
        # before the backend was back goes again after the devices' 10 s ack timeout
        deadline = time.monotonic() + 35
        while any(outbox_rows(j) for j in journals.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {line: outbox_rows(j) for line, j in journals.items()}
    finally:
        for tapper in tappers.values():
            tapper.finish()
    assert left == dict.fromkeys(LINES, 0)
    for line, tapper in tappers.items():
        assert len(tapper.results) == tapper.sent, line
    journal = sorted(row for j in journals.values() for row in journalled(j))
    accepted = sum(1 for t in tappers.values() for r in t.results if r["result"] == "accepted")
    assert accepted > 200
    assert len(journal) == accepted
    assert ledger_rows(city.db) == journal


def test_parameters_reach_a_device_behind_its_line_broker(city: City) -> None:
    """``farelab backend params`` on the central broker, retained, before the device is up:
    the device behind line L2's broker applies it and reports the version back."""
    published = farelab(
        "backend",
        "params",
        "--broker",
        city.backend_url,
        "--db",
        city.db,
        "--device",
        "bus-3",
        "--hotlist",
        "12345",
    )
    assert published.returncode == 0, published.stderr
    version = int(published.stdout.split("version ")[1].split()[0])
    proc = city.run_validators("L2")
    tapper = Tapper(proc, city.tmp, "L2")
    url = BrokerURL.parse(city.backend_url)
    running: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 20
        while running != {"bus-3": version} and time.monotonic() < deadline:
            # the device reports the version it starts with too: ask until it has changed
            running = asyncio.run(read_status(url, ["bus-3"], wait=2))
            time.sleep(0.2)
    finally:
        tapper.finish()
    assert running == {"bus-3": version}

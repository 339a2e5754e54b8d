"""``farelab backend run --http``: the live dashboard, its state, metrics and health, with a
Mosquitto, the backend and validators tapping simulated cards, and the page in a real browser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from farelab._devices import entry_of
from farelab.backend import Board, Dashboard, Store, classify, parse_http_address, register
from farelab.backend._mosquitto import Mosquitto, free_port
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, TacVerifier, personalise, save_image
from farelab.protocol import (
    LATENCY_BOUNDS_MS,
    STATUS_TOPIC,
    Batch,
    BrokerURL,
    DeviceStatus,
    decode_batch,
    decode_status,
    encode_batch,
    encode_status,
)
from farelab.validator import Journal, MqttUplink
from farelab.validator._stats import TapCounts, TapStats
from tests.validator_support import Lab, bus, new_card

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

DEVICES = """
[[validator]]
id = "bus-1"
kind = "bus"
network = "taiyuan"
route = "1"
terminal_id = "000000000B01"
whitelist = ["1310000000000000"]
reader = "sim"

[[validator]]
id = "bus-2"
kind = "bus"
network = "taiyuan"
route = "2"
terminal_id = "000000000B02"
whitelist = ["1310000000000000"]
reader = "sim"

[[validator]]
id = "gate-a"
kind = "metro-gate"
network = "taiyuan"
line = "L2"
station = "尖草坪"
terminal_id = "000000020001"
whitelist = ["1310000000000000"]
reader = "sim"

[[validator]]
id = "gate-b"
kind = "metro-gate"
network = "taiyuan"
line = "L2"
station = "西桥"
terminal_id = "000000021601"
whitelist = ["1310000000000000"]
reader = "sim"

[[validator]]
id = "gate-cz"
kind = "metro-gate"
network = "changzhou"
line = "L1"
station = "Senlin Gongyuan"
terminal_id = "000000010101"
whitelist = ["1310000000000000"]
reader = "sim"
"""

# A device id and a refusal reason a hostile client might report: shown as text, never run.
HOSTILE_DEVICE = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_REASON = "<script>document.title='pwned'</script>"


def _farelab(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "farelab", *args], cwd=ROOT, text=True, **kwargs)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _get(url: str, *, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _raw(port: int, request: bytes) -> bytes:
    """What the server answers to ``request`` sent as it is on a connection of its own."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.25)


@dataclass
class City:
    """A backend with its dashboard and validators tapping a stream of cards."""

    base: str
    port: int
    broker: Mosquitto
    backend: subprocess.Popen[str]
    backend_log: Path
    feeding: threading.Event

    def state(self) -> dict[str, Any]:
        status, body = _get(self.base + "/api/state")
        assert status == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc


def _cards(tmp_path: Path) -> list[Path]:
    """Ten riders' cards; two of them nearly empty."""
    paths = []
    for n in range(10):
        path = tmp_path / f"card{n}.json"
        balance = 30 if n in {3, 7} else 20_000
        save_image(
            path, personalise(serial=str(4100 + n), issued=date(2026, 1, 1), balance=balance)
        )
        paths.append(path)
    return paths


def _feed(stdin: Any, cards: list[Path], clone: Path, feeding: threading.Event) -> None:
    """About six taps a second over the five devices; after a while, the stale copy of a card
    (a clone) rides too."""
    devices = ("bus-1", "gate-a", "bus-2", "gate-b", "gate-cz", "bus-1")
    n = 0
    with contextlib.suppress(BrokenPipeError, ValueError):
        while feeding.is_set():
            card = cards[n % len(cards)]
            device = devices[(n // len(cards) + n) % len(devices)]
            if n == 40:
                card, device = clone, "bus-2"
            stdin.write(json.dumps({"device": device, "card": str(card)}) + "\n")
            stdin.flush()
            n += 1
            time.sleep(0.16)
        stdin.close()


@pytest.fixture
def city(broker: Mosquitto, tmp_path: Path) -> Iterator[City]:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES)
    port = free_port()
    backend_log = tmp_path / "backend.log"
    with backend_log.open("w") as log:
        backend = _farelab(
            "backend",
            "run",
            "--broker",
            broker.url,
            "--db",
            f"sqlite:///{tmp_path / 'ledger.db'}",
            "--devices",
            str(config),
            "--http",
            f"127.0.0.1:{port}",
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    cards = _cards(tmp_path)
    clone = tmp_path / "clone.json"
    shutil.copy(cards[0], clone)  # taken before the card's first ride: the same counter again
    feeding = threading.Event()
    feeding.set()
    validator = None
    feeder = None
    try:
        _wait_for("the dashboard", lambda: _reachable(base), timeout=20)
        validator = _farelab(
            "validator",
            "run",
            "--config",
            str(config),
            "--journal",
            str(tmp_path / "j.db"),
            "--broker",
            broker.url,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        feeder = threading.Thread(
            target=_feed, args=(validator.stdin, cards, clone, feeding), daemon=True
        )
        feeder.start()
        yield City(base, port, broker, backend, backend_log, feeding)
    finally:
        feeding.clear()
        if feeder is not None:
            feeder.join(5)
        if validator is not None:
            _stop(validator)
        _stop(backend)


def _reachable(base: str) -> bool:
    try:
        return _get(base + "/healthz")[0] == 200
    except OSError:
        return False


def _total_taps(state: dict[str, Any]) -> int:
    return sum(d["taps"] for d in state["devices"])


def test_the_state_follows_the_devices_reports_and_the_ledger(city: City) -> None:
    _wait_for(
        "reports and counted rides",
        lambda: _total_taps(s := city.state()) >= 10 and s["ledger"]["transactions"] > 0,
    )
    before = city.state()
    _wait_for("more taps", lambda: _total_taps(city.state()) > _total_taps(before) + 5)
    _wait_for("a refusal", lambda: sum(city.state()["refused"].values()) > 0)
    state = city.state()
    assert set(state) == {
        "time",
        "devices",
        "taps_per_s",
        "refused",
        "ledger",
        "clearing",
        "latency_ms",
        "lag_s",
        "alerts",
        "cards_by_state",
    }
    # No card records in this ledger: every state at 0.
    assert state["cards_by_state"] == dict.fromkeys(
        ("active", "reported", "frozen", "replaced", "cancelled", "expired"), 0
    )
    devices = {d["device"]: d for d in state["devices"]}
    assert set(devices) == {"bus-1", "bus-2", "gate-a", "gate-b", "gate-cz"}
    for doc in devices.values():
        assert set(doc) == {
            "device",
            "role",
            "online",
            "last_seen",
            "outbox",
            "params_version",
            "taps",
            "accepted",
            "refused",
        }
        assert doc["role"] == "validator"
    reporting = [d for d in devices.values() if d["taps"]]
    assert reporting
    assert all(d["online"] and d["last_seen"] and d["outbox"] is not None for d in reporting)
    assert all(d["taps"] == d["accepted"] + sum(d["refused"].values()) for d in reporting)
    assert state["taps_per_s"]["total"] > 0
    assert set(state["taps_per_s"]["by_device"]) <= set(devices)
    assert state["taps_per_s"]["by_line"]
    assert state["refused"].get("insufficient_balance", 0) > 0
    ledger = state["ledger"]
    assert ledger["fares_fen"] > 0
    assert sum(r["transactions"] for r in ledger["by_operator"].values()) == ledger["transactions"]
    assert set(ledger["by_issuer"]) == {"1310000000000000"}
    assert sum(p["net_fen"] for p in state["clearing"]) == 0
    assert {p["party"] for p in state["clearing"]} >= {"issuer:1310000000000000"}
    latency = state["latency_ms"]
    assert len(latency["counts"]) == len(latency["bounds"]) + 1
    assert sum(latency["counts"]) > 0
    assert state["lag_s"] is None or state["lag_s"] >= 0
    _wait_for(
        "the clone's alert", lambda: any(a["kind"] == "clone" for a in city.state()["alerts"])
    )
    alert = next(a for a in city.state()["alerts"] if a["kind"] == "clone")
    assert set(alert) == {"at", "kind", "card", "device", "detail"}
    assert alert["card"].endswith("4100")


def test_metrics_are_prometheus_text_all_named_farelab(city: City) -> None:
    _wait_for("reports", lambda: _total_taps(city.state()) > 0)
    status, body = _get(city.base + "/metrics")
    assert status == 200
    families = list(text_string_to_metric_families(body.decode()))
    names = {f.name for f in families}
    assert all(f.name.startswith("farelab_") for f in families)
    assert all(s.name.startswith("farelab_") for f in families for s in f.samples)
    assert {
        "farelab_device_taps",
        "farelab_tap_duration_seconds",
        "farelab_ledger_transactions",
    } <= names
    taps = next(f for f in families if f.name == "farelab_device_taps")
    assert sum(s.value for s in taps.samples) > 0


def test_health_and_bad_requests_are_answered_without_a_traceback(city: City) -> None:
    status, body = _get(city.base + "/healthz")
    assert (status, json.loads(body)) == (200, {"ledger": "ok"})
    assert _get(city.base + "/nowhere")[0] == 404
    assert _get(city.base + "/", method="POST")[0] == 405
    assert _get(city.base + "/api/state", method="DELETE")[0] == 405
    assert _get(city.base + "/", method="HEAD") == (200, b"")
    assert _raw(city.port, b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 405 ")
    assert b"400" in _raw(city.port, b"garbage\r\n\r\n")
    assert b"400" in _raw(city.port, b"GET / HTCPCP/1.0\r\n\r\n")
    assert _raw(city.port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.0 414 "
    )
    page = _get(city.base + "/")[1].decode()
    assert "<canvas" in page
    assert "http://" not in page
    assert "https://" not in page
    assert _get(city.base + "/healthz")[0] == 200
    assert "Traceback" not in city.backend_log.read_text()


def test_health_is_503_while_the_ledger_does_not_answer(tmp_path: Path) -> None:
    port = free_port()
    dashboard = Dashboard(
        BrokerURL.parse(f"mqtt://127.0.0.1:{free_port()}"),
        f"sqlite:///{tmp_path / 'none.db'}",
        host="127.0.0.1",
        port=port,
        client_id="farelab-test-dash",
    )
    try:
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert (status, json.loads(body)) == (503, {"ledger": "unavailable"})
        assert _get(f"http://127.0.0.1:{port}/api/state")[0] == 503
    finally:
        dashboard.close()


def test_a_bad_http_address_is_one_line_of_error(tmp_path: Path) -> None:
    proc = _farelab(
        "backend",
        "run",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--db",
        f"sqlite:///{tmp_path / 'l.db'}",
        "--http",
        "localhost",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [
        "farelab: error: --http 'localhost': expected HOST:PORT, a port from 1 to 65535 "
        "(or 0: a free one)"
    ]


def _browser() -> webdriver.Chrome:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.fail(f"the browser test needs {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1440,1500",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


async def _report_hostile(broker: Mosquitto) -> None:
    status = DeviceStatus(
        HOSTILE_DEVICE,
        1,
        taps=1,
        accepted=0,
        refused={HOSTILE_REASON: 1},
        outbox=0,
        latency_counts=(0,) * (len(LATENCY_BOUNDS_MS) + 1),
    )
    async with BrokerURL.parse(broker.url).client() as client:
        topic = STATUS_TOPIC.format(device=HOSTILE_DEVICE)
        await client.publish(topic, encode_status(status), qos=1)


def test_the_page_updates_live_and_shows_reported_text_as_text(city: City, tmp_path: Path) -> None:
    driver = _browser()
    try:
        driver.get(city.base + "/")
        taps = driver.find_element(By.ID, "taps-total")
        _wait_for("a count on the page", lambda: taps.text.isdigit() and int(taps.text) > 0)
        first = int(taps.text)
        _wait_for("the count to grow", lambda: int(taps.text) > first)
        _wait_for(
            "a clone among the alerts",
            lambda: "clone" in driver.find_element(By.ID, "alerts").text,
            timeout=40,
        )
        time.sleep(6)  # a few more updates, so that the rate's chart has a history
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if target := os.environ.get("FARELAB_SCREENSHOT"):
            shutil.copy(shot, target)

        asyncio.run(_report_hostile(city.broker))
        devices = driver.find_element(By.ID, "devices")
        _wait_for("the reported device", lambda: HOSTILE_DEVICE in devices.text)
        _wait_for(
            "the reported reason",
            lambda: HOSTILE_REASON in driver.find_element(By.ID, "refused").text,
        )
        assert driver.title == "farelab backend"
        assert driver.find_elements(By.CSS_SELECTOR, "main img") == []
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1
    finally:
        driver.quit()


PG = "postgresql://postgres@127.0.0.1:5432/test"
VERIFIER = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A ledger with the lab's bus registered, on either database."""
    if request.param == "sqlite":
        store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
        register(store, entry_of(bus("taiyuan")))
        yield store
        store.close()
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (database test) is needed: {exc}")
    admin.execute(f"CREATE SCHEMA {schema}")
    store = Store(f"{PG}?options=-csearch_path%3D{schema}")
    register(store, entry_of(bus("taiyuan")))
    yield store
    store.close()
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def test_the_ledger_gives_totals_and_alerts_for_the_dashboard(ledger: Store) -> None:
    assert ledger.last_batch_ms() is None
    lab = Lab([bus("taiyuan")])
    cards = [new_card(balance=5000, serial=str(7100 + i)) for i in range(3)]
    for t, card in enumerate(cards * 2):
        lab.tap("bus", card, t * 60)
    records = [payload for _, _, payload in lab.journal.outbox(100)]
    forged = replace(records[1], tac=bytes(4))
    # The fifth record never arrives: a gap in the bus's journal.
    for batch_id, chunk in ((1, [records[0], forged, records[2]]), (4, [records[3], records[5]])):
        batch = decode_batch(encode_batch(Batch(batch_id, "bus", tuple(chunk))))
        ledger.ingest("bus", batch.batch_id, classify(batch, VERIFIER))
    totals = ledger.dashboard_totals()
    assert totals["transactions"] == 4
    counted = (records[0], records[2], records[3], records[5])
    assert totals["fares_fen"] == sum(r.amount for r in counted) > 0
    assert totals["loads_fen"] == 0
    assert totals["by_issuer"] == {
        "1310000000000000": {"transactions": 4, "fen": totals["fares_fen"]}
    }
    assert sum(r["transactions"] for r in totals["by_operator"].values()) == 4
    alerts = ledger.dashboard_alerts(10)
    assert [(a["kind"], a["device"]) for a in alerts] == [("forged", "bus"), ("gap", "bus")]
    assert alerts[0]["card"].endswith("7101")
    assert alerts[1]["detail"].startswith("1 sequence number(s) missing")
    assert ledger.last_batch_ms() is not None


def _report(device: str, taps: int, at: datetime | None = None) -> DeviceStatus:
    return DeviceStatus(device, 1, at=at, taps=taps, accepted=taps, outbox=0)


def test_a_device_rate_is_its_taps_over_the_last_seconds_and_falls_to_zero() -> None:
    board = Board()
    for t in range(6):
        board.report(_report("bus-1", 10 * t), now=1000.0 + 2 * t)
    assert board.rate("bus-1", 1010.0) == pytest.approx(5.0)
    assert board.rate("bus-1", 1015.0) < 5.0
    assert board.rate("bus-1", 1025.0) == 0.0
    assert board.rate("bus-9", 1010.0) == 0.0


def test_a_device_that_started_again_starts_its_rate_again() -> None:
    board = Board()
    board.report(_report("bus-1", 500), now=1000.0)
    board.report(_report("bus-1", 3), now=1002.0)
    assert board.rate("bus-1", 1002.0) == 0.0
    board.report(_report("bus-1", 13), now=1004.0)
    assert board.rate("bus-1", 1004.0) == pytest.approx(5.0)


def test_a_retained_report_was_seen_when_the_device_made_it() -> None:
    board = Board()
    made = datetime.fromtimestamp(900.0, UTC)
    board.report(_report("bus-1", 5, at=made), now=1000.0, retained=True)
    board.report(_report("bus-2", 5), now=1000.0, retained=True)
    seen = {device: at for device, (_, at) in board.devices().items()}
    assert seen == {"bus-1": 900.0, "bus-2": None}


def test_the_board_keeps_at_most_its_bound_of_devices() -> None:
    board = Board(max_devices=2)
    for n in range(3):
        board.report(_report(f"d{n}", 1), now=1000.0)
    board.report(_report("d0", 2), now=1001.0)
    assert {device: s.taps for device, (s, _) in board.devices().items()} == {"d0": 2, "d1": 1}


async def test_a_device_reports_at_connection_and_again_only_when_something_changed(
    broker: Mosquitto, tmp_path: Path
) -> None:
    url = BrokerURL.parse(broker.url)
    counts = {"now": TapCounts()}
    uplink = MqttUplink(url, ["bus-1"], status_every=0.3)
    uplink.attach_params(lambda device, payload: None)
    uplink.attach_status(lambda device: (4, counts["now"]) if device == "bus-1" else None)
    reports: list[DeviceStatus] = []
    journal = Journal(tmp_path / "j.db")

    async def listen() -> None:
        async with url.client() as client:
            await client.subscribe(STATUS_TOPIC.format(device="bus-1"), qos=1)
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                reports.append(decode_status(payload))

    async def until(n: int) -> None:
        async with asyncio.timeout(10):
            while len(reports) < n:
                await asyncio.sleep(0.05)

    async with asyncio.TaskGroup() as group:
        listener = group.create_task(listen())
        await asyncio.sleep(0.3)
        sender = group.create_task(uplink.run(journal))
        await until(1)
        await asyncio.sleep(1.5)  # five periods with nothing new
        assert len(reports) == 1
        stats = TapStats()
        stats.count(accepted=False, reason="expired", elapsed_s=0.004)
        counts["now"] = stats.snapshot()
        await until(2)
        sender.cancel()
        listener.cancel()
    first, second = reports
    assert (first.device, first.params_version, first.taps, first.outbox) == ("bus-1", 4, 0, 0)
    assert first.at is not None
    assert (second.taps, second.accepted, dict(second.refused)) == (1, 0, {"expired": 1})
    assert second.latency_counts is not None
    assert sum(second.latency_counts) == 1
    journal.close()


def test_an_http_address_is_host_and_port() -> None:
    assert parse_http_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http_address("[::1]:8080") == ("::1", 8080)
    assert parse_http_address("localhost:1") == ("localhost", 1)
    assert parse_http_address("127.0.0.1:0") == ("127.0.0.1", 0)  # a free port, printed at start
    for bad in ("localhost", ":80", "host:", "host:-1", "host:65536", "host:http", "[]:80"):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            parse_http_address(bad)
    with pytest.raises(ValueError, match="brackets"):
        parse_http_address("::1:8080")

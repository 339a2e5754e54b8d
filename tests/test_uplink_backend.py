"""Validators' journals to the backend's ledger over a real Mosquitto: every transaction once,
TACs verified, replays changing nothing, bad payloads quarantined."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from farelab.backend._mosquitto import Mosquitto
from farelab.card import load_image, personalise, save_image
from farelab.protocol import BrokerURL
from farelab.validator import Journal, MqttUplink
from tests.cli_support import farelab, start_farelab
from tests.validator_support import Lab, bus, new_card

DEVICES = """
[[validator]]
id = "bus-1"
kind = "bus"
network = "taiyuan"
terminal_id = "000000000B01"
whitelist = ["1310000000000000"]

[[validator]]
id = "gate-a"
kind = "metro-gate"
network = "taiyuan"
line = "L2"
station = "尖草坪"
terminal_id = "000000020001"
whitelist = ["1310000000000000"]

[[validator]]
id = "gate-b"
kind = "metro-gate"
network = "taiyuan"
line = "L2"
station = "西桥"
terminal_id = "000000021601"
whitelist = ["1310000000000000"]
"""


LAB_BUS = """
[[validator]]
id = "bus"
kind = "bus"
network = "taiyuan"
route = "1"
terminal_id = "000000000B01"
whitelist = ["1310000000000000"]
"""


def start_backend(
    broker: Mosquitto, db: str, workers: int = 1, devices: Path | None = None
) -> subprocess.Popen[str]:
    registry = ["--devices", str(devices)] if devices is not None else []
    proc = start_farelab(
        "backend",
        "run",
        "--broker",
        broker.url,
        "--db",
        db,
        "--workers",
        str(workers),
        *registry,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


@contextlib.contextmanager
def uplink_on_a_thread(uplink: Any, journal: Journal) -> Iterator[None]:
    """``uplink.run(journal)`` on an event loop of its own thread, while the test taps on this
    one; cancelled and joined on exit."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(uplink.run(journal))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(15)


def drained(journal: Journal, within: float) -> bool:
    """Whether the journal's outbox empties within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if journal.outbox_rows == 0:
            return True
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def make_taps(
    tmp_path: Path, cards: int, rounds: int, first_serial: int = 100
) -> tuple[Path, list[Path]]:
    paths = []
    lines = []
    for c in range(cards):
        path = tmp_path / f"card{c}.json"
        save_image(
            path, personalise(serial=str(first_serial + c), issued=date(2026, 1, 1), balance=50_000)
        )
        paths.append(path)
    for r in range(rounds):
        for c, path in enumerate(paths):
            base = 8 * 3600 + r * 1800 + c
            for device, dt in (("bus-1", 0), ("gate-a", 300), ("gate-b", 1200)):
                h, rest = divmod(base + dt, 3600)
                at = f"2026-11-23T{h:02d}:{rest // 60:02d}:{rest % 60:02d}+08:00"
                lines.append(json.dumps({"device": device, "card": str(path), "at": at}))
    taps = tmp_path / "taps.jsonl"
    taps.write_text("\n".join(lines) + "\n")
    return taps, paths


def test_replay_uploads_and_the_ledger_matches_the_cards(broker: Mosquitto, tmp_path: Path) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    backend = start_backend(broker, db, devices=config)
    try:
        taps, cards = make_taps(tmp_path, cards=5, rounds=4)
        result = farelab(
            "validator",
            "replay",
            "--config",
            str(config),
            "--taps",
            str(taps),
            "--journal",
            str(tmp_path / "j.db"),
            "--broker",
            broker.url,
        )
        assert result.returncode == 0, result.stderr
        outputs = [json.loads(x) for x in result.stdout.splitlines()]
        assert "the backend acknowledged" in result.stderr
    finally:
        stop(backend)
    report = json.loads(farelab("backend", "report", "--db", db, "--json").stdout)
    accepted = [o for o in outputs if o["result"] == "accepted"]
    assert report["transactions"] == len(accepted) == 60
    spent = sum(50_000 - load_image(p).balance for p in cards)
    assert report["purchase_fen"] == spent == sum(o["fare_fen"] for o in accepted)
    assert (report["forged"], report["gaps"], report["clones"], report["quarantined"]) == (
        0,
        0,
        0,
        0,
    )
    assert report["balance_anomalies"] == 0
    assert set(report["by_operator"]) == {"TAIYUAN"}
    assert set(report["by_issuer"]) == {"1310000000000000"}


def test_upload_without_a_backend_times_out_and_says_what_is_pending(
    broker: Mosquitto, tmp_path: Path
) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES)
    taps, _ = make_taps(tmp_path, cards=1, rounds=1)
    journal = tmp_path / "j.db"
    result = farelab(
        "validator",
        "replay",
        "--config",
        str(config),
        "--taps",
        str(taps),
        "--journal",
        str(journal),
        "--broker",
        broker.url,
        "--upload-timeout",
        "2",
    )
    assert result.returncode == 3
    assert "upload timed out" in result.stderr
    assert "3 records still pending" in result.stderr


def test_uplink_keeps_sending_after_the_outbox_has_drained(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A drained outbox must not strand the next rows: the uplink drains, taps go on, and it
    drains again without reconnecting."""
    config = tmp_path / "bus.toml"
    config.write_text(LAB_BUS)
    backend = start_backend(broker, f"sqlite:///{tmp_path / 'ledger.db'}", devices=config)
    lab = Lab([bus("taiyuan")], journal=Journal(tmp_path / "j.db"))
    uplink = MqttUplink(BrokerURL.parse(broker.url), ["bus"], ack_timeout=30)
    try:
        with uplink_on_a_thread(uplink, lab.journal):
            card, t = new_card(balance=100_000), 0
            for round_ in range(3):
                for _ in range(5):
                    lab.tap("bus", card, t)
                    t += 400
                assert drained(lab.journal, 30), (
                    f"round {round_}: {lab.journal.outbox_rows} rows left"
                )
            assert uplink.stats["bus"].records_acked == 15
            assert uplink.stats["bus"].connects == 1
    finally:
        backend.terminate()
        backend.wait(15)


async def test_stale_acks_delete_nothing(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a reconnect the uplink sends again from the outbox's first row, so a new batch can
    start at the row an old one did, with more rows; and a journal file replaced by a new one
    numbers its rows from 1 again.  An ack of such an old batch, still queued in the persistent
    session, must not delete the new batch's rows: the backend never saw them.  Expected after
    every restart, such an ack is told at INFO, not as a warning."""
    import asyncio  # noqa: PLC0415

    caplog.set_level(logging.INFO, logger="farelab.uplink")

    import aiomqtt  # noqa: PLC0415

    from farelab.protocol import (  # noqa: PLC0415
        ACK_TOPIC,
        TX_TOPIC,
        Ack,
        Batch,
        BrokerURL,
        cancel_and_wait,
        decode_batch,
        encode_ack,
    )
    from farelab.validator import Journal, MqttUplink  # noqa: PLC0415
    from tests.validator_support import Lab, bus, new_card  # noqa: PLC0415

    def journal_of_three_taps(name: str) -> Journal:
        lab = Lab([bus("taiyuan")], journal=Journal(tmp_path / name))
        card = new_card(balance=100_000)
        for i in range(3):
            lab.tap("bus", card, i * 400)
        return lab.journal

    url = BrokerURL.parse(broker.url)
    ack_topic = ACK_TOPIC.format(device="bus")

    async def first_batch(backend: aiomqtt.Client) -> Batch:
        async with asyncio.timeout(10):
            message = await anext(aiter(backend.messages))
        return decode_batch(bytes(message.payload))

    async with url.client(identifier="fake-backend") as backend:
        await backend.subscribe(TX_TOPIC.format(device="bus"), qos=1)
        earlier = journal_of_three_taps("earlier.db")  # the file a device had before
        task = asyncio.create_task(MqttUplink(url, ["bus"]).run(earlier))
        try:
            old = await first_batch(backend)
        finally:
            await cancel_and_wait(task)
        journal = journal_of_three_taps("now.db")
        uplink = MqttUplink(url, ["bus"], ack_timeout=30)
        task = asyncio.create_task(uplink.run(journal))
        try:
            new = await first_batch(backend)
            for stale in (
                Ack(new.batch_id, len(new.records) - 1, committed=True),  # fewer rows
                Ack(old.batch_id, len(old.records), committed=True),  # the earlier file's
            ):
                await backend.publish(ack_topic, encode_ack(stale), qos=1)
            await asyncio.sleep(1.0)
            after_stale = journal.outbox_rows
            good = Ack(new.batch_id, len(new.records), committed=True)
            await backend.publish(ack_topic, encode_ack(good), qos=1)
            async with asyncio.timeout(10):
                while journal.outbox_rows:
                    await asyncio.sleep(0.05)
            result = len(new.records), after_stale, uplink.stats["bus"].records_acked
        finally:
            await cancel_and_wait(task)

    assert result == (3, 3, 3)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "farelab.uplink"]
    assert not [m for level, m in said if level >= logging.WARNING and "ack" in m], said
    assert [m for level, m in said if level == logging.INFO and "stale ack" in m], said


def replay(
    config: Path, taps: Path, journal: Path, broker: Mosquitto, *extra: str
) -> list[dict[str, object]]:
    """``farelab validator replay`` uploading to ``broker``; its accepted taps."""
    result = farelab(
        "validator",
        "replay",
        "--config",
        str(config),
        "--taps",
        str(taps),
        "--journal",
        str(journal),
        "--broker",
        broker.url,
        *extra,
    )
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(x) for x in result.stdout.splitlines()]
    return [o for o in outputs if o["result"] == "accepted"]


def test_a_replaced_journal_costs_no_ride_and_is_reported(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A device's journal file deleted and started over numbers its records from 1 again: the
    ledger tells them apart by the journal's epoch, counts every ride, and reports the reset."""
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    journal = tmp_path / "j.db"
    backend = start_backend(broker, db, devices=config)
    try:
        first_taps, cards = make_taps(tmp_path, cards=5, rounds=1)
        accepted = replay(config, first_taps, journal, broker)
        for leftover in tmp_path.glob("j.db*"):
            leftover.unlink()
        later = tmp_path / "later"
        later.mkdir()
        second_taps, _ = make_taps(later, cards=5, rounds=1)
        lines = second_taps.read_text().replace("2026-11-23", "2026-11-24")
        for c, card in enumerate(cards):  # the same cards, a day later
            lines = lines.replace(str(later / f"card{c}.json"), str(card))
        second_taps.write_text(lines)
        accepted += replay(config, second_taps, journal, broker)
    finally:
        stop(backend)
    report = json.loads(farelab("backend", "report", "--db", db, "--json").stdout)
    spent = sum(50_000 - load_image(p).balance for p in cards)
    assert len(accepted) == 30
    assert (report["transactions"], report["purchase_fen"]) == (30, spent)
    assert (report["duplicates"], report["journal_resets"]) == (0, 3)
    assert (report["conflicting_duplicates"], report["replays"], report["clones"]) == (0, 0, 0)


def test_an_unregistered_device_keeps_its_rows_until_it_is_registered(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """The backend refuses a batch from a device it does not know (quarantined, a rejected
    ack); the device keeps the rows and sends them again, and they count once it is
    registered."""
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    journal = tmp_path / "j.db"
    taps, cards = make_taps(tmp_path, cards=1, rounds=1)
    backend = start_backend(broker, db)
    try:
        refused = farelab(
            "validator",
            "replay",
            "--config",
            str(config),
            "--taps",
            str(taps),
            "--journal",
            str(journal),
            "--broker",
            broker.url,
            "--upload-timeout",
            "3",
        )
        assert refused.returncode == 3, refused.stderr
        assert "3 records still pending" in refused.stderr
        added = farelab("backend", "devices", "add", "--config", str(config), "--db", db)
        assert added.returncode == 0, added.stderr
        later = tmp_path / "later"
        later.mkdir()
        more_taps, more_cards = make_taps(later, cards=1, rounds=1, first_serial=200)
        accepted = replay(config, more_taps, journal, broker)
    finally:
        stop(backend)
    report = json.loads(farelab("backend", "report", "--db", db, "--json").stdout)
    spent = sum(50_000 - load_image(p).balance for p in cards + more_cards)
    assert len(accepted) == 3
    assert (report["transactions"], report["purchase_fen"]) == (6, spent)
    assert report["quarantine_reasons"].get("unknown_device", 0) >= 1

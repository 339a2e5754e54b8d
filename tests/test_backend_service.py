"""The backend as a service on a real Mosquitto: bad payloads quarantined with their reason, two
workers on one shared subscription with PostgreSQL splitting a load, and a broker and a worker
killed in the middle of uploads — with nothing lost or counted twice."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import aiomqtt
import psycopg
import pytest

from farelab.backend._mosquitto import Mosquitto
from farelab.backend._store import Store
from farelab.card import load_image
from farelab.protocol import encode_batch
from farelab.validator._journal import Journal
from tests.cli_support import farelab, start_farelab
from tests.test_uplink_backend import DEVICES, make_taps, start_backend, stop

PG = "postgresql://postgres@127.0.0.1:5432/test"


async def publish(url_port: int, topic: str, payloads: list[bytes]) -> None:
    async with aiomqtt.Client("127.0.0.1", url_port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        for payload in payloads:
            await c.publish(topic, payload, qos=1)


def report(db: str) -> dict[str, object]:
    out = farelab("backend", "report", "--db", db, "--json")
    assert out.returncode == 0, out.stderr
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


async def test_bad_payloads_are_quarantined_with_their_reason(
    broker: Mosquitto, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    backend = start_backend(broker, db)
    from farelab.protocol import Batch, Record  # noqa: PLC0415

    record = Record.from_text(
        (
            1,
            "completed",
            9,
            "bus",
            "3des",
            "1",
            "1310000000000000",
            0,
            1,
            50,
            100,
            "000000000B01",
            "20261123",
            "080000",
            0,
            "00" * 8,
            0,
            "TAIYUAN",
            "00000000",
        )
    )
    good = encode_batch(Batch(1, "bus-1", (record,)))
    payloads = {
        "malformed": b"hello",
        "truncated": good[:-10],
        "unknown_version": good[:3] + b"\x07" + good[4:],
        "oversize": b"FLB\x01" + bytes(70_000),
    }
    try:
        await publish(broker.port, "farelab/v1/dev/bus-1/tx", list(payloads.values()))
        await publish(broker.port, "farelab/v1/dev/bus-2/tx", [good])  # wrong device
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and report(db)["quarantined"] != 5:
            await asyncio.sleep(0.2)
    finally:
        stop(backend)
    doc = report(db)
    assert doc["quarantined"] == 5
    reasons = doc["quarantine_reasons"]
    assert isinstance(reasons, dict)
    assert set(reasons) == {*payloads, "device_mismatch"}
    assert doc["transactions"] == 0


@pytest.fixture
def pg_url() -> object:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (database test) is needed: {exc}")
    admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG}?options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def replay_in_parallel(
    tmp_path: Path, broker: Mosquitto, n: int, cards: int, rounds: int, *, db: str
) -> list[subprocess.Popen[str]]:
    procs = []
    for i in range(n):
        folder = tmp_path / f"validator{i}"
        folder.mkdir()
        config = folder / "devices.toml"
        config.write_text(re.sub(r'^id = "', f'id = "v{i}-', DEVICES, flags=re.MULTILINE))
        added = farelab("backend", "devices", "add", "--config", str(config), "--db", db)
        assert added.returncode == 0, added.stderr
        taps, _ = make_taps(folder, cards=cards, rounds=rounds, first_serial=1000 * (i + 1))
        taps.write_text(taps.read_text().replace('"device": "', f'"device": "v{i}-'))
        procs.append(
            start_farelab(
                "validator",
                "replay",
                "--config",
                str(config),
                "--taps",
                str(taps),
                "--journal",
                str(folder / "j.db"),
                "--broker",
                broker.url,
                "--upload-timeout",
                "90",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return procs


def spent(tmp_path: Path) -> int:
    return sum(50_000 - load_image(p).balance for p in tmp_path.glob("validator*/card*.json"))


def accepted(outputs: list[str]) -> int:
    return sum(json.loads(x)["result"] == "accepted" for out in outputs for x in out.splitlines())


def test_two_workers_with_postgresql_split_the_load_without_double_counting(
    broker: Mosquitto, tmp_path: Path, pg_url: str
) -> None:
    backend = start_backend(broker, pg_url, workers=2)
    try:
        procs = replay_in_parallel(tmp_path, broker, n=3, cards=6, rounds=6, db=pg_url)
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            outputs.append(out)
    finally:
        stop(backend)
    doc = report(pg_url)
    assert doc["transactions"] == accepted(outputs) == 3 * 6 * 6 * 3
    assert doc["purchase_fen"] == spent(tmp_path)
    with psycopg.connect(pg_url) as db:
        workers = db.execute("SELECT count(DISTINCT worker) FROM batches").fetchone()
    assert workers is not None
    assert workers[0] == 2


def test_broker_and_a_worker_killed_mid_upload_lose_and_double_nothing(
    broker: Mosquitto, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    backend = start_backend(broker, db, workers=2)
    try:
        procs = replay_in_parallel(tmp_path, broker, n=3, cards=10, rounds=8, db=db)
        time.sleep(1.5)
        broker.kill()  # the broker dies with messages in flight …
        children = subprocess.run(
            ["pgrep", "-P", str(backend.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        assert children
        os.kill(int(children[0]), signal.SIGKILL)  # … and so does a backend worker
        time.sleep(1.0)
        broker.start()  # same port: the uplinks and workers reconnect
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=150)
            assert proc.returncode == 0, err
            outputs.append(out)
    finally:
        stop(backend)
    doc = report(db)
    assert doc["transactions"] == accepted(outputs) == 3 * 10 * 8 * 3
    assert doc["purchase_fen"] == spent(tmp_path)
    assert (doc["gaps"], doc["forged"], doc["clones"], doc["balance_anomalies"]) == (0, 0, 0, 0)
    # exactly the journals' transactions, each once
    journalled = set()
    for path in tmp_path.glob("validator*/j.db"):
        journal = Journal(path)
        journalled |= {
            (t["device"], t["seq"], t["tac"])
            for t in journal.transactions()
            if t["status"] == "completed"
        }
        assert journal.outbox_rows == 0
        journal.close()
    ledger = Store(db)
    counted = set(
        ledger.execute("SELECT device, seq, tac FROM transactions WHERE verdict = 'ok'").fetchall()
    )
    ledger.close()
    assert counted == journalled

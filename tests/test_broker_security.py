"""Each device authenticates with its own credentials; the shipped ACL lets it publish only its
own uplink; TLS works end to end."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import aiomqtt
import pytest

from backend._mosquitto import Mosquitto
from backend._wire import Batch, Record, encode_batch
from tests.test_uplink_backend import farelab, make_taps, stop

ROOT = Path(__file__).resolve().parent.parent
SECRET = {"farelab-backend": "backend-pw", "bus-1": "bus1-pw", "gate-a": "ga-pw", "gate-b": "gb-pw"}
DEVICE = """
[[validator]]
id = "{id}"
kind = "bus"
network = "taiyuan"
terminal_id = "{terminal}"
whitelist = ["1310000000000000"]
mqtt_password = "{password}"
"""


def secured_broker(folder: Path, tls: str = "") -> Mosquitto:
    passwd = folder / "farelab.passwd"
    passwd.touch()
    for user, password in SECRET.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
    acl = folder / "farelab.acl"
    acl.write_text((resources.files("backend") / "mosquitto" / "farelab.acl").read_text())
    broker = Mosquitto(folder, extra=f"password_file {passwd}\nacl_file {acl}\n{tls}")
    conf = broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
    broker.conf.write_text(conf)
    broker.start()
    return broker


def backend(url: str, db: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "farelab", "backend", "run", "--broker", url, "--db", db],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def foreign_batch() -> bytes:
    r = Record(
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
        "000000000B02",
        "20261123",
        "080000",
        0,
        "00" * 8,
        0,
        "TAIYUAN",
        "00000000",
    )
    return encode_batch(Batch(1, "bus-2", (r,)))


async def publish(port: int, user: str, password: str, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", port, username=user, password=password, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        await client.publish(topic, payload, qos=1)


def ledger(db: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(farelab("backend", "report", "--db", db, "--json").stdout)
    return doc


def test_wrong_password_is_refused(tmp_path: Path) -> None:
    broker = secured_broker(tmp_path)
    try:
        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(publish(broker.port, "bus-1", "guess", "farelab/v1/dev/bus-1/tx", b"x"))
    finally:
        broker.stop()


def test_a_device_cannot_publish_as_another(tmp_path: Path) -> None:
    broker = secured_broker(tmp_path)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    proc = backend(broker.url.replace("mqtt://", "mqtt://farelab-backend:backend-pw@"), db)
    try:
        # bus-1 uploads a batch in bus-2's name, on bus-2's topic: the broker drops it
        asyncio.run(
            publish(broker.port, "bus-1", "bus1-pw", "farelab/v1/dev/bus-2/tx", foreign_batch())
        )
        # … while on its own topic the same bytes reach the backend (and are quarantined there,
        # since the batch names another device)
        asyncio.run(
            publish(broker.port, "bus-1", "bus1-pw", "farelab/v1/dev/bus-1/tx", foreign_batch())
        )
        time.sleep(1.5)
    finally:
        stop(proc)
        broker.stop()
    doc = ledger(db)
    assert doc["transactions"] == 0
    assert doc["quarantine_reasons"] == {"device_mismatch": 1}


def test_devices_with_their_own_credentials_over_tls(tmp_path: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca_key, ca, key, csr, crt = (
        str(tmp_path / n) for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem")
    )
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "2",
        "-subj",
        "/CN=farelab test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        "/CN=127.0.0.1",
    )
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        crt,
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    broker = secured_broker(tmp_path, tls=f"certfile {crt}\nkeyfile {key}\n")
    config = tmp_path / "devices.toml"
    config.write_text(DEVICE.format(id="bus-1", terminal="000000000B01", password=SECRET["bus-1"]))
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    proc = backend(f"mqtts://farelab-backend:backend-pw@127.0.0.1:{broker.port}?ca={ca}", db)
    try:
        taps, _ = make_taps(tmp_path, cards=2, rounds=2)
        lines = [x for x in taps.read_text().splitlines() if '"bus-1"' in x]
        taps.write_text("\n".join(lines) + "\n")
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
            f"mqtts://127.0.0.1:{broker.port}?ca={ca}",
        )
        assert result.returncode == 0, result.stderr
    finally:
        stop(proc)
        broker.stop()
    assert ledger(db)["transactions"] == 4

"""The broker keeps each account to its role and its own id: the configuration `farelab backend
broker-config` writes from the device registry, against a real Mosquitto; each device
authenticates with its own credentials; TLS works end to end."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from farelab.backend._brokerconfig import Account, acl_text, mosquitto_conf
from farelab.backend._mosquitto import Mosquitto, free_port
from farelab.backend._params import publish_params
from farelab.backend._registry import DeviceEntry, hash_secret, register, revoke
from farelab.backend._store import Store
from farelab.protocol import (
    DEVICE_CLIENT_ID,
    KIOSK_CLIENT_ID,
    MAX_PACKET_SIZE,
    Batch,
    BrokerURL,
    LinkState,
    ParamsMessage,
    Record,
    cancel_and_wait,
    encode_batch,
)
from farelab.topup._host import HostUnreachableError, MqttHost
from farelab.validator._journal import Journal
from farelab.validator._uplink import MqttUplink
from tests.cli_support import ROOT, farelab, start_farelab
from tests.test_uplink_backend import make_taps, stop

SECRET = {
    "farelab-backend": "backend-pw",
    "bus-1": "bus1-pw",
    "bus-2": "bus2-pw",
    "kiosk-1": "k1-pw",
    "kiosk-2": "k2-pw",
}
DEVICE = """
[[validator]]
id = "{id}"
kind = "bus"
network = "taiyuan"
operator = "TYBUS"
terminal_id = "{terminal}"
whitelist = ["1310000000000000"]
mqtt_password = "{password}"
"""


def registry(db: str) -> None:
    """Two validators and two kiosks with passwords; bus-3 revoked; kiosk-3 without one."""
    store = Store(db)
    try:
        for n, device in enumerate(("bus-1", "bus-2", "bus-3"), 1):
            entry = DeviceEntry(device, "validator", "TYBUS", frozenset({"bus"}), f"000000000B0{n}")
            register(store, entry, secret_hash=hash_secret(SECRET.get(device, "bus3-pw")))
        revoke(store, "bus-3")
        for n, kiosk in enumerate(("kiosk-1", "kiosk-2", "kiosk-3"), 1):
            entry = DeviceEntry(kiosk, "kiosk", "TYKIOSK", frozenset({"load"}), f"F0000000000{n}")
            secret = hash_secret(SECRET[kiosk]) if kiosk in SECRET else ""
            register(store, entry, secret_hash=secret)
    finally:
        store.close()


def secured_broker(
    folder: Path,
    *,
    fmt: str = "dynsec",
    tls: Sequence[str] = (),
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Mosquitto:
    """A Mosquitto on the configuration `broker-config` writes from :func:`registry`'s ledger
    (``folder/ledger.db``); ``edit`` changes its dynamic-security document first (a broker
    misconfigured by hand)."""
    db = f"sqlite:///{folder / 'ledger.db'}"
    registry(db)
    port = free_port()
    out = folder / "broker"
    result = farelab(
        "backend",
        "broker-config",
        "--db",
        db,
        "--out",
        str(out),
        "--backend-password",
        SECRET["farelab-backend"],
        "--listener",
        f"127.0.0.1:{port}",
        "--format",
        fmt,
        *tls,
    )
    assert result.returncode == 0, result.stderr
    assert "left out (revoked, or registered without a password): bus-3, kiosk-3" in result.stdout
    if edit is not None:
        document = out / "dynamic-security.json"
        doc = json.loads(document.read_text())
        edit(doc)
        document.write_text(json.dumps(doc))
    broker = Mosquitto(folder, config=(out / "farelab.conf").read_text(), port=port)
    broker.start()
    return broker


def own_client_id(user: str | None) -> str | None:
    """The client id the broker lets a validator's or kiosk's account use (the backend's: any)."""
    if user and user.startswith("bus-"):
        return DEVICE_CLIENT_ID.format(device=user)
    if user and user.startswith("kiosk-"):
        return KIOSK_CLIENT_ID.format(kiosk=user)
    return None


def without_grant(topic: str) -> Callable[[dict[str, Any]], None]:
    """An edit that takes the grant to subscribe to ``topic`` away from its account's role."""

    def edit(doc: dict[str, Any]) -> None:
        for role in doc["roles"]:
            role["acls"] = [acl for acl in role["acls"] if acl["topic"] != topic]

    return edit


def login(port: int, user: str | None, password: str | None = None) -> aiomqtt.Client:
    if user is not None and password is None:
        password = SECRET[user]
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=password,
        identifier=own_client_id(user),
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=5,
    )


def backend(url: str, db: str) -> subprocess.Popen[str]:
    proc = start_farelab(
        "backend",
        "run",
        "--broker",
        url,
        "--db",
        db,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def foreign_batch() -> bytes:
    r = Record.from_text(
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
            "000000000B02",
            "20261123",
            "080000",
            0,
            "00" * 8,
            0,
            "TAIYUAN",
            "00000000",
        )
    )
    return encode_batch(Batch(1, "bus-2", (r,)))


async def publish(port: int, user: str, password: str, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=password,
        identifier=own_client_id(user),
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.publish(topic, payload, qos=1)


def ledger(db: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(farelab("backend", "report", "--db", db, "--json").stdout)
    return doc


async def test_wrong_password_is_refused(tmp_path: Path) -> None:
    broker = secured_broker(tmp_path)
    try:
        with pytest.raises(aiomqtt.MqttError):
            await publish(broker.port, "bus-1", "guess", "farelab/v1/dev/bus-1/tx", b"x")
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("user", "password"),
    [
        (None, None),  # anonymous
        ("bus-9", "any"),  # not registered
        ("bus-3", "bus3-pw"),  # revoked
        ("kiosk-3", ""),  # registered without a password
        ("farelab-backend", "bus1-pw"),  # another account's password
    ],
)
async def test_only_registered_accounts_log_in(
    tmp_path: Path, user: str | None, password: str
) -> None:
    broker = secured_broker(tmp_path)
    try:
        with pytest.raises(aiomqtt.MqttCodeError) as refused:
            async with login(broker.port, user, password):
                pass
        assert refused.value.rc in (134, 135)  # bad user name or password / not authorized
    finally:
        broker.stop()


# topic → (account, the topics it publishes to in vain, one of its own topics)
OUTSIDE_PUBLISH = {
    "bus-1": (
        "farelab/v1/dev/bus-2/tx",
        "farelab/v1/dev/bus-2/status",
        "farelab/v1/dev/bus-1/ack",
        "farelab/v1/dev/bus-1/params",
        "farelab/v1/dev/bus-2/params",
        "farelab/v1/kiosk/bus-1/load/req",
        "farelab/v1/kiosk/kiosk-1/load/req",
        "farelab/v1/kiosk/kiosk-1/load/resp",
        "farelab/v1/dev/bus-1/tx/more",
        "farelab/v2/dev/bus-1/tx",
    ),
    "kiosk-1": (
        "farelab/v1/dev/kiosk-1/tx",
        "farelab/v1/dev/kiosk-1/status",
        "farelab/v1/dev/bus-1/tx",
        "farelab/v1/dev/bus-1/params",
        "farelab/v1/kiosk/kiosk-2/load/req",
        "farelab/v1/kiosk/kiosk-1/load/resp",
        "farelab/v1/kiosk/kiosk-2/load/resp",
    ),
}
OWN_TOPIC = {"bus-1": "farelab/v1/dev/bus-1/status", "kiosk-1": "farelab/v1/kiosk/kiosk-1/load/req"}


async def publishes_seen(port: int, user: str, topics: Sequence[str], own: str) -> list[str]:
    """Publish to each topic as ``user``, then to its own topic; the topics the backend account
    (subscribed to all of ``farelab/#``) saw before that last message, which comes after any
    earlier one the broker let through (one publisher's messages keep their order)."""
    async with login(port, "farelab-backend") as observer:
        granted = await observer.subscribe("farelab/#", qos=1)
        assert [rc.value for rc in granted] == [1]  # type: ignore[union-attr]
        async with login(port, user) as client:
            for topic in topics:
                await client.publish(topic, f"from {user}".encode(), qos=1)
            await client.publish(own, b"last", qos=1)
        seen: list[str] = []
        async for message in observer.messages:
            if str(message.topic) == own and message.payload == b"last":
                return seen
            seen.append(str(message.topic))
    raise AssertionError("unreachable")


@pytest.mark.parametrize("fmt", ["dynsec", "acl"])
@pytest.mark.parametrize("user", ["bus-1", "kiosk-1"])
async def test_each_role_is_refused_every_publish_outside_it(
    tmp_path: Path, user: str, fmt: str
) -> None:
    broker = secured_broker(tmp_path, fmt=fmt)
    try:
        seen = await publishes_seen(broker.port, user, OUTSIDE_PUBLISH[user], OWN_TOPIC[user])
    finally:
        broker.stop()
    assert seen == []


# account → (filters refused at SUBACK, filters granted)
SUBSCRIBE = {
    "bus-1": (
        (
            "$share/farelab-backend/farelab/v1/dev/+/tx",
            "$share/farelab-backend/farelab/v1/kiosk/+/load/req",
            "$share/farelab-backend/farelab/v1/dev/bus-1/tx",
            "$share/g/farelab/v1/dev/bus-1/ack",
            "farelab/v1/dev/+/tx",
            "farelab/v1/dev/+/ack",
            "farelab/v1/dev/bus-1/+",
            "farelab/v1/dev/bus-1/tx",
            "farelab/v1/dev/bus-2/ack",
            "farelab/v1/dev/bus-2/params",
            "farelab/v1/kiosk/kiosk-1/load/resp",
            "farelab/v1/kiosk/+/load/req",
            "farelab/#",
            "#",
            "$SYS/#",
        ),
        ("farelab/v1/dev/bus-1/ack", "farelab/v1/dev/bus-1/params"),
    ),
    "kiosk-1": (
        (
            "$share/farelab-backend/farelab/v1/kiosk/+/load/req",
            "$share/farelab-backend/farelab/v1/dev/+/tx",
            "farelab/v1/kiosk/+/load/resp",
            "farelab/v1/kiosk/kiosk-1/load/req",
            "farelab/v1/kiosk/kiosk-2/load/resp",
            "farelab/v1/kiosk/kiosk-1/#",
            "farelab/v1/dev/kiosk-1/ack",
            "farelab/v1/dev/kiosk-1/params",
            "farelab/#",
            "#",
        ),
        ("farelab/v1/kiosk/kiosk-1/load/resp",),
    ),
    "farelab-backend": (
        ("#", "other/#", "$SYS/#", "$share/someone-else/farelab/v1/dev/+/tx", "$share/g/#"),
        (
            "farelab/#",
            "$share/farelab-backend/farelab/v1/dev/+/tx",
            "$share/farelab-backend/farelab/v1/kiosk/+/load/req",
        ),
    ),
}


@pytest.mark.parametrize("user", list(SUBSCRIBE))
async def test_each_role_is_refused_every_subscription_outside_it(
    tmp_path: Path, user: str
) -> None:
    """Refused at SUBACK (reason code 0x87), not granted and then starved at delivery: a
    device in the backend's shared group would be handed other devices' batches, which the
    broker then drops, and every upload would stall."""
    refused, granted = SUBSCRIBE[user]
    broker = secured_broker(tmp_path)

    async def codes(filters: Sequence[str]) -> list[int]:
        async with login(broker.port, user) as client:
            return [(await client.subscribe(f, qos=1))[0].value for f in filters]  # type: ignore[union-attr]

    try:
        assert await codes(refused) == [0x87] * len(refused)
        assert await codes(granted) == [1] * len(granted)
    finally:
        broker.stop()


async def test_a_packet_over_the_size_limit_never_reaches_the_backend(tmp_path: Path) -> None:
    broker = secured_broker(tmp_path)

    async def oversize() -> None:
        async with login(broker.port, "bus-1") as client:
            await client.publish("farelab/v1/dev/bus-1/tx", bytes(MAX_PACKET_SIZE), qos=0)
            await client.publish("farelab/v1/dev/bus-1/tx", b"after", qos=1)

    async def attempt() -> list[int]:
        async with login(broker.port, "farelab-backend") as observer:
            await observer.subscribe("farelab/v1/dev/+/tx", qos=1)
            with pytest.raises(aiomqtt.MqttError):  # the broker disconnects the sender
                await oversize()
            async with login(broker.port, "bus-1") as client:
                await client.publish("farelab/v1/dev/bus-1/tx", b"last", qos=1)
            sizes: list[int] = []
            async for message in observer.messages:
                if message.payload == b"last":
                    return sizes
                sizes.append(len(bytes(message.payload)))
        raise AssertionError("unreachable")

    try:
        assert await attempt() == []
    finally:
        broker.stop()


async def test_a_device_cannot_publish_as_another(tmp_path: Path) -> None:
    broker = secured_broker(tmp_path)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    proc = backend(broker.url.replace("mqtt://", "mqtt://farelab-backend:backend-pw@"), db)
    try:
        # bus-1 uploads a batch in bus-2's name, on bus-2's topic: the broker drops it
        await publish(broker.port, "bus-1", "bus1-pw", "farelab/v1/dev/bus-2/tx", foreign_batch())
        # … while on its own topic the same bytes reach the backend (and are quarantined there,
        # since the batch names another device)
        await publish(broker.port, "bus-1", "bus1-pw", "farelab/v1/dev/bus-1/tx", foreign_batch())
        await asyncio.sleep(1.5)
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
    broker = secured_broker(tmp_path, tls=("--certfile", crt, "--keyfile", key))
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


def run_briefly(url: str, db: str) -> str:
    """``backend run`` until its worker is connected; its stderr."""
    proc = start_farelab(
        "backend",
        "run",
        "--broker",
        url,
        "--db",
        db,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "ingesting from" in line or "Traceback" in line:
            break
    stop(proc)
    return "".join(lines) + proc.stderr.read()


def test_backend_run_warns_loudly_on_a_broker_that_lets_anyone_in(
    broker: Mosquitto, tmp_path: Path
) -> None:
    err = run_briefly(broker.url, f"sqlite:///{tmp_path / 'ledger.db'}")
    assert "WARNING: the broker" in err
    assert "(anonymous, any password)" in err
    assert "load cards (up to 1000 yuan each) as any kiosk" in err
    assert "farelab backend broker-config" in err


def test_backend_run_does_not_warn_on_the_secured_broker(tmp_path: Path) -> None:
    broker = secured_broker(tmp_path)
    url = f"mqtt://farelab-backend:backend-pw@127.0.0.1:{broker.port}"
    try:
        err = run_briefly(url, f"sqlite:///{tmp_path / 'ledger.db'}")
    finally:
        broker.stop()
    assert "ingesting from" in err
    assert "WARNING" not in err


async def test_an_oversize_load_request_is_quarantined_unread(tmp_path: Path) -> None:
    broker = secured_broker(tmp_path)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    proc = backend(f"mqtt://farelab-backend:backend-pw@127.0.0.1:{broker.port}", db)

    async def ask() -> list[dict[str, object]]:
        async with login(broker.port, "kiosk-1") as kiosk:
            await kiosk.subscribe("farelab/v1/kiosk/kiosk-1/load/resp", qos=1)
            req = "farelab/v1/kiosk/kiosk-1/load/req"
            await kiosk.publish(req, json.dumps({"id": "x" * 20_000, "op": "void"}), qos=1)
            await kiosk.publish(req, b"[]", qos=1)
            answers = []
            async for message in kiosk.messages:
                answers.append(json.loads(bytes(message.payload)))
                if len(answers) == 2:
                    return answers
        raise AssertionError("unreachable")

    try:
        first, second = await ask()
    finally:
        stop(proc)
        broker.stop()
    assert first["reason"] == "oversize"
    assert second["reason"] == "malformed"  # an ordinary answer: the backend reads this kiosk
    assert ledger(db)["quarantine_reasons"] == {"oversize": 1}


def test_a_bad_group_device_or_ca_file_is_a_one_line_error(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    Store(db).close()
    runs = {
        "--group": farelab(
            "backend", "run", "--broker", "mqtt://127.0.0.1:1", "--db", db, "--group", "a/#"
        ),
        "--device": farelab(
            "backend", "params", "--broker", "mqtt://127.0.0.1:1", "--db", db, "--device", "a/#"
        ),
        "CA file": farelab(
            "backend",
            "run",
            "--broker",
            f"mqtts://127.0.0.1:1?ca={tmp_path / 'no.pem'}",
            "--db",
            db,
        ),
    }
    for what, result in runs.items():
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert what in result.stderr


def test_workers_stop_the_backend_on_a_configuration_error(tmp_path: Path) -> None:
    """A worker that cannot use its broker URL (here: the CA file went away after the start
    check) stops the backend with status 2; it is not started again and again."""
    code = (
        "import sys; from backend._service import run_workers; "
        "sys.exit(run_workers(sys.argv[1], sys.argv[2], issuers={}, workers=2))"
    )
    url = f"mqtts://127.0.0.1:1?ca={tmp_path / 'gone.pem'}"
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    result = subprocess.run(
        [sys.executable, "-c", code, url, db],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "starting it again" not in result.stderr
    assert "Traceback" not in result.stderr
    assert "gone.pem: No such file or directory" in result.stderr


def test_broker_config_refuses_what_mosquitto_could_not_use(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    store = Store(db)
    entry = DeviceEntry("bus-1", "validator", "TYBUS", frozenset({"bus"}), "000000000B01")
    register(store, entry, secret_hash="pbkdf2-sha512$101$c2FsdA==$aGFzaA==")
    store.close()
    out = str(tmp_path / "broker")
    cases = {
        "--listener": ("--listener", "localhost"),
        "bus-1: its secret": (),
        "--group": ("--group", "a/#"),
    }
    for what, extra in cases.items():
        result = farelab("backend", "broker-config", "--db", db, "--out", out, *extra)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert what.split(":")[0].lstrip("-") in result.stderr, result.stderr
    assert not (tmp_path / "broker" / "farelab.conf").exists()
    missing = farelab(
        "backend", "broker-config", "--db", f"sqlite:///{tmp_path / 'no.db'}", "--out", out
    )
    assert missing.returncode == 2
    assert "no farelab ledger" in missing.stderr
    assert not (tmp_path / "no.db").exists()


def test_the_shipped_files_are_what_broker_config_writes() -> None:
    """``backend/mosquitto/farelab.conf`` and ``farelab.acl`` are examples of the command's
    output (its defaults; a validator bus-1 and a kiosk kiosk-1), kept from drifting."""
    shipped = ROOT / "backend" / "mosquitto"
    conf = mosquitto_conf(
        folder=Path("/etc/mosquitto/farelab"),
        listener=("127.0.0.1", 1883),
        plugin="/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    )
    example = [
        Account("farelab-backend", "backend", ""),
        Account("bus-1", "validator", ""),
        Account("kiosk-1", "kiosk", ""),
    ]
    assert (shipped / "farelab.conf").read_text().split("\n", 1)[1] == conf
    assert (shipped / "farelab.acl").read_text().split("\n", 1)[1] == acl_text(example)


async def test_parameters_over_the_broker_limit_are_refused_before_sending() -> None:
    big = ParamsMessage(1, frozenset(str(n).rjust(20, "0") for n in range(180_000)))
    nowhere = BrokerURL("127.0.0.1", 1)  # never reached: the size is checked first
    with pytest.raises(ValueError, match="more than the broker takes"):
        await publish_params(nowhere, big, ["bus-1"])


@pytest.mark.parametrize(
    ("login_as", "group"),
    [("farelab-backend:backend-pw", "another-group"), ("bus-1:bus1-pw", "farelab-backend")],
)
def test_a_backend_the_broker_refuses_to_feed_stops_saying_why(
    tmp_path: Path, login_as: str, group: str
) -> None:
    """Not a worker that waits for ever on a subscription the broker refused."""
    broker = secured_broker(tmp_path)
    url = f"mqtt://{login_as}@127.0.0.1:{broker.port}"
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    try:
        result = farelab("backend", "run", "--broker", url, "--db", db, "--group", group)
    finally:
        broker.stop()
    assert result.returncode == 2
    if login_as.startswith("bus-1"):  # a validator's account may use its own client id only
        assert "the broker refused the login ([code:135] Not authorized)" in result.stderr
    else:
        assert f"the broker refused the subscription $share/{group}/" in result.stderr
    assert "starting it again" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_kiosk_whose_answers_it_may_not_read_is_told_at_once(tmp_path: Path) -> None:
    """A broker that does not let the kiosk read `…/load/resp`: the refused SUBACK is the
    answer (host unreachable, with the reason), not a wait until the timeout."""
    broker = secured_broker(tmp_path, edit=without_grant("farelab/v1/kiosk/kiosk-1/load/resp"))
    host = MqttHost(
        BrokerURL.parse(f"mqtt://kiosk-1:{SECRET['kiosk-1']}@127.0.0.1:{broker.port}"),
        "kiosk-1",
        timeout=30,
    )
    try:
        started = time.monotonic()
        with pytest.raises(HostUnreachableError, match=r"refused the subscription.*0x87"):
            await host.call({"id": "x", "op": "authorize"})
        assert time.monotonic() - started < 25  # the refusal, not the 30 s timeout, ended it
    finally:
        broker.stop()


async def test_an_uplink_refused_its_acks_backs_off_instead_of_resending_for_ever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that does not let bus-1 read its acks: the uplink says why and retries later
    rather than publishing batches it can never see acknowledged."""
    broker = secured_broker(tmp_path, edit=without_grant("farelab/v1/dev/bus-1/ack"))
    url = BrokerURL.parse(f"mqtt://bus-1:{SECRET['bus-1']}@127.0.0.1:{broker.port}")

    try:
        with caplog.at_level("WARNING", logger="farelab.uplink"):
            journal = Journal(tmp_path / "j.db")
            uplink = MqttUplink(url, ["bus-1"])
            task = asyncio.create_task(uplink.run(journal))
            try:
                for _ in range(100):
                    if uplink.stats["bus-1"].state is LinkState.BACKOFF:
                        break
                    await asyncio.sleep(0.05)
                assert uplink.stats["bus-1"].state is LinkState.BACKOFF
            finally:
                await cancel_and_wait(task)
                journal.close()
        assert "refused the subscription farelab/v1/dev/bus-1/ack (reason 0x87)" in caplog.text
    finally:
        broker.stop()


@pytest.mark.parametrize("user", ["bus-1", "kiosk-1"])
@pytest.mark.parametrize(
    "identifier",
    [
        "farelab-dev-bus-2",
        "farelab-kiosk-kiosk-2",
        "farelab-backend-somehost-abc123-w1",
        "anything-else",
    ],
)
async def test_a_device_or_kiosk_account_may_use_only_its_own_client_id(
    tmp_path: Path, user: str, identifier: str
) -> None:
    """A second connection under a client id throws the first off: bus-1's or kiosk-1's
    account must not be able to take another validator's, kiosk's or backend worker's session
    over, again and again."""
    broker = secured_broker(tmp_path)

    async def attempt(client_id: str | None) -> None:
        async with aiomqtt.Client(
            "127.0.0.1",
            broker.port,
            username=user,
            password=SECRET[user],
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=5,
        ):
            pass

    try:
        await attempt(own_client_id(user))
        with pytest.raises(aiomqtt.MqttCodeError) as refused:
            await attempt(identifier)
        assert refused.value.rc == 135  # not authorized
    finally:
        broker.stop()

"""The bridged topology's configurations: each line broker admits its own devices and forwards
exactly their topics over a persistent bridge; the central broker admits the backend and each
bridge for exactly what it forwards; and the sample under ``deploy/mosquitto`` is what the code
writes.

``python -m tests.test_city_topology`` writes the sample again after a change to the code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from farelab.backend import hash_secret
from farelab.city import CENTRAL, BridgedTopology, CentralTLS, bridge_account, line_broker
from farelab.validator import load_config
from tests.cli_support import ROOT

SAMPLE_FOLDER = ROOT / "deploy" / "mosquitto"
#: The sample's placeholder passwords (deploy/devices.toml has the devices'); a real deployment
#: writes its files from its own registry.
SAMPLE_PASSWORDS = {
    "farelab-backend": "change-me-backend",
    "gate-a": "change-me-gate-a",
    "gate-b": "change-me-gate-b",
}
SAMPLE_BRIDGE_PASSWORD = "change-me-bridge-L2"
_SAMPLE_SALT = b"farelab-demo"  # the sample's files come out the same each time


@dataclass(frozen=True)
class Login:
    username: str
    role: str
    secret_hash: str


def login(username: str, role: str, password: str, salt: bytes | None = None) -> Login:
    return Login(username, role, hash_secret(password, salt=salt))


def sample() -> BridgedTopology:
    """The deployment sample: a central broker and line L2's station computer, each in a
    container of its own, two gates behind the station computer."""
    roles = {"farelab-backend": "backend", "gate-a": "validator", "gate-b": "validator"}
    return BridgedTopology(
        central_port=1883,
        lines={"L2": (1883, ["gate-a", "gate-b"])},
        folder=Path("/etc/farelab/mosquitto"),
        logins=[login(u, r, SAMPLE_PASSWORDS[u], _SAMPLE_SALT) for u, r in roles.items()],
        bridge_passwords={"L2": SAMPLE_BRIDGE_PASSWORD},
        listen_host="0.0.0.0",
        central_host="central",
        data=Path("/mosquitto/data"),
        salt=_SAMPLE_SALT,
    )


def city() -> BridgedTopology:
    logins = [
        login("farelab-backend", "backend", "pw"),
        login("bus-1", "validator", "pw1"),
        login("bus-2", "validator", "pw2"),
        login("bus-3", "validator", "pw3"),
        login("kiosk-1", "kiosk", "pwk"),
        login("kiosk-2", "kiosk", "pwk2"),
    ]
    return BridgedTopology(
        central_port=2000,
        lines={"L1": (2001, ["bus-1", "kiosk-1"]), "L2": (2002, ["bus-2"])},
        folder=Path("/srv/brokers"),
        logins=logins,
        bridge_passwords={"L1": "bridge-L1-secret", "L2": "bridge-L2-secret"},
    )


def options(text: str, name: str) -> list[str]:
    """The values of every ``name`` line of a Mosquitto configuration."""
    return [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")]


def acl_blocks(text: str) -> dict[str, list[str]]:
    """Each user's ``topic`` lines of an acl_file."""
    blocks: dict[str, list[str]] = {}
    user = ""
    for line in text.splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            blocks[user] = []
        elif line.startswith("topic "):
            blocks[user].append(line.split(" ", 1)[1])
    return blocks


def usernames(passwd: str) -> list[str]:
    return [line.split(":")[0] for line in passwd.splitlines()]


def test_a_line_bridge_forwards_exactly_its_own_devices_topics() -> None:
    conf = city().configs()["line-L1/mosquitto.conf"]
    assert options(conf, "topic") == [
        "farelab/v1/dev/bus-1/tx out 1",
        "farelab/v1/dev/bus-1/status out 1",
        "farelab/v1/kiosk/kiosk-1/load/req out 1",
        "farelab/v1/dev/bus-1/ack in 1",
        "farelab/v1/dev/bus-1/params in 1",
        "farelab/v1/kiosk/kiosk-1/load/resp in 1",
    ]


def test_a_line_bridge_keeps_its_session_through_a_central_outage() -> None:
    conf = city().configs()["line-L1/mosquitto.conf"]
    assert options(conf, "connection") == [bridge_account("L1")]
    assert options(conf, "address") == ["127.0.0.1:2000"]
    assert options(conf, "remote_clientid") == [bridge_account("L1")]
    assert options(conf, "remote_username") == [bridge_account("L1")]
    assert options(conf, "remote_password") == ["bridge-L1-secret"]
    assert options(conf, "cleansession") == ["false"]
    assert options(conf, "try_private") == ["true"]
    assert options(conf, "bridge_attempt_unsubscribe") == ["false"]
    assert options(conf, "bridge_protocol_version") == ["mqttv311"]
    assert options(conf, "persistence") == ["true"]
    assert options(conf, "persistence_location") == ["/srv/brokers/line-L1/"]
    assert int(options(conf, "max_queued_messages")[0]) >= 100_000


def test_each_device_logs_in_at_its_own_line_broker_only() -> None:
    files = city().configs()
    assert usernames(files["line-L1/farelab.passwd"]) == ["bus-1", "kiosk-1"]
    assert usernames(files["line-L2/farelab.passwd"]) == ["bus-2"]
    assert usernames(files[f"{CENTRAL}/farelab.passwd"]) == [
        "farelab-backend",
        "bus-3",
        "kiosk-2",
        bridge_account("L1"),
        bridge_account("L2"),
    ]
    assert acl_blocks(files["line-L1/farelab.acl"]) == {
        "bus-1": [
            "write farelab/v1/dev/bus-1/tx",
            "write farelab/v1/dev/bus-1/status",
            "read farelab/v1/dev/bus-1/ack",
            "read farelab/v1/dev/bus-1/params",
        ],
        "kiosk-1": [
            "write farelab/v1/kiosk/kiosk-1/load/req",
            "read farelab/v1/kiosk/kiosk-1/load/resp",
        ],
    }
    for name in ("line-L1", "line-L2", CENTRAL):
        conf = files[f"{name}/mosquitto.conf"]
        assert options(conf, "allow_anonymous") == ["false"]
        assert options(conf, "password_file") == [f"/srv/brokers/{name}/farelab.passwd"]
        assert options(conf, "acl_file") == [f"/srv/brokers/{name}/farelab.acl"]


def test_a_bridge_account_may_do_only_what_its_line_forwards() -> None:
    blocks = acl_blocks(city().configs()[f"{CENTRAL}/farelab.acl"])
    assert blocks[bridge_account("L2")] == [
        "write farelab/v1/dev/bus-2/tx",
        "write farelab/v1/dev/bus-2/status",
        "read farelab/v1/dev/bus-2/ack",
        "read farelab/v1/dev/bus-2/params",
    ]
    assert blocks["farelab-backend"] == ["readwrite farelab/#"]
    assert set(blocks) == {
        "farelab-backend",
        "bus-3",
        "kiosk-2",
        "farelab-bridge-L1",
        "farelab-bridge-L2",
    }


def test_a_bridge_password_is_in_clear_only_where_the_bridge_logs_in_with_it() -> None:
    files = city().configs()
    line = next(x for x in files["central/farelab.passwd"].splitlines() if "bridge-L1" in x)
    assert line.startswith(f"{bridge_account('L1')}:$7$101$")
    for name, text in files.items():
        assert ("bridge-L1-secret" in text) == (name == "line-L1/mosquitto.conf"), name


def test_the_bridges_cross_the_network_over_tls_when_asked() -> None:
    plain = city()
    tls = CentralTLS("/etc/ssl/central.pem", "/etc/ssl/central.key", "/etc/ssl/ca.pem")
    files = BridgedTopology(
        central_port=8883,
        lines=plain.lines,
        folder=plain.folder,
        logins=plain.logins,
        bridge_passwords=plain.bridge_passwords,
        tls=tls,
    ).configs()
    central = files[f"{CENTRAL}/mosquitto.conf"]
    assert options(central, "listener") == ["8883 127.0.0.1"]
    assert options(central, "certfile") == [tls.certfile]
    assert options(central, "keyfile") == [tls.keyfile]
    for line in ("line-L1", "line-L2"):
        assert options(files[f"{line}/mosquitto.conf"], "bridge_cafile") == [tls.cafile]
        assert options(files[f"{line}/mosquitto.conf"], "address") == ["127.0.0.1:8883"]
    assert "bridge_cafile" not in plain.configs()["line-L1/mosquitto.conf"]


def test_each_device_is_pointed_at_its_line_broker() -> None:
    topology = city()
    assert topology.device_broker("bus-1") == topology.device_broker("kiosk-1") == 2001
    assert topology.device_broker("bus-2") == 2002
    assert topology.device_broker("bus-3") == 2000


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ({"L1": (2001, ["bus-1"]), "L2": (2002, ["bus-1"])}, "on lines L1 and L2"),
        ({"L1": (2001, ["bus-9"])}, "bus-9 on line L1 has no validator or kiosk account"),
        ({"L1": (2001, ["farelab-backend"])}, "has no validator or kiosk account"),
        ({"L/1": (2001, ["bus-1"])}, "line 'L/1' must be"),
        ({"L3": (2003, ["bus-1"])}, "line L3: its bridge has no password"),
    ],
)
def test_a_topology_no_broker_could_run_is_refused(
    lines: dict[str, tuple[int, list[str]]], message: str
) -> None:
    base = city()
    with pytest.raises(ValueError, match=message):
        BridgedTopology(
            central_port=2000,
            lines=lines,
            folder=base.folder,
            logins=base.logins,
            bridge_passwords={"L1": "x", "L2": "y", "L/1": "z"},
        )


def test_the_deployment_sample_is_what_the_code_writes() -> None:
    """``deploy/mosquitto`` is mounted by ``deploy/compose.yaml``; it must not drift from the
    code (write it again with ``python -m tests.test_city_topology``)."""
    files = sample().configs()
    shipped = sorted(str(p.relative_to(SAMPLE_FOLDER)) for p in SAMPLE_FOLDER.rglob("*.*"))
    assert shipped == sorted(files)
    for name, text in files.items():
        assert (SAMPLE_FOLDER / name).read_text(encoding="utf-8") == text, name
    assert line_broker("L2") in {name.split("/")[0] for name in files}


def test_the_compose_file_runs_the_sample_with_its_passwords() -> None:
    """``deploy/compose.yaml`` mounts each broker's sample folder where its configuration says
    it is, and its placeholder passwords, like ``deploy/devices.toml``'s, are the ones the
    sample's password hashes were made from."""
    compose = (ROOT / "deploy" / "compose.yaml").read_text(encoding="utf-8")
    topology = sample()
    for service, broker in (("central", CENTRAL), ("station-l2", line_broker("L2"))):
        here = topology.folder / broker
        assert f"  {service}:\n    image: eclipse-mosquitto:2\n" in compose
        assert f'command: ["mosquitto", "-c", "{here / "mosquitto.conf"}"]' in compose
        assert f"- ./mosquitto/{broker}:{here}:ro\n" in compose
        assert f"- {service}-data:{topology.data}\n" in compose
    password = f"${{FARELAB_BACKEND_PASSWORD:-{SAMPLE_PASSWORDS['farelab-backend']}}}"
    assert f"- mqtt://farelab-backend:{password}@central:1883\n" in compose
    devices = load_config(ROOT / "deploy" / "devices.toml").devices
    assert {d.device.id: d.mqtt_password for d in devices} == {
        d: SAMPLE_PASSWORDS[d] for d in topology.lines["L2"][1]
    }


if __name__ == "__main__":
    for name, text in sample().configs().items():
        (SAMPLE_FOLDER / name).parent.mkdir(parents=True, exist_ok=True)
        (SAMPLE_FOLDER / name).write_text(text, encoding="utf-8")
        print(f"wrote {SAMPLE_FOLDER / name}")

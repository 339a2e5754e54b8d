"""Station computers: a Mosquitto per line between its devices and a central Mosquitto, bridged
with persistent sessions, as :class:`BridgedTopology` writes their configurations.

Each device logs in to its line's broker only, with its own account and the grants of its role
(as ``farelab backend broker-config`` gives them).  The line broker forwards exactly its own
devices' topics to the central broker over one bridge: ``tx``, ``status`` and a kiosk's
``load/req`` out; ``ack``, ``params`` and ``load/resp`` in, all at QoS 1.  The central broker
admits the backend's account, one bridge account per line, allowed exactly the topics that line
forwards, and any device that is on no line.

What a central outage does: devices keep publishing to their line broker, which queues every QoS
1 message for the bridge (``cleansession false`` keeps the bridge's local session, and its queue,
while it is down; ``max_queued_messages`` sizes it) and sends the queue when the bridge is back.
On the central side the bridge's session (its subscriptions to the acks and parameters) is kept
too, so acks the backend publishes while a line is cut off wait for it.  A message the central
broker had taken but not yet passed on when it died is not lost either: no ack comes back, and
the device sends the batch again from its journal (the backend counts it once).

Retained parameters reach a device that subscribes after the bridge connected: the bridge
subscribes to the device's ``params`` on the central broker, which sends the retained message
with its retain flag; ``try_private`` tells the central broker that the client is a bridge, so
it also keeps the flag on live messages, and the line broker stores the message as retained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from farelab.backend import BACKEND_ACCOUNT, Account, grants, hash_secret
from farelab.protocol import (
    MAX_PACKET_SIZE,
    check_client_id,
)

__all__ = [
    "CENTRAL",
    "BridgedTopology",
    "BrokerLogin",
    "CentralTLS",
    "bridge_account",
    "line_broker",
]

#: The central broker's name: its files are ``central/…`` in :meth:`BridgedTopology.configs`.
CENTRAL = "central"
_CONF = "mosquitto.conf"
_PASSWD = "farelab.passwd"  # noqa: S105 (a file name)
_ACL = "farelab.acl"
_ROLES = ("validator", "kiosk", "backend")


class BrokerLogin(Protocol):
    """One broker account as the registry gives it (the backend's ``Account`` is one)."""

    @property
    def username(self) -> str:
        """The device id, or the backend's account name."""

    @property
    def role(self) -> str:
        """``validator``, ``kiosk`` or ``backend``."""

    @property
    def secret_hash(self) -> str:
        """``pbkdf2-sha512$ITERATIONS$SALT_B64$HASH_B64``, the registry's form."""


def line_broker(line: str) -> str:
    """A line broker's name, which names its folder in :meth:`BridgedTopology.configs`."""
    return f"line-{line}"


def bridge_account(line: str) -> str:
    """The account (and client id, on the central broker) of a line's bridge."""
    return f"farelab-bridge-{line}"


def _forwarded(username: str, role: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The topics a bridge sends out for this account, and those it brings in: what the
    device's role lets it publish and receive (``farelab.backend.grants``, the rule every broker
    configuration of farelab follows)."""
    if role not in ("validator", "kiosk"):
        raise ValueError(f"account {username}: a line broker serves devices, not the {role} role")
    allowed = grants(Account(username, role, ""))
    return allowed.publish, allowed.receive


def _passwd_line(login: BrokerLogin) -> str:
    """The account as a Mosquitto password file line (``$7$``: PBKDF2-SHA512, the registry's
    own hash, so no password is needed to write it)."""
    scheme, _, rest = login.secret_hash.partition("$")
    if scheme != "pbkdf2-sha512" or rest.count("$") != 2:
        raise ValueError(f"account {login.username}: its secret is not a PBKDF2-SHA512 hash")
    return f"{login.username}:$7${rest}"


def _acl_block(username: str, role: str, publish: Sequence[str], receive: Sequence[str]) -> str:
    lines = [f"# {role}", f"user {username}"]
    lines += [f"topic write {t}" for t in publish]
    lines += [f"topic read {t}" for t in receive]
    return "\n".join(lines) + "\n"


def _grants(login: BrokerLogin) -> tuple[Sequence[str], Sequence[str]]:
    """What the account may publish and receive; the backend: everything under farelab/."""
    if login.role == "backend":
        return (), ()
    return _forwarded(login.username, login.role)


@dataclass(frozen=True, slots=True)
class CentralTLS:
    """TLS between the station computers and the central broker, which listens with
    ``certfile`` and ``keyfile``; the bridges check its certificate against ``cafile`` (the
    paths as each broker's host sees them)."""

    certfile: str
    keyfile: str
    cafile: str


@dataclass(frozen=True, slots=True)
class BridgedTopology:
    """A central Mosquitto and one per line, bridged: the text of every file they run on.

    Attributes:
        central_port: the central broker's port.
        lines: each line's broker port and the ids of the devices that log in to it.
        folder: where the files go, one subfolder per broker (``central``, ``line-<line>``);
            each broker keeps its persistence file in its own.
        logins: every broker account (as ``farelab backend broker-config`` takes them from the
            registry): the backend's, and each device's.  A device on a line logs in there; one
            on no line, at the central broker.
        bridge_passwords: each line's bridge password (in clear in the line broker's
            configuration: it logs in with it; only its hash goes to the central broker).
        listen_host: the address every broker listens on.
        central_host: the central broker's address as the line brokers reach it.
        data: where every broker keeps its persistence file (each on a host of its own);
            None: in its own subfolder of ``folder``.
        tls: TLS on the central broker's listener and the bridges; None: plain MQTT.
        salt: the bridge accounts' hash salt (12 bytes) for files that must come out the same
            each time; None: a new random salt for each.
    """

    central_port: int
    lines: Mapping[str, tuple[int, Sequence[str]]]
    folder: Path
    logins: Sequence[BrokerLogin]
    bridge_passwords: Mapping[str, str]
    listen_host: str = "127.0.0.1"
    central_host: str = "127.0.0.1"
    data: Path | None = None
    tls: CentralTLS | None = None
    salt: bytes | None = None

    def __post_init__(self) -> None:
        known = {login.username: login.role for login in self.logins}
        if known.get(BACKEND_ACCOUNT) != "backend":
            raise ValueError(f"the logins need the backend's account {BACKEND_ACCOUNT!r}")
        for login in self.logins:
            if login.role not in _ROLES:
                raise ValueError(f"account {login.username}: unknown role {login.role!r}")
        placed: dict[str, str] = {}
        for line, (_, devices) in self.lines.items():
            check_client_id(line, "line")
            if not self.bridge_passwords.get(line):
                raise ValueError(f"line {line}: its bridge has no password")
            for device in devices:
                if device in placed:
                    raise ValueError(f"device {device} is on lines {placed[device]} and {line}")
                if known.get(device) not in ("validator", "kiosk"):
                    raise ValueError(
                        f"device {device} on line {line} has no validator or kiosk account "
                        "(revoked, or registered without a password): it could log in nowhere"
                    )
                placed[device] = line

    def device_broker(self, device: str) -> int:
        """The port the device connects to: its line's broker, or the central one."""
        for port, devices in self.lines.values():
            if device in devices:
                return port
        return self.central_port

    def configs(self) -> dict[str, str]:
        """Every file, by its path under ``folder``: ``<broker>/mosquitto.conf`` (run it with
        ``mosquitto -c``), ``<broker>/farelab.passwd`` and ``<broker>/farelab.acl``."""
        roles = {login.username: login for login in self.logins}
        on_lines = {d for _, devices in self.lines.values() for d in devices}
        central = [login for login in self.logins if login.username not in on_lines]
        passwd = [_passwd_line(login) for login in central]
        acl = [
            _acl_header("the central broker: the backend, each line's bridge, devices on no line")
        ]
        for login in central:
            if login.role == "backend":
                acl.append(f"# backend\nuser {login.username}\ntopic readwrite farelab/#\n")
            else:
                acl.append(_acl_block(login.username, login.role, *_grants(login)))
        files: dict[str, str] = {}
        for line, (port, devices) in self.lines.items():
            account = bridge_account(line)
            secret = hash_secret(self.bridge_passwords[line], salt=self.salt)
            passwd.append(_passwd_line(_Login(account, "bridge", secret)))
            out: list[str] = []
            into: list[str] = []
            for device in devices:
                sent, brought = _forwarded(device, roles[device].role)
                out += sent
                into += brought
            acl.append(_acl_block(account, f"bridge of line {line}", out, into))
            name = line_broker(line)
            own = [roles[d] for d in devices]
            files[f"{name}/{_CONF}"] = self._line_conf(line, port, out, into)
            files[f"{name}/{_PASSWD}"] = "".join(_passwd_line(x) + "\n" for x in own)
            files[f"{name}/{_ACL}"] = "\n".join(
                [
                    _acl_header(f"line {line}'s broker: its own devices"),
                    *(_acl_block(x.username, x.role, *_grants(x)) for x in own),
                ]
            )
        return {
            f"{CENTRAL}/{_CONF}": self._central_conf(),
            f"{CENTRAL}/{_PASSWD}": "".join(x + "\n" for x in passwd),
            f"{CENTRAL}/{_ACL}": "\n".join(acl),
            **files,
        }

    def _common(self, name: str, port: int, what: str) -> list[str]:
        here = self.folder / name
        return [
            f"# farelab's {what}, in the bridged topology: a station computer's",
            "# broker per line between its devices and the central broker. Every client",
            "# authenticates; each account may publish and receive only what its role and its",
            "# own id allow.",
            f"# Run: mosquitto -c {here / _CONF}",
            "",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {here / _PASSWD}",
            f"acl_file {here / _ACL}",
            "",
            "# the largest legitimate message is a parameters version (4.09 MB with a hotlist",
            "# of 170 000 cards)",
            f"max_packet_size {MAX_PACKET_SIZE}",
            "",
            "# sessions that outlive their connections: a device's, and a bridge's while the",
            "# other side is down (each queues every QoS 1 message up to this many)",
            "max_queued_messages 1000000",
            "persistent_client_expiration 7d",
            "persistence true",
            f"persistence_location {self.data or here}/",
            "# a crash loses what came since the last save; every device's journal still has it",
            "autosave_interval 30",
            "",
            "set_tcp_nodelay true",
            "",
            f"listener {port} {self.listen_host}",
        ]

    def _central_conf(self) -> str:
        lines = self._common(CENTRAL, self.central_port, "central broker")
        if self.tls is not None:
            lines += [f"certfile {self.tls.certfile}", f"keyfile {self.tls.keyfile}"]
        return "\n".join(lines) + "\n"

    def _line_conf(self, line: str, port: int, out: Sequence[str], into: Sequence[str]) -> str:
        account = bridge_account(line)
        lines = [
            *self._common(line_broker(line), port, f"station computer of line {line}"),
            "",
            "# the bridge to the central broker: a persistent session at both ends (cleansession",
            "# false), so what is published while the central broker is away waits here, and",
            "# what is published for these devices while the line is cut off waits there",
            f"connection {account}",
            f"address {self.central_host}:{self.central_port}",
            f"remote_clientid {account}",
            f"local_clientid {account}-local",
            f"remote_username {account}",
            f"remote_password {self.bridge_passwords[line]}",
            "cleansession false",
            "bridge_protocol_version mqttv311",
            "# tells the central broker this is a bridge: retained parameters stay retained",
            "try_private true",
            "bridge_attempt_unsubscribe false",
            "# notices of the bridge's state would be publishes outside its account's grants",
            "notifications false",
            "keepalive_interval 15",
            "restart_timeout 1 5",
            *([f"bridge_cafile {self.tls.cafile}"] if self.tls is not None else []),
            "# exactly this line's devices' topics, at QoS 1",
            *(f"topic {t} out 1" for t in out),
            *(f"topic {t} in 1" for t in into),
        ]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class _Login:
    username: str
    role: str
    secret_hash: str


def _acl_header(what: str) -> str:
    return (
        f"# farelab's accounts on {what}.\n"
        "# One block per account, no patterns (a pattern would apply to every role).\n"
    )

"""The broker's accounts and what each may do, written from the device registry as a ready
Mosquitto configuration.

Three roles, one account each per registered device plus the backend's own:

- ``validator``: publishes only ``farelab/v1/dev/<own id>/tx`` and ``…/status``, subscribes to
  and receives only its own ``…/ack`` and ``…/params``;
- ``kiosk``: publishes only ``farelab/v1/kiosk/<own id>/load/req``, subscribes to and receives
  only its own ``…/load/resp``;
- ``backend``: everything under ``farelab/``, and the shared-subscription groups it ingests on
  (``$share/<group>/farelab/…``).

Nobody else may do anything, and anonymous clients are refused.

The configuration uses Mosquitto's dynamic-security plugin, which ships with Mosquitto 2.x,
because it is the only way Mosquitto refuses a *subscription*: Mosquitto asks its ACL about the
whole filter a client subscribes to — for a shared subscription the full
``$share/<group>/<filter>`` — and the plugin checks it against the role's subscribe entries,
so a device that asks for the backend's group gets SUBACK "not authorized" (0x87).  The older
``acl_file`` grants every subscription (up to at least 2.0.18) and filters only at delivery:
a device in the backend's shared group then receives its share of other devices' batches,
which are dropped for it, and every upload stalls.  Mosquitto 2.0's plugin has no
``%u``/``%c`` patterns, so each device gets a role of its own with its literal topics, beside
the shared role of its kind, which denies everything else.

``FORMATS``: ``dynsec`` (the secured setup) or ``acl`` (a password file and per-user ACL blocks,
for a broker without the plugin; roles are kept at publish and delivery, but a subscription
outside them is granted and a device can still join the backend's shared group).
"""

from __future__ import annotations

import base64
import binascii
import glob
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from farelab.backend._registry import entries, hash_secret
from farelab.backend._store import Store
from farelab.protocol import (
    ACK_TOPIC,
    DEVICE_CLIENT_ID,
    KIOSK_CLIENT_ID,
    LOAD_REQ,
    LOAD_RESP,
    MAX_PACKET_SIZE,
    PARAMS_TOPIC,
    STATUS_TOPIC,
    TX_TOPIC,
    check_client_id,
)

__all__ = [
    "BACKEND_ACCOUNT",
    "DEFAULT_GROUP",
    "FORMATS",
    "Account",
    "Grants",
    "accounts",
    "acl_text",
    "dynsec_document",
    "find_dynsec_plugin",
    "grants",
    "mosquitto_conf",
    "passwd_text",
    "write_broker_config",
]

BACKEND_ACCOUNT = "farelab-backend"
DEFAULT_GROUP = "farelab-backend"
FORMATS = ("dynsec", "acl")
_DYNSEC_FILE = "dynamic-security.json"
_LOGINS_FILE = "farelab.passwd"
_ACL_FILE = "farelab.acl"
_CONF_FILE = "farelab.conf"


@dataclass(frozen=True, slots=True)
class Account:
    """One broker login.

    Attributes:
        username: the device id, or :data:`BACKEND_ACCOUNT`.
        role: ``validator``, ``kiosk`` or ``backend``.
        secret_hash: ``pbkdf2-sha512$ITERATIONS$SALT_B64$HASH_B64`` (see ``hash_secret``).
    """

    username: str
    role: str
    secret_hash: str


@dataclass(frozen=True, slots=True)
class Grants:
    """What one account may do: topics it may publish to, filters it may subscribe to (the
    whole filter, ``$share/…`` included), topics it may receive."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    receive: tuple[str, ...]


def grants(account: Account, *, groups: Sequence[str] = (DEFAULT_GROUP,)) -> Grants:
    """The role's grants for this account's own id (``groups``: the backend's shared groups)."""
    me = account.username
    if account.role == "validator":
        mine = (ACK_TOPIC.format(device=me), PARAMS_TOPIC.format(device=me))
        return Grants((TX_TOPIC.format(device=me), STATUS_TOPIC.format(device=me)), mine, mine)
    if account.role == "kiosk":
        resp = (LOAD_RESP.format(kiosk=me),)
        return Grants((LOAD_REQ.format(kiosk=me),), resp, resp)
    if account.role == "backend":
        shared = tuple(f"$share/{group}/farelab/#" for group in groups)
        return Grants(("farelab/#",), ("farelab/#", *shared), ("farelab/#",))
    raise ValueError(f"account {me}: unknown role {account.role!r}")


def _split_hash(account: Account) -> tuple[int, bytes, bytes]:
    """Iterations, salt and hash of a registry secret, checked as Mosquitto needs them (a salt
    of 12 bytes and a SHA-512 hash: the plugin silently drops any other account)."""
    parts = account.secret_hash.split("$")
    iterations, salt, digest = 0, b"", b""
    if len(parts) == 4 and parts[0] == "pbkdf2-sha512" and parts[1].isdigit():
        try:
            iterations = int(parts[1])
            salt = base64.b64decode(parts[2], validate=True)
            digest = base64.b64decode(parts[3], validate=True)
        except binascii.Error:
            iterations = 0
    if iterations < 1 or len(salt) != 12 or len(digest) != 64:
        raise ValueError(
            f"account {account.username}: its secret is not a PBKDF2-SHA512 hash with a "
            "12-byte salt (pbkdf2-sha512$ITERATIONS$SALT$HASH); register its password again"
        )
    return iterations, salt, digest


def accounts(store: Store, backend_password: str) -> tuple[list[Account], list[str]]:
    """The broker's accounts from the registry, the backend's first; and the ids left out (a
    revoked device, or one registered without a password: it can log in nowhere).  ValueError
    if a device has the backend's account name or a secret Mosquitto cannot use."""
    backend = Account(BACKEND_ACCOUNT, "backend", hash_secret(backend_password))
    hashes = dict(store.execute("SELECT id, secret_hash FROM devices").fetchall())
    found: list[Account] = [backend]
    left_out: list[str] = []
    for entry in entries(store):
        if entry.id == BACKEND_ACCOUNT:
            raise ValueError(
                f"device {entry.id!r} has the backend's account name; register it under another id"
            )
        secret = str(hashes.get(entry.id) or "")
        if entry.revoked or not secret:
            left_out.append(entry.id)
            continue
        account = Account(entry.id, entry.role, secret)
        _split_hash(account)
        found.append(account)
    return found, left_out


def _role_name(account: Account) -> str:
    return f"farelab-{account.role}-{account.username}"


def dynsec_document(
    found: Iterable[Account], *, groups: Sequence[str] = (DEFAULT_GROUP,)
) -> dict[str, object]:
    """The dynamic-security plugin's configuration (its JSON file) for these accounts."""
    deny_all = [
        {"acltype": kind, "topic": "#", "allow": False}
        for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")
    ]
    roles: list[dict[str, object]] = [
        {
            "rolename": "farelab-validator",
            "textdescription": "every validator: nothing beyond its own role's topics",
            "acls": deny_all,
        },
        {
            "rolename": "farelab-kiosk",
            "textdescription": "every kiosk: nothing beyond its own role's topics",
            "acls": deny_all,
        },
    ]
    clients: list[dict[str, object]] = []
    for account in found:
        allowed = grants(account, groups=groups)
        subscribe = "subscribePattern" if account.role == "backend" else "subscribeLiteral"
        acls = [
            *({"acltype": "publishClientSend", "topic": t, "allow": True} for t in allowed.publish),
            *({"acltype": subscribe, "topic": t, "allow": True} for t in allowed.subscribe),
            *(
                {"acltype": "publishClientReceive", "topic": t, "allow": True}
                for t in allowed.receive
            ),
        ]
        own = "farelab-backend" if account.role == "backend" else _role_name(account)
        roles.append({"rolename": own, "acls": acls})
        client_roles: list[dict[str, object]] = [{"rolename": own, "priority": 1}]
        if account.role != "backend":
            client_roles.append({"rolename": f"farelab-{account.role}", "priority": 0})
        iterations, salt, digest = _split_hash(account)
        client: dict[str, object] = {
            "username": account.username,
            "textname": f"farelab {account.role}",
            "roles": client_roles,
            "password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(),
            "iterations": iterations,
        }
        # Any account may connect with any client id, and a second connection under an id
        # throws the first off: pinned, a device's or kiosk's account can neither take another
        # client's session (a validator's, a kiosk's, a backend worker's) nor be taken over.
        if account.role == "validator":
            client["clientid"] = DEVICE_CLIENT_ID.format(device=account.username)
        elif account.role == "kiosk":
            client["clientid"] = KIOSK_CLIENT_ID.format(kiosk=account.username)
        clients.append(client)
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


def passwd_text(found: Iterable[Account]) -> str:
    """A Mosquitto password file (``$7$``, PBKDF2-SHA512) for these accounts."""
    lines = []
    for account in found:
        iterations, salt, digest = _split_hash(account)
        b64 = base64.b64encode
        lines.append(
            f"{account.username}:$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"
        )
    return "\n".join(lines) + "\n"


def acl_text(found: Iterable[Account], *, groups: Sequence[str] = (DEFAULT_GROUP,)) -> str:
    """A Mosquitto ``acl_file`` with one block per account (no patterns: a pattern would apply
    to every role)."""
    out = [
        "# farelab's broker accounts, one block per account, written by",
        "# `farelab backend broker-config --format acl` from the device registry.",
        "# Mosquitto's acl_file grants every subscription and filters at delivery only: a device",
        "# can still join the backend's shared group. The dynsec format refuses it at SUBACK.",
    ]
    for account in found:
        allowed = grants(account, groups=groups)
        out += ["", f"# {account.role}", f"user {account.username}"]
        if account.role == "backend":
            out.append("topic readwrite farelab/#")
            continue
        out += [f"topic write {t}" for t in allowed.publish]
        out += [f"topic read {t}" for t in allowed.receive]
    return "\n".join(out) + "\n"


def find_dynsec_plugin() -> str | None:
    """Where this machine's Mosquitto keeps its dynamic-security plugin, if anywhere."""
    candidates = [
        *sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")),
        "/usr/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/mosquitto_dynamic_security.so",
    ]
    return next((c for c in candidates if os.path.exists(c)), None)


def mosquitto_conf(
    *,
    folder: Path,
    listener: tuple[str, int],
    fmt: str = "dynsec",
    plugin: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> str:
    """The Mosquitto configuration that uses the files written beside it in ``folder``."""
    host, port = listener
    lines = [
        "# farelab's Mosquitto configuration, written by `farelab backend broker-config` from the",
        "# device registry: every client authenticates, each account may publish and subscribe",
        "# only what its role and its own id allow. Run: mosquitto -c " + str(folder / _CONF_FILE),
        "",
        "per_listener_settings false",
        "allow_anonymous false",
    ]
    if fmt == "dynsec":
        lines += [f"plugin {plugin}", f"plugin_opt_config_file {folder / _DYNSEC_FILE}"]
    else:
        lines += [f"password_file {folder / _LOGINS_FILE}", f"acl_file {folder / _ACL_FILE}"]
    lines += [
        "",
        "# the largest legitimate message is a parameters version (fare tables and a hotlist of",
        "# 170 000 cards: 4.09 MB); a client that sends a larger packet is disconnected",
        f"max_packet_size {MAX_PACKET_SIZE}",
        "",
        "# QoS 1 sessions of devices that are offline for a while (the journal is the durable",
        "# store; this only spares a resend)",
        "max_queued_messages 100000",
        "persistent_client_expiration 1d",
        "persistence true",
        f"persistence_location {folder}/",
        "",
        "# acks and load authorizations are small messages answered at once: without this,",
        "# Nagle's algorithm meets the client's delayed ACK and each answer can wait ~40 ms",
        "set_tcp_nodelay true",
        "",
        f"listener {port} {host}",
    ]
    if certfile and keyfile:
        lines += [f"certfile {certfile}", f"keyfile {keyfile}"]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds password hashes), atomically."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_broker_config(
    store: Store,
    folder: Path,
    *,
    backend_password: str,
    listener: tuple[str, int] = ("127.0.0.1", 1883),
    fmt: str = "dynsec",
    plugin: str | None = None,
    groups: Sequence[str] = (DEFAULT_GROUP,),
    certfile: str | None = None,
    keyfile: str | None = None,
) -> tuple[Path, list[Account], list[str]]:
    """Write the configuration into ``folder`` (created if needed); returns the Mosquitto
    configuration file, the accounts written and the device ids left out.  ValueError for a
    bad argument or registry entry, OSError if the folder cannot be written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    for group in groups:
        check_client_id(group, "shared-subscription group")
    if fmt == "dynsec" and not plugin:
        raise ValueError(
            "the dynamic-security plugin (mosquitto_dynamic_security.so) was not found; "
            "give its path with --plugin"
        )
    found, left_out = accounts(store, backend_password)
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "dynsec":
        _write_private(
            folder / _DYNSEC_FILE,
            json.dumps(dynsec_document(found, groups=groups), indent=2) + "\n",
        )
    else:
        _write_private(folder / _LOGINS_FILE, passwd_text(found))
        _write_private(folder / _ACL_FILE, acl_text(found, groups=groups))
    conf = folder / _CONF_FILE
    text = mosquitto_conf(
        folder=folder, listener=listener, fmt=fmt, plugin=plugin, certfile=certfile, keyfile=keyfile
    )
    _write_private(conf, text)
    return conf, found, left_out

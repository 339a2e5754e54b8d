"""Parameters the backend sends its devices, and the status they answer with, version 1.

Parameters are a JSON object, published retained on a device's ``params`` topic (or read from a
file): ``{"version": n, "hotlist": [serials], "whitelist": [issuer ids], "networks": toml}``.
``version`` is required (an integer, 0 or more); a list left out keeps what the device has.
``hotlist`` holds card serials of up to 20 digits, ``whitelist`` 16-digit hex issuer ids, and
``networks`` the fare tables as TOML text.  A device reports the version it runs, retained on
its ``status`` topic: ``{"device": id, "params_version": n}``.

A message must fit the broker's packet limit (:data:`MAX_PACKET_SIZE`, which farelab's broker
configuration sets): parameters are at most :data:`PARAMS_MAX` bytes.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

from farelab.card import full_serial

__all__ = [
    "MAX_PACKET_SIZE",
    "PARAMS_MAX",
    "ParamsError",
    "ParamsMessage",
    "decode_params",
    "decode_status",
    "encode_params",
    "encode_status",
]

#: The largest MQTT packet farelab's broker takes (its ``max_packet_size``).  The largest message
#: farelab sends is a parameters version: the shipped fare tables and a hotlist of 170 000 cards
#: make 4.09 MB of JSON (a 500-record batch is 41 kB).  A client that sends a larger packet is
#: disconnected by the broker.
MAX_PACKET_SIZE = 4 * 1024 * 1024
#: The largest parameters message: the packet limit less room for the topic and header.
PARAMS_MAX = MAX_PACKET_SIZE - 4096


class ParamsError(ValueError):
    """A parameters (or status) message that is not valid; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class ParamsMessage:
    """One parameters version.  ``None``: the message leaves that part as the device has it.
    Serials are padded to 20 digits; issuer ids are 8 bytes."""

    version: int
    hotlist: frozenset[str] | None = None
    whitelist: frozenset[bytes] | None = None
    networks: str | None = None


def encode_params(message: ParamsMessage) -> bytes:
    """The message's JSON (lists sorted, so equal parameters make equal payloads)."""
    doc: dict[str, object] = {"version": message.version}
    if message.hotlist is not None:
        doc["hotlist"] = sorted(message.hotlist)
    if message.whitelist is not None:
        doc["whitelist"] = sorted(w.hex().upper() for w in message.whitelist)
    if message.networks is not None:
        doc["networks"] = message.networks
    return json.dumps(doc).encode()


def _serials(raw: object) -> frozenset[str]:
    if not isinstance(raw, list) or not all(
        isinstance(s, str) and s.isascii() and s.isdigit() and len(s) <= 20 for s in raw
    ):
        raise ParamsError("'hotlist' must be a list of card serials (up to 20 digits)")
    return frozenset(full_serial(s) for s in raw)


def _issuers(raw: object) -> frozenset[bytes]:
    issuers: frozenset[bytes] = frozenset({b""})
    if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        with contextlib.suppress(ValueError):
            issuers = frozenset(bytes.fromhex(s) for s in raw)
    if any(len(issuer) != 8 for issuer in issuers):
        raise ParamsError("'whitelist' must be a list of 16-digit hex issuer ids")
    return issuers


def decode_params(payload: str | bytes) -> ParamsMessage:
    """Parameters from their JSON form; ParamsError says what is wrong."""
    try:
        doc = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParamsError(f"not JSON ({exc})") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**63:
        raise ParamsError("expected an object with an integer 'version' (0 or more)")
    networks = doc.get("networks")
    if networks is not None and not isinstance(networks, str):
        raise ParamsError("'networks' must be the fare tables as TOML text")
    return ParamsMessage(
        version,
        _serials(doc["hotlist"]) if "hotlist" in doc else None,
        _issuers(doc["whitelist"]) if "whitelist" in doc else None,
        networks,
    )


def encode_status(device: str, version: int) -> bytes:
    """A device's report of the parameters version it runs."""
    return json.dumps({"device": device, "params_version": version}).encode()


def decode_status(payload: bytes) -> tuple[str, int]:
    """(device, parameters version) from a status message; ParamsError if it is not one."""
    try:
        doc = json.loads(payload)
        device, version = doc["device"], doc["params_version"]
    except (ValueError, UnicodeDecodeError, TypeError, KeyError):
        raise ParamsError("not a status message") from None
    if not isinstance(device, str) or not isinstance(version, int) or isinstance(version, bool):
        raise ParamsError("not a status message")
    return device, version

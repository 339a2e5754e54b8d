"""Parameters the backend sends its devices, and the status they answer with, version 1.

Parameters are a JSON object, published retained on a device's ``params`` topic (or read from a
file): ``{"version": n, "hotlist": [serials], "whitelist": [issuer ids], "networks": toml}``.
``version`` is required (an integer, 0 or more); a list left out keeps what the device has.
``hotlist`` holds card serials of up to 20 digits, ``whitelist`` 16-digit hex issuer ids, and
``networks`` the fare tables as TOML text.  A device reports the version it runs, retained on
its ``status`` topic: ``{"device": id, "params_version": n}``, and, from devices that count
their taps, what the backend cannot see otherwise (:class:`DeviceStatus`): the taps, accepted
and refused by reason, the outbox rows waiting, a histogram of the taps' durations over
:data:`LATENCY_BOUNDS_MS`, and the time of the report.

A message must fit the broker's packet limit (:data:`MAX_PACKET_SIZE`, which farelab's broker
configuration sets): parameters are at most :data:`PARAMS_MAX` bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from farelab.card import full_serial

__all__ = [
    "LATENCY_BOUNDS_MS",
    "MAX_PACKET_SIZE",
    "PARAMS_MAX",
    "DeviceStatus",
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
#: The upper bounds (milliseconds) of a status report's tap-duration histogram; its counts have
#: one more bucket, for the taps longer than the last bound.
LATENCY_BOUNDS_MS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# A report's refusal reasons are a device's own words: a few dozen at most, each short.
_REASONS_MAX = 64
_REASON_LEN = 64


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


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A device's status report.  Only ``device`` and ``params_version`` in the short form that
    older devices send; the counters are None there.  ``taps``, ``accepted`` and ``refused``
    (reason → taps) count since the device started; ``outbox``: its rows not yet acknowledged;
    ``latency_counts``: taps per bucket of ``latency_bounds_ms`` (one more bucket, the taps
    longer than the last bound); ``at``: when the device made the report (its clock)."""

    device: str
    params_version: int
    at: datetime | None = None
    taps: int | None = None
    accepted: int | None = None
    refused: Mapping[str, int] = field(default_factory=dict)
    outbox: int | None = None
    latency_bounds_ms: tuple[int, ...] = LATENCY_BOUNDS_MS
    latency_counts: tuple[int, ...] | None = None


def encode_status(status: DeviceStatus) -> bytes:
    """A device's status report as JSON: the short form when it carries no counters."""
    doc: dict[str, object] = {"device": status.device, "params_version": status.params_version}
    if status.at is not None:
        doc["at"] = status.at.isoformat(timespec="milliseconds")
    for name in ("taps", "accepted", "outbox"):
        value = getattr(status, name)
        if value is not None:
            doc[name] = value
    if status.taps is not None:
        doc["refused"] = dict(sorted(status.refused.items()))
    if status.latency_counts is not None:
        doc["latency_ms"] = {
            "bounds": list(status.latency_bounds_ms),
            "counts": list(status.latency_counts),
        }
    return json.dumps(doc, ensure_ascii=False).encode()


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _optional_count(doc: dict[str, object], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or not _count(value):
        raise ParamsError(f"status: {name!r} must be a count (0 or more)")
    return value


def _refused(raw: object) -> dict[str, int]:
    if raw is None:
        return {}
    if (
        not isinstance(raw, dict)
        or len(raw) > _REASONS_MAX
        or not all(
            isinstance(k, str) and 0 < len(k) <= _REASON_LEN and _count(v) for k, v in raw.items()
        )
    ):
        raise ParamsError(
            f"status: 'refused' must map up to {_REASONS_MAX} reasons to counts (0 or more)"
        )
    return dict(raw)


def _latency(raw: object) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    if raw is None:
        return LATENCY_BOUNDS_MS, None
    bounds = raw.get("bounds") if isinstance(raw, dict) else None
    counts = raw.get("counts") if isinstance(raw, dict) else None
    if (
        not isinstance(bounds, list)
        or not isinstance(counts, list)
        or not 0 < len(bounds) <= 64
        or len(counts) != len(bounds) + 1
        or not all(_count(b) for b in bounds)
        or any(a >= b for a, b in itertools.pairwise(bounds))
        or not all(_count(c) for c in counts)
    ):
        raise ParamsError(
            "status: 'latency_ms' must be increasing 'bounds' and one more 'counts' than bounds"
        )
    return tuple(bounds), tuple(counts)


def decode_status(payload: bytes) -> DeviceStatus:
    """A device's status report, the short form or the full one; ParamsError if it is not one."""
    try:
        doc = json.loads(payload)
        device, version = doc["device"], doc["params_version"]
    except (ValueError, UnicodeDecodeError, TypeError, KeyError):
        raise ParamsError("not a status message") from None
    if not isinstance(device, str) or not isinstance(version, int) or isinstance(version, bool):
        raise ParamsError("not a status message")
    at = doc.get("at")
    if at is not None:
        try:
            at = datetime.fromisoformat(at) if isinstance(at, str) else None
        except ValueError:
            at = None
        if at is None or at.tzinfo is None:
            raise ParamsError("status: 'at' must be an ISO-8601 time with its offset")
    bounds, counts = _latency(doc.get("latency_ms"))
    return DeviceStatus(
        device,
        version,
        at=at,
        taps=_optional_count(doc, "taps"),
        accepted=_optional_count(doc, "accepted"),
        refused=_refused(doc.get("refused")),
        outbox=_optional_count(doc, "outbox"),
        latency_bounds_ms=bounds,
        latency_counts=counts,
    )

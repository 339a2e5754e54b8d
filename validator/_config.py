"""The validator configuration file: one TOML file describing one or more devices.

Every problem is reported as a :class:`ConfigError` naming the file, the device and the key —
never a traceback.  See ``farelab validator run --help`` for the format.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from farelab.card import (
    DEMO_KEYS,
    IssuerKeys,
    KeysFileError,
    describe_path,
    full_serial,
    load_keys_file,
)
from farelab.validator import _values as values
from farelab.validator._device import Device, Direction, Kind, Parameters
from farelab.validator._network import Network, NetworkError, load_networks, shipped_networks

__all__ = ["Config", "ConfigError", "DeviceConfig", "load_config"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """A device with its initial parameters and the master keys of its PSAM."""

    device: Device
    params: Parameters
    keys: Mapping[bytes, IssuerKeys]
    mqtt_password: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole file."""

    devices: tuple[DeviceConfig, ...]
    journal: Path | None = None
    synchronous: Literal["normal", "full"] = "normal"
    max_outbox: int = 1_000_000
    source: Path = field(default=Path("."))

    def device(self, device_id: str) -> DeviceConfig:
        """A device by id."""
        for dc in self.devices:
            if dc.device.id == device_id:
                return dc
        known = ", ".join(dc.device.id for dc in self.devices)
        raise ConfigError(
            f"{describe_path(self.source)}: no device {values.shown(device_id)} (devices: {known})"
        )


class _Where:
    def __init__(self, source: Path, label: str, table: Mapping[str, Any]) -> None:
        self.source = source
        self.label = label
        self.table = table

    def error(self, key: str, want: str) -> ConfigError:
        return ConfigError(f"{describe_path(self.source)}: {self.label}: key {key!r} {want}")

    def text(self, key: str, default: str | None = None) -> str:
        value = self.table.get(key, default)
        if value is None:
            raise self.error(key, "is missing")
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "must be a non-empty string")
        return value

    def hex_list(self, key: str, length: int) -> frozenset[bytes]:
        value = self.table.get(key)
        if value is None:
            raise self.error(key, f"is missing (a list of {2 * length}-digit hex ids)")
        if not isinstance(value, list):
            raise self.error(key, f"must be a list of {2 * length}-digit hex ids")
        out = set()
        for item in value:
            try:
                raw = bytes.fromhex(item) if isinstance(item, str) else b""
            except ValueError:
                raw = b""
            if len(raw) != length:
                raise self.error(key, f"has {values.shown(item)}, not a {2 * length}-digit hex id")
            out.add(raw)
        return frozenset(out)

    def serials(self, key: str) -> frozenset[str]:
        value = self.table.get(key, [])
        ok = isinstance(value, list) and all(
            isinstance(v, str) and v.isdigit() and len(v) <= 20 for v in value
        )
        if not ok:
            raise self.error(key, "must be a list of card serials (strings of up to 20 digits)")
        return frozenset(full_serial(v) for v in value)

    def fen(self, key: str) -> int | None:
        value = self.table.get(key)
        if value is None:
            return None
        try:
            return values.fen(value, "an amount in yuan")
        except ValueError as exc:
            raise self.error(key, str(exc).replace("an amount in yuan ", "", 1)) from None

    def device_id(self, key: str) -> str:
        text = self.text(key)  # its own error (a ConfigError, a ValueError) is not wrapped again
        try:
            return values.device_id(text, "a device id")
        except ValueError as exc:
            raise self.error(key, str(exc).replace("a device id ", "= ", 1)) from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to be a file
        return False


def _network(where: _Where, base: Path, cache: dict[str, Network]) -> Network:
    name = where.text("network")
    if name in cache:
        return cache[name]
    shipped = shipped_networks()
    if name in shipped:
        cache[name] = shipped[name]
        return shipped[name]
    file_part, _, key = name.partition(":") if not _exists(Path(name)) else (name, "", "")
    path = Path(file_part)
    if not path.is_absolute():
        path = base / path
    if not _exists(path):
        known = ", ".join(shipped)
        raise where.error(
            "network", f"= {values.shown(name)} is neither a shipped network ({known}) nor a file"
        )
    try:
        networks = load_networks(path)
    except NetworkError as exc:
        raise ConfigError(f"{describe_path(where.source)}: {where.label}: {exc}") from None
    if not key:
        if len(networks) != 1:
            raise where.error(
                "network", f"= {values.shown(name)}: the file has several networks; add ':NAME'"
            )
        key = next(iter(networks))
    if key not in networks:
        raise where.error(
            "network",
            f"= {values.shown(name)}: no network {values.shown(key)} in {describe_path(path)}",
        )
    cache[name] = networks[key]
    return networks[key]


def _device(where: _Where, base: Path, cache: dict[str, Network]) -> Device:
    device_id = where.device_id("id")
    kind_raw = where.text("kind")
    try:
        kind = Kind(kind_raw)
    except ValueError:
        raise where.error("kind", 'must be "bus" or "metro-gate"') from None
    network = _network(where, base, cache)
    terminal_raw = where.text("terminal_id")
    if not re.fullmatch(r"[0-9A-Fa-f]{12}", terminal_raw):
        raise where.error("terminal_id", "must be 12 hex digits (the 6-byte PSAM terminal id)")
    reader = where.text("reader", "sim")
    if reader != "sim" and not (reader.startswith("pcsc:") and len(reader) > 5):
        raise where.error("reader", 'must be "sim" or "pcsc:<reader name>"')
    line = station = None
    direction = Direction.BOTH
    if kind is Kind.METRO_GATE:
        if not network.has_stations:
            raise where.error(
                "network", f"= {values.shown(network.key)} ships no station data for a gate"
            )
        try:
            line = network.line(where.text("line"))
            station = network.station(where.text("station"))
        except NetworkError as exc:
            raise ConfigError(f"{describe_path(where.source)}: {where.label}: {exc}") from None
        if line.key not in station.lines:
            raise where.error("station", f"{station.name_en!r} is not on line {line.key}")
        try:
            direction = Direction(where.table.get("direction", "both"))
        except ValueError:
            raise where.error("direction", 'must be "entry", "exit" or "both"') from None
    route_fare = where.fen("route_fare")
    if kind is Kind.BUS and route_fare is None and network.rules.bus_base_fen is None:
        raise where.error(
            "route_fare", f"is missing and network {values.shown(network.key)} has no bus fare"
        )
    operator = where.table.get("operator", "")
    if not isinstance(operator, str) or len(operator.encode()) > 8:
        raise where.error("operator", "must be a string of at most 8 bytes")
    route = where.table.get("route", "")
    if not isinstance(route, str) or len(route.encode()) > 4:
        raise where.error("route", "must be a string of at most 4 bytes")
    return Device(
        id=device_id,
        kind=kind,
        network=network,
        terminal_id=bytes.fromhex(terminal_raw),
        reader=reader,
        line=line,
        station=station,
        direction=direction,
        route_fare_fen=route_fare,
        route=route,
        operator=operator.encode(),
    )


def load_config(path: Path) -> Config:
    """Read and check a configuration file."""
    where = describe_path(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    base = path.parent
    keys = DEMO_KEYS
    psam = doc.get("psam", {})
    if not isinstance(psam, dict):
        raise ConfigError(f"{where}: [psam] must be a table")
    if "keys" in psam:
        keys_path = Path(str(psam["keys"]))
        try:
            keys = load_keys_file(keys_path if keys_path.is_absolute() else base / keys_path)
        except KeysFileError as exc:
            raise ConfigError(f"{where}: [psam] keys: {exc}") from None
    raw_devices = doc.get("validator")
    if not isinstance(raw_devices, list) or not raw_devices:
        raise ConfigError(f"{where}: no [[validator]] devices")
    cache: dict[str, Network] = {}
    devices: list[DeviceConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(raw_devices):
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: validator[{i}] must be a table")
        label = f"validator[{i}]" + (f" (id {values.shown(table['id'])})" if "id" in table else "")
        table_where = _Where(path, label, table)
        device = _device(table_where, base, cache)
        if device.id in seen:
            raise table_where.error("id", f"= {device.id!r} is used twice")
        seen.add(device.id)
        whitelist = table_where.hex_list("whitelist", 8)
        params = Parameters(0, table_where.serials("hotlist"), whitelist)
        password = table.get("mqtt_password")
        if password is not None and (not isinstance(password, str) or not password):
            raise table_where.error("mqtt_password", "must be a non-empty string")
        devices.append(DeviceConfig(device, params, dict.fromkeys(whitelist, keys), password))
    journal_table = doc.get("journal", {})
    if not isinstance(journal_table, dict):
        raise ConfigError(f"{where}: [journal] must be a table")
    jw = _Where(path, "[journal]", journal_table)
    journal = Path(jw.text("path")) if "path" in journal_table else None
    if journal is not None and not journal.is_absolute():
        journal = base / journal
    sync = journal_table.get("synchronous", "normal")
    if sync not in ("normal", "full"):
        raise jw.error("synchronous", 'must be "normal" or "full"')
    max_outbox = journal_table.get("max_outbox", 1_000_000)
    if not isinstance(max_outbox, int) or isinstance(max_outbox, bool) or max_outbox < 1:
        raise jw.error("max_outbox", "must be a positive integer")
    return Config(tuple(devices), journal, sync, max_outbox, path)

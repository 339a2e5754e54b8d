"""``farelab backend devices``: the backend's device registry — add (by hand or from a validator
configuration), list, revoke.  Ingest takes a device's operator, station, line and terminal
from here, and refuses batches from devices that are not registered."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from farelab._errors import CliError
from farelab.backend import (
    ROLES,
    DeviceEntry,
    Store,
    StoreError,
    entries,
    hash_secret,
    lookup,
    register,
    revoke,
)
from farelab.card import describe_path
from farelab.validator import ConfigError, Device, Direction, Kind, load_config

__all__ = ["add_parser", "entry_of", "register_configs"]


def entry_of(device: Device) -> DeviceEntry:
    """A configured validator as the registry knows it: the operator it writes into records,
    the kinds its kind and direction make, its terminal id, and a gate's station and line."""
    if device.kind is Kind.BUS:
        kinds = frozenset({"bus"})
    elif device.direction is Direction.BOTH:
        kinds = frozenset({"entry", "exit"})
    else:
        kinds = frozenset({device.direction.value})
    return DeviceEntry(
        id=device.id,
        role="validator",
        operator=device.operator_id.rstrip(b"\x00").decode(errors="replace"),
        kinds=kinds,
        terminal=device.terminal_id.hex().upper(),
        station=device.station_code.hex().upper() if device.station is not None else "",
        line=device.line.number if device.line is not None else 0,
    )


def register_configs(store: Store, paths: Iterable[Path]) -> tuple[list[str], list[str]]:
    """Register every ``[[validator]]`` of these configuration files (their ``mqtt_password``
    kept hashed); the ids registered, and the ids left as they were because the registry holds
    them revoked.  CliError for a file that cannot be used.

    A configuration lists the devices a site has, including one revoked since (stolen, say):
    registering it again from the file — at every ``backend run --devices`` — would undo the
    revocation unnoticed.  Only ``devices add ID``, naming the device, reinstates it.
    """
    done: list[str] = []
    revoked: list[str] = []
    for path in paths:
        try:
            config = load_config(path)
            pairs = [(entry_of(dc.device), dc.mqtt_password) for dc in config.devices]
        except (ConfigError, ValueError) as exc:
            raise CliError(f"--config {describe_path(path)}: {exc}") from None
        for entry, password in pairs:
            known = lookup(store, entry.id)
            if known is not None and known.revoked:
                revoked.append(entry.id)
                continue
            register(store, entry, secret_hash=hash_secret(password) if password else "")
            done.append(entry.id)
    return done, revoked


def add_parser(cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``devices`` and its subcommands under ``farelab backend``."""
    dev = cmds.add_parser(
        "devices",
        help="the device registry: add, list, revoke",
        description="The backend accepts uploads only from registered devices, and takes each "
        "one's operator, station, line and terminal from here rather than from its records.",
    )
    sub = dev.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    add = sub.add_parser(
        "add",
        help="register a device (or every validator of a configuration file)",
        description="Register ID with --role, --operator, --kinds and --terminal, or every "
        "[[validator]] of each --config file. Registering a device again replaces its entry "
        "(and lifts a revocation).",
    )
    add.add_argument("id", nargs="?", metavar="ID", help="the device id (its MQTT username)")
    add.add_argument(
        "--config",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a validator configuration (TOML): register each of its devices (repeatable)",
    )
    add.add_argument("--role", choices=ROLES, help="validator or kiosk")
    add.add_argument("--operator", metavar="OP", help="who clearing pays (1-8 bytes)")
    add.add_argument(
        "--kinds",
        metavar="LIST",
        help="comma-separated: bus | entry,exit | entry | exit (validators); load,refund (kiosks)",
    )
    add.add_argument("--terminal", metavar="HEX12", help="the device's PSAM terminal id")
    add.add_argument("--station", default="", metavar="HEX16", help="a gate's station code")
    add.add_argument("--line", type=int, default=0, metavar="N", help="a gate's line number")
    add.add_argument("--password", metavar="PW", help="its broker password (kept hashed)")
    add.add_argument("--db", required=True, metavar="URL", help="the ledger's database URL")
    add.set_defaults(func=_add)
    lst = sub.add_parser("list", help="the registered devices")
    lst.add_argument("--db", required=True, metavar="URL", help="the ledger's database URL")
    lst.add_argument("--json", action="store_true", help="print JSON for scripts")
    lst.set_defaults(func=_list)
    rev = sub.add_parser("revoke", help="refuse a device from now on")
    rev.add_argument("id", metavar="ID", help="the device id")
    rev.add_argument("--db", required=True, metavar="URL", help="the ledger's database URL")
    rev.set_defaults(func=_revoke)


def _open(url: str, *, create: bool) -> Store:
    try:
        return Store(url, create=create)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def _manual_entry(args: argparse.Namespace) -> DeviceEntry:
    missing = [
        f"--{name}" for name in ("role", "operator", "kinds", "terminal") if not getattr(args, name)
    ]
    if missing:
        raise CliError(f"devices add {args.id}: {', '.join(missing)} needed (or --config FILE)")
    kinds = frozenset(k.strip() for k in args.kinds.split(",") if k.strip())
    try:
        return DeviceEntry(
            id=args.id,
            role=args.role,
            operator=args.operator,
            kinds=kinds,
            terminal=args.terminal.upper(),
            station=args.station.upper(),
            line=args.line,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _add(args: argparse.Namespace) -> int:
    if (args.id is None) == (not args.config):
        raise CliError("devices add takes a device ID or --config FILE (not both)")
    entry = _manual_entry(args) if args.id is not None else None
    if entry is not None and args.password is not None and not args.password:
        raise CliError("--password must not be empty")
    store = _open(args.db, create=True)
    try:
        if entry is not None:
            secret = hash_secret(args.password) if args.password else ""
            register(store, entry, secret_hash=secret)
            added: Sequence[str] = [entry.id]
            revoked: Sequence[str] = []
        else:
            added, revoked = register_configs(store, args.config)
    finally:
        store.close()
    print(f"registered {len(added)} device(s): {', '.join(added)}")
    if revoked:
        print(f"left revoked: {', '.join(revoked)} (devices add ID reinstates one)")
    return 0


def _as_json(entry: DeviceEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "role": entry.role,
        "operator": entry.operator,
        "kinds": sorted(entry.kinds),
        "terminal": entry.terminal,
        "station": entry.station,
        "line": entry.line,
        "revoked": entry.revoked,
    }


def _list(args: argparse.Namespace) -> int:
    store = _open(args.db, create=False)
    try:
        found = entries(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps([_as_json(e) for e in found], indent=2))
        return 0
    for e in found:
        where = f" station {e.station} line {e.line}" if e.station else ""
        state = "  REVOKED" if e.revoked else ""
        print(
            f"{e.id:<24} {e.role:<9} {e.operator:<8} {','.join(sorted(e.kinds)):<11} "
            f"{e.terminal}{where}{state}"
        )
    print(f"{len(found)} device(s)")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    store = _open(args.db, create=False)
    try:
        known = revoke(store, args.id)
    finally:
        store.close()
    if not known:
        raise CliError(f"no device {args.id!r} in the registry", status=1)
    print(f"revoked {args.id}")
    return 0

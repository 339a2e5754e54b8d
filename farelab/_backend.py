"""``farelab backend``: ingest uploads over MQTT, and report on the ledger."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path

from aiomqtt import MqttError

from farelab import _brokercli as broker_cli
from farelab import _devices as devices_cli
from farelab._errors import CliError
from farelab.backend import (
    ANOMALY_KEYS,
    OPEN_BROKER_RISKS,
    Store,
    StoreError,
    clear_ledger,
    devices_in,
    next_params,
    open_broker_warning,
    open_logins,
    publish_params,
    read_status,
    report,
    run_workers,
)
from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    IssuerKeys,
    KeysFileError,
    fen_to_yuan,
    load_keys_file,
)
from farelab.protocol import BrokerURL, check_client_id
from farelab.validator import NetworkError, parse_networks, positive_seconds

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``backend`` and its subcommands."""
    backend = sub.add_parser(
        "backend",
        help="the clearing backend: ingest uploads, report on the ledger",
        description="The backend ingests validators' batches from an MQTT broker (MQTT 5 shared "
        "subscription, so several workers split the load), verifies every TAC, de-duplicates, "
        "commits, then acknowledges.",
    )
    cmds = backend.add_subparsers(dest="backend_command", required=True, metavar="SUBCOMMAND")
    risks = "\n".join(f"  - {risk}" for risk in OPEN_BROKER_RISKS)
    run = cmds.add_parser(
        "run",
        help="ingest until stopped (Ctrl-C, SIGTERM)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ingest validators' batches and answer kiosks' load requests until stopped.\n\n"
        "WARNING: the broker is where devices, kiosks and the backend are told apart. On a "
        "broker that\nlets in clients without valid credentials (a plain Mosquitto does), "
        "anyone who can reach it can:\n"
        f"{risks}\n"
        "Run the broker with the configuration `farelab backend broker-config` writes from the "
        "device\nregistry. At start this command tries the broker anonymously and with a "
        "made-up account, and\nprints this warning on stderr if it gets in.\n\n"
        "Each worker's MQTT client id is farelab-backend-<host>-<random>-w<N>, unique per host "
        "and start,\nso several backends can share a broker and a --group; workers stop when "
        "this process dies.",
    )
    run.add_argument(
        "--broker",
        required=True,
        metavar="URL",
        help="mqtt://[user:password@]host[:port] or mqtts://… (TLS)",
    )
    run.add_argument(
        "--db", required=True, metavar="URL", help="sqlite:///PATH or postgresql://user@host/dbname"
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on the shared subscription (default 1)",
    )
    run.add_argument(
        "--keys",
        metavar="FILE",
        help="TOML issuer master keys (default: the demo issuer's test keys)",
    )
    run.add_argument(
        "--issuer",
        action="append",
        metavar="HEX16",
        help="an issuer id the --keys belong to (repeatable, as a PSAM holds the same keys for "
        "every whitelisted issuer; default: the demo issuer)",
    )
    run.add_argument(
        "--group",
        default="farelab-backend",
        help="shared-subscription group name (default farelab-backend; letters, digits, '.', "
        "'_', '-')",
    )
    run.add_argument(
        "--devices",
        action="append",
        type=Path,
        default=[],
        metavar="CONFIG",
        help="register every validator of this configuration file first (repeatable)",
    )
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the live dashboard there: / (the page), /api/state (JSON), /metrics "
        "(Prometheus), /healthz",
    )
    run.set_defaults(func=_run)
    broker_cli.add_parser(cmds)
    par = cmds.add_parser(
        "params",
        help="publish a new parameters version (hotlist, whitelist) to devices",
        description="Publish the ledger's hotlist (cloned cards) plus --hotlist serials, and "
        "optionally a --whitelist, as a new version, retained, on each device's parameters "
        "topic. Devices apply it atomically and report the version they run.",
    )
    par.add_argument("--broker", required=True, metavar="URL", help="the MQTT broker")
    par.add_argument("--db", required=True, metavar="URL", help="the ledger's database URL")
    par.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="ID",
        help="a device to publish to (repeatable; default: every device in the ledger)",
    )
    par.add_argument(
        "--hotlist",
        action="append",
        default=[],
        metavar="SERIAL",
        help="a card serial to refuse (repeatable)",
    )
    par.add_argument(
        "--whitelist",
        action="append",
        metavar="HEX16",
        help="an accepted issuer id (repeatable; omitted: devices keep theirs)",
    )
    par.add_argument(
        "--networks",
        type=Path,
        metavar="FILE",
        help="fare tables (a networks TOML file, as validator/networks.toml) that supersede the "
        "devices' own for the networks it defines",
    )
    par.add_argument(
        "--wait",
        type=_wait_seconds,
        default=0.0,
        metavar="SECONDS",
        help="then wait this long for the devices to report the version they run",
    )
    par.set_defaults(func=_params)

    clr = cmds.add_parser(
        "clear",
        help="clearing and settlement between operators and issuers",
        description="Clear the counted transactions: rides are owed by the card's issuer to "
        "the operator, top-ups by the kiosk's operator to the issuer. Prints each party's net "
        "position and the payments that settle them.",
    )
    clr.add_argument("--db", required=True, metavar="URL", help="the ledger's database URL")
    clr.add_argument("--day", metavar="YYYY-MM-DD", help="one day (China time) only")
    clr.add_argument("--csv", type=Path, metavar="FILE", help="write positions as CSV")
    clr.add_argument("--json", type=Path, metavar="FILE", help="write everything as JSON")
    clr.set_defaults(func=_clear)

    rep = cmds.add_parser("report", help="totals, anomalies and breakdowns of the ledger")
    rep.add_argument("--db", required=True, metavar="URL", help="the ledger's database URL")
    rep.add_argument("--json", action="store_true", help="print JSON for scripts")
    rep.set_defaults(func=_report)
    devices_cli.add_parser(cmds)


def _run(args: argparse.Namespace) -> int:
    try:
        broker = BrokerURL.parse(args.broker)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not 1 <= args.workers <= 64:
        raise CliError("--workers must be 1 to 64")
    try:
        check_client_id(args.group, "--group")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.workers > 1 and not broker.mqtt5:
        raise CliError(
            "several --workers need MQTT 5 shared subscriptions; the broker URL says protocol=3.1.1"
        )
    http = None
    if args.http is not None:
        from farelab.backend import parse_http_address  # noqa: PLC0415 - only with --http

        try:
            http = parse_http_address(args.http)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    keys = DEMO_KEYS
    if args.keys:
        try:
            keys = load_keys_file(Path(args.keys))
        except KeysFileError as exc:
            raise CliError(str(exc)) from None
    issuers: dict[bytes, IssuerKeys] = {}
    for text in args.issuer or [DEMO_ISSUER_ID.hex()]:
        try:
            issuer = bytes.fromhex(text)
        except ValueError:
            raise CliError(f"--issuer {text!r} is not hex") from None
        if len(issuer) != 8:
            raise CliError(f"--issuer {text!r} must be 16 hex digits (8 bytes)")
        issuers[issuer] = keys
    try:
        store = Store(args.db)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    try:
        _, revoked = devices_cli.register_configs(store, args.devices)
    finally:
        store.close()
    if revoked:
        print(
            f"farelab backend: --devices: left revoked: {', '.join(revoked)}",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"farelab backend: {args.workers} worker(s) on {broker}, ledger {args.db}",
        file=sys.stderr,
        flush=True,
    )
    logins = asyncio.run(open_logins(broker))
    if logins:
        print(open_broker_warning(broker, logins), file=sys.stderr, flush=True)
    from farelab.backend import ConfigurationError  # noqa: PLC0415 - the service's, loaded late

    try:
        return run_workers(
            str(args.broker),
            args.db,
            issuers=issuers,
            workers=args.workers,
            group=args.group,
            http=http,
            on_dashboard=_dashboard_listening,
        )
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None


def _dashboard_listening(address: tuple[str, int]) -> None:
    host, port = address
    shown = f"[{host}]" if ":" in host else host
    print(f"farelab backend: dashboard on http://{shown}:{port}/", file=sys.stderr, flush=True)


def _params(args: argparse.Namespace) -> int:
    try:
        broker = BrokerURL.parse(args.broker)
        store = Store(args.db, create=False)
    except (ValueError, StoreError) as exc:
        raise CliError(str(exc)) from None
    try:
        for device in args.device:
            check_client_id(device, "--device")
    except ValueError as exc:
        store.close()
        raise CliError(str(exc)) from None
    bad = [s for s in args.hotlist if not s.isdigit() or len(s) > 20]
    if bad:
        raise CliError(f"--hotlist takes card serials (up to 20 digits), not {bad}")
    for issuer in args.whitelist or []:
        try:
            ok = len(bytes.fromhex(issuer)) == 8
        except ValueError:
            ok = False
        if not ok:
            raise CliError(f"--whitelist takes 16-digit hex issuer ids, not {issuer!r}")
    try:
        devices = args.device or devices_in(store)
        if not devices:
            raise CliError("no devices: the ledger has none yet; name them with --device")
        tables = None
        if args.networks is not None:
            try:
                tables = args.networks.read_text(encoding="utf-8")
                parse_networks(tables)
            except OSError as exc:
                raise CliError(f"{args.networks}: cannot read: {exc.strerror}") from None
            except NetworkError as exc:
                raise CliError(f"{args.networks}: {exc}") from None
        params = next_params(store, hotlist=args.hotlist, whitelist=args.whitelist, networks=tables)
    finally:
        store.close()
    try:
        n = asyncio.run(publish_params(broker, params, devices))
        print(f"published parameters version {params.version} to {n} device(s)")
        if args.wait > 0:
            running = asyncio.run(
                read_status(broker, devices, wait=args.wait, version=params.version)
            )
            for device in devices:
                print(f"  {device}: running version {running.get(device, 'unknown')}")
    except MqttError as exc:
        raise CliError(f"broker {broker}: {exc}") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return 0


def _wait_seconds(text: str) -> float:
    """``--wait``: 0 (do not wait) or a positive, finite number of seconds (``nan`` is no time
    and would silently not wait; ``1e300`` would never end)."""
    with contextlib.suppress(InvalidOperation):
        if Decimal(text.strip()) == 0:
            return 0.0
    try:
        return positive_seconds(text, "a wait")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _clear(args: argparse.Namespace) -> int:
    if args.day is not None:
        try:
            date.fromisoformat(args.day)
        except ValueError:
            raise CliError(f"--day {args.day!r} is not a date (YYYY-MM-DD)") from None
    try:
        store = Store(args.db, create=False)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    try:
        result = clear_ledger(store, day=args.day)
    finally:
        store.close()
    try:
        if args.csv is not None:
            args.csv.write_text(result.to_csv(), encoding="utf-8")
        if args.json is not None:
            args.json.write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write: {exc}") from None
    doc = result.to_json()
    print(f"{doc['transactions']} transactions over {len(doc['days'])} day(s)")
    print("net positions (receivable − payable):")
    for party, net in sorted(doc["net_positions"].items(), key=lambda kv: kv[1]):
        print(f"  {party:<32} {fen_to_yuan(net):>14}")
    print("settlement:")
    for row in doc["settlements"]:
        print(f"  {row['payer']:<28} pays {row['payee']:<28} {fen_to_yuan(row['amount_fen']):>12}")
    return 0


def _report(args: argparse.Namespace) -> int:
    try:
        store = Store(args.db, create=False)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    try:
        doc = report(store)
    finally:
        store.close()
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"transactions  {doc['transactions']}  (purchases {fen_to_yuan(doc['purchase_fen'])} "
        f"yuan, loads {fen_to_yuan(doc['load_fen'])} yuan)"
    )
    for key in (
        "duplicates",
        "forged",
        "grey",
        "void",
        "gaps",
        "clones",
        "quarantined",
        "balance_anomalies",
        *ANOMALY_KEYS.values(),
    ):
        print(f"{key:<22} {doc[key]}")
    for title, table in (("operator", doc["by_operator"]), ("issuer", doc["by_issuer"])):
        print(f"by {title}:")
        for name, row in sorted(table.items()):
            print(f"  {name:<20} {row['transactions']:>8}  {fen_to_yuan(row['amount_fen']):>12}")
    return 0

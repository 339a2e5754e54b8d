"""``farelab city``: a whole fare system at a city's pace, every device a process, and the
reconciliation that proves every fen is where it should be (:mod:`farelab.city`)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from farelab._errors import CliError
from farelab.card import CST, describe_path

__all__ = ["register"]

NETWORKS = ("taiyuan", "changzhou")


def _positive(kind: type[int] | type[float], what: str) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
        return value

    return parse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``city``."""
    city = sub.add_parser(
        "city",
        help="a whole city's fare system, every device a process, reconciled to the fen",
        description="Run a city: a validator process for every gate of the network's stations "
        "(entry and exit) and a few buses, each with its own journal and broker account, a "
        "kiosk, the backend with its workers, and a seeded population of riders commuting at "
        "the peaks, topping up when low, with cards of every type, of other cities (whitelisted "
        "and not), a hotlisted card and a cloned one. At the end the reconciliation checks, per "
        "card, balance at start + loads - fares = balance at end; that the journals' "
        "transactions are the ledger's, one for one; and that clearing moved what the ledger "
        "counts. Exit status 0 only when everything reconciles, 1 when something does not "
        "(each difference printed with its card and transactions), 2 for bad options.",
    )
    city.add_argument(
        "--network", choices=NETWORKS, default="taiyuan", help="the city (default taiyuan)"
    )
    city.add_argument(
        "--riders",
        type=_positive(int, "a whole number"),
        default=300,
        metavar="N",
        help="how many riders (default 300)",
    )
    span = city.add_mutually_exclusive_group()
    span.add_argument(
        "--duration",
        type=_positive(float, "a number of seconds"),
        metavar="S",
        help="ride for S wall-clock seconds (default 60)",
    )
    span.add_argument(
        "--days",
        type=_positive(float, "a number of days"),
        metavar="D",
        help="ride for D simulated days (from 06:00 of the first)",
    )
    city.add_argument(
        "--speed",
        type=_positive(float, "a number"),
        default=900.0,
        metavar="X",
        help="simulated seconds per wall second (default 900: a day from 06:00 to 21:00 in a "
        "minute)",
    )
    city.add_argument("--seed", type=int, default=1, metavar="N", help="the seed (default 1)")
    city.add_argument(
        "--broker",
        metavar="URL",
        help="use this MQTT broker (it must know the devices' accounts, or let them in); "
        "'embedded' for the in-process broker (amqtt: MQTT 3.1.1, no accounts, one backend "
        "worker); default: a Mosquitto of the city's own on a free port, or the embedded one "
        "when Mosquitto is not installed",
    )
    city.add_argument(
        "--db",
        metavar="URL",
        help="the ledger (postgresql://…); default: SQLite in the work folder",
    )
    city.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="where the backend serves its dashboard (default: a free port on 127.0.0.1)",
    )
    city.add_argument(
        "--chaos",
        action="store_true",
        help="on a seeded schedule kill and restart the broker, backend workers, devices and "
        "kiosks, pull cards mid-tap, cut, delay and reset device connections",
    )
    city.add_argument(
        "--topology",
        choices=("direct", "bridged"),
        default="direct",
        help="direct: every device on one Mosquitto; bridged: a Mosquitto per metro line (the "
        "station computer) bridged to a central one with persistent sessions, as real systems "
        "have them (with --chaos, the broker killed is the central one)",
    )
    city.add_argument("--json", type=Path, metavar="FILE", help="write the summary as JSON to FILE")
    city.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="the work folder: cards, device configs and journals, ledger, logs (default: a new "
        "temporary folder, kept)",
    )
    city.add_argument(
        "--stations",
        type=_positive(int, "a whole number"),
        metavar="N",
        help="gates at the first N stations only (a smaller city)",
    )
    city.add_argument(
        "--workers",
        type=_positive(int, "a whole number"),
        default=2,
        metavar="N",
        help="backend worker processes (default 2)",
    )
    city.add_argument(
        "--devices-per-process",
        type=_positive(int, "a whole number"),
        default=1,
        metavar="N",
        help="devices each 'farelab validator run' process hosts, with one journal (default 1: "
        "every device a process of its own, as in the field; more devices a process cost less "
        "CPU a tap, as a station computer hosting its gates)",
    )
    city.add_argument(
        "--kiosks",
        type=_positive(int, "a whole number"),
        metavar="N",
        help="top-up kiosks, each a 'farelab topup serve' process where the riders living near "
        "it top up, one card at a time (default: one for every 2000 riders, one at least)",
    )
    city.set_defaults(func=_run)


def _say(text: str) -> None:
    print(f"farelab city: {text}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    from farelab.city import (  # noqa: PLC0415
        CityError,
        CityInterruptedError,
        CityOptions,
        plan_city,
        run_city,
    )
    from farelab.validator import shipped_networks  # noqa: PLC0415

    network = shipped_networks()[args.network]
    folder = args.dir
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="farelab-city-"))
    elif folder.exists() and any(folder.iterdir()):
        raise CliError(f"--dir {describe_path(folder)} is not empty: give a new or empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--dir {describe_path(folder)}: {exc.strerror}") from None
    if args.json is not None:
        try:
            args.json.touch()
        except OSError as exc:
            raise CliError(f"--json {describe_path(args.json)}: {exc.strerror}") from None
    if args.topology == "bridged" and args.broker:
        raise CliError("--topology bridged starts its own brokers: it cannot be used with --broker")
    http = args.http
    day = datetime.now(CST).date()
    try:
        plan = plan_city(
            network, riders=args.riders, seed=args.seed, day=day, stations=args.stations
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    options = CityOptions(
        network=network,
        riders=args.riders,
        seed=args.seed,
        folder=folder.resolve(),
        duration_s=args.duration if args.days is None else None,
        days=args.days,
        speed=args.speed,
        broker=args.broker,
        db=args.db,
        http=http,
        chaos=args.chaos,
        stations=args.stations,
        workers=args.workers,
        topology=args.topology,
        devices_per_process=args.devices_per_process,
        kiosks=args.kiosks,
    )
    try:
        summary = run_city(options, plan, _say)
    except CityInterruptedError as exc:
        raise CliError(f"{exc}; work folder {folder}", status=130) from None
    except CityError as exc:
        raise CliError(f"{exc}; work folder {folder}") from None
    _print(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return 0 if summary["reconciled"] else 1


def _print(s: dict[str, object]) -> None:
    refused = s["refused"]
    assert isinstance(refused, dict)
    print(
        f"{s['riders']} riders, {s['devices']} devices ({s['validator_processes']} validator "
        f"processes): {s['taps']} taps "
        f"({s['taps_per_s']}/s), {s['accepted']} accepted, "
        f"{sum(refused.values())} refused"
        + (
            " (" + ", ".join(f"{k} {v}" for k, v in sorted(refused.items())) + ")"
            if refused
            else ""
        )
    )
    print(
        f"loads {s['loads']} ({int(s['loads_fen']) / 100:.2f} yuan), "  # type: ignore[call-overload]
        f"fares {int(s['fares_fen']) / 100:.2f} yuan; faults injected: "  # type: ignore[call-overload]
        f"{len(s['faults'])}"  # type: ignore[arg-type]
    )
    differences = s["differences"]
    assert isinstance(differences, list)
    if s["reconciled"]:
        print("reconciled: every card, journal and clearing total agrees with the ledger")
    else:
        print(f"NOT reconciled: {len(differences)} differences")
        for d in differences[:50]:
            print("  " + json.dumps(d, ensure_ascii=False))
    print(f"work folder: {s['folder']}")

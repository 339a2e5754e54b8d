"""``farelab card zoo``: the card zoo and its answer key (:mod:`farelab.testbed`), from the
command line."""

from __future__ import annotations

import argparse

from farelab._errors import CliError
from farelab.card import DEMO_KEYS, KeysFileError, describe_path, load_keys_file, shown, yuan_to_fen
from farelab.testbed import ZooError, build_zoo, parse_moment, write_zoo
from farelab.validator import shipped_networks

__all__ = ["zoo_command"]


def zoo_command(args: argparse.Namespace) -> int:
    """``farelab card zoo``: build and write the zoo the arguments describe."""
    networks = shipped_networks()
    network = networks.get(args.network)
    if network is None:
        known = ", ".join(networks)
        raise CliError(f"--network {shown(args.network)} is not a shipped network ({known})")
    fare: int | None = None
    if args.bus is not None:
        try:
            fare = yuan_to_fen(args.bus, what="--bus")
        except ValueError as exc:
            raise CliError(str(exc)) from None
    keys, keys_file = DEMO_KEYS, None
    if args.keys is not None:
        try:
            keys = load_keys_file(args.keys)
        except KeysFileError as exc:
            raise CliError(str(exc)) from None
        keys_file = args.keys.resolve()
    try:
        zoo = build_zoo(
            network=network,
            at=parse_moment(args.at),
            station=args.station,
            bus_fare_fen=fare,
            kiosk=args.kiosk,
            seed=args.seed,
            keys=keys,
            keys_file=keys_file,
            reader=args.reader,
        )
        manifest = write_zoo(args.dir, zoo)
    except ZooError as exc:
        raise CliError(str(exc)) from None
    results: dict[str, int] = {}
    for card in manifest["cards"]:
        results[card["expect"]["result"]] = results.get(card["expect"]["result"], 0) + 1
    counted = ", ".join(f"{n} {result}" for result, n in sorted(results.items()))
    print(
        f"{len(manifest['cards'])} cards written to {describe_path(args.dir)} "
        f"({counted}); answer key manifest.json, devices validator.toml, "
        f"assuming {zoo.at.isoformat()}"
    )
    return 0

"""``farelab``: one command, a subcommand per part of the system.

Each subcommand's module (and what it imports: numpy, the MQTT client, the database drivers) is
loaded only when that subcommand runs: ``farelab --help`` and ``farelab card show`` start about as
fast as the interpreter does.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from farelab import __version__
from farelab._errors import CliError

__all__ = ["COMMANDS", "main"]

#: Each subcommand: the module that registers it, and its one-line help (the same words the
#: module gives it, shown by ``farelab --help`` without loading the module).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("farelab._demo", "run the system end to end, narrated"),
    "card": ("farelab._card", "issue, inspect and present simulated T-Union cards"),
    "validator": ("farelab._validator", "bus and metro validators: run them, or replay taps"),
    "topup": (
        "farelab._topup",
        "the top-up kiosk: host-authorized loads under the 1000-yuan cap",
    ),
    "backend": ("farelab._backend", "the clearing backend: ingest uploads, report on the ledger"),
    "cards": (
        "farelab._cards",
        "card records: issue, report lost, replace, refund, cancel; status and e-card",
    ),
    "bench": (
        "farelab._bench",
        "measure taps, the backend, start-up, memory, the city and the testbed against their "
        "budgets",
    ),
    "trace": ("farelab._trace", "read APDU traces: decode one, or set two side by side"),
    "testbed": (
        "farelab._testbed",
        "score a terminal farelab did not write against the card zoo's answer key",
    ),
    "city": (
        "farelab._city",
        "a whole city's fare system, every device a process, reconciled to the fen",
    ),
}


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The command tree: every subcommand in full for ``"*"``, else ``command``'s in full and the
    others by name and help only (enough to list them, and to say a name is unknown)."""
    parser = argparse.ArgumentParser(
        prog="farelab",
        description=(
            "A testable simulator of contactless transit fare collection: the T-Union card, "
            "bus and metro validators, the top-up kiosk and the clearing backend."
        ),
        epilog="Run 'farelab COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"farelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if command in ("*", name):
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(words))
    args = parser.parse_args(words)
    try:
        status: int = args.func(args)
    except CliError as exc:
        print(f"farelab: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("farelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())

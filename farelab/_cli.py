"""``farelab``: one command, a subcommand per part of the system."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from farelab import __version__
from farelab import _backend as backend_cli
from farelab import _bench as bench_cli
from farelab import _card as card_cli
from farelab import _demo as demo
from farelab import _topup as topup_cli
from farelab import _validator as validator_cli
from farelab._errors import CliError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
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
    demo.register(sub)
    card_cli.register(sub)
    validator_cli.register(sub)
    topup_cli.register(sub)
    backend_cli.register(sub)
    bench_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
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

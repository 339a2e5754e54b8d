"""``farelab bench``: the benchmark suite, its budget table and its JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench._suite import budget_table, dump, run_suite
from farelab._errors import CliError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench``."""
    bench = sub.add_parser(
        "bench",
        help="measure tap latency, throughput and memory against their budgets",
        description="Run the benchmarks (it starts its own pcscd and Mosquitto), print the "
        "budget table (measured vs budget, ✓/✗), and optionally write every figure as JSON. "
        "Exit status: 0 all measured budgets hold, 1 one is missed, 2 a measure broke.",
    )
    bench.add_argument(
        "--quick", action="store_true", help="smaller counts (CI runs this to catch breakage)"
    )
    bench.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    doc = run_suite(
        quick=args.quick, progress=lambda line: print(line, file=sys.stderr, flush=True)
    )
    if args.json is not None:
        try:
            dump(doc, args.json)
        except OSError as exc:
            raise CliError(f"cannot write {args.json}: {exc.strerror}") from None
    print(budget_table(doc))
    errors = doc.get("errors")
    if isinstance(errors, dict) and errors:
        for name, error in errors.items():
            print(f"not measured: {name}: {error}", file=sys.stderr)
        return 2
    budgets = doc.get("budgets")
    missed = isinstance(budgets, dict) and any(b["holds"] is False for b in budgets.values())
    return 1 if missed else 0

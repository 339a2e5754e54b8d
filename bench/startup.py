"""Start-up time of the commands a testbed calls by the thousand, against a bare interpreter.

What runs: the installed ``farelab`` console script next to ``sys.executable`` (what users run)
when it exists, else ``sys.executable -m farelab``; the bare interpreter is ``sys.executable -c
pass``.  The commands take turns (interleaved, so a noisy neighbour slows them alike), after one
untimed round.  They run with bytecode caches, as an installed farelab has them: in a temporary
``PYTHONPYCACHEPREFIX`` that the untimed round fills, whatever ``PYTHONDONTWRITEBYTECODE`` says
(else every run would compile farelab's sources again, which no installed copy does).

``python -m farelab.bench.startup [--runs N]`` prints each command's median and 90th-percentile
wall time and its ratio to the bare interpreter's median, ``--help``, ``card new`` and ``card
show``; :func:`figures` gives ``farelab bench`` the budgeted ones, ``--help`` and ``card show``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["farelab_command", "figures", "main", "measure"]

BARE = "python -c pass"
HELP = "farelab --help"
CARD_NEW = "farelab card new"
CARD_SHOW = "farelab card show"


def farelab_command() -> list[str]:
    """How users start farelab: the console script beside the interpreter, or ``-m farelab``."""
    script = Path(sys.executable).with_name("farelab")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "farelab"]


def _commands(card: Path, *, card_new: bool) -> dict[str, list[str]]:
    farelab = farelab_command()
    commands = {
        BARE: [sys.executable, "-c", "pass"],
        HELP: [*farelab, "--help"],
        CARD_SHOW: [*farelab, "card", "show", str(card)],
    }
    if card_new:
        commands[CARD_NEW] = [*farelab, "card", "new", str(card.with_suffix(".new"))]
    return commands


def measure(runs: int, *, card_new: bool = True) -> dict[str, list[float]]:
    """Wall seconds of each command (keyed by how it reads: ``"farelab --help"``), ``runs``
    times each, in turn; ``card_new=False`` leaves out ``card new``."""
    if runs < 1:
        raise ValueError(f"runs must be 1 or more, got {runs}")
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        card = Path(tmp) / "bench.card"
        commands = _commands(card, card_new=card_new)
        subprocess.run(
            [*farelab_command(), "card", "new", str(card)], check=True, capture_output=True, env=env
        )
        times: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(-1, runs):  # round -1 fills the bytecode caches, untimed
            for name, argv in commands.items():
                card.with_suffix(".new").unlink(missing_ok=True)
                start = time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True, env=env)
                if i >= 0:
                    times[name].append(time.perf_counter() - start)
            if (i + 1) % 10 == 0 and i >= 0:
                print(f"  {i + 1}/{runs} runs", file=sys.stderr)
    return times


def figures(runs: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``farelab --help`` and ``farelab card show`` against the bare interpreter, ``runs`` times
    each, interleaved.

    Figures: the medians ``cli_bare_ms``, ``cli_help_ms``, ``cli_card_show_ms``; each command's
    median over the bare median, ``cli_help_ratio`` and ``cli_card_show_ratio``; and the worse of
    the two, ``cli_startup_ratio``.  Samples (milliseconds, in run order): ``cli_bare``,
    ``cli_help``, ``cli_card_show``.
    """
    times = measure(runs, card_new=False)
    samples = {
        "cli_bare": [t * 1000 for t in times[BARE]],
        "cli_help": [t * 1000 for t in times[HELP]],
        "cli_card_show": [t * 1000 for t in times[CARD_SHOW]],
    }
    medians = {name: statistics.median(values) for name, values in samples.items()}
    help_ratio = medians["cli_help"] / medians["cli_bare"]
    show_ratio = medians["cli_card_show"] / medians["cli_bare"]
    return {
        "cli_bare_ms": medians["cli_bare"],
        "cli_help_ms": medians["cli_help"],
        "cli_card_show_ms": medians["cli_card_show"],
        "cli_help_ratio": help_ratio,
        "cli_card_show_ratio": show_ratio,
        "cli_startup_ratio": max(help_ratio, show_ratio),
    }, samples


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit status 0."""
    parser = argparse.ArgumentParser(
        prog="python -m farelab.bench.startup",
        description="Start-up wall time of farelab's light commands against a bare interpreter.",
    )
    parser.add_argument("--runs", type=int, default=30, help="runs of each command (default 30)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be 1 or more")
    print(f"measuring {' '.join(farelab_command())}", file=sys.stderr)
    times = measure(args.runs)
    bare = statistics.median(times[BARE])
    ratios: dict[str, float] = {}
    print(f"{'command':<20} {'median':>9} {'p90':>9} {'× bare':>7}")
    for name in (BARE, HELP, CARD_NEW, CARD_SHOW):
        samples = sorted(times[name])
        median = statistics.median(samples)
        p90 = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
        ratios[name] = median / bare
        print(f"{name:<20} {median * 1000:7.1f}ms {p90 * 1000:7.1f}ms {ratios[name]:7.1f}")
    worse = max(ratios[HELP], ratios[CARD_SHOW])
    print(f"cli_startup_ratio (the worse of --help and card show): {worse:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

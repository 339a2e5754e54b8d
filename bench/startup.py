"""Start-up time of the commands a testbed calls by the thousand, against a bare interpreter.

``python -m farelab.bench.startup [--runs N]`` runs each command N times in turn (interleaved, so
a noisy neighbour slows them alike) and prints the median and 90th-percentile wall time, and each
command's ratio to the bare interpreter's median.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "measure"]


def _commands(card: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "python -c pass": [py, "-c", "pass"],
        "farelab --help": [py, "-m", "farelab", "--help"],
        "farelab card new": [py, "-m", "farelab", "card", "new", str(card.with_suffix(".new"))],
        "farelab card show": [py, "-m", "farelab", "card", "show", str(card)],
    }


def measure(runs: int) -> dict[str, list[float]]:
    """Wall seconds of each command, ``runs`` times."""
    with tempfile.TemporaryDirectory() as tmp:
        card = Path(tmp) / "bench.card"
        subprocess.run(
            [sys.executable, "-m", "farelab", "card", "new", str(card)],
            check=True,
            capture_output=True,
        )
        commands = _commands(card)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(runs):
            for name, argv in commands.items():
                card.with_suffix(".new").unlink(missing_ok=True)
                start = time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
            if (i + 1) % 10 == 0:
                print(f"  {i + 1}/{runs} runs", file=sys.stderr)
    return times


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
    times = measure(args.runs)
    bare = statistics.median(times["python -c pass"])
    print(f"{'command':<20} {'median':>9} {'p90':>9} {'× bare':>7}")
    for name, samples in times.items():
        samples.sort()
        median = statistics.median(samples)
        p90 = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
        print(f"{name:<20} {median * 1000:7.1f}ms {p90 * 1000:7.1f}ms {median / bare:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

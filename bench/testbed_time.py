"""The testbed's own time per card: ``farelab testbed run`` beyond pcscd's presence polls.

What runs: a bus zoo (``changzhou``, 2 yuan) written now, its cards presented in turn (over again
when more are asked than the zoo has) by :func:`farelab.testbed.run_zoo` — what ``farelab
testbed run`` calls — in "Virtual PCD 00 00" of a pcscd of our own, to farelab's validator
(``farelab validator run``, a process of its own) as the terminal under test.

Each card's wall time is pcscd's and the terminal's, and the rest is ours.  pcscd's: from the card
entering the field to the terminal's first APDU (``testbed_presence_ms``: pcscd's presence poll,
every 0.4 s, finding the card, then the terminal seeing it), and from the card being taken away to
pcscd reporting the reader empty (``testbed_removal_ms``: the same poll finding it gone — a card
must be seen gone before the next one can be seen come).  Ours, ``testbed_ms_per_card``: the run's
wall time per card less those two — the APDUs, the wait until the terminal lets the card go, taking
it away, judging it and setting up the next card.  The terminal's own time between its APDUs
and after its last one counts here too (``testbed_apdus_ms``, ``testbed_terminal_after_ms``):
on a loaded machine farelab's validator, a Python process, is what grows.

``python -m farelab.bench.testbed_time [CARDS]`` prints the figures (under ``flock
/tmp/farelab-pcscd.lock``).
"""

from __future__ import annotations

import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from farelab.card import CST, running_pcscd
from farelab.testbed import build_zoo, load_manifest, run_zoo, select_cards, write_zoo
from farelab.validator import shipped_networks

__all__ = ["main", "measure"]

_SLOT = ("127.0.0.1", 35963)


def _validator(config: Path, journal: Path, log: Path) -> subprocess.Popen[str]:
    """farelab's validator on the zoo's reader, once it says it runs (and its reader is open)."""
    command = ["validator", "run", "--config", str(config), "--journal", str(journal)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "farelab", *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.stdout is not None
    said = ""
    deadline = time.monotonic() + 30
    while "running" not in said and time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if ready:
            said += proc.stdout.readline()
    if "running" not in said:
        proc.kill()
        proc.wait()
        log.write_text(said)
        raise RuntimeError(f"farelab validator run did not start: {said[-500:]}")
    time.sleep(0.5)  # its reader thread opens the reader and waits for a card
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(cards: int, folder: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Present ``cards`` zoo cards to farelab's validator through a pcscd of our own; the figures
    (``testbed_ms_per_card``, ``testbed_presence_ms``, ``testbed_removal_ms``, ``testbed_cards``
    and what explains them) and each card's samples in ms (``testbed_card``: ours,
    ``testbed_presence``, ``testbed_removal``).

    What explains ``testbed_ms_per_card``: ``testbed_apdus_ms`` (first to last APDU: the
    terminal, pcscd and the card), ``testbed_until_done_ms`` (last APDU to the end of the turn),
    of which ``testbed_terminal_after_ms`` is the terminal's own work before it powers the card
    down (its journal, say) and the rest the run seeing the card stay down; what is left is
    taking the card away, judging it and setting up the next.  ``testbed_own_ms`` is the figure
    less the terminal's time (its APDUs and its work after the last): the run's alone."""
    if cards < 1:
        raise ValueError(f"cards must be 1 or more, got {cards}")
    folder.mkdir(parents=True, exist_ok=True)
    zoo = folder / "testbed-zoo"
    at = datetime.now(CST).replace(microsecond=0)
    network = shipped_networks()["changzhou"]
    reader = "pcsc:Virtual PCD 00 00"
    write_zoo(zoo, build_zoo(network=network, at=at, bus_fare_fen=200, reader=reader))
    manifest = load_manifest(zoo)
    pool = select_cards(manifest, cases=None, devices=None)
    chosen = [pool[i % len(pool)] for i in range(cards)]
    slots = dict.fromkeys({c.device for c in chosen}, _SLOT)
    with running_pcscd(folder / "testbed-pcscd.log"):
        terminal = _validator(zoo / "validator.toml", folder / "testbed-j.db", folder / "v.log")
        try:
            began = time.perf_counter()
            results = run_zoo(manifest, chosen, slots=slots, quiet=0.5, timeout=10.0)
            wall = time.perf_counter() - began
        finally:
            _stop(terminal)
    n = len(results)
    presences = [r.presence for r in results]
    presence = [p.to_first_apdu * 1000 for p in presences]
    removal = [p.removal * 1000 for p in presences]
    ours = [r.seconds * 1000 - a - b for r, a, b in zip(results, presence, removal, strict=True)]
    ups = [p.to_power_up * 1000 for p in presences if p.to_power_up is not None]
    after = [p.to_power_off * 1000 for p in presences if p.to_power_off is not None]
    wall_ms = wall * 1000 / n
    figures = {
        "testbed_cards": float(n),
        "testbed_wall_ms_per_card": wall_ms,
        "testbed_presence_ms": statistics.fmean(presence),
        "testbed_removal_ms": statistics.fmean(removal),
        "testbed_ms_per_card": wall_ms - statistics.fmean(presence) - statistics.fmean(removal),
        "testbed_card_p50_ms": statistics.median(ours),
        "testbed_card_max_ms": max(ours),
        "testbed_power_up_ms": statistics.fmean(ups) if ups else float("nan"),
        "testbed_apdus_ms": statistics.fmean(p.busy * 1000 for p in presences),
        "testbed_until_done_ms": statistics.fmean(p.quiet * 1000 for p in presences),
        "testbed_terminal_after_ms": statistics.fmean(after) if after else float("nan"),
        "testbed_own_ms": wall_ms
        - statistics.fmean(presence)
        - statistics.fmean(removal)
        - statistics.fmean(p.busy * 1000 for p in presences)
        - (statistics.fmean(after) * len(after) / n if after else 0.0),
        "testbed_powered_down_share": sum(p.ended_by == "power-off" for p in presences) / n,
        "testbed_passed_share": sum(r.passed for r in results) / n,
    }
    samples = {"testbed_card": ours, "testbed_presence": presence, "testbed_removal": removal}
    return figures, samples


def main(argv: list[str] | None = None) -> int:
    """Print the figures of one run (``CARDS``, default 23: one bus zoo)."""
    import argparse  # noqa: PLC0415

    from farelab.bench._args import count  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m farelab.bench.testbed_time",
        description="Time `farelab testbed run` over a bus zoo presented in pcscd's virtual "
        "reader, and its time per card beyond pcscd's presence detection. Needs pcscd and "
        "vsmartcard-vpcd; run it alone (flock /tmp/farelab-pcscd.lock).",
    )
    parser.add_argument(
        "cards",
        nargs="?",
        type=count,
        default=23,
        help="zoo cards to present (default 23: one bus zoo)",
    )
    cards = parser.parse_args(sys.argv[1:] if argv is None else argv).cards
    with tempfile.TemporaryDirectory(prefix="farelab-testbed-time-") as tmp:
        figures, _ = measure(cards, Path(tmp))
    for name, value in figures.items():
        print(f"{name:<28} {value:10.1f}" if value >= 10 else f"{name:<28} {value:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

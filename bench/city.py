"""The city end to end: ``farelab city`` run as users run it, its taps per second of wall time
once every tap is journalled, uploaded, TAC-verified and reconciled.

What runs: ``farelab city --riders N --duration S --speed X --devices-per-process K --dir
FOLDER/city --json FOLDER/city.json`` in a subprocess (every validator, the backend with its
workers, the kiosk and Mosquitto are its own processes, as in the field).  The figure is

    city_taps_per_s = taps / (riding wall seconds + drain wall seconds)

— the riding from the first rider's start to the last tap answered, the drain until every
device's outbox is acknowledged by the backend — and it counts only when the city reconciled
(every card, journal and clearing total agrees with the ledger): otherwise :func:`measure`
raises :class:`CityNotReconciledError` with the differences.  Set-up (writing the cards,
starting the processes) and the reconciliation itself are left out; ``city_total_s`` has them.

The timetable asks what the riders ask: at the default speed (900: the day 06:00–21:00 in a
minute) a rider taps about 5.3 times a day, so 12 000 riders over 60 s ask about 1 070 taps a
second on average (more at the peaks); ``city_offered_taps_per_s`` is taps ÷ the planned
riding seconds, ``city_lag_s`` how much longer the riding took than planned (0: the city kept
the timetable).

``python -m farelab.bench.city [--riders N] [--duration S] [--devices-per-process K]`` prints
the figures; :func:`figures` gives ``farelab bench`` its run (``quick``: a small city, about 25
seconds in all).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "DEVICES_PER_PROCESS",
    "FULL",
    "QUICK",
    "CityNotReconciledError",
    "figures",
    "main",
    "measure",
]

DEVICES_PER_PROCESS = 25
"""Devices a validator process hosts in the bench's city: Taiyuan's 49 in two processes (one
per core), each with its journal and its uplink process."""
FULL = {"riders": 12_000, "duration_s": 60.0}
"""The bench's city: about 64 000 taps asked over a simulated day in a minute."""
QUICK = {"riders": 1_000, "duration_s": 6.0}
"""``--quick``: a morning of a small city (about 25 s in all)."""


class CityNotReconciledError(RuntimeError):
    """The city ran but did not reconcile: its figure does not count."""


def measure(
    riders: int,
    duration_s: float,
    folder: Path,
    *,
    speed: float = 900.0,
    devices_per_process: int = DEVICES_PER_PROCESS,
    seed: int = 1,
    timeout_s: float | None = None,
) -> dict[str, float]:
    """Run ``farelab city`` in ``folder`` (which must be empty or new) and return its figures:
    ``city_taps_per_s``, ``city_device_rss_mb`` (a validator process's resident set at the
    end, mean), ``city_taps``, ``city_reconciled`` (1.0), ``city_devices``,
    ``city_processes`` (validator processes), ``city_wall_s`` (riding + drain), and
    ``city_riding_s``, ``city_drain_s``, ``city_total_s``, ``city_offered_taps_per_s``,
    ``city_lag_s``, ``city_uplink_rss_mb`` (a validator's uplink process, mean), ``city_loads``.

    CityNotReconciledError (with the differences) if it did not reconcile; RuntimeError if the
    command failed otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    summary_file = folder / "city.json"
    argv = [
        sys.executable,
        "-m",
        "farelab",
        "city",
        "--riders",
        str(riders),
        "--duration",
        f"{duration_s:g}",
        "--speed",
        f"{speed:g}",
        "--seed",
        str(seed),
        "--devices-per-process",
        str(devices_per_process),
        "--dir",
        str(folder / "city"),
        "--json",
        str(summary_file),
    ]
    limit = timeout_s if timeout_s is not None else 300.0 + duration_s * 10
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    total = time.monotonic() - started
    summary: dict[str, Any] = {}
    if summary_file.exists() and summary_file.stat().st_size:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    if not summary:
        tail = " / ".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"farelab city failed (status {done.returncode}): {tail}")
    if not summary["reconciled"]:
        differences = summary.get("differences") or []
        shown = "; ".join(json.dumps(d, ensure_ascii=False) for d in differences[:20])
        raise CityNotReconciledError(
            f"the city did not reconcile ({len(differences)} differences): {shown}"
        )
    return figures_of(summary, duration_s=duration_s, total_s=total)


def figures_of(summary: dict[str, Any], *, duration_s: float, total_s: float) -> dict[str, float]:
    """The figures of a reconciled city's ``--json`` summary."""
    riding = float(summary["riding_s"])
    drain = float(summary.get("drain_s") or 0.0)
    wall = riding + drain
    taps = int(summary["taps"])
    return {
        "city_taps_per_s": round(taps / wall, 1) if wall > 0 else 0.0,
        "city_device_rss_mb": float(summary.get("memory_per_device_mb") or 0.0),
        "city_taps": float(taps),
        "city_reconciled": 1.0 if summary["reconciled"] else 0.0,
        "city_devices": float(summary["devices"]) - 1.0,  # the kiosk is not a validator
        "city_processes": float(summary.get("validator_processes") or summary["devices"] - 1),
        "city_wall_s": round(wall, 1),
        "city_riding_s": riding,
        "city_drain_s": drain,
        "city_total_s": round(total_s, 1),
        "city_offered_taps_per_s": round(taps / duration_s, 1),
        "city_lag_s": round(max(0.0, riding - duration_s), 1),
        "city_uplink_rss_mb": float(summary.get("uplink_memory_per_process_mb") or 0.0),
        "city_loads": float(summary.get("loads") or 0),
    }


def figures(quick: bool = False, folder: Path | None = None) -> dict[str, float]:
    """``farelab bench``'s city: :data:`FULL` (or :data:`QUICK`) in ``folder`` (default: a new
    temporary folder, removed afterwards)."""
    size = QUICK if quick else FULL
    riders, duration = int(size["riders"]), float(size["duration_s"])
    if folder is not None:
        return measure(riders, duration, folder)
    with tempfile.TemporaryDirectory(prefix="farelab-bench-city-") as tmp:
        return measure(riders, duration, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    """``python -m farelab.bench.city``: run the city once and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m farelab.bench.city", description=__doc__)
    parser.add_argument("--riders", type=int, default=int(FULL["riders"]))
    parser.add_argument("--duration", type=float, default=float(FULL["duration_s"]))
    parser.add_argument("--speed", type=float, default=900.0)
    parser.add_argument("--devices-per-process", type=int, default=DEVICES_PER_PROCESS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="farelab-bench-city-") as tmp:
        out = measure(
            args.riders,
            args.duration,
            args.dir or Path(tmp),
            speed=args.speed,
            devices_per_process=args.devices_per_process,
            seed=args.seed,
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

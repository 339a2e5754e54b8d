"""The city's chaos schedule: which fault strikes what, when and for how long, drawn from a seed.

Pure: no clock, no process, no socket.  The city's shell reads the schedule and applies each
:class:`Fault` at its time; the same seed gives the same schedule, so a run that lost money can
be run again with the same faults.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, get_args

__all__ = ["FAULT_KINDS", "PULL_STEPS", "Fault", "FaultKind", "plan_faults"]

FaultKind = Literal[
    "kill_broker",
    "kill_backend_worker",
    "kill_device",
    "kill_kiosk",
    "pull_card",
    "cut",
    "delay",
    "reset",
]
"""What a fault does: SIGKILL a process (and start it again after ``duration``), pull a card
from a device's reader at a step of its next tap, or cut, delay or reset a device's connection
to the broker at the fault proxy."""

FAULT_KINDS: Final[tuple[FaultKind, ...]] = get_args(FaultKind)
"""Every kind of fault, in a fixed order."""

PULL_STEPS: Final[tuple[str, ...]] = ("SELECT", "READ", "INIT", "UPDATE_CAPP", "DEBIT")
"""The steps of a tap after which a ``pull_card`` fault takes the card away."""

BROKER: Final = "broker"
"""The target of a ``kill_broker`` fault."""

SETTLE_SHARE: Final = 0.15
"""The last share of a run with no fault in it, so that every device can drain its outbox
before the reconciliation."""

WARM_UP_SHARE: Final = 0.05
"""The first share of a run with no fault in it: the processes are still starting."""

SPACING: Final = 1.0
"""Seconds a fault without a duration still holds its target, so that two faults on one target
never strike in the same instant."""

# (shortest, longest) seconds each kind holds its target; 0 for an instant fault.
_DURATIONS: Final[dict[FaultKind, tuple[float, float]]] = {
    "kill_broker": (2.0, 10.0),
    "kill_backend_worker": (0.0, 0.0),
    "kill_device": (1.0, 5.0),
    "kill_kiosk": (1.0, 5.0),
    "pull_card": (0.0, 0.0),
    "cut": (1.0, 8.0),
    "delay": (1.0, 10.0),
    "reset": (0.0, 0.0),
}

_DELAY_MS: Final = (50, 800)

# How often each kind is drawn beyond the first of each: card pulls and link faults are the
# common case, a broker crash the rare one.
_WEIGHTS: Final[dict[FaultKind, int]] = {
    "kill_broker": 1,
    "kill_backend_worker": 1,
    "kill_device": 2,
    "kill_kiosk": 1,
    "pull_card": 3,
    "cut": 2,
    "delay": 2,
    "reset": 2,
}


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault of the schedule.

    ``at``: seconds from the start of the run; ``kind``: what it does; ``target``: the device
    id, kiosk id, ``backend-worker-N`` or ``broker`` it strikes; ``duration``: seconds the
    target stays down, cut or delayed (0 for an instant fault: a worker kill, a card pull, a
    reset); ``step``: for ``pull_card``, the tap step after which the card goes (the city
    sends it with the device's next tap request as ``"pull_after"``); ``delay_ms``: for
    ``delay``, the latency added to every chunk in both directions.
    """

    at: float
    kind: FaultKind
    target: str
    duration: float = 0.0
    step: str | None = None
    delay_ms: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.at < 0 or self.duration < 0:
            raise ValueError("a fault's time and duration are never negative")
        if (self.step is not None) != (self.kind == "pull_card"):
            raise ValueError("a pull_card fault, and only it, names a step")
        if self.step is not None and self.step not in PULL_STEPS:
            raise ValueError(f"unknown tap step {self.step!r}")
        if (self.delay_ms is not None) != (self.kind == "delay"):
            raise ValueError("a delay fault, and only it, carries delay_ms")

    @property
    def ends(self) -> float:
        """Seconds from the start when the target is back (``at`` for an instant fault)."""
        return self.at + self.duration

    def as_json(self, start: datetime | str | None = None) -> dict[str, Any]:
        """The fault for the city's summary: ``at`` in seconds from the start (3 decimals),
        ``kind``, ``target``, ``duration`` (3 decimals), and ``step`` or ``delay_ms`` where the
        kind has one.  Given the run's ``start`` (an aware datetime or its ISO 8601 text),
        also ``wallclock``: the fault's own time as ISO 8601."""
        out: dict[str, Any] = {
            "at": round(self.at, 3),
            "kind": self.kind,
            "target": self.target,
            "duration": round(self.duration, 3),
        }
        if self.step is not None:
            out["step"] = self.step
        if self.delay_ms is not None:
            out["delay_ms"] = self.delay_ms
        if start is not None:
            begun = datetime.fromisoformat(start) if isinstance(start, str) else start
            if begun.utcoffset() is None:
                raise ValueError("the run's start needs a UTC offset")
            out["wallclock"] = (begun + timedelta(seconds=self.at)).isoformat(
                timespec="milliseconds"
            )
        return out


def plan_faults(
    seed: int,
    duration: float,
    devices: Sequence[str],
    *,
    kiosks: Sequence[str] = ("kiosk-1",),
    workers: int = 2,
    rate_per_min: float = 6.0,
) -> list[Fault]:
    """The faults of a run of ``duration`` seconds, sorted by time, the same for the same
    arguments.

    ``seed``: drives every choice; ``devices``: the validator ids (their processes, card pulls
    and proxy connections); ``kiosks``: the kiosk ids; ``workers``: how many backend workers the
    supervisor runs (targets ``backend-worker-1`` …); ``rate_per_min``: faults per minute on
    average.  No fault strikes in the first 5 % of the run or lasts into its last 15 %; two
    faults on one target never overlap (an instant fault holds its target for a second).  In a
    run of 60 s or more every kind with a target appears at least once.
    """
    if duration <= 0:
        raise ValueError("a run's duration must be positive")
    if workers < 0 or rate_per_min < 0:
        raise ValueError("workers and rate_per_min are never negative")
    names = [*devices, *kiosks, BROKER, *(_worker(i) for i in range(1, workers + 1))]
    if len(set(names)) != len(names):
        raise ValueError("device, kiosk and worker names must be distinct")
    rng = random.Random(seed)
    targets: dict[FaultKind, list[str]] = {
        "kill_broker": [BROKER],
        "kill_backend_worker": [_worker(i) for i in range(1, workers + 1)],
        "kill_device": list(devices),
        "kill_kiosk": list(kiosks),
        "pull_card": list(devices),
        "cut": list(devices),
        "delay": list(devices),
        "reset": list(devices),
    }
    usable = [k for k in FAULT_KINDS if targets[k]]
    if not usable:
        return []
    window = (duration * WARM_UP_SHARE, duration * (1 - SETTLE_SHARE))
    count = round(rate_per_min * duration / 60)
    kinds: list[FaultKind] = list(usable) if duration >= 60 else []
    weights = [_WEIGHTS[k] for k in usable]
    kinds += rng.choices(usable, weights=weights, k=max(0, count - len(kinds)))
    busy: dict[str, list[tuple[float, float]]] = {}
    faults: list[Fault] = []
    for kind in kinds:
        fault = _place(rng, kind, targets[kind], window, busy)
        if fault is not None:
            faults.append(fault)
    faults.sort(key=lambda f: (f.at, f.target))
    return faults


def _worker(i: int) -> str:
    return f"backend-worker-{i}"


def _place(
    rng: random.Random,
    kind: FaultKind,
    targets: Sequence[str],
    window: tuple[float, float],
    busy: dict[str, list[tuple[float, float]]],
) -> Fault | None:
    """A fault of ``kind`` on one of ``targets`` in a free stretch of ``window``, booked in
    ``busy``; ``None`` when no target has room for it."""
    shortest, longest = _DURATIONS[kind]
    length = round(rng.uniform(shortest, longest), 3)
    held = max(length, SPACING)
    step = rng.choice(PULL_STEPS) if kind == "pull_card" else None
    delay_ms = rng.randint(*_DELAY_MS) if kind == "delay" else None
    order = list(targets)
    rng.shuffle(order)
    for target in order:
        at = _free_start(rng, busy.get(target, []), window, held)
        if at is None:
            continue
        busy.setdefault(target, []).append((at, at + held))
        return Fault(at, kind, target, length, step, delay_ms)
    return None


def _free_start(
    rng: random.Random, taken: list[tuple[float, float]], window: tuple[float, float], held: float
) -> float | None:
    """A start time, uniform over the starts in ``window`` where an interval of ``held``
    seconds overlaps none of ``taken``; ``None`` if there is none."""
    lo, hi = window
    gaps: list[tuple[float, float]] = []  # ranges of possible starts
    cursor = lo
    for begin, end in sorted(taken):
        if begin - held > cursor:
            gaps.append((cursor, begin - held))
        cursor = max(cursor, end)
    if hi - held > cursor:
        gaps.append((cursor, hi - held))
    total = sum(b - a for a, b in gaps)
    if total <= 0:
        return None
    point = rng.uniform(0, total)
    for a, b in gaps:
        if point <= b - a:
            return a + point
        point -= b - a
    return gaps[-1][1]

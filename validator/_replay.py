"""Deterministic, in-process replay of a taps file (``farelab validator replay``).

Each input line: ``{"device": ID, "card": PATH, "at": ISO-8601 with offset, "pull_after":
optional step}`` (or ``"from_trace": TRACE.jsonl`` in place of ``"card"``: a stub card that
answers from a recorded session; ``"behaviour": FILE.toml``: the card misbehaves as the file's
rules say, their counts carried from one line to the next of the same card); each output line:
``{"device", "card_serial", "result", "reason", "fare_fen", "balance_fen", "tac", "grey"}``.
The whole file is checked before the first tap runs, so a typo on line 900 does not leave 899
taps applied and the rest not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from farelab.card import (
    BehavingCard,
    Behaviour,
    BehaviourError,
    BehaviourState,
    InProcessReader,
    Reader,
    SimulatedCard,
    TraceCard,
    TraceWriter,
    TracingReader,
    step_of,
)
from farelab.validator._config import Config
from farelab.validator._decision import TapResult
from farelab.validator._journal import Journal
from farelab.validator._runtime import Validator, failure_text
from farelab.validator._values import shown

__all__ = ["PULL_STEPS", "ReplayError", "TapLine", "parse_taps", "replay", "result_json"]

PULL_STEPS = ("SELECT", "READ", "INIT", "UPDATE_CAPP", "DEBIT")


class ReplayError(ValueError):
    """A taps file that cannot be replayed; the message lists the bad lines."""


@dataclass(frozen=True, slots=True)
class TapLine:
    """One checked input line."""

    line: int
    device: str
    card: Path
    at: datetime
    pull_after: str | None
    from_trace: bool = False
    behaviour: Behaviour | None = None
    behaviour_file: Path | None = None


def _check(number: int, text: str, config: Config) -> TapLine:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    device, card, at, pull = (
        doc.get("device"),
        doc.get("card"),
        doc.get("at"),
        doc.get("pull_after"),
    )
    from_trace = "from_trace" in doc
    if from_trace:
        if card is not None:
            raise ValueError('"card" and "from_trace" cannot both be given')
        card = doc["from_trace"]
        if not isinstance(card, str) or not card:
            raise ValueError('"from_trace" must be a trace file path')
    if not isinstance(device, str):
        raise ValueError('"device" must be a device id')
    config.device(device)
    if not isinstance(card, str) or not card:
        raise ValueError('"card" must be a card image path')
    if not isinstance(at, str):
        raise ValueError('"at" must be an ISO-8601 time with offset')
    try:
        moment = datetime.fromisoformat(at)
    except ValueError:
        raise ValueError(f'"at" {shown(at)} is not ISO-8601') from None
    if moment.tzinfo is None:
        raise ValueError(f'"at" {shown(at)} has no UTC offset')
    if pull is not None and pull not in PULL_STEPS:
        raise ValueError(f'"pull_after" must be one of {", ".join(PULL_STEPS)}')
    unknown = set(doc) - {"device", "card", "from_trace", "at", "pull_after", "behaviour"}
    if unknown:
        raise ValueError(f"unknown keys {shown(sorted(unknown))}")
    behaviour, behaviour_file = _behaviour(doc.get("behaviour"), from_trace)
    return TapLine(number, device, Path(card), moment, pull, from_trace, behaviour, behaviour_file)


def _behaviour(value: object, from_trace: bool) -> tuple[Behaviour | None, Path | None]:
    """A line's ``behaviour`` file, read and checked now (a bad rule names its key)."""
    if value is None:
        return None, None
    if not isinstance(value, str) or not value:
        raise ValueError('"behaviour" must be a behaviour file path')
    if from_trace:
        raise ValueError('"behaviour" applies to a card image, not to "from_trace"')
    try:
        return Behaviour.load(Path(value)), Path(value)
    except BehaviourError as exc:
        raise ValueError(f'"behaviour": {exc}') from None


def parse_taps(lines: Iterator[str], config: Config) -> list[TapLine]:
    """Check every line; ReplayError listing the first problems."""
    taps: list[TapLine] = []
    problems: list[str] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            taps.append(_check(number, text, config))
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ReplayError("; ".join(problems[:10]) + more)
    return taps


def result_json(result: TapResult) -> dict[str, Any]:
    """A tap result as the replay (and the run loop) prints it."""
    return {
        "device": result.device,
        "card_serial": result.card_serial,
        "result": result.result,
        "reason": result.reason,
        "fare_fen": result.fare_fen,
        "balance_fen": result.balance_fen,
        "tac": result.tac or None,
        "grey": result.grey,
    }


def _card(tap: TapLine, recorded: dict[Path, TraceCard]) -> SimulatedCard | TraceCard:
    if not tap.from_trace:
        return SimulatedCard.from_file(tap.card)
    # One recording is one card's session: each tap of it goes on where the last one ended.
    card = recorded.get(tap.card)
    if card is None:
        card = recorded[tap.card] = TraceCard.from_file(tap.card)
    return card


def _behaving(
    tap: TapLine,
    card: SimulatedCard | TraceCard,
    states: dict[tuple[Path, Path], BehaviourState],
    log: TextIO | None,
) -> SimulatedCard | TraceCard | BehavingCard:
    if tap.behaviour is None or tap.behaviour_file is None:
        return card
    key = (tap.behaviour_file, tap.card)
    state = states.get(key)
    if state is None:
        state = states[key] = BehaviourState(tap.behaviour)
    # A replay keeps no clock: a delay is logged, never waited for, and a firing is logged at
    # the tap's own time, so that the same taps give the same log.
    at = tap.at.isoformat(timespec="milliseconds")
    label = {"line": tap.line, "device": tap.device, "card": str(tap.card)}
    return BehavingCard(card, state, log=log, sleep=lambda _: None, clock=lambda: at, label=label)


def replay(
    config: Config,
    taps: list[TapLine],
    journal: Journal,
    *,
    trace: TraceWriter | None = None,
    behaviour_log: TextIO | None = None,
) -> Iterator[TapResult]:
    """Run the taps in order; yields each result once it is journalled and the card written.
    ``trace``: where each tap's APDU exchanges are recorded, if anywhere; ``behaviour_log``:
    where each firing of a line's behaviour rules is written as a JSON line (the tap's time, its
    line, device and card, then the rule and what it did)."""
    devices = {dc.device.id: Validator(config=dc, journal=journal) for dc in config.devices}
    recorded: dict[Path, TraceCard] = {}
    # A behaviour's counts (presentations, occurrences) belong to one card under one file.
    behaving: dict[tuple[Path, Path], BehaviourState] = {}
    for tap in taps:
        device = devices[tap.device]
        try:
            card = _card(tap, recorded)
        except Exception as exc:  # any card that cannot be loaded is this tap's card_error
            yield device.card_failed(tap.at, f"line {tap.line}: {failure_text(exc, tap.card)}")
            continue
        # A muted card: the terminal gives up at once and the card is taken away.
        reader = InProcessReader(mute_wait=0)
        reader.insert(_behaving(tap, card, behaving, behaviour_log))
        if tap.pull_after is not None:
            step = tap.pull_after
            reader.pull_after(lambda apdu, step=step: step_of(apdu) == step)  # type: ignore[misc]
        elif isinstance(card, TraceCard):
            reader.pull_after(card.tears_after)  # where the recorded card left, this one does
        tapped: Reader = reader if trace is None else TracingReader(reader, trace)
        try:
            result = device.tap(tapped, tap.at)
        finally:
            if isinstance(card, SimulatedCard):
                card.close()  # out of the field: the next line's tap of this card may take it
        if journal.gate is not None:
            journal.gate.between_taps()  # nothing here waits on a display: collect now
        yield result
        if tap.line % 500 == 0:
            journal.checkpoint()

"""Card behaviours: fault injection for testing terminals we did not write.

A behaviour file (TOML) is a list of rules ``when → do``.  For each C-APDU the card receives, the
rules are tried in order and the first whose ``when`` matches fires its ``do`` (see
docs/testbed.md for the format)::

    seed = 7

    [[rule]]
    when = { command = "DEBIT", occurrence = 1 }
    do = { action = "vanish", moment = "after" }

The rules themselves are sans-IO: :class:`BehaviourState` counts presentations and commands and
draws its random numbers from a seeded generator, so the same APDU sequence fires the same rules.
:class:`BehavingCard` wraps any :class:`card.CardEndpoint` and acts the firings out: it answers a
status word or a corrupted answer itself, sleeps for a delay, and for ``vanish``, ``reset`` and
``mute`` raises a :class:`FieldFaultError` that the transport (the vicc client, the in-process
reader) turns into what a terminal sees when a card leaves the field or stops answering.
"""

from __future__ import annotations

import json
import random
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from farelab.card._messages import describe_path, shown
from farelab.card._reader import CardEndpoint, CardRemovedError

__all__ = [
    "ACTIONS",
    "COMMANDS",
    "Action",
    "BehavingCard",
    "Behaviour",
    "BehaviourError",
    "BehaviourState",
    "CardLeftError",
    "CardMutedError",
    "FieldFaultError",
    "Firing",
    "Rule",
    "When",
    "command_name",
    "enter_field",
]

COMMANDS = (
    "SELECT",
    "READ_BINARY",
    "READ_RECORD",
    "GET_BALANCE",
    "INIT_PURCHASE",
    "INIT_LOAD",
    "UPDATE_CAPP",
    "DEBIT",
    "CREDIT",
    "GET_PROOF",
)
"""The command names a rule's ``when.command`` may use (besides ``any``)."""

ACTIONS = ("vanish", "delay", "status", "corrupt", "mute", "reset")
"""What a rule may ``do``."""

_BY_INS = {
    0xA4: "SELECT",
    0xB0: "READ_BINARY",
    0xB2: "READ_RECORD",
    0x5C: "GET_BALANCE",
    0xDC: "UPDATE_CAPP",
    0x54: "DEBIT",
    0x52: "CREDIT",
    0x5A: "GET_PROOF",
}

# Where the MAC and the TAC sit in each answer that carries one (docs/card-protocol.md).
_FIELDS: dict[str, dict[str, slice]] = {
    "DEBIT": {"tac": slice(0, 4), "mac": slice(4, 8)},
    "CREDIT": {"tac": slice(0, 4)},
    "GET_PROOF": {"mac": slice(0, 4), "tac": slice(4, 8)},
    "INIT_LOAD": {"mac": slice(12, 16)},
}

_PARAMS: dict[str, frozenset[str]] = {
    "vanish": frozenset({"action", "moment", "away_ms"}),
    "reset": frozenset({"action", "moment"}),
    "mute": frozenset({"action", "moment"}),
    "delay": frozenset({"action", "ms"}),
    "status": frozenset({"action", "sw"}),
    "corrupt": frozenset({"action", "field"}),
}
_MOMENTS = ("before", "after")
_CORRUPTIBLE = ("data", "mac", "tac")
DEFAULT_AWAY_MS = 1000
"""How long a vanished card served through vpcd stays away before it comes back."""


def command_name(apdu: bytes) -> str | None:
    """The name of a C-APDU as rules use it (``DEBIT``, ``INIT_LOAD``, …), by INS (and P1 for
    INITIALIZE); None for anything else."""
    if len(apdu) < 4:
        return None
    if apdu[1] == 0x50:
        return "INIT_LOAD" if apdu[2] == 0x00 else "INIT_PURCHASE"
    return _BY_INS.get(apdu[1])


class BehaviourError(ValueError):
    """A behaviour file that cannot be used; the message names the file and the key."""


class FieldFaultError(CardRemovedError):
    """Raised by a card endpoint instead of answering; the transport acts it out.  A transport
    that does not know it sees a card removed, which is what a terminal would see."""


class CardLeftError(FieldFaultError):
    """The card leaves the field without answering.

    ``away``: seconds before it comes back into the field by itself (0: at once, a reset; None:
    only when someone puts it back)."""

    def __init__(self, message: str, *, away: float | None) -> None:
        super().__init__(message)
        self.away = away


class CardMutedError(FieldFaultError):
    """The card stays in the field and never answers again until it is removed."""


@dataclass(frozen=True, slots=True)
class When:
    """A rule's condition: every field given must hold."""

    command: str = "any"
    occurrence: int | None = None
    presentation: int | None = None
    probability: float | None = None


@dataclass(frozen=True, slots=True)
class Action:
    """What a rule does.  ``moment``: ``before`` the command takes effect or ``after`` it is
    committed (vanish, reset, mute); ``ms``: delay; ``sw``: status word; ``field``: what
    corrupt flips (``data``, ``mac``, ``tac``); ``away_ms``: how long a vanished card stays away
    when it is served through vpcd."""

    action: str
    moment: str = "before"
    ms: int = 0
    sw: int = 0
    field: str = "data"
    away_ms: int = DEFAULT_AWAY_MS

    def as_json(self) -> dict[str, Any]:
        """The parameters that matter for this action, as the log shows them."""
        doc: dict[str, Any] = {"do": self.action}
        if self.action in ("vanish", "reset", "mute"):
            doc["moment"] = self.moment
        if self.action == "vanish":
            doc["away_ms"] = self.away_ms
        elif self.action == "delay":
            doc["ms"] = self.ms
        elif self.action == "status":
            doc["sw"] = f"{self.sw:04X}"
        elif self.action == "corrupt":
            doc["field"] = self.field
        return doc


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``when → do`` rule; ``number`` counts from 1 in file order."""

    number: int
    when: When
    do: Action


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise BehaviourError(f"{where}: must be a table")
    return value


def _unknown(doc: Mapping[str, Any], allowed: frozenset[str] | set[str], where: str) -> None:
    extra = sorted(set(doc) - set(allowed))
    if extra:
        key = f"{where}.{extra[0]}" if where else extra[0]
        raise BehaviourError(f"{key}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _positive(doc: Mapping[str, Any], key: str, where: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BehaviourError(f"{where}.{key}: must be a whole number from 1, got {shown(value)}")
    return value


def _parse_when(value: object, where: str) -> When:
    doc = _table(value, where)
    _unknown(doc, {"command", "occurrence", "presentation", "probability"}, where)
    command = doc.get("command", "any")
    if command != "any" and command not in COMMANDS:
        raise BehaviourError(
            f"{where}.command: unknown command {shown(command)} (one of {', '.join(COMMANDS)}, any)"
        )
    probability = doc.get("probability")
    if probability is not None:
        if isinstance(probability, bool) or not isinstance(probability, int | float):
            raise BehaviourError(f"{where}.probability: must be a number from 0 to 1")
        if not 0 <= probability <= 1:
            raise BehaviourError(f"{where}.probability: must be from 0 to 1, got {probability}")
        probability = float(probability)
    return When(
        command=command,
        occurrence=_positive(doc, "occurrence", where),
        presentation=_positive(doc, "presentation", where),
        probability=probability,
    )


def _parse_do(value: object, where: str) -> Action:
    doc: Mapping[str, Any] = {"action": value} if isinstance(value, str) else _table(value, where)
    action = doc.get("action")
    if action not in _PARAMS:
        key = where if isinstance(value, str) else f"{where}.action"
        raise BehaviourError(f"{key}: unknown action {shown(action)} (one of {', '.join(ACTIONS)})")
    _unknown(doc, _PARAMS[action], where)
    moment = doc.get("moment", "before")
    if moment not in _MOMENTS:
        raise BehaviourError(f"{where}.moment: must be before or after, got {shown(moment)}")
    field = doc.get("field", "data")
    if field not in _CORRUPTIBLE:
        raise BehaviourError(f"{where}.field: must be data, mac or tac, got {shown(field)}")
    ms = 0
    if action == "delay":
        given = _positive(doc, "ms", where)
        if given is None:
            raise BehaviourError(f"{where}.ms: a delay needs its milliseconds")
        ms = given
    away = doc.get("away_ms", DEFAULT_AWAY_MS)
    if isinstance(away, bool) or not isinstance(away, int) or away < 0:
        raise BehaviourError(f"{where}.away_ms: must be a whole number from 0, got {shown(away)}")
    sw = 0
    if action == "status":
        text = doc.get("sw")
        if not isinstance(text, str) or len(text) != 4:
            raise BehaviourError(f"{where}.sw: must be a status word of 4 hex digits")
        try:
            sw = int(text, 16)
        except ValueError:
            raise BehaviourError(f"{where}.sw: {shown(text)} is not hex") from None
    return Action(action=action, moment=moment, ms=ms, sw=sw, field=field, away_ms=away)


@dataclass(frozen=True, slots=True)
class Behaviour:
    """A checked behaviour file: its rules in order and the seed of its random draws."""

    rules: tuple[Rule, ...]
    seed: int = 0

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Behaviour:
        """Check a parsed behaviour document; BehaviourError naming the first bad key."""
        _unknown(doc, {"seed", "rule"}, "")
        seed = doc.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BehaviourError(f"seed: must be a whole number, got {shown(seed)}")
        raw = doc.get("rule", [])
        if not isinstance(raw, list):
            raise BehaviourError("rule: must be an array of tables ([[rule]])")
        rules = []
        for number, item in enumerate(raw, 1):
            where = f"rule[{number}]"
            entry = _table(item, where)
            _unknown(entry, {"when", "do"}, where)
            if "do" not in entry:
                raise BehaviourError(f"{where}.do: missing")
            rules.append(
                Rule(
                    number,
                    _parse_when(entry.get("when", {}), f"{where}.when"),
                    _parse_do(entry["do"], f"{where}.do"),
                )
            )
        return cls(tuple(rules), seed)

    @classmethod
    def load(cls, path: Path) -> Behaviour:
        """Read and check a behaviour file; BehaviourError (with the file named) otherwise."""
        try:
            with path.open("rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise BehaviourError(f"{describe_path(path)}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise BehaviourError(f"{describe_path(path)}: not TOML ({exc})") from None
        try:
            return cls.from_dict(doc)
        except BehaviourError as exc:
            raise BehaviourError(f"{describe_path(path)}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Firing:
    """A rule that fired: on which presentation, on which command and its occurrence."""

    rule: Rule
    presentation: int
    command: str
    occurrence: int
    apdu: bytes

    def as_json(self) -> dict[str, Any]:
        """The log line's fields (without the time, which the shell adds)."""
        return {
            "rule": self.rule.number,
            "presentation": self.presentation,
            "command": self.command,
            "occurrence": self.occurrence,
            "apdu": self.apdu.hex().upper(),
            **self.rule.do.as_json(),
        }


class BehaviourState:
    """The rules at work on one card: presentations and command occurrences counted so far, and
    the seeded generator of probability draws.  No clock, no I/O."""

    def __init__(self, behaviour: Behaviour) -> None:
        """``behaviour``: the rules to apply."""
        self.behaviour = behaviour
        self.presentation = 0
        self._counts: dict[str, int] = {}
        self._random = random.Random(behaviour.seed)

    def arrive(self) -> None:
        """The card enters a field: a new presentation."""
        self.presentation += 1

    def decide(self, apdu: bytes) -> Firing | None:
        """Count the command and return the first rule that fires on it, if any."""
        if self.presentation == 0:
            self.presentation = 1  # a transport that never says when the card arrived
        name = command_name(apdu)
        if name is None:
            name = f"INS_{apdu[1]:02X}" if len(apdu) >= 2 else "INVALID"
        counts = self._counts
        counts["any"] = counts.get("any", 0) + 1
        if name in COMMANDS:
            counts[name] = counts.get(name, 0) + 1
        for rule in self.behaviour.rules:
            when = rule.when
            if when.command not in ("any", name):
                continue
            occurrence = counts[when.command]
            if when.occurrence is not None and when.occurrence != occurrence:
                continue
            if when.presentation is not None and when.presentation != self.presentation:
                continue
            if when.probability is not None and self._random.random() >= when.probability:
                continue
            return Firing(rule, self.presentation, name, occurrence, apdu)
        return None


def _flip(answer: bytes, command: str, field: str) -> tuple[bytes, bool]:
    """The answer with every bit of ``field`` flipped; whether there was anything to flip."""
    data, sw = answer[:-2], answer[-2:]
    where = slice(0, len(data)) if field == "data" else _FIELDS.get(command, {}).get(field)
    if where is None or len(data) < (where.stop or 0) or not data[where]:
        return answer, False
    out = bytearray(data)
    out[where] = bytes(b ^ 0xFF for b in data[where])
    return bytes(out) + sw, True


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class BehavingCard:
    """A card endpoint that misbehaves as its rules say; every firing is logged as a JSON line.

    Transports tell it when it enters a field (:meth:`field_entered`); one that does not makes
    every power-up part of presentation 1.
    """

    def __init__(
        self,
        card: CardEndpoint,
        state: BehaviourState | Behaviour,
        *,
        log: TextIO | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], str] = _utc_now,
        label: Mapping[str, Any] | None = None,
    ) -> None:
        """
        Args:
            card: the well-behaved card underneath.
            state: the rules (or the rules already at work, to carry their counts across
                several card objects that are one physical card).
            log: where each firing is written as a JSON line (flushed at once); None: nowhere.
            sleep: how a delay waits (tests pass a fake).
            clock: the time written in the log.
            label: fields written into every log line after the time (which tap, which card).
        """
        self.card = card
        self.state = state if isinstance(state, BehaviourState) else BehaviourState(state)
        self.firings: list[Firing] = []
        self._log = log
        self._sleep = sleep
        self._clock = clock
        self._label = dict(label or {})
        self._lock = threading.Lock()

    def field_entered(self) -> None:
        """The transport put the card in a field: a new presentation."""
        with self._lock:
            self.state.arrive()

    def power_on(self) -> bytes:
        """Cold reset of the card underneath."""
        return self.card.power_on()

    def power_off(self) -> None:
        """Field off for the card underneath."""
        self.card.power_off()

    def atr(self) -> bytes:
        """The ATR of the card underneath."""
        return self.card.atr()

    def transmit(self, apdu: bytes) -> bytes:
        """Answer as the card underneath would, unless a rule fires; FieldFaultError for vanish,
        reset and mute."""
        with self._lock:
            firing = self.state.decide(apdu)
        if firing is None:
            return self.card.transmit(apdu)
        do = firing.rule.do
        extra: dict[str, Any] = {}
        try:
            if do.action == "status":
                return do.sw.to_bytes(2, "big")
            if do.action in ("vanish", "reset", "mute"):
                if do.moment == "after":
                    self.card.transmit(apdu)
                if do.action == "mute":
                    raise CardMutedError("the card stopped answering")
                away = do.away_ms / 1000 if do.action == "vanish" else 0.0
                raise CardLeftError("the card left the field", away=away)
            answer = self.card.transmit(apdu)
            if do.action == "delay":
                self._sleep(do.ms / 1000)
                return answer
            answer, extra["corrupted"] = _flip(answer, firing.command, do.field)
            return answer
        finally:
            self._write(firing, extra)

    def _write(self, firing: Firing, extra: dict[str, Any]) -> None:
        self.firings.append(firing)
        if self._log is not None:
            line = {"time": self._clock(), **self._label, **firing.as_json(), **extra}
            self._log.write(json.dumps(line) + "\n")
            self._log.flush()


def enter_field(card: object) -> None:
    """Tell a card that a transport put it in a field, if it wants to know (a
    :class:`BehavingCard` counts presentations), also through wrappers that pass on what they do
    not define (a card recorded by ``card serve --trace``)."""
    hook = getattr(card, "field_entered", None)
    if callable(hook):
        hook()

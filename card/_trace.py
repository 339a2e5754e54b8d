"""APDU traces: every exchange between a terminal and a card as one JSON line, read back,
decoded the way a protocol analyser shows it, and replayed by a stub card.

A trace file holds one JSON object a line (docs/testbed.md, "APDU traces"):

- an exchange: ``{"time", "reader", "command", "response", "sw", "elapsed_ms"}`` — the time in
  UTC (ISO 8601), the reader's name, the C-APDU in hex, the response data in hex and the status
  word (both ``null`` when no answer came back, then ``"error"`` says why) and how long the
  exchange took;
- an event: ``{"time", "reader", "event": "connect" | "disconnect", "atr"}`` — a card powered up
  (with its ATR) or down, which separates one presentation of a card from the next.

:class:`TracingReader` (the terminal's side) and :class:`TracingEndpoint` (the card's side) wrap
any reader or card and write to a :class:`TraceWriter`; nothing is wrapped, and nothing costs,
when no trace is asked for.  :func:`read_trace` reads a file back, :func:`decode` names a
command and its PBOC fields, :func:`sw_meaning` says what a status word means, and
:class:`TraceCard` answers a terminal from a recording.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from farelab.card._reader import CardEndpoint, Reader, ReaderError
from farelab.card._simcard import ATR

__all__ = [
    "MISMATCH_SW",
    "Decoded",
    "Exchange",
    "TraceCard",
    "TraceError",
    "TraceEvent",
    "TraceWriter",
    "TracingEndpoint",
    "TracingReader",
    "decode_apdu",
    "find_tears",
    "format_exchange",
    "format_trace",
    "read_trace",
    "sw_meaning",
]

log = logging.getLogger("farelab.trace")

#: What :class:`TraceCard` answers to a command that is not the one recorded: ISO 7816-4's
#: "no precise diagnosis", which no T-Union card answers to a well-formed command.
MISMATCH_SW = 0x6F00


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class Exchange:
    """One C-APDU and what came back: ``response`` (the data) and ``sw`` are None when no
    answer arrived (``error`` says why)."""

    time: str
    reader: str
    command: bytes
    response: bytes | None
    sw: int | None
    elapsed_ms: float
    error: str | None = None

    @property
    def rapdu(self) -> bytes | None:
        """The R-APDU as it came over the wire (data and status word), or None."""
        if self.response is None or self.sw is None:
            return None
        return self.response + self.sw.to_bytes(2, "big")

    def to_json(self) -> dict[str, Any]:
        """The trace line's object."""
        doc: dict[str, Any] = {
            "time": self.time,
            "reader": self.reader,
            "command": self.command.hex().upper(),
            "response": None if self.response is None else self.response.hex().upper(),
            "sw": None if self.sw is None else f"{self.sw:04X}",
            "elapsed_ms": round(self.elapsed_ms, 3),
        }
        if self.error is not None:
            doc["error"] = self.error
        return doc


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """A card powered up (``connect``, with its ATR) or down (``disconnect``)."""

    time: str
    reader: str
    event: str
    atr: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """The trace line's object."""
        doc: dict[str, Any] = {"time": self.time, "reader": self.reader, "event": self.event}
        if self.atr is not None:
            doc["atr"] = self.atr.hex().upper()
        return doc


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class TraceWriter:
    """Appends trace lines to a file, one flushed line per exchange, from any thread."""

    def __init__(self, out: Path | IO[str]) -> None:
        """``out``: a path (opened for appending, closed by :meth:`close`) or an open text
        stream (left open)."""
        if isinstance(out, Path):
            self._out: IO[str] = out.open("a", encoding="utf-8")
            self._owned = True
        else:
            self._out = out
            self._owned = False
        self._lock = threading.Lock()

    def write(self, item: Exchange | TraceEvent) -> None:
        """Write one line and flush it, so that a crash keeps every exchange before it."""
        line = json.dumps(item.to_json(), separators=(",", ":")) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()

    def exchange(
        self,
        reader: str,
        command: bytes,
        rapdu: bytes | None,
        elapsed_s: float,
        error: str | None = None,
    ) -> None:
        """Record one exchange (``rapdu`` None when no answer came back)."""
        data, sw = (None, None) if rapdu is None or len(rapdu) < 2 else (rapdu[:-2], rapdu[-2:])
        self.write(
            Exchange(
                _now(),
                reader,
                bytes(command),
                None if data is None else bytes(data),
                None if sw is None else int.from_bytes(sw, "big"),
                elapsed_s * 1000.0,
                error if rapdu is None or len(rapdu) >= 2 else "short answer " + rapdu.hex(),
            )
        )

    def event(self, reader: str, event: str, atr: bytes | None = None) -> None:
        """Record a power-up or power-down."""
        self.write(TraceEvent(_now(), reader, event, atr))

    def close(self) -> None:
        """Close the file, if this writer opened it."""
        if self._owned:
            self._out.close()


class TracingReader:
    """A :class:`Reader` that records every exchange of the reader it wraps."""

    def __init__(self, reader: Reader, trace: TraceWriter) -> None:
        """``reader``: the reader to watch; ``trace``: where its exchanges go."""
        self.reader = reader
        self._trace = trace

    @property
    def name(self) -> str:
        """The wrapped reader's name."""
        return self.reader.name

    def wait_for_card(self, timeout: float) -> bool:
        """As the wrapped reader."""
        return self.reader.wait_for_card(timeout)

    def wait_for_removal(self, timeout: float) -> bool:
        """As the wrapped reader."""
        return self.reader.wait_for_removal(timeout)

    def connect(self) -> bytes:
        """Power up, recording the ATR."""
        atr = self.reader.connect()
        self._trace.event(self.reader.name, "connect", atr)
        return atr

    def transmit(self, apdu: bytes) -> bytes:
        """One exchange, recorded whether or not an answer came back."""
        start = time.perf_counter()
        try:
            answer = self.reader.transmit(apdu)
        except ReaderError as exc:
            self._trace.exchange(
                self.reader.name, apdu, None, time.perf_counter() - start, str(exc) or "no answer"
            )
            raise
        self._trace.exchange(self.reader.name, apdu, answer, time.perf_counter() - start)
        return answer

    def disconnect(self) -> None:
        """Power down, recorded."""
        self.reader.disconnect()
        self._trace.event(self.reader.name, "disconnect")

    def __getattr__(self, name: str) -> Any:
        # What a particular reader offers beyond the interface (an in-process reader's
        # insert/remove, pull_after) stays reachable through the wrapper.
        return getattr(self.reader, name)


class TracingEndpoint:
    """A :class:`CardEndpoint` that records every exchange of the card it wraps (``card
    serve --trace``): the card's view, which a relay or a terminal we did not write cannot
    hide."""

    def __init__(self, card: CardEndpoint, trace: TraceWriter, *, name: str = "card") -> None:
        """``card``: the card to watch; ``trace``: where its exchanges go; ``name``: the
        ``reader`` field of its lines."""
        self.card = card
        self._trace = trace
        self._name = name

    def power_on(self) -> bytes:
        """Cold reset, recorded with the ATR."""
        atr = self.card.power_on()
        self._trace.event(self._name, "connect", atr)
        return atr

    def power_off(self) -> None:
        """Field gone, recorded."""
        self.card.power_off()
        self._trace.event(self._name, "disconnect")

    def atr(self) -> bytes:
        """The ATR (pcscd's presence poll: not recorded)."""
        return self.card.atr()

    def transmit(self, apdu: bytes) -> bytes:
        """One exchange, recorded — also when the card leaves the field instead of answering
        (a card that misbehaves on purpose)."""
        start = time.perf_counter()
        try:
            answer = self.card.transmit(apdu)
        except ReaderError as exc:
            self._trace.exchange(
                self._name, apdu, None, time.perf_counter() - start, str(exc) or "no answer"
            )
            raise
        self._trace.exchange(self._name, apdu, answer, time.perf_counter() - start)
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.card, name)


# --- reading ---------------------------------------------------------------------------------


def _hex(doc: dict[str, Any], key: str, *, optional: bool = False) -> bytes | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be hex')
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError(f'"{key}" is not hex') from None


def _item(doc: Any) -> Exchange | TraceEvent:
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    when, reader = doc.get("time", ""), doc.get("reader", "")
    if not isinstance(when, str) or not isinstance(reader, str):
        raise ValueError('"time" and "reader" must be text')
    event = doc.get("event")
    if event is not None:
        if event not in ("connect", "disconnect"):
            raise ValueError(f'"event" must be connect or disconnect, got {event!r}')
        return TraceEvent(when, reader, event, _hex(doc, "atr", optional=True))
    command = _hex(doc, "command")
    assert command is not None  # not optional
    response = _hex(doc, "response", optional=True)
    sw_text = doc.get("sw")
    sw: int | None = None
    if sw_text is not None:
        if not isinstance(sw_text, str) or len(sw_text) != 4:
            raise ValueError('"sw" must be four hex digits')
        try:
            sw = int(sw_text, 16)
        except ValueError:
            raise ValueError('"sw" must be four hex digits') from None
    if (response is None) != (sw is None):
        raise ValueError('"response" and "sw" are both null or both given')
    elapsed = doc.get("elapsed_ms", 0.0)
    if not isinstance(elapsed, int | float):
        raise ValueError('"elapsed_ms" must be a number')
    error = doc.get("error")
    return Exchange(
        when,
        reader,
        command,
        response,
        sw,
        float(elapsed),
        error if isinstance(error, str) else None,
    )


def read_trace(path: Path) -> list[Exchange | TraceEvent]:
    """Every line of a trace file; TraceError naming the first bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file") from None
    items: list[Exchange | TraceEvent] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            items.append(_item(json.loads(text)))
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}: line {number}: not JSON ({exc.msg})") from None
        except ValueError as exc:
            raise TraceError(f"{path}: line {number}: {exc}") from None
    return items


# --- decoding --------------------------------------------------------------------------------

_SW_MEANINGS = {
    0x9000: "success",
    0x6281: "part of the data may be corrupted",
    0x6282: "end of file reached before Le bytes",
    0x6700: "wrong length",
    0x6881: "logical channel not supported",
    0x6882: "secure messaging not supported",
    0x6981: "command incompatible with the file",
    0x6982: "security status not satisfied",
    0x6983: "authentication method blocked",
    0x6985: "conditions of use not satisfied",
    0x6A80: "wrong data",
    0x6A81: "application blocked",
    0x6A82: "file or application not found",
    0x6A83: "record not found",
    0x6A86: "wrong P1 P2",
    0x6B00: "offset outside the file",
    0x6D00: "instruction not supported",
    0x6E00: "class not supported",
    0x6F00: "no precise diagnosis (a trace card: not the command recorded)",
    0x9302: "MAC invalid",
    0x9401: "insufficient balance",
    0x9402: "transaction counter exhausted",
    0x9403: "key not found",
    0x9406: "MAC not available (no such completed transaction)",
}


def sw_meaning(sw: int) -> str:
    """What a status word means (ISO 7816-4 and the PBOC purse's own)."""
    known = _SW_MEANINGS.get(sw)
    if known is not None:
        return known
    sw1, sw2 = sw >> 8, sw & 0xFF
    if sw1 == 0x61:
        return f"{sw2 or 256} more bytes available (GET RESPONSE)"
    if sw1 == 0x6C:
        return f"wrong Le: {sw2 or 256} bytes available"
    if sw & 0xFFF0 == 0x63C0:
        return f"wrong PIN, {sw & 0x0F} tries left"
    return "unknown status word"


@dataclass(frozen=True, slots=True)
class Decoded:
    """A command's name and its fields, and the fields of its answer (amounts in yuan, counters
    in decimal, dates and times as people write them, the rest in hex)."""

    name: str
    fields: dict[str, str] = field(default_factory=dict)
    answer: dict[str, str] = field(default_factory=dict)


def _pairs(texts: list[str]) -> dict[str, str]:
    return dict(t.split("=", 1) for t in texts)


_TX = {0x02: "load", 0x06: "purchase", 0x09: "composite purchase"}
_NAMES = {
    (0x00, 0xA4): "SELECT",
    (0x00, 0xB0): "READ BINARY",
    (0x00, 0xB2): "READ RECORD",
    (0x00, 0x84): "GET CHALLENGE",
    (0x00, 0x20): "VERIFY",
    (0x00, 0x24): "CHANGE PIN",
    (0x84, 0x2C): "RESET RETRY COUNTER",
    (0x80, 0x5C): "GET BALANCE",
    (0x80, 0xDC): "UPDATE CAPP DATA CACHE",
    (0x80, 0x54): "DEBIT FOR PURCHASE",
    (0x80, 0x52): "CREDIT FOR LOAD",
    (0x80, 0x5A): "GET TRANSACTION PROOF",
    (0x84, 0x1E): "APPLICATION BLOCK",
    (0x84, 0x18): "APPLICATION UNBLOCK",
    (0x00, 0xC0): "GET RESPONSE",
    (0xFF, 0xCA): "GET UID (reader)",
}
_INIT = {0x00: "INITIALIZE FOR LOAD", 0x01: "INITIALIZE FOR PURCHASE", 0x03: "INITIALIZE FOR CAPP"}


def _fen(raw: bytes) -> str:
    value = int.from_bytes(raw, "big")
    return f"{value // 100}.{value % 100:02d}"


def _when(day: bytes, clock: bytes) -> str:
    d, t = day.hex(), clock.hex()
    if not (d + t).isdigit():
        return (day + clock).hex().upper()
    return f"{d[0:4]}-{d[4:6]}-{d[6:8]} {t[0:2]}:{t[2:4]}:{t[4:6]}"


def _aid(data: bytes) -> str:
    text = data.decode("ascii", "replace")
    if text.isprintable() and all(32 <= b < 127 for b in data):
        return f"name={text!r}"
    if len(data) == 2:
        return f"file={data.hex().upper()}"
    return f"aid={data.hex().upper()}"


def _command_fields(cla: int, ins: int, p1: int, p2: int, data: bytes) -> tuple[str, list[str]]:
    key = (cla, ins)
    if key == (0x80, 0x50):
        name = _INIT.get(p1, f"INITIALIZE {p1:02X}")
        if len(data) == 11:
            return name, [
                f"key={data[0]:02X}",
                f"amount={_fen(data[1:5])}",
                f"terminal={data[5:11].hex().upper()}",
            ]
        return name, [f"data={data.hex().upper()}"]
    name = _NAMES.get(key, f"{cla:02X} {ins:02X}")
    fields: list[str] = []
    if ins == 0xA4 and data:
        fields.append(_aid(data))
    elif ins == 0xB0 and cla == 0x00:
        fields += (
            [f"sfi={p1 & 0x1F:02X}", f"offset={p2}"] if p1 & 0x80 else [f"offset={p1 << 8 | p2}"]
        )
    elif ins in (0xB2, 0xDC):
        fields += [f"sfi={p2 >> 3:02X}", f"record={p1}"]
        if data:
            fields.append(f"data={data.hex().upper()}")
    elif key == (0x80, 0x54) and len(data) == 15:
        fields += [
            f"terminal_counter={int.from_bytes(data[0:4], 'big')}",
            f"at={_when(data[4:8], data[8:11])}",
            f"mac1={data[11:15].hex().upper()}",
        ]
    elif key == (0x80, 0x52) and len(data) == 11:
        fields += [f"at={_when(data[0:4], data[4:7])}", f"mac2={data[7:11].hex().upper()}"]
    elif key == (0x80, 0x5A) and len(data) == 2:
        fields += [
            f"type={_TX.get(p2, f'{p2:02X}')}",
            f"counter={int.from_bytes(data, 'big')}",
        ]
    elif data:
        fields.append(f"data={data.hex().upper()}")
    return name, fields


def _answer_fields(cla: int, ins: int, p1: int, data: bytes) -> list[str]:
    key = (cla, ins)
    if key == (0x80, 0x5C) and len(data) == 4:
        return [f"balance={_fen(data)}"]
    if key == (0x80, 0x50) and p1 == 0x00 and len(data) == 16:
        return [
            f"balance={_fen(data[0:4])}",
            f"online_counter={int.from_bytes(data[4:6], 'big')}",
            f"key_version={data[6]:02X}",
            f"alg={data[7]:02X}",
            f"random={data[8:12].hex().upper()}",
            f"mac1={data[12:16].hex().upper()}",
        ]
    if key == (0x80, 0x50) and len(data) == 15:
        return [
            f"balance={_fen(data[0:4])}",
            f"offline_counter={int.from_bytes(data[4:6], 'big')}",
            f"overdraft={_fen(data[6:9])}",
            f"key_version={data[9]:02X}",
            f"alg={data[10]:02X}",
            f"random={data[11:15].hex().upper()}",
        ]
    if key == (0x80, 0x54) and len(data) == 8:
        return [f"tac={data[0:4].hex().upper()}", f"mac2={data[4:8].hex().upper()}"]
    if key == (0x80, 0x52) and len(data) == 4:
        return [f"tac={data.hex().upper()}"]
    if key == (0x80, 0x5A) and len(data) == 8:
        return [f"mac={data[0:4].hex().upper()}", f"tac={data[4:8].hex().upper()}"]
    if data:
        return [f"data={data.hex().upper()}"]
    return []


def decode_apdu(command: bytes, response: bytes | None = None) -> Decoded:
    """The command's name and PBOC fields (amounts in yuan, counters, terminal id, date and
    time, MAC1/MAC2/TAC), and those of its answer's data."""
    if len(command) < 4:
        return Decoded(f"{len(command)}-byte message", {"data": command.hex().upper()})
    cla, ins, p1, p2 = command[0], command[1], command[2], command[3]
    data = command[5 : 5 + command[4]] if len(command) > 5 else b""
    name, fields = _command_fields(cla, ins, p1, p2, data)
    answer = [] if response is None else _answer_fields(cla, ins, p1, response)
    return Decoded(name, _pairs(fields), _pairs(answer))


_MONEY = frozenset({(0x80, 0x54), (0x80, 0x52)})


def find_tears(items: Sequence[Exchange | TraceEvent]) -> dict[int, str]:
    """Where a transaction tore: for the index of each DEBIT or CREDIT that got no answer, and
    of the GET TRANSACTION PROOF that later asked about it, a note saying so."""
    notes: dict[int, str] = {}
    torn: int | None = None
    for index, item in enumerate(items):
        if not isinstance(item, Exchange) or len(item.command) < 4:
            continue
        key = (item.command[0], item.command[1])
        if key in _MONEY and item.sw is None:
            torn = index
            notes[index] = "TORN: no answer; the card may or may not have committed"
        elif key == (0x80, 0x5A) and torn is not None:
            if item.sw == 0x9000:
                verdict = "the card committed it"
            elif item.sw == 0x9406:
                verdict = "the card never committed it"
            else:
                verdict = "no verdict"
            notes[index] = f"proof of the transaction torn at #{torn + 1}: {verdict}"
            torn = None
    return notes


#: How many hex digits of a long field a decoded line shows unless asked for all of them.
_SHORT = 32


def _short(value: str, full: bool) -> str:
    if full or len(value) <= _SHORT:
        return value
    return f"{value[:_SHORT]}…({len(value) // 2} bytes)"


def _fields(fields: dict[str, str], full: bool) -> str:
    return " ".join(f"{k}={_short(v, full)}" for k, v in fields.items())


def format_exchange(
    number: int, item: Exchange, note: str | None = None, *, full: bool = False
) -> str:
    """One exchange as ``farelab trace show`` prints it: number, time of day, elapsed time,
    reader, the command's name and fields, the status word and its meaning, the answer's fields
    and ``note`` (a tear); long data cut to 16 bytes unless ``full``."""
    decoded = decode_apdu(item.command, item.response)
    clock = item.time[11:23] if len(item.time) >= 23 else item.time
    head = f"{number:>4}  {clock}  {item.elapsed_ms:>8.3f} ms  {item.reader}  {decoded.name}"
    fields = _fields(decoded.fields, full)
    if item.sw is None:
        answer = f"-> no answer ({item.error or 'card gone'})"
    else:
        answer = f"-> {item.sw:04X} {sw_meaning(item.sw)}"
        extra = _fields(decoded.answer, full)
        if extra:
            answer += f": {extra}"
    text = f"{head}  {fields}  {answer}" if fields else f"{head}  {answer}"
    return f"{text}  !! {note}" if note else text


def format_trace(items: Sequence[Exchange | TraceEvent], *, full: bool = False) -> list[str]:
    """A whole trace as ``farelab trace show`` prints it: one line an exchange (numbered from
    1), a ``-`` line for each power-up or power-down, tears and their proofs noted."""
    notes = find_tears(items)
    lines: list[str] = []
    number = 0
    for index, item in enumerate(items):
        if isinstance(item, TraceEvent):
            atr = f" ATR {item.atr.hex().upper()}" if item.atr else ""
            word = "card powered up" if item.event == "connect" else "card powered down"
            lines.append(f"   -  {item.reader}  {word}{atr}")
            continue
        number += 1
        lines.append(format_exchange(number, item, notes.get(index), full=full))
    return lines


# --- replay ----------------------------------------------------------------------------------

#: Commands whose data carry the terminal's clock, counter or MACs, which change from one run
#: of a terminal to the next: a trace card answers them as recorded when only their data differ.
_VOLATILE = frozenset({(0x80, 0x54), (0x80, 0x52), (0x80, 0xDC)})


class TraceCard:
    """A stub card that answers a terminal from a recorded session (``card serve
    --from-trace``).

    The recorded exchanges are answered in order.  A command that is not the next one recorded
    is answered ``6F00`` (:data:`MISMATCH_SW`) and logged, and the recording does not move on;
    unless ``exact``, a DEBIT, CREDIT or UPDATE CAPP DATA CACHE whose header and length match
    the recording passes although its data (the terminal's clock, counter, MAC) differ.  A
    recorded exchange that got no answer (a tear) is answered ``6F00`` too, and
    :meth:`tears_after` tells the transport to take the card away then, as happened in the
    recording.  Past the recording's end, every command is a mismatch.
    """

    def __init__(self, items: Iterable[Exchange | TraceEvent], *, exact: bool = False) -> None:
        """``items``: the recording (its exchanges, in order; the first ATR is the card's);
        ``exact``: every command must match the recording byte for byte."""
        recorded = list(items)
        self._exchanges = [i for i in recorded if isinstance(i, Exchange)]
        atrs = [i.atr for i in recorded if isinstance(i, TraceEvent) and i.atr]
        self._atr = atrs[0] if atrs else ATR
        self._exact = exact
        self._next = 0
        self._lock = threading.Lock()
        self._tore = False
        self.mismatches = 0

    @classmethod
    def from_file(cls, path: Path, *, exact: bool = False) -> TraceCard:
        """The stub card of a trace file; TraceError if it cannot be read."""
        return cls(read_trace(path), exact=exact)

    @property
    def remaining(self) -> int:
        """How many recorded exchanges are not answered yet."""
        return len(self._exchanges) - self._next

    def power_on(self) -> bytes:
        """The recorded ATR (the recording goes on where it was)."""
        return self._atr

    def power_off(self) -> None:
        """Nothing to lose: the recording is the card's state."""

    def atr(self) -> bytes:
        """The recorded ATR."""
        return self._atr

    def _matches(self, recorded: bytes, apdu: bytes) -> bool:
        if recorded == apdu:
            return True
        return (
            not self._exact
            and len(recorded) == len(apdu) >= 5
            and recorded[:5] == apdu[:5]
            and (apdu[0], apdu[1]) in _VOLATILE
        )

    def transmit(self, apdu: bytes) -> bytes:
        """The recorded answer, or ``6F00`` (logged) for a command not recorded next."""
        with self._lock:
            self._tore = False
            index = self._next
            if index >= len(self._exchanges):
                self.mismatches += 1
                log.warning("trace card: %s after the end of the recording", apdu.hex().upper())
                return MISMATCH_SW.to_bytes(2, "big")
            recorded = self._exchanges[index]
            if not self._matches(recorded.command, apdu):
                self.mismatches += 1
                log.warning(
                    "trace card: exchange #%d: got %s, recorded %s; answered %04X",
                    index + 1,
                    apdu.hex().upper(),
                    recorded.command.hex().upper(),
                    MISMATCH_SW,
                )
                return MISMATCH_SW.to_bytes(2, "big")
            self._next += 1
            if recorded.command != apdu:
                log.info(
                    "trace card: exchange #%d: %s differs from the recording in its data only",
                    index + 1,
                    decode_apdu(apdu).name,
                )
            answer = recorded.rapdu
            if answer is None:
                self._tore = True
                return MISMATCH_SW.to_bytes(2, "big")
            return answer

    def tears_after(self, apdu: bytes) -> bool:
        """Whether the exchange just answered was one the recording tore (the card left the
        field before its answer): the transport's cue to take the card away."""
        with self._lock:
            return self._tore

"""The conformance run: each zoo card presented to a terminal farelab did not write, through
pcscd's virtual reader, and the card's end state judged against the zoo's answer key.

The judging is a pure function (:func:`judge`) of the card as it went in, the card as it came
out, the exchanges it saw and the answer key; :func:`present` is the shell that serves one card
in a vpcd slot until the terminal is done with it; :func:`run_zoo` does both for every card of
a zoo (:func:`load_manifest`).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from farelab.card import (
    DEMO_KEYS,
    BehavingCard,
    Behaviour,
    CardEndpoint,
    CardImage,
    Exchange,
    ImageError,
    IssuerKeys,
    KeysFileError,
    LogRecord,
    MemoryStore,
    ReaderError,
    SimulatedCard,
    TacVerifier,
    TraceEvent,
    TraceWriter,
    TracingEndpoint,
    TxType,
    ViccClient,
    describe_path,
    fen_to_yuan,
    load_image,
    load_keys_file,
    read_trace,
)
from farelab.testbed._zoo import KIOSK, Expect

__all__ = [
    "VPCD_BASE_PORT",
    "CardResult",
    "Presence",
    "RunError",
    "Seen",
    "ZooEntry",
    "ZooManifest",
    "describe_expect",
    "judge",
    "load_manifest",
    "present",
    "run_zoo",
    "select_cards",
    "vpcd_port",
]

VPCD_BASE_PORT = 35963
"""vpcd's port for the slot "Virtual PCD 00 00"; slot N listens on this port + N."""
AWAY_S = 0.8
"""How long a card stays out between two presentations: vpcd reports a card gone only when
pcscd's presence poll (every 0.4 s) finds no connection."""
_TICK = 0.02


class RunError(ValueError):
    """A zoo, a reader or an option the run cannot use; the message says which."""


@dataclass(frozen=True, slots=True)
class ZooEntry:
    """One card of a zoo's manifest."""

    file: str
    case: str
    device: str
    expect: Expect


@dataclass(frozen=True, slots=True)
class ZooManifest:
    """A zoo as the run reads it: its folder, its cards, the devices' terminal ids and the
    issuer keys its cards carry."""

    folder: Path
    network: str
    cards: tuple[ZooEntry, ...]
    terminals: Mapping[str, bytes]
    keys: IssuerKeys


def _need(doc: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise RunError(f"{where}: key {key!r} is missing or not a {kind.__name__}")
    return value


def _expect(doc: Any, where: str) -> Expect:
    if not isinstance(doc, dict):
        raise RunError(f"{where}: key 'expect' is not an object")
    result = _need(doc, "result", str, where)
    if result not in ("accepted", "rejected", "loaded"):
        raise RunError(f"{where}: expect.result {result!r} is not accepted, rejected or loaded")
    reason = doc.get("reason")
    balance = doc.get("balance_fen")
    if reason is not None and not isinstance(reason, str):
        raise RunError(f"{where}: expect.reason is not a string")
    if balance is not None and not isinstance(balance, int):
        raise RunError(f"{where}: expect.balance_fen is not a number of fen")
    return Expect(result, reason, _need(doc, "fare_fen", int, where), balance)


def load_manifest(folder: Path) -> ZooManifest:
    """Read ``folder/manifest.json`` (written by ``farelab card zoo``) and the keys it names;
    RunError naming the file and the key when it cannot be used."""
    path = folder / "manifest.json"
    where = describe_path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{where}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise RunError(f"{where}: not a zoo manifest")
    device = _need(doc, "device", dict, where)
    terminals: dict[str, bytes] = {}
    for i, dev in enumerate(_need(device, "devices", list, where)):
        here = f"{where}: device.devices[{i}]"
        if not isinstance(dev, dict):
            raise RunError(f"{here}: not an object")
        try:
            terminals[_need(dev, "id", str, here)] = bytes.fromhex(
                _need(dev, "terminal_id", str, here)
            )
        except ValueError:
            raise RunError(f"{here}: terminal_id is not hex") from None
    keys_name = device.get("keys", "demo")
    keys = DEMO_KEYS
    if keys_name != "demo":
        if not isinstance(keys_name, str):
            raise RunError(f"{where}: device.keys is not a file name")
        try:
            keys = load_keys_file(Path(keys_name))
        except KeysFileError as exc:
            raise RunError(f"{where}: device.keys: {exc}") from None
    cards = []
    for i, card in enumerate(_need(doc, "cards", list, where)):
        here = f"{where}: cards[{i}]"
        if not isinstance(card, dict):
            raise RunError(f"{here}: not an object")
        cards.append(
            ZooEntry(
                _need(card, "file", str, here),
                _need(card, "case", str, here),
                _need(card, "device", str, here),
                _expect(card.get("expect"), here),
            )
        )
    return ZooManifest(folder, str(doc.get("network", "")), tuple(cards), terminals, keys)


def vpcd_port(reader: str) -> int:
    """The vpcd port behind a virtual reader's PC/SC name (``Virtual PCD 00 01`` → 35964)."""
    match = re.fullmatch(r"Virtual PCD \d\d (\d\d)", reader.strip())
    if match is None:
        raise RunError(
            f"reader {reader!r} is not one of vpcd's virtual readers ('Virtual PCD 00 NN')"
        )
    return VPCD_BASE_PORT + int(match.group(1))


@dataclass(frozen=True, slots=True)
class Seen:
    """What the card shows after the terminal had it: the purchases and loads it committed
    (amounts, oldest first), its balance, whether it was blocked, the TACs checked, and what
    is wrong with it by the answer key (empty when it passes)."""

    debits: tuple[int, ...]
    balance_fen: int
    blocked: bool
    apdus: int
    problems: tuple[str, ...]
    tac_valid: bool | None = None
    loads: tuple[int, ...] = ()

    @property
    def result(self) -> str:
        """``accepted`` (one purchase), ``loaded`` (one load), ``rejected`` (neither),
        ``debited N times`` or ``loaded N times``."""
        if self.debits and self.loads:
            return "debited and loaded"
        if self.loads:
            return "loaded" if len(self.loads) == 1 else f"loaded {len(self.loads)} times"
        if not self.debits:
            return "rejected"
        if len(self.debits) == 1:
            return "accepted"
        return f"debited {len(self.debits)} times"

    def to_json(self) -> dict[str, Any]:
        """The ``seen`` object of the run's JSON report."""
        return {
            "result": self.result,
            "debits_fen": list(self.debits),
            "loads_fen": list(self.loads),
            "balance_fen": self.balance_fen,
            "blocked": self.blocked,
            "tac_valid": self.tac_valid,
            "apdus": self.apdus,
            "problems": list(self.problems),
        }

    def describe(self) -> str:
        """One line for the run's table."""
        if self.apdus == 0:
            return "untouched (no APDU)"
        parts = []
        if self.debits:
            parts.append("debit " + " + ".join(fen_to_yuan(d) for d in self.debits))
        if self.loads:
            parts.append("load " + " + ".join(fen_to_yuan(d) for d in self.loads))
        if not self.debits and not self.loads:
            parts.append("no debit")
        parts.append(f"balance {fen_to_yuan(self.balance_fen)}")
        if self.tac_valid is not None:
            parts.append("TAC ok" if self.tac_valid else "TAC BAD")
        if self.blocked:
            parts.append("blocked")
        return ", ".join(parts)


def describe_expect(expect: Expect) -> str:
    """The answer key's expectation as one line of the run's table."""
    balance = "" if expect.balance_fen is None else f", balance {fen_to_yuan(expect.balance_fen)}"
    if expect.result == "accepted":
        reason = "" if expect.reason is None else f" ({expect.reason})"
        return f"debit {fen_to_yuan(expect.fare_fen)}{balance}{reason}"
    if expect.result == "loaded":
        return f"load {fen_to_yuan(expect.fare_fen)}{balance}"
    return f"no debit ({expect.reason})"


def _debit_ttc(exchanges: Sequence[Exchange], record: LogRecord) -> int | None:
    """The terminal counter of the DEBIT that wrote ``record`` (its date and time match)."""
    for ex in reversed(exchanges):
        cmd = ex.command
        if len(cmd) >= 20 and cmd[1] == 0x54 and cmd[4] == 15:
            data = cmd[5:20]
            if data[4:8] == record.day and data[8:11] == record.time:
                return int.from_bytes(data[0:4], "big")
    return None


def _tacs_valid(
    before: CardImage,
    after: CardImage,
    records: Sequence[LogRecord],
    exchanges: Sequence[Exchange],
    keys: IssuerKeys,
) -> bool:
    """Whether each new transaction's TAC (kept with its proof) is the one the issuer's TAC key
    gives for its record — and, for a purchase, the DEBIT that made it; for a load, the
    balance it left (walked forward from the balance before)."""
    public = before.public
    verifier = TacVerifier(issuers={public.issuer_id: keys.tac}, cache_size=0)
    proofs = {(p.tx_type, p.counter): p for p in after.proofs}
    balance = before.balance
    for record in records:
        proof = proofs.get((record.tx_type, record.counter + 1))
        if proof is None:
            return False
        load = record.tx_type == TxType.LOAD
        balance += record.amount if load else -record.amount
        ttc = 0 if load else _debit_ttc(exchanges, record)
        if ttc is None:
            return False
        expected = verifier.tac(
            alg=before.alg,
            issuer_id=public.issuer_id,
            serial8=public.serial8,
            tx_type=record.tx_type,
            amount=record.amount,
            terminal=record.terminal,
            day=record.day,
            time=record.time,
            ttc=ttc,
            counter=record.counter,
            balance_after=balance,
        )
        if expected != proof.tac:
            return False
    return True


def _purchases(n: int) -> str:
    return "no purchase" if n == 0 else "a purchase" if n == 1 else f"{n} purchases"


def _loads(n: int) -> str:
    return "no load" if n == 0 else "a load" if n == 1 else f"{n} loads"


def judge(
    entry: ZooEntry,
    before: CardImage,
    after: CardImage,
    exchanges: Sequence[Exchange],
    *,
    terminal_id: bytes | None,
    keys: IssuerKeys,
) -> Seen:
    """The card's end state against the answer key.

    An ``accepted`` card must carry exactly one new purchase of the fare, by the device's
    terminal, and a ``loaded`` card (a kiosk's) exactly one new load of the amount, with the
    expected balance, its TAC valid under the issuer's keys; a ``rejected`` card must come out
    as it went in — no purchase, no load, no record changed — except that a hotlisted card
    must come out blocked.  Two purchases are a second debit (a terminal that charged again a
    card whose last transaction tore)."""
    new = max(after.offline_counter - before.offline_counter, 0) + max(
        after.online_counter - before.online_counter, 0
    )
    records = [LogRecord.decode(r) for r in after.log[:new]][::-1]
    debits = tuple(r.amount for r in records if r.tx_type != TxType.LOAD)
    loads = tuple(r.amount for r in records if r.tx_type == TxType.LOAD)
    problems: list[str] = []
    tac_valid: bool | None = None
    if records:
        if not before.ef15_damaged:
            tac_valid = _tacs_valid(before, after, records, exchanges, keys)
            if not tac_valid:
                problems.append("a TAC does not verify with the issuer's keys")
        for record in records:
            if record.tx_type not in (TxType.PURCHASE, TxType.CAPP_PURCHASE, TxType.LOAD):
                problems.append(f"a transaction of unknown type {record.tx_type:02X}")
            if terminal_id is not None and record.terminal != terminal_id:
                problems.append(
                    f"a transaction by terminal {record.terminal.hex().upper()}, "
                    f"not the device's {terminal_id.hex().upper()}"
                )
    expect = entry.expect
    wanted = {"accepted": (1, 0), "loaded": (0, 1)}.get(expect.result, (0, 0))
    if (len(debits), len(loads)) != wanted:
        if len(debits) != wanted[0]:
            what = f"{_purchases(len(debits))} where {('one', 'none')[wanted[0] == 0]} was expected"
            if expect.reason == "already_processed" and debits:
                what += ": the card was debited again after its last transaction tore"
            problems.insert(0, what)
        if len(loads) != wanted[1]:
            problems.insert(
                0, f"{_loads(len(loads))} where {('one', 'none')[wanted[1] == 0]} was expected"
            )
    elif expect.result in ("accepted", "loaded"):
        amount = (debits or loads)[0]
        if amount != expect.fare_fen:
            what = "charged" if debits else "loaded"
            problems.insert(
                0, f"{what} {fen_to_yuan(amount)}, expected {fen_to_yuan(expect.fare_fen)}"
            )
    if expect.result in ("accepted", "loaded"):
        if expect.balance_fen is not None and after.balance != expect.balance_fen:
            problems.append(
                f"balance {fen_to_yuan(after.balance)}, expected {fen_to_yuan(expect.balance_fen)}"
            )
        if after.blocked and not before.blocked:
            problems.append("the card was blocked")
    else:
        if not records and (after.balance, after.log, after.metro, after.bus, after.trips) != (
            before.balance,
            before.log,
            before.metro,
            before.bus,
            before.trips,
        ):
            problems.append("the card's records changed")
        if expect.reason == "hotlisted" and not after.blocked:
            problems.append("a hotlisted card was not blocked")
        elif expect.reason != "hotlisted" and after.blocked and not before.blocked:
            problems.append("the card was blocked")
    apdus = sum(1 for _ in exchanges)
    return Seen(debits, after.balance, after.blocked, apdus, tuple(problems), tac_valid, loads)


@dataclass(frozen=True, slots=True)
class Presence:
    """How one card's turn went: seconds from entering the field to the terminal's first
    APDU (pcscd's presence poll and the terminal's own), from the first to the last APDU, from
    the last APDU to the end of the turn (the terminal powering the card down, or the quiet
    period), whether the timeout ended it, and how many times the card entered the field (more
    than once when a behaviour made it leave and come back).

    ``ended_by`` says what ended the turn: ``power-off`` (the terminal powered the card down
    after its first APDU — a PC/SC ``SCardDisconnect`` with ``SCARD_UNPOWER_CARD``), ``quiet``
    (no APDU for the quiet period), ``timeout``, or ``gone`` (vpcd hung up).  ``removal`` is the
    seconds from taking the card away until pcscd reported the reader empty (its presence poll
    finding the card gone), or the time the field was kept empty when that could not be
    watched; ``to_power_up`` the seconds from entering the field until pcscd powered the card
    up — its presence poll finding it (None if it never did); ``to_power_off`` the seconds from
    the last APDU until the terminal powered the card down, when that ended the turn (the
    terminal's own work after its last APDU; the rest of ``quiet`` is the run seeing the card
    stay down)."""

    to_first_apdu: float
    busy: float
    quiet: float
    timed_out: bool
    presentations: int = 1
    ended_by: str = "quiet"
    removal: float = 0.0
    to_power_up: float | None = None
    to_power_off: float | None = None


LEAVE_WAIT_S = 1.5
"""How long a card taken away waits for pcscd's presence poll (every 0.4 s) to find it gone."""
POWER_OFF_GRACE_S = 0.01
"""How long a card the terminal powered down stays for it to be powered up again: a PC/SC
``SCardReconnect`` with ``SCARD_UNPOWER_CARD`` powers it down and up within a millisecond."""


class _Watch:
    """The card as the run watches it: the commands a terminal sent it (answered or not), its
    power, and whether it is in the field, each change waking the run."""

    def __init__(self, card: CardEndpoint) -> None:
        self.card = card
        self.changed = threading.Condition()
        self.commands = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.powered = False
        self.off_at = 0.0
        self.powered_up_at: float | None = None
        self.in_field = False

    def _note(self) -> float:
        self.changed.notify_all()
        return time.monotonic()

    def power_on(self) -> bytes:
        atr = self.card.power_on()
        with self.changed:
            self.powered = True
            now = self._note()
            if self.powered_up_at is None:
                self.powered_up_at = now
        return atr

    def power_off(self) -> None:
        self.card.power_off()
        with self.changed:
            self.powered = False
            self.off_at = self._note()

    def atr(self) -> bytes:
        return self.card.atr()

    def transmit(self, apdu: bytes) -> bytes:
        with self.changed:
            self.commands += 1
            self.last_at = self._note()
            if self.first_at is None:
                self.first_at = self.last_at
        return self.card.transmit(apdu)

    def serve(self, client: ViccClient, stop: threading.Event) -> None:
        """``client.serve`` on the vicc thread; the run hears when it ends."""
        try:
            client.serve(stop=stop)
        finally:
            with self.changed:
                self.in_field = False
                self._note()


def _turn(
    watch: _Watch,
    *,
    entered: float,
    since: float,
    quiet: float,
    deadline: float,
) -> str:
    """Wait (holding ``watch.changed``) until the terminal is done with the card in the field:
    what ended its turn, or ``gone`` if it left the field first.  ``entered``: when the card
    entered the field; ``since``: when the quiet period counts from if no APDU came since."""
    while watch.in_field:
        now = time.monotonic()
        first = watch.first_at
        last = max(watch.last_at or since, since)
        wake = deadline if first is None else min(deadline, last + quiet)
        if first is not None and not watch.powered and watch.off_at > max(last, entered):
            if now >= watch.off_at + POWER_OFF_GRACE_S:
                return "power-off"
            wake = watch.off_at + POWER_OFF_GRACE_S
        elif first is not None and now - last >= quiet:
            return "quiet"
        elif now >= deadline:
            return "timeout"
        watch.changed.wait(max(wake - now, 0.0))
    return "gone"


def present(
    card: CardEndpoint,
    *,
    host: str,
    port: int,
    quiet: float,
    timeout: float,
    on_enter: Callable[[], None] | None = None,
    seen_gone: Callable[[float], bool] | None = None,
) -> Presence:
    """Serve ``card`` in the vpcd slot at ``host:port`` until the terminal under test is done
    with it — it powered the card down after its first command (a terminal that lets a card go
    disconnects with ``SCARD_UNPOWER_CARD``) and did not power it up again within
    :data:`POWER_OFF_GRACE_S`, or it sent no command for ``quiet`` seconds after its first — or
    ``timeout`` seconds passed; then take it away and return once pcscd has seen it gone, so
    that the next card can enter the field at once.  ``seen_gone(seconds)`` says whether pcscd
    reports the slot's reader empty within that time (a PC/SC watch of the reader); without it,
    or when it says no, the field is kept empty :data:`AWAY_S` seconds, long enough for pcscd's
    presence poll to see the card gone.

    A card that leaves the field of its own accord (a behaviour's ``vanish`` or ``reset``) is
    put back after it has been away as long as it asked (at least :data:`AWAY_S`), as a rider
    taps again, and the quiet period starts again from there.  ``on_enter`` is called each
    time the card enters the field (a behaving card counts its presentations)."""
    watch = _Watch(card)
    start = since = time.monotonic()
    deadline = start + timeout
    presentations = 0
    while True:
        client = ViccClient(watch, host=host, port=port)
        client.connect(timeout=5.0)
        entered = time.monotonic()
        presentations += 1
        if on_enter is not None:
            on_enter()
        stop = threading.Event()
        watch.in_field = True
        server = threading.Thread(
            target=watch.serve, args=(client, stop), name="testbed-vicc", daemon=True
        )
        server.start()
        try:
            with watch.changed:
                ended = _turn(watch, entered=entered, since=since, quiet=quiet, deadline=deadline)
                let_go = watch.off_at  # before taking the card away powers it down too
        finally:
            stop.set()
            client.leave()
            server.join()
        end = time.monotonic()
        left = client.left
        if ended != "gone" or left is None:
            break
        away = max(left.away if left.away is not None else 0.0, AWAY_S)
        if time.monotonic() + away >= deadline:
            ended = "timeout"
            break
        time.sleep(away)
        since = time.monotonic()
    if seen_gone is None or not seen_gone(LEAVE_WAIT_S):
        time.sleep(AWAY_S)
    removal = time.monotonic() - end
    timed_out = ended == "timeout"
    up = None if watch.powered_up_at is None else watch.powered_up_at - start
    first, last = watch.first_at, watch.last_at
    if first is None or last is None:
        return Presence(end - start, 0.0, 0.0, timed_out, presentations, ended, removal, up)
    off = let_go - last if ended == "power-off" else None
    return Presence(
        first - start, last - first, end - last, timed_out, presentations, ended, removal, up, off
    )


@dataclass(frozen=True, slots=True)
class CardResult:
    """One card of the run: the manifest's entry, what the card showed, the exchanges it saw
    (trace items) and how its presentation went."""

    entry: ZooEntry
    seen: Seen
    trace: tuple[Exchange | TraceEvent, ...]
    presence: Presence
    seconds: float
    output: str = ""
    """What the terminal command printed (a kiosk run's ``kiosk_command``)."""

    @property
    def passed(self) -> bool:
        """Whether the card's end state is what the answer key says."""
        return not self.seen.problems

    def to_json(self) -> dict[str, Any]:
        """One of the JSON report's ``results``."""
        return {
            "file": self.entry.file,
            "case": self.entry.case,
            "expected": self.entry.expect.to_json(),
            "seen": self.seen.to_json(),
            "pass": self.passed,
            "trace": [item.to_json() for item in self.trace],
        }


def select_cards(
    manifest: ZooManifest,
    *,
    cases: Collection[str] | None,
    devices: Collection[str] | None,
    kiosk: bool = False,
) -> list[ZooEntry]:
    """The manifest's cards a run presents: a validator's cards, or with ``kiosk`` the
    kiosk's, restricted to ``cases`` and ``devices`` when given (RunError for a name no card
    has, or a kiosk run of a zoo without the kiosk's cards)."""
    chosen = [c for c in manifest.cards if (c.device == KIOSK) == kiosk]
    if kiosk and not chosen:
        raise RunError("the zoo has no kiosk cards (make it with farelab card zoo --kiosk)")
    for names, what in ((cases, "case"), (devices, "device")):
        if names is None:
            continue
        known = sorted({getattr(c, what) for c in chosen})
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise RunError(f"no {what} {', '.join(unknown)} in the zoo ({', '.join(known)})")
        chosen = [c for c in chosen if getattr(c, what) in names]
    return chosen


def _start(command: Sequence[str]) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    except OSError as exc:
        raise RunError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None


def _finish(proc: subprocess.Popen[str], timeout: float) -> str:
    """The terminal command's output, once it ended (stopped if it outlives ``timeout``)."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        output += f"\n(stopped: still running {timeout:g} s after the card was taken away)"
    return output


def run_zoo(
    manifest: ZooManifest,
    cards: Sequence[ZooEntry],
    *,
    slots: Mapping[str, tuple[str, int]],
    quiet: float = 0.5,
    timeout: float = 10.0,
    trace: Path | None = None,
    behaviour: Behaviour | None = None,
    log: TextIO | None = None,
    kiosk_command: Sequence[str] | None = None,
    on_result: Callable[[CardResult], None] | None = None,
) -> list[CardResult]:
    """Present each of ``cards`` in the vpcd slot (``slots``: device id → host and port) of
    the device it is meant for, one after the other, and judge it; ``on_result`` hears each
    result as it comes.  ``trace`` appends every exchange the cards saw (the trace format).
    With ``behaviour``, each card misbehaves by those rules (their counts start afresh for
    each card), each firing a JSON line in ``log``.  ``kiosk_command`` is run for each card
    just before it is presented, ``{amount}`` in its words replaced by the amount (yuan) the
    answer key asks the kiosk to load: the kiosk under test, told what to load."""
    missing = sorted({c.device for c in cards} - set(slots))
    if missing:
        raise RunError(f"no reader for the zoo's device(s) {', '.join(missing)}")
    with contextlib.ExitStack() as stack:
        watches = {slot: _watch_reader(slot, stack) for slot in set(slots.values())}
        return _run(
            manifest,
            cards,
            slots=slots,
            watches=watches,
            quiet=quiet,
            timeout=timeout,
            trace=trace,
            behaviour=behaviour,
            log=log,
            kiosk_command=kiosk_command,
            on_result=on_result,
        )


def _watch_reader(
    slot: tuple[str, int], stack: contextlib.ExitStack
) -> Callable[[float], bool] | None:
    """Whether pcscd reports the slot's reader empty within so many seconds — through a PC/SC
    context of our own, when vpcd's pcscd is this machine's and shows the slot's reader
    (None otherwise: then a card taken away is kept away :data:`AWAY_S` seconds)."""
    host, port = slot
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        from farelab.card import PcscReader  # noqa: PLC0415 - loads pyscard
    except ImportError:
        return None
    try:
        reader = PcscReader(f"Virtual PCD 00 {port - VPCD_BASE_PORT:02d}")
    except ReaderError:
        return None
    stack.callback(reader.close)
    return reader.wait_for_removal


def _run(
    manifest: ZooManifest,
    cards: Sequence[ZooEntry],
    *,
    slots: Mapping[str, tuple[str, int]],
    watches: Mapping[tuple[str, int], Callable[[float], bool] | None],
    quiet: float,
    timeout: float,
    trace: Path | None,
    behaviour: Behaviour | None,
    log: TextIO | None,
    kiosk_command: Sequence[str] | None,
    on_result: Callable[[CardResult], None] | None,
) -> list[CardResult]:
    # Every image is read before the first card enters the field: a zoo that cannot be used
    # fails before the run starts, and no card waits on a file between two others.
    images: dict[str, CardImage] = {}
    for entry in cards:
        if entry.file not in images:
            try:
                images[entry.file] = load_image(manifest.folder / entry.file)
            except ImageError as exc:
                raise RunError(str(exc)) from None
    results: list[CardResult] = []
    with tempfile.TemporaryDirectory(prefix="farelab-testbed-") as work:
        for n, entry in enumerate(cards):
            before = images[entry.file]
            sim = SimulatedCard(before, store=MemoryStore())
            card_trace = Path(work) / f"{n}.jsonl"
            writer = TraceWriter(card_trace)
            host, port = slots[entry.device]
            began = time.monotonic()
            inner: CardEndpoint = sim
            on_enter: Callable[[], None] | None = None
            if behaviour is not None:
                behaving = BehavingCard(sim, behaviour, log=log)
                inner, on_enter = behaving, behaving.field_entered
            kiosk = None
            if kiosk_command is not None:
                amount = fen_to_yuan(entry.expect.fare_fen)
                kiosk = _start([word.replace("{amount}", amount) for word in kiosk_command])
            try:
                presence = present(
                    TracingEndpoint(inner, writer),  # what the terminal saw, faults included
                    host=host,
                    port=port,
                    quiet=quiet,
                    timeout=timeout,
                    on_enter=on_enter,
                    seen_gone=watches[host, port],
                )
            finally:
                writer.close()
                output = "" if kiosk is None else _finish(kiosk, timeout)
            items = tuple(read_trace(card_trace))
            if trace is not None:
                with trace.open("a", encoding="utf-8") as out:
                    out.write(card_trace.read_text(encoding="utf-8"))
            exchanges = [i for i in items if isinstance(i, Exchange)]
            seen = judge(
                entry,
                before,
                sim.image,
                exchanges,
                terminal_id=manifest.terminals.get(entry.device),
                keys=manifest.keys,
            )
            result = CardResult(entry, seen, items, presence, time.monotonic() - began, output)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results

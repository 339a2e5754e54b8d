"""Classifying an uploaded batch, and deciding what it does to the ledger (pure).

A record's *verdict* decides whether it counts: ``ok`` (a genuine completed transaction),
``forged`` (its TAC does not verify: flagged, not counted), ``unknown_issuer``, ``void`` (the
device learnt that its DEBIT never reached the card), ``grey`` (outcome unknown until the card
returns), and the verdicts :func:`decide` gives against the registry and the ledger:
``wrong_device`` (its TAC-covered terminal is not the registered device's), ``wrong_kind`` (a
kind the device may not make, or one its TAC-covered transaction type contradicts),
``bad_time`` (its TAC-covered day and time are no date), ``replay`` (a counted card transaction
sent again under another identity) and ``clone`` (another transaction under a counted card
counter).

Only what the TAC covers — card, issuer, amount, transaction type, terminal, terminal
transaction counter, day and time — is taken from the record as proof.  What the backend knows
itself (operator, station, line: the device registry's) replaces what the record says; the
rest is checked (the time against the TAC's, the balance against the card's chain) and a
disagreement is an anomaly.

A record's identity in the ledger is (device, journal epoch, sequence number): a journal file
replaced on a device starts its numbers at 1 again, under a new random epoch.

The rules are pure, as a sans-IO core: no database, clock or thread here.  :func:`counter_ranges`
and :func:`own_keys` say what the store must look up for a batch, :func:`records_wanted` which
counted transactions it must read in full; the store fetches that (:class:`LedgerView`),
:func:`decide` says everything the batch does (:class:`Decision`: refused, or the records to
store and update, the anomalies, the clones), and the store writes it, all in one database
transaction.  The one question :func:`decide` leaves open is a card's loads, read only when a
balance does not chain (rare): :func:`balance_breaks` weighs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

from farelab.backend._registry import DeviceEntry
from farelab.card import CST, Alg, TacVerifier
from farelab.protocol import Batch, Record, encode_record

__all__ = [
    "PURCHASE_TYPES",
    "SEQ_JUMP",
    "TIME_TOLERANCE_MS",
    "Anomaly",
    "ChainCheck",
    "Classified",
    "Counted",
    "Decision",
    "LedgerView",
    "Stored",
    "admit",
    "balance_breaks",
    "batch_epoch",
    "classify",
    "counter_ranges",
    "decide",
    "own_keys",
    "records_wanted",
    "tac_time_ms",
]

LOAD_TYPE = 2
PURCHASE_TYPES = (6, 9)
_PURCHASE_KINDS = frozenset({"bus", "entry", "exit"})

#: How far a record's ``at`` may stray from the day and time its TAC covers.  The device stamps
#: both from one clock in the same tap, so they agree to the second; a minute is slack for a
#: tap that straddles a clock adjustment, not for a record whose time was rewritten.
TIME_TOLERANCE_MS = 60_000

#: A sequence number further than this past the highest one the ledger holds for a device's
#: journal is an implausible jump (one anomaly), not that many uploads missing: a validator
#: journals a few thousand taps a day, so a million is years of them.
SEQ_JUMP = 1_000_000


class Classified(NamedTuple):
    """A record with its verdict.  A named tuple, not a frozen dataclass: :func:`classify`
    makes one per record, and a frozen dataclass took a sixth of its time to make."""

    device: str
    record: Record
    verdict: str


def expected_tac(record: Record, verifier: TacVerifier) -> bytes | None:
    """The TAC the card must have given this transaction (a load's or a purchase's, by its
    type), or None if the verifier has no keys for its issuer."""
    if record.tx_type in PURCHASE_TYPES:
        # A purchase's straight away (nearly every record): the dispatch by type below had
        # been a tenth of verifying a TAC.
        return verifier.purchase_tac(
            alg=Alg.from_label(record.alg),
            issuer_id=record.issuer,
            serial8=record.card_serial[2:],  # EF15[12:20]
            amount=record.amount,
            tx_type=record.tx_type,
            terminal=record.terminal,
            ttc=record.ttc,
            day=record.day,
            time=record.time,
        )
    return verifier.tac(
        alg=Alg.from_label(record.alg),
        issuer_id=record.issuer,
        serial8=record.card_serial[2:],  # EF15[12:20]
        tx_type=record.tx_type,
        amount=record.amount,
        terminal=record.terminal,
        day=record.day,
        time=record.time,
        ttc=record.ttc,
        counter=record.card_counter,
        balance_after=record.balance_before + record.amount,
    )


def _verdict(record: Record, verifier: TacVerifier) -> str:
    if record.status != "completed":
        return record.status
    expected = expected_tac(record, verifier)
    if expected is None:
        return "unknown_issuer"
    return "ok" if expected == record.tac else "forged"


def classify(batch: Batch, verifier: TacVerifier) -> list[Classified]:
    """Every record of the batch with its verdict (TACs verified here).

    The completed purchases (nearly every record) have their TACs computed in one call of the
    verifier; the others one by one."""
    device, records = batch.device, batch.records
    algs = _ALGS
    purchases = [
        r
        for r in records
        if r.status == "completed" and r.tx_type in PURCHASE_TYPES and r.alg in algs
    ]
    tacs = verifier.purchase_tacs(
        (
            algs[r.alg],
            r.issuer,
            r.card_serial[2:],  # EF15[12:20]
            r.amount,
            r.tx_type,
            r.terminal,
            r.ttc,
            r.day,
            r.time,
        )
        for r in purchases
    )
    if len(purchases) == len(records):
        return [
            Classified(
                device, r, "unknown_issuer" if tac is None else "ok" if tac == r.tac else "forged"
            )
            for r, tac in zip(records, tacs, strict=True)
        ]
    verdicts = {
        id(r): "unknown_issuer" if tac is None else "ok" if tac == r.tac else "forged"
        for r, tac in zip(purchases, tacs, strict=True)
    }
    return [Classified(device, r, verdicts.get(id(r)) or _verdict(r, verifier)) for r in records]


_ALGS = {alg.label: alg for alg in Alg}


def batch_epoch(batch_id: int) -> int:
    """The journal epoch a batch id carries above its 40-bit first row id (0 for an uplink
    that puts none there)."""
    return batch_id >> 40


def counter_ranges(rows: Sequence[Classified]) -> list[tuple[bytes, int, int]]:
    """Which counted transactions of the ledger :func:`decide` needs for ``rows``: per card, the
    runs of card counters (lowest, highest, by card) that cover each counted record's own
    counter and, for a purchase, its predecessor's (counter − 1).  One lookup per run serves
    both the replay and clone checks and the balance chain."""
    spans: dict[bytes, list[tuple[int, int]]] = {}
    for c in rows:
        if c.verdict == "ok":
            r = c.record
            counter = r.card_counter
            low = counter - 1 if counter > 0 and r.tx_type in PURCHASE_TYPES else counter
            spans.setdefault(r.card_serial, []).append((low, counter))
    out: list[tuple[bytes, int, int]] = []
    for card in sorted(spans):
        runs = spans[card]
        if len(runs) == 1:
            out.append((card, *runs[0]))
            continue
        runs.sort()
        low, high = runs[0]
        for start, end in runs[1:]:
            if start > high + 1:
                out.append((card, low, high))
                low, high = start, end
            else:
                high = max(high, end)
        out.append((card, low, high))
    return out


def own_keys(rows: Sequence[Classified]) -> dict[tuple[bytes, int, int], int | None]:
    """The (card, counter, type) keys of the records of ``rows`` that may count, each with its
    record's sequence number, None when records of several numbers have it."""
    own: dict[tuple[bytes, int, int], int | None] = {}
    for c in rows:
        if c.verdict == "ok":
            r = c.record
            key = (r.card_serial, r.card_counter, r.tx_type)
            if own.setdefault(key, r.seq) != r.seq:
                own[key] = None
    return own


def admit(device: str, entry: DeviceEntry | None) -> str | None:
    """Why a batch from ``device`` is refused before any of its records is looked at (the
    quarantine reason), or None: only a registered, unrevoked validator uploads batches."""
    if entry is None:
        return "unknown_device"
    if entry.revoked:
        return "revoked_device"
    if entry.role != "validator":
        return "wrong_role"
    return None


# A batch's records carry a few distinct seconds, and a ledger's days repeat: the conversion,
# a third of the rules' time per record when it built a datetime each time, is remembered.
@lru_cache(maxsize=4096)
def tac_time_ms(day_bcd: bytes, time_bcd: bytes) -> int | None:
    """The TAC-covered day (BCD YYYYMMDD) and time (BCD hhmmss), China Standard Time, in ms
    since the epoch; None if they are no date and time."""
    day, time = day_bcd.hex(), time_bcd.hex()
    if len(day) != 8 or len(time) != 6:
        return None
    try:
        moment = datetime(
            int(day[0:4]),
            int(day[4:6]),
            int(day[6:8]),
            int(time[0:2]),
            int(time[2:4]),
            int(time[4:6]),
            tzinfo=CST,
        )
    except ValueError:
        return None
    return int(moment.timestamp()) * 1000


class Counted(NamedTuple):
    """A counted transaction of the ledger, found by its (card, counter, type).

    A named tuple, not a frozen dataclass: the store makes one per row it fetches for a batch,
    and a frozen dataclass takes three times as long to make.
    """

    device: str
    epoch: int
    seq: int
    balance_before: int
    amount: int
    at_ms: int
    #: the transaction itself, when the rules compare it (:func:`records_wanted`), else None
    record: Record | None = None


def records_wanted(
    device: str,
    epoch: int,
    own: Mapping[tuple[bytes, int, int], int | None],
    counted: Mapping[tuple[bytes, int, int], Counted],
) -> list[tuple[bytes, int, int]]:
    """Which of the ``counted`` transactions found for a batch of ``device``'s journal
    ``epoch`` the rules compare with a record of the batch, so that the store reads them in
    full: those under a key of the batch (``own``: its :func:`own_keys`) held under another
    identity than the record's (a replay or a clone: rare).  As (card, counter, counter)
    ranges, as :func:`counter_ranges` gives them."""
    wanted = []
    for key, seq in own.items():
        found = counted.get(key)
        if found is not None and (
            seq is None or (found.device, found.epoch, found.seq) != (device, epoch, seq)
        ):
            wanted.append((key[0], key[1], key[1]))
    return wanted


@dataclass(frozen=True, slots=True)
class LedgerView:
    """What the store fetched for one batch: what the ledger knows that the rules read.

    Attributes:
        entry: the device's registry entry, None if it has none.
        held: the records stored under this device and epoch at the batch's sequence numbers
            (with the status and TAC the ledger holds), by seq.
        counted: counted transactions under the batch's (card, counter, type) keys and their
            predecessors' (counter − 1), found by :func:`counter_ranges` (other transactions
            in those ranges may be there too: the rules never look them up).  The rules read
            the record of one only under a key of the batch held under another identity than
            the record's (:func:`own_keys`); the others may come without it.
        top_seq: the highest sequence number held for this device and epoch, None if none.
        other_epochs: other journal epochs the ledger holds rows of this device under (only
            looked up when ``top_seq`` is None).
    """

    entry: DeviceEntry | None = None
    held: Mapping[int, Record] = field(default_factory=dict)
    counted: Mapping[tuple[bytes, int, int], Counted] = field(default_factory=dict)
    top_seq: int | None = None
    other_epochs: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """A counted purchase whose balance before is not its predecessor's balance after; it is a
    break unless the card's loads between the two account for the difference."""

    card_serial: bytes
    device: str
    seq: int
    after_ms: int  # the predecessor's time
    at_ms: int
    expected: int
    got: int


class Stored(NamedTuple):
    """A record as the ledger keeps it: with its verdict and its time (the TAC's when the
    record's own strays from it).  A named tuple: :func:`decide` makes one per record."""

    record: Record
    verdict: str
    at_ms: int


class Anomaly(NamedTuple):
    """Something a batch shows that the ledger keeps for people to look into."""

    kind: str
    card_serial: bytes
    device: str
    seq: int
    detail: str


@dataclass
class Decision:
    """What a batch does to the ledger.

    Attributes:
        epoch: the journal epoch the batch's identities are under.
        rejected: the quarantine reason when the batch is refused (then nothing else is set
            and nothing is written), else ``""``.
        inserts: new records to store, in order.
        updates: records the ledger holds (a grey one resolved): their new status, verdict
            and TAC.
        station, line, operator: what the ledger keeps for every record of the batch in place
            of what the record says (the registry's).
        anomalies: what the batch shows, for the ``anomalies`` table.
        chain: counted purchases whose balance does not follow their predecessor's: each is a
            ``balance_break`` anomaly unless the card's loads explain it
            (:func:`balance_breaks`, once the store has read them).
        duplicates, resolved, forged: how many records were already held, resolved a grey
            one, or had a TAC that does not verify.
        clones: the cards of the records that are clones (hotlisted), in order.
    """

    epoch: int = 0
    rejected: str = ""
    inserts: list[Stored] = field(default_factory=list)
    updates: list[Stored] = field(default_factory=list)
    station: bytes = bytes(8)
    line: int = 0
    operator: str = ""
    anomalies: list[Anomaly] = field(default_factory=list)
    chain: list[ChainCheck] = field(default_factory=list)
    duplicates: int = 0
    resolved: int = 0
    forged: int = 0
    clones: list[bytes] = field(default_factory=list)

    @property
    def hotlist(self) -> list[bytes]:
        """The cards the batch puts on the hotlist, each once: the clones'."""
        return list(dict.fromkeys(self.clones))


def _content(r: Record) -> tuple[Any, ...]:
    """What a resent record repeats exactly (status and TAC aside: a grey record resolves)."""
    return (
        r.tx_type,
        r.kind,
        r.alg,
        r.card_serial,
        r.issuer,
        r.card_counter,
        r.ttc,
        r.amount,
        r.balance_before,
        r.terminal,
        r.day,
        r.time,
    )


def _proof(r: Record) -> tuple[Any, ...]:
    """What the TAC covers of a record, and the TAC: equal proofs are one card transaction."""
    return (r.issuer, r.amount, r.terminal, r.ttc, r.day, r.time, r.tac)


def _kind_fault(r: Record, entry: DeviceEntry) -> str | None:
    if r.kind not in entry.kinds:
        return f"kind {r.kind!r}; this device makes {', '.join(sorted(entry.kinds))}"
    purchase = r.kind in _PURCHASE_KINDS
    if purchase != (r.tx_type in PURCHASE_TYPES) or (not purchase and r.tx_type != LOAD_TYPE):
        return f"kind {r.kind!r} with transaction type {r.tx_type} under the TAC"
    return None


def _identity(device: str, epoch: int, seq: int) -> str:
    return f"{device}#{seq}" if epoch == 0 else f"{device}@{epoch}#{seq}"


def decide(device: str, batch_id: int, rows: Sequence[Classified], view: LedgerView) -> Decision:
    """What a batch ``batch_id`` of ``device`` (its records classified) does to the ledger,
    given what the ledger knows (``view``).

    A device the registry does not admit has its batch refused (:func:`admit`).  Otherwise a
    record whose identity the ledger holds is a duplicate if its content is the same (a grey one
    resolves), a ``conflicting_duplicate`` anomaly otherwise (kept, not counted).  A new record
    is stored with the registry's operator, station and line and the TAC's day and time;
    whether it counts is its verdict.
    """
    entry = view.entry
    reason = admit(device, entry)
    if reason is not None or entry is None:
        return Decision(rejected=reason or "unknown_device")
    epoch = batch_epoch(batch_id)
    # What the registry knows replaces what the records say.
    station = bytes.fromhex(entry.station) if entry.station else bytes(8)
    operator, line, terminal = entry.operator, entry.line, bytes.fromhex(entry.terminal)
    out = Decision(epoch=epoch, station=station, line=line, operator=operator)
    top = view.top_seq
    held = view.held
    inserted: dict[int, int] = {}  # seq -> index in out.inserts
    # This batch's records as stored so far, by seq: looked at again only by a later record
    # of the same identity, so the common batch builds nothing for them.
    written: dict[int, Record] = {}
    counts = _Counts(device, epoch, view.counted)
    counted, fresh = view.counted, counts.fresh
    kind_faults: dict[tuple[str, int], str | None] = {}  # by (kind, transaction type)

    def anomaly(kind: str, r: Record, detail: str) -> None:
        out.anomalies.append(Anomaly(kind, r.card_serial, device, r.seq, detail))

    if rows and top is None and view.other_epochs - {0}:
        shown = ", ".join(str(e) for e in sorted(view.other_epochs))
        anomaly(
            "journal_reset",
            rows[0].record,
            f"journal epoch {epoch} starts at #{rows[0].record.seq} after epoch(s) {shown}",
        )
    for c in rows:
        r, verdict = c.record, c.verdict
        old = written.get(r.seq)
        if old is None:
            old = held.get(r.seq)
        if old is not None:
            both_final = old.status == "completed" and r.status == "completed"
            if _content(old) != _content(r) or (both_final and old.tac != r.tac):
                anomaly(
                    "conflicting_duplicate",
                    r,
                    f"{_identity(device, epoch, r.seq)} again with other content: "
                    f"{encode_record(r).hex()}",
                )
                continue
            if not (old.status == "grey" and r.status != "grey"):
                out.duplicates += 1
                continue
        if top is None or r.seq > top:
            if r.seq > (top or 0) + SEQ_JUMP:
                anomaly("seq_jump", r, f"#{r.seq} after #{top or 0} of journal epoch {epoch}")
            top = r.seq
        if verdict == "forged":
            out.forged += 1
            anomaly("forged_tac", r, f"TAC {r.tac.hex().upper()}")
        if r.operator != operator or r.line != line or r.station != station:
            mismatched = [
                f"{name} {sent!r} (registry {ours!r})"
                for name, sent, ours, differ in (
                    ("operator", r.operator, operator, r.operator != operator),
                    ("station", r.station.hex(), station.hex(), r.station != station),
                    ("line", r.line, line, r.line != line),
                )
                if differ
            ]
            anomaly("field_mismatch", r, "; ".join(mismatched))
        at_ms = r.at_ms
        tac_ms = tac_time_ms(r.day, r.time)
        if tac_ms is not None and not -TIME_TOLERANCE_MS <= at_ms - tac_ms <= TIME_TOLERANCE_MS:
            anomaly(
                "time_mismatch",
                r,
                f"at {r.at_ms} ms, the TAC's day and time {r.day.hex()} {r.time.hex()}",
            )
            at_ms = tac_ms
        if verdict == "ok":
            kind = (r.kind, r.tx_type)
            if kind not in kind_faults:
                kind_faults[kind] = _kind_fault(r, entry)
            kind_fault = kind_faults[kind]
            if r.terminal != terminal:
                verdict = "wrong_device"
                anomaly(
                    "wrong_device",
                    r,
                    f"terminal {r.terminal.hex().upper()}, registry {entry.terminal}",
                )
            elif kind_fault is not None:
                verdict = "wrong_kind"
                anomaly("wrong_kind", r, kind_fault)
            elif tac_ms is None:
                verdict = "bad_time"
                anomaly("bad_time", r, f"TAC-covered day and time {r.day.hex()} {r.time.hex()}")
        if verdict == "ok":
            key = (r.card_serial, r.card_counter, r.tx_type)
            first = counts.get(key) if key in fresh else counted.get(key)
            if first is not None and (first.device, first.epoch, first.seq) != (
                device,
                epoch,
                r.seq,
            ):
                where = _identity(first.device, first.epoch, first.seq)
                if first.record is not None and _proof(first.record) == _proof(r):
                    verdict = "replay"
                    anomaly("replay", r, f"card counter {r.card_counter} counted at {where}")
                else:
                    verdict = "clone"
                    out.clones.append(r.card_serial)
                    anomaly("clone", r, f"card counter {r.card_counter} also at {where}")
            else:
                if r.card_counter > 0 and r.tx_type in PURCHASE_TYPES:
                    _check_chain(out, counts, r, at_ms)
                fresh[key] = (r, at_ms)
        stored = Stored(r, verdict, at_ms)
        written[r.seq] = r
        if old is not None and r.seq not in inserted:
            out.updates.append(stored)
            out.resolved += 1
            continue
        if old is not None:
            out.resolved += 1  # a grey record resolved within this very batch
        if r.seq in inserted:
            out.inserts[inserted[r.seq]] = stored
        else:
            inserted[r.seq] = len(out.inserts)
            out.inserts.append(stored)
    return out


class _Counts:
    """The counted transactions a batch sees: those it counted itself (kept as the record and
    its time, a :class:`Counted` made only when looked up again), then the ledger's."""

    __slots__ = ("device", "epoch", "fresh", "ledger")

    def __init__(
        self, device: str, epoch: int, ledger: Mapping[tuple[bytes, int, int], Counted]
    ) -> None:
        self.device = device
        self.epoch = epoch
        self.ledger = ledger
        self.fresh: dict[tuple[bytes, int, int], tuple[Record, int]] = {}

    def get(self, key: tuple[bytes, int, int]) -> Counted | None:
        """The counted transaction under ``key`` (card, counter, type), if any."""
        mine = self.fresh.get(key)
        if mine is None:
            return self.ledger.get(key)
        r, at_ms = mine
        return Counted(self.device, self.epoch, r.seq, r.balance_before, r.amount, at_ms, r)


def _check_chain(out: Decision, counts: _Counts, r: Record, at_ms: int) -> None:
    """Compare a counted purchase's balance before with its predecessor's balance after, where
    the batch or the ledger holds the predecessor (the same card's purchase at counter − 1)."""
    fresh, ledger = counts.fresh, counts.ledger
    serial, prior = r.card_serial, r.card_counter - 1
    for tx_type in PURCHASE_TYPES:
        key = (serial, prior, tx_type)
        before = counts.get(key) if key in fresh else ledger.get(key)
        if before is not None:
            expected = before.balance_before - before.amount
            if expected != r.balance_before:
                out.chain.append(
                    ChainCheck(
                        serial,
                        counts.device,
                        r.seq,
                        before.at_ms,
                        at_ms,
                        expected,
                        r.balance_before,
                    )
                )
            return


def balance_breaks(
    checks: Sequence[ChainCheck], loads: Mapping[bytes, Sequence[tuple[int, int]]]
) -> list[Anomaly]:
    """The ``balance_break`` anomalies among ``checks``: those the card's counted loads
    (``loads[card]``: at_ms, amount) between the predecessor and the purchase do not explain."""
    out = []
    for check in checks:
        topped = sum(
            amount
            for at, amount in loads.get(check.card_serial, ())
            if check.after_ms <= at <= check.at_ms
        )
        if check.got != check.expected + topped:
            out.append(
                Anomaly(
                    "balance_break",
                    check.card_serial,
                    check.device,
                    check.seq,
                    f"balance before {check.got}, the card's chain says {check.expected + topped}",
                )
            )
    return out

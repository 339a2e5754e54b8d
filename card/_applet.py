"""The card's operating system as a pure function: ``(image, session, C-APDU) -> Outcome``.

Three isolated applications (docs/card-protocol.md B1, R1): the T-Union transit purse (no PIN, R5),
the social-security application (PIN rules of R8) and a bank application that refuses transit
terminals.  Nothing here reads a clock, draws randomness from the OS or touches a file: the session
carries a deterministic random generator seeded at power-on, ``today`` comes from the caller, and a
command that changes the persistent image says so in :attr:`Outcome.committed` so the shell can
persist before it answers.

Atomicity (docs/card-protocol.md B3) follows from the shape: INITIALIZE and UPDATE CAPP DATA CACHE
only change the volatile session; DEBIT and CREDIT build one new image holding balance, counter,
EF18 record, cached EF1A/EF1E records and the transaction proof together.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date

from farelab.card._apdu import (
    SW,
    ApduFormatError,
    Command,
    bytes_remaining,
    exact_length,
    parse_command,
    pin_tries_left,
)
from farelab.card._crypto import mac, session_key, tac_key
from farelab.card._files import EF1A_LEN, EF1E_LEN, LogRecord, TxType
from farelab.card._image import CardImage, Proof

__all__ = [
    "BANK_AID",
    "PPSE_NAME",
    "PSE_NAME",
    "SOCIAL_AID",
    "TRANSIT_AID",
    "App",
    "Outcome",
    "Pending",
    "Session",
    "card_uid",
    "is_weak_pin",
    "maintenance_mac",
    "process",
]

TRANSIT_AID = bytes.fromhex("A000000632010105")
SOCIAL_AID = bytes.fromhex("D15600000100")
BANK_AID = bytes.fromhex("A000000333010101")
PSE_NAME = b"1PAY.SYS.DDF01"
PPSE_NAME = b"2PAY.SYS.DDF01"
MF_FID = b"\x3f\x00"

SFI_PUBLIC, SFI_HOLDER, SFI_MANAGEMENT = 0x15, 0x16, 0x17
SFI_LOG, SFI_TRANSIT, SFI_TRIPS = 0x18, 0x1A, 0x1E
SFI_SOCIAL_HOLDER = 0x05
SFI_DIRECTORY = 0x01
MAX_CACHED_RECORDS = 4
KEY_INDEX = 0x01


class App(enum.Enum):
    """The currently selected application."""

    NONE = "none"
    TRANSIT = "transit"
    TRANSIT_BLOCKED = "transit-blocked"
    SOCIAL = "social"
    BANK = "bank"
    PSE = "pse"
    """The payment-system environment (``1PAY.SYS.DDF01``), its directory file readable."""


@dataclass(frozen=True, slots=True)
class Pending:
    """An INITIALIZE that awaits its DEBIT or CREDIT."""

    tx_type: TxType
    amount: int
    terminal: bytes
    counter: int
    random: bytes
    balance: int


@dataclass(frozen=True, slots=True)
class Session:
    """Volatile card state: lost whenever the card leaves the field."""

    rng: bytes
    app: App = App.NONE
    pending: Pending | None = None
    cache: tuple[tuple[int, int, bytes], ...] = ()
    challenge: bytes | None = None
    pin_ok: bool = False
    response: bytes = b""
    """Response data the last command could not send (no Le, or a GET RESPONSE shorter than
    it), for a GET RESPONSE that follows at once."""

    @classmethod
    def power_on(cls, entropy: bytes) -> Session:
        """A fresh session; ``entropy`` seeds the card's random numbers (any length)."""
        return cls(rng=hashlib.sha256(b"farelab-card-rng" + entropy).digest())

    def draw(self, n: int) -> tuple[bytes, Session]:
        """``n`` random bytes and the session that follows."""
        out = hashlib.sha256(b"out" + self.rng).digest()[:n]
        return out, replace(self, rng=hashlib.sha256(b"next" + self.rng).digest())


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one command. Persist ``image`` before sending ``response`` if committed."""

    image: CardImage
    session: Session
    response: bytes
    committed: bool = False


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


_OK = _sw(SW.OK)


def is_weak_pin(pin: str) -> bool:
    """Six identical digits, or six consecutive ones up or down (R8)."""
    steps = {int(b) - int(a) for a, b in itertools.pairwise(pin)}
    return len(set(pin)) == 1 or steps in ({1}, {-1})


def maintenance_mac(image: CardImage, challenge: bytes, message: bytes) -> bytes:
    """MAC of a maintenance command (farelab's definition).

    ``MAC(SK, header ‖ data)`` where ``SK = session_key(DAMK, challenge8)``, the challenge of the
    GET CHALLENGE just before, right-padded with zeros to 8 bytes.
    """
    sk = session_key(image.alg, image.keys.damk, challenge.ljust(8, b"\x00"))
    return mac(image.alg, sk, message)


class _Ctx:
    """Working state of one command: answers are built through it."""

    __slots__ = ("cmd", "entry", "held", "image", "session", "today")

    def __init__(
        self, image: CardImage, session: Session, cmd: Command, today: date, held: bytes
    ) -> None:
        self.image = image
        self.session = session
        self.entry = session
        self.cmd = cmd
        self.today = today
        self.held = held

    def answer(self, sw: int, data: bytes = b"") -> Outcome:
        return Outcome(self.image, self.session, data + _sw(sw))

    def ok(self, data: bytes = b"") -> Outcome:
        """Success, its data sent as far as Le asks: none without Le (kept for GET RESPONSE);
        all of it for Le 00 or its exact length; any other Le is ``6Cxx`` and the command is not
        executed, the session left as the command found it (docs/card-protocol.md, "Lengths,
        classes and the reader")."""
        le = self.cmd.le
        if not data or le in (256, len(data)):
            return Outcome(self.image, self.session, data + _OK)
        if le is None:
            return Outcome(self.image, replace(self.session, response=data), _OK)
        return Outcome(self.image, self.entry, _sw(exact_length(len(data))))

    def commit(self, image: CardImage, sw: int = SW.OK, data: bytes = b"") -> Outcome:
        """A committed change; its data held for GET RESPONSE when the command had no Le (a
        wrong Le is refused before anything is committed, see :meth:`le_refusal`)."""
        if data and self.cmd.le is None:
            return Outcome(image, replace(self.session, response=data), _sw(sw), committed=True)
        return Outcome(image, self.session, data + _sw(sw), committed=True)

    def le_refusal(self, length: int) -> Outcome | None:
        """``6Cxx`` for an Le that is neither absent, 00 nor ``length``, else None; for the
        commands that commit, which must refuse before they change anything."""
        le = self.cmd.le
        if le in (None, 256, length):
            return None
        return self.answer(exact_length(length))

    def cancel(self) -> None:
        self.session = replace(self.session, pending=None, cache=())


_Handler = Callable[[_Ctx], Outcome]
_GET_RESPONSE = (0x00, 0xC0)
_GET_UID = (0xFF, 0xCA)
_CONTINUATIONS = frozenset({(0x80, 0xDC), (0x80, 0x54), (0x80, 0x52), _GET_RESPONSE})
_USES_CHALLENGE = frozenset({(0x84, 0x1E), (0x84, 0x18), (0x84, 0x2C)})
_KEEP_CHALLENGE = _USES_CHALLENGE | {(0x00, 0x84), _GET_RESPONSE}


def process(image: CardImage, session: Session, apdu: bytes, *, today: date) -> Outcome:
    """Run one C-APDU. Never raises on any input: bad input gets a status word."""
    held = session.response
    try:
        cmd = parse_command(apdu)
    except ApduFormatError as exc:
        return Outcome(image, replace(session, response=b""), _sw(exc.sw))
    key = (cmd.cla, cmd.ins)
    if key == _GET_UID:
        # The contactless reader's own command (PC/SC part 3): the card never sees it, so it
        # changes nothing of the card's session.
        return _get_uid(image, session, cmd)
    session = replace(session, response=b"") if held else session
    refusal = _class_refusal(cmd.cla, cmd.ins)
    if refusal is not None:
        return Outcome(image, session, _sw(refusal))
    handler = _HANDLERS.get(key)
    if handler is None:
        known = any(ins == cmd.ins for _, ins in _HANDLERS)
        sw = SW.CLA_NOT_SUPPORTED if known else SW.INS_NOT_SUPPORTED
        return Outcome(image, session, _sw(sw))
    ctx = _Ctx(image, session, cmd, today, held)
    if key not in _CONTINUATIONS and session.pending is not None:
        ctx.cancel()
    if key not in _KEEP_CHALLENGE and session.challenge is not None:
        ctx.session = replace(ctx.session, challenge=None)
    ctx.entry = ctx.session
    return handler(ctx)


def _class_refusal(cla: int, ins: int) -> int | None:
    """``6881``/``6882`` for a class byte asking for a logical channel or secure messaging the
    card does not have (ISO 7816-4 5.4.1, proprietary classes read alike), else None.

    Only the maintenance commands' ``84`` (their MAC) is secure messaging the card takes.
    """
    if (cla, ins) in _HANDLERS:
        return None
    if 0x40 <= cla <= 0x7F:  # further interindustry classes: logical channels 4 to 19
        return SW.CHANNEL_NOT_SUPPORTED
    if cla & 0x60 == 0x00:
        if cla & 0x03:
            return SW.CHANNEL_NOT_SUPPORTED
        if cla & 0x0C:
            return SW.SM_NOT_SUPPORTED
    if cla not in (0x00, 0x80, 0x84):
        return SW.CLA_NOT_SUPPORTED
    return None


def card_uid(image: CardImage) -> bytes:
    """The card's 4-byte ISO 14443-A UID (farelab: fixed, derived from the serial in EF15)."""
    return hashlib.sha256(b"farelab-uid" + image.ef15[12:20]).digest()[:4]


def _get_uid(image: CardImage, session: Session, cmd: Command) -> Outcome:
    """``FF CA 00 00 Le``: the UID, as a PC/SC contactless reader answers it."""
    if cmd.p1 != 0x00 or cmd.p2 != 0x00:
        return Outcome(image, session, _sw(SW.APP_BLOCKED))  # 6A81: function not supported
    if cmd.data:
        return Outcome(image, session, _sw(SW.WRONG_LENGTH))
    uid = card_uid(image)
    if cmd.le not in (None, 256, len(uid)):
        return Outcome(image, session, _sw(exact_length(len(uid))))
    return Outcome(image, session, uid + _OK)


def _get_response(ctx: _Ctx) -> Outcome:
    """``00 C0 00 00 Le``: the data the command before could not send."""
    cmd = ctx.cmd
    if cmd.p1 or cmd.p2:
        return ctx.answer(SW.WRONG_P1P2)
    if cmd.data or cmd.le is None:
        return ctx.answer(SW.WRONG_LENGTH)
    held = ctx.held
    if not held:
        return ctx.answer(SW.CONDITIONS)
    if cmd.le == 256 or cmd.le == len(held):
        return ctx.ok(held)
    if cmd.le > len(held):
        ctx.session = replace(ctx.session, response=held)
        return ctx.answer(exact_length(len(held)))
    rest = held[cmd.le :]
    ctx.session = replace(ctx.session, response=rest)
    return ctx.answer(bytes_remaining(len(rest)), held[: cmd.le])


# --- selection -----------------------------------------------------------------------------


def _tlv(tag: bytes, value: bytes) -> bytes:
    return tag + bytes((len(value),)) + value


def _select(ctx: _Ctx) -> Outcome:
    cmd = ctx.cmd
    if cmd.p2 not in (0x00, 0x0C):
        return ctx.answer(SW.WRONG_P1P2)
    fci = cmd.p2 == 0x00
    if cmd.p1 == 0x00:
        if cmd.data != MF_FID:
            return ctx.answer(SW.NOT_FOUND if len(cmd.data) == 2 else SW.WRONG_LENGTH)
        ctx.session = replace(ctx.session, app=App.NONE, pin_ok=False)
        return ctx.ok(_tlv(b"\x6f", _tlv(b"\x83", MF_FID)) if fci else b"")
    if cmd.p1 != 0x04:
        return ctx.answer(SW.WRONG_P1P2)
    if not 5 <= len(cmd.data) <= 16:
        return ctx.answer(SW.WRONG_LENGTH)
    aid = cmd.data
    if aid == TRANSIT_AID and ctx.image.transit:
        if ctx.image.blocked:
            ctx.session = replace(ctx.session, app=App.TRANSIT_BLOCKED, pin_ok=False)
            return ctx.answer(SW.APP_BLOCKED)
        # DF01 (farelab) carries the purse algorithm, so that a terminal can compute a
        # maintenance MAC (application block) without an INITIALIZE first.
        app = App.TRANSIT
        prop = _tlv(b"\x9f\x0c", ctx.image.ef15) + _tlv(b"\xdf\x01", bytes((ctx.image.alg,)))
    elif aid == SOCIAL_AID:
        app, prop = App.SOCIAL, _tlv(b"\x88", bytes((SFI_SOCIAL_HOLDER,)))
    elif aid == BANK_AID:
        app, prop = App.BANK, _tlv(b"\x50", b"FARELAB BANK")
    elif aid == PSE_NAME:
        directory = _tlv(b"\xbf\x0c", _directory(ctx.image))
        app, prop = App.PSE, _tlv(b"\x88", bytes((SFI_DIRECTORY,))) + directory
    elif aid == PPSE_NAME:
        app, prop = App.NONE, _tlv(b"\xbf\x0c", _directory(ctx.image))
    else:
        ctx.session = replace(ctx.session, app=App.NONE, pin_ok=False)
        return ctx.answer(SW.NOT_FOUND)
    ctx.session = replace(ctx.session, app=app, pin_ok=False)
    if not fci:
        return ctx.ok()
    return ctx.ok(_tlv(b"\x6f", _tlv(b"\x84", aid) + _tlv(b"\xa5", prop)))


def _directory_entry(aid: bytes, label: bytes, priority: int) -> bytes:
    return _tlv(
        b"\x61", _tlv(b"\x4f", aid) + _tlv(b"\x50", label) + _tlv(b"\x87", bytes((priority,)))
    )


# The payment-system environment's directory (EMV Book 1 12.2.3): every application of the card,
# so that generic tools find them without knowing the AIDs. The PPSE's FCI carries it; the PSE's
# carries it too, and its directory file (SFI 1) holds it as one record.
_TRANSIT_ENTRY = _directory_entry(TRANSIT_AID, b"T-UNION TRANSIT", 1)
_OTHER_ENTRIES = _directory_entry(SOCIAL_AID, b"SOCIAL SECURITY", 2) + _directory_entry(
    BANK_AID, b"FARELAB BANK", 3
)


def _directory(image: CardImage) -> bytes:
    """The directory of the applications this card carries (a card without the transit
    application lists only the others)."""
    return _TRANSIT_ENTRY + _OTHER_ENTRIES if image.transit else _OTHER_ENTRIES


def _refusal_outside(ctx: _Ctx, wanted: App) -> int | None:
    """The status word for a command of application ``wanted`` run elsewhere, or None."""
    app = ctx.session.app
    if app is wanted:
        return None
    if app is App.TRANSIT_BLOCKED:
        return SW.APP_BLOCKED
    if app is App.BANK:
        return SW.SECURITY_STATUS
    if app in (App.NONE, App.PSE):
        return SW.CONDITIONS
    return SW.INS_NOT_SUPPORTED


# --- files ---------------------------------------------------------------------------------


def _binary_files(ctx: _Ctx) -> dict[int, bytes] | int:
    app = ctx.session.app
    if app is App.TRANSIT:
        img = ctx.image
        return {SFI_PUBLIC: img.ef15, SFI_HOLDER: img.ef16, SFI_MANAGEMENT: img.ef17}
    if app is App.SOCIAL:
        social = ctx.image.social
        if social.pin_changed and not ctx.session.pin_ok:
            return SW.SECURITY_STATUS
        return {SFI_SOCIAL_HOLDER: social.holder}
    if app is App.BANK:
        return SW.SECURITY_STATUS
    if app is App.TRANSIT_BLOCKED:
        return SW.APP_BLOCKED
    return SW.NOT_FOUND


def _record_files(ctx: _Ctx) -> dict[int, tuple[bytes, ...]]:
    if ctx.session.app is App.PSE:
        return {SFI_DIRECTORY: (_tlv(b"\x70", _directory(ctx.image)),)}
    if ctx.session.app is not App.TRANSIT:
        return {}
    img = ctx.image
    return {SFI_LOG: img.log, SFI_TRANSIT: (img.metro, img.bus), SFI_TRIPS: img.trips}


def _read_binary(ctx: _Ctx) -> Outcome:
    cmd = ctx.cmd
    if cmd.data:
        return ctx.answer(SW.WRONG_LENGTH)
    if not cmd.p1 & 0x80:
        return ctx.answer(SW.NOT_FOUND)
    if cmd.p1 & 0x60:
        return ctx.answer(SW.WRONG_P1P2)
    files = _binary_files(ctx)
    if isinstance(files, int):
        return ctx.answer(files)
    sfi, offset = cmd.p1 & 0x1F, cmd.p2
    content = files.get(sfi)
    if content is None:
        is_record = sfi in _record_files(ctx)
        return ctx.answer(SW.FILE_INCOMPATIBLE if is_record else SW.NOT_FOUND)
    if offset >= len(content):
        return ctx.answer(SW.OFFSET_BEYOND_END)
    rest = content[offset:]
    le = cmd.le
    if le is None or le == 256:
        return ctx.ok(rest)
    if le > len(rest):
        return ctx.answer(SW.END_OF_FILE, rest)
    return ctx.ok(rest[:le])


def _read_record(ctx: _Ctx) -> Outcome:
    cmd = ctx.cmd
    if cmd.data:
        return ctx.answer(SW.WRONG_LENGTH)
    if cmd.p2 & 0x07 != 0x04:
        return ctx.answer(SW.WRONG_P1P2)
    sfi = cmd.p2 >> 3
    app = ctx.session.app
    if app not in (App.TRANSIT, App.PSE):
        refusal = {App.BANK: SW.SECURITY_STATUS, App.TRANSIT_BLOCKED: SW.APP_BLOCKED}
        return ctx.answer(refusal.get(app, SW.NOT_FOUND))
    records = _record_files(ctx).get(sfi)
    if records is None:
        binary = _binary_files(ctx)
        is_binary = isinstance(binary, dict) and sfi in binary
        return ctx.answer(SW.FILE_INCOMPATIBLE if is_binary else SW.NOT_FOUND)
    if not 1 <= cmd.p1 <= len(records):
        return ctx.answer(SW.RECORD_NOT_FOUND)
    return ctx.ok(records[cmd.p1 - 1])


def _get_challenge(ctx: _Ctx) -> Outcome:
    cmd = ctx.cmd
    if cmd.p1 or cmd.p2:
        return ctx.answer(SW.WRONG_P1P2)
    if cmd.data or cmd.le not in (4, 8):
        return ctx.answer(SW.WRONG_LENGTH)
    value, session = ctx.session.draw(cmd.le)
    ctx.session = replace(session, challenge=value)
    return ctx.ok(value)


# --- purse ---------------------------------------------------------------------------------


def _get_balance(ctx: _Ctx) -> Outcome:
    refusal = _refusal_outside(ctx, App.TRANSIT)
    if refusal is not None:
        return ctx.answer(refusal)
    cmd = ctx.cmd
    if cmd.p1 != 0x00 or cmd.p2 != 0x02:
        return ctx.answer(SW.WRONG_P1P2)
    if cmd.data:
        return ctx.answer(SW.WRONG_LENGTH)
    return ctx.ok(ctx.image.balance.to_bytes(4, "big"))


_INIT_KINDS = {0x00: TxType.LOAD, 0x01: TxType.PURCHASE, 0x03: TxType.CAPP_PURCHASE}


def _initialize(ctx: _Ctx) -> Outcome:
    refusal = _refusal_outside(ctx, App.TRANSIT)
    if refusal is not None:
        return ctx.answer(refusal)
    cmd = ctx.cmd
    kind = _INIT_KINDS.get(cmd.p1)
    if kind is None or cmd.p2 != 0x02:
        return ctx.answer(SW.WRONG_P1P2)
    is_load = kind is TxType.LOAD
    if len(cmd.data) != 11:
        return ctx.answer(SW.WRONG_LENGTH)
    if cmd.data[0] != KEY_INDEX:
        return ctx.answer(SW.KEY_NOT_FOUND)
    amount = int.from_bytes(cmd.data[1:5], "big")
    terminal = cmd.data[5:11]
    img = ctx.image
    counter = img.online_counter if is_load else img.offline_counter
    if counter >= 0xFFFF:
        return ctx.answer(SW.COUNTER_EXHAUSTED)
    if is_load:
        if amount == 0:
            return ctx.answer(SW.WRONG_DATA)
        if img.balance + amount > img.max_balance:
            return ctx.answer(SW.CONDITIONS)
    elif amount > img.balance:
        return ctx.answer(SW.INSUFFICIENT_BALANCE)
    random, session = ctx.session.draw(4)
    pending = Pending(kind, amount, terminal, counter, random, img.balance)
    ctx.session = replace(session, pending=pending, cache=())
    head = img.balance.to_bytes(4, "big") + counter.to_bytes(2, "big")
    tail = bytes((img.keys.version, img.alg)) + random
    if not is_load:
        return ctx.ok(head + b"\x00\x00\x00" + tail)
    seslk = session_key(img.alg, img.keys.dlk, random + counter.to_bytes(2, "big") + b"\x80\x00")
    mac1 = mac(img.alg, seslk, img.balance.to_bytes(4, "big") + cmd.data[1:5] + b"\x02" + terminal)
    return ctx.ok(head + tail + mac1)


def _update_capp(ctx: _Ctx) -> Outcome:
    refusal = _refusal_outside(ctx, App.TRANSIT)
    if refusal is not None:
        return ctx.answer(refusal)
    pending = ctx.session.pending
    cmd = ctx.cmd
    outcome = _check_capp(ctx)
    if outcome is not None:
        ctx.cancel()
        return ctx.answer(outcome)
    assert pending is not None
    sfi, rec = cmd.p2 >> 3, cmd.p1
    kept = tuple(e for e in ctx.session.cache if (e[0], e[1]) != (sfi, rec))
    if len(kept) >= MAX_CACHED_RECORDS:
        ctx.cancel()
        return ctx.answer(SW.CONDITIONS)
    ctx.session = replace(ctx.session, cache=(*kept, (sfi, rec, cmd.data)))
    return ctx.ok()


def _check_capp(ctx: _Ctx) -> int | None:
    pending = ctx.session.pending
    cmd = ctx.cmd
    if pending is None or pending.tx_type is not TxType.CAPP_PURCHASE:
        return SW.CONDITIONS
    if cmd.p2 & 0x07:
        return SW.WRONG_P1P2
    sfi = cmd.p2 >> 3
    if sfi == SFI_TRANSIT:
        if cmd.p1 not in (1, 2):
            return SW.RECORD_NOT_FOUND
        if len(cmd.data) != EF1A_LEN:
            return SW.WRONG_LENGTH
        current = ctx.image.metro if cmd.p1 == 1 else ctx.image.bus
        if cmd.data[:3] != current[:3]:
            return SW.WRONG_DATA
        return None
    if sfi == SFI_TRIPS:
        if cmd.p1 != 0:
            return SW.RECORD_NOT_FOUND
        return SW.WRONG_LENGTH if len(cmd.data) != EF1E_LEN else None
    if sfi == SFI_LOG:
        return SW.SECURITY_STATUS
    if sfi in (SFI_PUBLIC, SFI_HOLDER, SFI_MANAGEMENT):
        return SW.FILE_INCOMPATIBLE
    return SW.NOT_FOUND


def _debit(ctx: _Ctx) -> Outcome:
    refusal = _refusal_outside(ctx, App.TRANSIT)
    if refusal is not None:
        return ctx.answer(refusal)
    wrong_le = ctx.le_refusal(8)  # not executed: the transaction stays for a corrected DEBIT
    if wrong_le is not None:
        return wrong_le
    cmd = ctx.cmd
    pending, cache = ctx.session.pending, ctx.session.cache
    ctx.cancel()
    if cmd.p1 != 0x01 or cmd.p2 != 0x00:
        return ctx.answer(SW.WRONG_P1P2)
    if pending is None or pending.tx_type is TxType.LOAD:
        return ctx.answer(SW.CONDITIONS)
    if len(cmd.data) != 15:
        return ctx.answer(SW.WRONG_LENGTH)
    img = ctx.image
    ttc, day, time, mac1 = cmd.data[0:4], cmd.data[4:8], cmd.data[8:11], cmd.data[11:15]
    counter = pending.counter.to_bytes(2, "big")
    sespk = session_key(img.alg, img.keys.dpk, pending.random + counter + ttc[2:4])
    amount = pending.amount.to_bytes(4, "big")
    head = amount + bytes((pending.tx_type,)) + pending.terminal
    if mac(img.alg, sespk, head + day + time) != mac1:
        return ctx.answer(SW.MAC_INVALID)
    if pending.amount > img.balance:
        return ctx.answer(SW.INSUFFICIENT_BALANCE)
    mac2 = mac(img.alg, sespk, amount)
    tac = mac(img.alg, tac_key(img.alg, img.keys.dtk), head + ttc + day + time)
    record = LogRecord(
        pending.counter, pending.amount, pending.tx_type, pending.terminal, day, time
    )
    metro, bus, trips = img.metro, img.bus, img.trips
    for sfi, rec, data in cache:
        if sfi == SFI_TRANSIT and rec == 1:
            metro = data
        elif sfi == SFI_TRANSIT:
            bus = data
        else:
            trips = img.with_trip(data)
    new = img.replace(
        balance=img.balance - pending.amount,
        offline_counter=pending.counter + 1,
        log=img.with_log(record.encode()),
        metro=metro,
        bus=bus,
        trips=trips,
        proofs=img.with_proof(Proof(pending.tx_type, pending.counter + 1, mac2, tac)),
    )
    return ctx.commit(new, data=tac + mac2)


def _credit(ctx: _Ctx) -> Outcome:
    refusal = _refusal_outside(ctx, App.TRANSIT)
    if refusal is not None:
        return ctx.answer(refusal)
    wrong_le = ctx.le_refusal(4)  # not executed: the transaction stays for a corrected CREDIT
    if wrong_le is not None:
        return wrong_le
    cmd = ctx.cmd
    pending = ctx.session.pending
    ctx.cancel()
    if cmd.p1 != 0x00 or cmd.p2 != 0x00:
        return ctx.answer(SW.WRONG_P1P2)
    if pending is None or pending.tx_type is not TxType.LOAD:
        return ctx.answer(SW.CONDITIONS)
    if len(cmd.data) != 11:
        return ctx.answer(SW.WRONG_LENGTH)
    img = ctx.image
    day, time, mac2 = cmd.data[0:4], cmd.data[4:7], cmd.data[7:11]
    counter = pending.counter.to_bytes(2, "big")
    seslk = session_key(img.alg, img.keys.dlk, pending.random + counter + b"\x80\x00")
    amount = pending.amount.to_bytes(4, "big")
    body = amount + b"\x02" + pending.terminal + day + time
    if mac(img.alg, seslk, body) != mac2:
        return ctx.answer(SW.MAC_INVALID)
    new_balance = img.balance + pending.amount
    if new_balance > img.max_balance:
        return ctx.answer(SW.CONDITIONS)
    tac = mac(
        img.alg, tac_key(img.alg, img.keys.dtk), new_balance.to_bytes(4, "big") + counter + body
    )
    record = LogRecord(pending.counter, pending.amount, TxType.LOAD, pending.terminal, day, time)
    new = img.replace(
        balance=new_balance,
        online_counter=pending.counter + 1,
        log=img.with_log(record.encode()),
        proofs=img.with_proof(Proof(TxType.LOAD, pending.counter + 1, mac2, tac)),
    )
    return ctx.commit(new, data=tac)


def _transaction_proof(ctx: _Ctx) -> Outcome:
    refusal = _refusal_outside(ctx, App.TRANSIT)
    if refusal is not None:
        return ctx.answer(refusal)
    cmd = ctx.cmd
    if cmd.p1 != 0x00 or cmd.p2 not in (TxType.LOAD, TxType.PURCHASE, TxType.CAPP_PURCHASE):
        return ctx.answer(SW.WRONG_P1P2)
    if len(cmd.data) != 2:
        return ctx.answer(SW.WRONG_LENGTH)
    counter = int.from_bytes(cmd.data, "big")
    for proof in ctx.image.proofs:
        if proof.tx_type == cmd.p2 and proof.counter == counter:
            return ctx.ok(proof.mac + proof.tac)
    return ctx.answer(SW.MAC_NOT_AVAILABLE)


# --- maintenance (hotlist) -----------------------------------------------------------------


def _maintenance_refusal(ctx: _Ctx, wanted: App) -> int | None:
    """Common checks of the MAC-protected maintenance commands; None when the MAC is right."""
    cmd = ctx.cmd
    challenge = ctx.session.challenge
    ctx.session = replace(ctx.session, challenge=None)
    if ctx.session.app is not wanted:
        if wanted is App.TRANSIT_BLOCKED and ctx.session.app is App.TRANSIT:
            return SW.CONDITIONS
        return _refusal_outside(ctx, wanted)
    if cmd.p1 != 0x00:
        return SW.WRONG_P1P2
    if len(cmd.data) < 4 or cmd.le is not None:
        return SW.WRONG_LENGTH
    if challenge is None:
        return SW.CONDITIONS
    header = bytes((cmd.cla, cmd.ins, cmd.p1, cmd.p2, len(cmd.data)))
    expected = maintenance_mac(ctx.image, challenge, header + cmd.data[:-4])
    return None if expected == cmd.data[-4:] else SW.MAC_INVALID


def _application_block(ctx: _Ctx) -> Outcome:
    if ctx.session.app is App.TRANSIT_BLOCKED:
        return ctx.answer(SW.APP_BLOCKED)
    if ctx.cmd.p2 not in (0x00, 0x01):
        return ctx.answer(SW.WRONG_P1P2)
    if len(ctx.cmd.data) != 4 and ctx.session.app is App.TRANSIT:
        return ctx.answer(SW.WRONG_LENGTH)
    refusal = _maintenance_refusal(ctx, App.TRANSIT)
    if refusal is not None:
        return ctx.answer(refusal)
    ctx.session = replace(ctx.session, app=App.TRANSIT_BLOCKED)
    return ctx.commit(ctx.image.replace(blocked=True))


def _application_unblock(ctx: _Ctx) -> Outcome:
    if ctx.cmd.p2 != 0x00:
        return ctx.answer(SW.WRONG_P1P2)
    if len(ctx.cmd.data) != 4 and ctx.session.app is App.TRANSIT_BLOCKED:
        return ctx.answer(SW.WRONG_LENGTH)
    refusal = _maintenance_refusal(ctx, App.TRANSIT_BLOCKED)
    if refusal is not None:
        return ctx.answer(refusal)
    ctx.session = replace(ctx.session, app=App.TRANSIT)
    return ctx.commit(ctx.image.replace(blocked=False))


# --- social security: PIN (R8) -------------------------------------------------------------


def _pin_digits(raw: bytes) -> str | None:
    text = raw.hex()
    return text if len(text) == 6 and text.isdigit() else None


def _check_pin(ctx: _Ctx, offered: str) -> Outcome | None:
    """Compare a PIN; None if right (failures cleared), else the committed refusal."""
    social = ctx.image.social
    failures = social.failures if social.failure_day == ctx.today else 0
    if offered == social.pin:
        if social.failures:
            ctx.image = ctx.image.replace(social=replace(social, failures=0, failure_day=None))
        ctx.session = replace(ctx.session, pin_ok=True)
        return None
    failures += 1
    locked = failures >= social.try_limit
    changed = replace(social, failures=failures, failure_day=ctx.today, locked=locked)
    ctx.session = replace(ctx.session, pin_ok=False)
    return ctx.commit(
        ctx.image.replace(social=changed), pin_tries_left(social.try_limit - failures)
    )


def _pin_preamble(ctx: _Ctx) -> int | None:
    refusal = _refusal_outside(ctx, App.SOCIAL)
    if refusal is not None:
        return refusal
    if ctx.cmd.p1 != 0x00 or ctx.cmd.p2 != 0x00:
        return SW.WRONG_P1P2
    if ctx.image.social.locked:
        return SW.AUTH_BLOCKED
    return None


def _verify(ctx: _Ctx) -> Outcome:
    refusal = _pin_preamble(ctx)
    if refusal is not None:
        return ctx.answer(refusal)
    social = ctx.image.social
    if not ctx.cmd.data:
        if ctx.session.pin_ok:
            return ctx.ok()
        failures = social.failures if social.failure_day == ctx.today else 0
        return ctx.answer(pin_tries_left(social.try_limit - failures))
    if len(ctx.cmd.data) != 3:
        return ctx.answer(SW.WRONG_LENGTH)
    offered = _pin_digits(ctx.cmd.data)
    if offered is None:
        return ctx.answer(SW.WRONG_DATA)
    before = ctx.image
    wrong = _check_pin(ctx, offered)
    if wrong is not None:
        return wrong
    return ctx.commit(ctx.image) if ctx.image is not before else ctx.ok()


def _change_pin(ctx: _Ctx) -> Outcome:
    refusal = _pin_preamble(ctx)
    if refusal is not None:
        return ctx.answer(refusal)
    if len(ctx.cmd.data) != 6:
        return ctx.answer(SW.WRONG_LENGTH)
    old, new = _pin_digits(ctx.cmd.data[:3]), _pin_digits(ctx.cmd.data[3:])
    # A weak new PIN is refused before the old one is checked, so the refusal tells nothing
    # about the old PIN and spends no try.
    if old is None or new is None or is_weak_pin(new):
        return ctx.answer(SW.WRONG_DATA)
    wrong = _check_pin(ctx, old)
    if wrong is not None:
        return wrong
    social = replace(ctx.image.social, pin=new, failures=0, failure_day=None)
    return ctx.commit(ctx.image.replace(social=social))


def _reset_retry_counter(ctx: _Ctx) -> Outcome:
    """The outlet's PIN reset (R8): MAC-protected with the maintenance key, sets a new PIN."""
    if ctx.cmd.p2 != 0x00:
        return ctx.answer(SW.WRONG_P1P2)
    if len(ctx.cmd.data) != 7 and ctx.session.app is App.SOCIAL:
        return ctx.answer(SW.WRONG_LENGTH)
    refusal = _maintenance_refusal(ctx, App.SOCIAL)
    if refusal is not None:
        return ctx.answer(refusal)
    new = _pin_digits(ctx.cmd.data[:3])
    social = ctx.image.social
    if new is None or (is_weak_pin(new) and new != social.initial_pin):
        return ctx.answer(SW.WRONG_DATA)
    reset = replace(social, pin=new, failures=0, failure_day=None, locked=False)
    return ctx.commit(ctx.image.replace(social=reset))


_HANDLERS: dict[tuple[int, int], _Handler] = {
    (0x00, 0xA4): _select,
    _GET_RESPONSE: _get_response,
    (0x00, 0xB0): _read_binary,
    (0x00, 0xB2): _read_record,
    (0x00, 0x84): _get_challenge,
    (0x00, 0x20): _verify,
    (0x00, 0x24): _change_pin,
    (0x84, 0x2C): _reset_retry_counter,
    (0x80, 0x5C): _get_balance,
    (0x80, 0x50): _initialize,
    (0x80, 0xDC): _update_capp,
    (0x80, 0x54): _debit,
    (0x80, 0x52): _credit,
    (0x80, 0x5A): _transaction_proof,
    (0x84, 0x1E): _application_block,
    (0x84, 0x18): _application_unblock,
}

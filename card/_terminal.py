"""The terminal end of the card protocol as sans-IO state machines (STYLE §1).

A flow never touches a reader.  ``start()`` returns the first event; each R-APDU goes back in
through ``receive()``, which returns the next event: :class:`Transmit` (send this C-APDU),
:class:`Refused` (the card or the data said no; the flow is over) or the flow's own result.
:func:`drive` runs a flow on any :class:`card.Reader`.

Every Transmit names its :class:`Step`, so a caller (or a test) can tear a transaction at an exact
APDU boundary — the validator's ``pull_after`` uses these names.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from farelab.card._apdu import SW, Command, Response, parse_response
from farelab.card._applet import SOCIAL_AID, TRANSIT_AID, is_weak_pin
from farelab.card._crypto import Alg
from farelab.card._files import CST, PublicInfo, TxType, bcd_date, bcd_time
from farelab.card._psam import Psam, PsamError, PurchaseTicket
from farelab.card._reader import Reader

__all__ = [
    "BlockApplication",
    "CappUpdate",
    "CardSnapshot",
    "FlowError",
    "InFlight",
    "InitInfo",
    "Load",
    "LoadDone",
    "LoadRequest",
    "NeedAuthorization",
    "PinReset",
    "PinResetDone",
    "ProofFound",
    "ProofMissing",
    "Purchase",
    "PurchaseDone",
    "ReadCard",
    "Refused",
    "Step",
    "TransactionProof",
    "Transmit",
    "drive",
]


class Step(enum.StrEnum):
    """The APDU steps of a tap, named as testbeds name them (``pull_after``)."""

    SELECT = "SELECT"
    READ = "READ"
    INIT = "INIT"
    UPDATE_CAPP = "UPDATE_CAPP"
    DEBIT = "DEBIT"
    CREDIT = "CREDIT"
    PROOF = "PROOF"
    CHALLENGE = "CHALLENGE"
    BLOCK = "BLOCK"
    PIN_RESET = "PIN_RESET"


class FlowError(RuntimeError):
    """A flow was used out of order (a bug in the caller, not a card fault)."""


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``apdu`` to the card and feed its answer to ``receive()``."""

    apdu: bytes
    step: Step


@dataclass(frozen=True, slots=True)
class Refused:
    """The flow ended without its result. ``sw`` is the card's status word (0 if not the card's
    fault); ``reason`` is a short machine-readable word."""

    step: Step
    sw: int
    reason: str

    @property
    def sw_hex(self) -> str:
        """The status word as four hex digits."""
        return f"{self.sw:04X}"


_REASONS: dict[int, str] = {
    SW.INSUFFICIENT_BALANCE: "insufficient_balance",
    SW.APP_BLOCKED: "blocked",
    SW.CONDITIONS: "conditions_not_satisfied",
    SW.MAC_INVALID: "mac_invalid",
    SW.COUNTER_EXHAUSTED: "counter_exhausted",
    SW.NOT_FOUND: "not_found",
    SW.SECURITY_STATUS: "security_status",
}


def _refused(step: Step, response: Response) -> Refused:
    return Refused(step, response.sw, _REASONS.get(response.sw, "card_error"))


def _malformed(step: Step, response: Response) -> Refused:
    return Refused(step, response.sw, "card_error")


def _answer(rapdu: bytes, step: Step) -> Response | Refused:
    try:
        return parse_response(rapdu)
    except ValueError:
        return Refused(step, 0, "card_error")


# --- reading -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardSnapshot:
    """What a terminal read from the transit application before deciding."""

    public: PublicInfo
    alg: Alg | None
    records: dict[tuple[int, int], bytes]

    @property
    def issuer_id(self) -> bytes:
        """EF15 issuer id."""
        return self.public.issuer_id

    @property
    def serial(self) -> str:
        """The 20-digit card number."""
        return self.public.serial


def _fci_tags(fci: bytes) -> dict[bytes, bytes]:
    """The primitive tags inside FCI template 6F/A5 (just enough BER-TLV for our FCI)."""
    found: dict[bytes, bytes] = {}

    def walk(data: bytes) -> None:
        i = 0
        while i < len(data):
            tag_len = 2 if data[i] & 0x1F == 0x1F else 1
            tag = data[i : i + tag_len]
            if i + tag_len >= len(data):
                return
            length = data[i + tag_len]
            value = data[i + tag_len + 1 : i + tag_len + 1 + length]
            if tag in (b"\x6f", b"\xa5"):
                walk(value)
            else:
                found[tag] = value
            i += tag_len + 1 + length

    walk(fci)
    return found


class ReadCard:
    """SELECT the transit application, then read EF15 (from the FCI when it is there) and the
    requested records, e.g. ``[(0x1A, 1)]`` for the metro record, ``[(0x18, 1)]`` for the
    newest log entry."""

    def __init__(self, *, records: Sequence[tuple[int, int]] = ((0x1A, 1), (0x1A, 2))) -> None:
        self._wanted = list(records)
        self._public: PublicInfo | None = None
        self._alg: Alg | None = None
        self._records: dict[tuple[int, int], bytes] = {}
        self._state = "new"

    def start(self) -> Transmit:
        """SELECT by AID."""
        if self._state != "new":
            raise FlowError("ReadCard.start() called twice")
        self._state = "select"
        return Transmit(Command(0x00, 0xA4, 0x04, 0x00, TRANSIT_AID, 256).encode(), Step.SELECT)

    def _next_read(self) -> Transmit | CardSnapshot:
        if self._public is None:
            self._state = "ef15"
            return Transmit(bytes.fromhex("00B095001E"), Step.READ)
        if self._wanted:
            sfi, rec = self._wanted[0]
            self._state = "record"
            return Transmit(bytes((0x00, 0xB2, rec, (sfi << 3) | 4, 0x00)), Step.READ)
        self._state = "done"
        return CardSnapshot(self._public, self._alg, dict(self._records))

    def receive(self, rapdu: bytes) -> Transmit | CardSnapshot | Refused:
        """Feed the card's answer."""
        step = Step.SELECT if self._state == "select" else Step.READ
        response = _answer(rapdu, step)
        if isinstance(response, Refused):
            return response
        if self._state == "select":
            if not response.ok:
                return _refused(step, response)
            tags = _fci_tags(response.data)
            if b"\x9f\x0c" in tags:
                try:
                    self._public = PublicInfo.decode(tags[b"\x9f\x0c"])
                except ValueError:
                    return _malformed(step, response)
            alg = tags.get(b"\xdf\x01")
            if alg is not None and len(alg) == 1 and alg[0] in (0x00, 0x04):
                self._alg = Alg(alg[0])
            return self._next_read()
        if self._state == "ef15":
            if not response.ok:
                return _refused(step, response)
            try:
                self._public = PublicInfo.decode(response.data)
            except ValueError:
                return _malformed(step, response)
            return self._next_read()
        if self._state == "record":
            key = self._wanted.pop(0)
            if response.ok:
                self._records[key] = response.data
            elif response.sw != SW.RECORD_NOT_FOUND:
                return _refused(step, response)
            return self._next_read()
        raise FlowError(f"ReadCard.receive() in state {self._state}")


# --- purchase ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitInfo:
    """The card's answer to INITIALIZE FOR (CAPP) PURCHASE."""

    balance: int
    counter: int
    key_version: int
    alg: Alg
    random: bytes


@dataclass(frozen=True, slots=True)
class CappUpdate:
    """One UPDATE CAPP DATA CACHE: a record of EF1A (record 1 or 2) or EF1E (record 0)."""

    sfi: int
    record: int
    data: bytes

    def encode(self) -> bytes:
        """The C-APDU."""
        return Command(0x80, 0xDC, self.record, self.sfi << 3, self.data).encode()


@dataclass(frozen=True, slots=True)
class InFlight:
    """A DEBIT or CREDIT that was sent: if its answer never arrives, this is what to look for
    with GET TRANSACTION PROOF (``proof_counter``) on the card's next tap."""

    tx_type: TxType
    amount: int
    proof_counter: int
    balance_before: int
    ttc: int
    day: bytes
    time: bytes


@dataclass(frozen=True, slots=True)
class PurchaseDone:
    """A completed (composite) purchase."""

    tx_type: TxType
    amount: int
    balance_before: int
    balance_after: int
    counter: int
    ttc: int
    tac: bytes
    mac2_valid: bool
    day: bytes
    time: bytes


class Purchase:
    """INITIALIZE FOR (CAPP) PURCHASE → [UPDATE CAPP DATA CACHE…] → DEBIT, with the PSAM.

    ``min_balance`` makes the flow stop after INITIALIZE with ``insufficient_balance`` when the
    card holds less (a metro entry needs the line's maximum fare, R3).  ``capp`` gives the cached
    records, as a list or as a function of the INITIALIZE answer (records that carry the balance).
    """

    def __init__(
        self,
        *,
        psam: Psam,
        card: CardSnapshot,
        amount: int,
        when: datetime,
        composite: bool = False,
        capp: Sequence[CappUpdate] | Callable[[InitInfo], Sequence[CappUpdate]] = (),
        min_balance: int = 0,
    ) -> None:
        if not 0 <= amount <= 0xFFFFFFFF:
            raise ValueError(f"amount must be 0..4294967295 fen, got {amount}")
        if capp and not composite:
            raise ValueError("CAPP records need a composite purchase")
        self._psam = psam
        self._card = card
        self._amount = amount
        self._when = when
        self._type = TxType.CAPP_PURCHASE if composite else TxType.PURCHASE
        self._capp = capp
        self._updates: list[CappUpdate] = []
        self._min_balance = min_balance
        self._init: InitInfo | None = None
        self._ticket: PurchaseTicket | None = None
        self._state = "new"
        self.in_flight: InFlight | None = None

    @property
    def init(self) -> InitInfo | None:
        """The INITIALIZE answer, once received."""
        return self._init

    def start(self) -> Transmit:
        """INITIALIZE FOR (CAPP) PURCHASE."""
        if self._state != "new":
            raise FlowError("Purchase.start() called twice")
        self._state = "init"
        p1 = 0x03 if self._type is TxType.CAPP_PURCHASE else 0x01
        data = b"\x01" + self._amount.to_bytes(4, "big") + self._psam.terminal_id
        return Transmit(Command(0x80, 0x50, p1, 0x02, data, 0x0F).encode(), Step.INIT)

    def _debit(self) -> Transmit | Refused:
        init = self._init
        assert init is not None
        try:
            ticket = self._psam.purchase(
                alg=init.alg,
                issuer_id=self._card.issuer_id,
                serial8=self._card.public.serial8,
                random=init.random,
                counter=init.counter,
                amount=self._amount,
                tx_type=self._type,
                when=self._when,
            )
        except PsamError:
            self._state = "done"
            return Refused(Step.INIT, 0, "psam_error")
        self._ticket = ticket
        self._state = "debit"
        self.in_flight = InFlight(
            self._type,
            self._amount,
            init.counter + 1,
            init.balance,
            ticket.ttc,
            ticket.day,
            ticket.time,
        )
        return Transmit(
            Command(0x80, 0x54, 0x01, 0x00, ticket.debit_data, 0x08).encode(), Step.DEBIT
        )

    def _next_update(self) -> Transmit | Refused:
        if self._updates:
            self._state = "capp"
            return Transmit(self._updates.pop(0).encode(), Step.UPDATE_CAPP)
        return self._debit()

    def receive(self, rapdu: bytes) -> Transmit | PurchaseDone | Refused:
        """Feed the card's answer."""
        step = {"init": Step.INIT, "capp": Step.UPDATE_CAPP, "debit": Step.DEBIT}.get(self._state)
        if step is None:
            raise FlowError(f"Purchase.receive() in state {self._state}")
        response = _answer(rapdu, step)
        if isinstance(response, Refused) or not response.ok:
            self._state = "done"
            return response if isinstance(response, Refused) else _refused(step, response)
        if step is Step.INIT:
            return self._on_init(response)
        if step is Step.UPDATE_CAPP:
            return self._next_update()
        return self._on_debit(response)

    def _on_init(self, response: Response) -> Transmit | Refused:
        data = response.data
        if len(data) != 15 or data[10] not in (0x00, 0x04):
            self._state = "done"
            return _malformed(Step.INIT, response)
        self._init = InitInfo(
            balance=int.from_bytes(data[0:4], "big"),
            counter=int.from_bytes(data[4:6], "big"),
            key_version=data[9],
            alg=Alg(data[10]),
            random=data[11:15],
        )
        if self._init.balance < max(self._min_balance, self._amount):
            self._state = "done"
            return Refused(Step.INIT, SW.INSUFFICIENT_BALANCE, "insufficient_balance")
        capp = self._capp(self._init) if callable(self._capp) else self._capp
        self._updates = list(capp)
        return self._next_update()

    def _on_debit(self, response: Response) -> PurchaseDone | Refused:
        self._state = "done"
        ticket, init = self._ticket, self._init
        assert ticket is not None
        assert init is not None
        if len(response.data) != 8:
            return _malformed(Step.DEBIT, response)
        tac, mac2 = response.data[:4], response.data[4:]
        return PurchaseDone(
            tx_type=self._type,
            amount=self._amount,
            balance_before=init.balance,
            balance_after=init.balance - self._amount,
            counter=init.counter,
            ttc=ticket.ttc,
            tac=tac,
            mac2_valid=self._psam.check_mac2(ticket, mac2),
            day=ticket.day,
            time=ticket.time,
        )


# --- load ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """What the kiosk forwards to the host after INITIALIZE FOR LOAD."""

    issuer_id: bytes
    serial: str
    serial8: bytes
    alg: Alg
    key_version: int
    balance: int
    counter: int
    random: bytes
    mac1: bytes
    amount: int
    terminal: bytes


@dataclass(frozen=True, slots=True)
class NeedAuthorization:
    """The flow waits for the host: call ``Load.authorize()`` with its MAC2, date and time."""

    request: LoadRequest


@dataclass(frozen=True, slots=True)
class LoadDone:
    """A completed load: ``tac`` goes back to the host."""

    amount: int
    balance_before: int
    balance_after: int
    counter: int
    tac: bytes
    day: bytes
    time: bytes


class Load:
    """INITIALIZE FOR LOAD → host authorization → CREDIT FOR LOAD."""

    def __init__(self, *, terminal_id: bytes, card: CardSnapshot, amount: int) -> None:
        if len(terminal_id) != 6:
            raise ValueError(f"terminal id must be 6 bytes, got {len(terminal_id)}")
        if not 0 < amount <= 0xFFFFFFFF:
            raise ValueError(f"a load amount must be positive, got {amount}")
        self._terminal = terminal_id
        self._card = card
        self._amount = amount
        self._request: LoadRequest | None = None
        self._credit: tuple[bytes, bytes] | None = None
        self._state = "new"
        self.in_flight: InFlight | None = None

    def start(self) -> Transmit:
        """INITIALIZE FOR LOAD."""
        if self._state != "new":
            raise FlowError("Load.start() called twice")
        self._state = "init"
        data = b"\x01" + self._amount.to_bytes(4, "big") + self._terminal
        return Transmit(Command(0x80, 0x50, 0x00, 0x02, data, 0x10).encode(), Step.INIT)

    def receive(self, rapdu: bytes) -> NeedAuthorization | LoadDone | Refused:
        """Feed the card's answer."""
        if self._state not in ("init", "credit"):
            raise FlowError(f"Load.receive() in state {self._state}")
        step = Step.INIT if self._state == "init" else Step.CREDIT
        response = _answer(rapdu, step)
        if isinstance(response, Refused) or not response.ok:
            self._state = "done"
            if isinstance(response, Refused):
                return response
            if step is Step.INIT and response.sw == SW.CONDITIONS:
                return Refused(step, response.sw, "cap_exceeded")
            return _refused(step, response)
        if step is Step.INIT:
            data = response.data
            if len(data) != 16 or data[7] not in (0x00, 0x04):
                self._state = "done"
                return _malformed(step, response)
            self._request = LoadRequest(
                issuer_id=self._card.issuer_id,
                serial=self._card.serial,
                serial8=self._card.public.serial8,
                alg=Alg(data[7]),
                key_version=data[6],
                balance=int.from_bytes(data[0:4], "big"),
                counter=int.from_bytes(data[4:6], "big"),
                random=data[8:12],
                mac1=data[12:16],
                amount=self._amount,
                terminal=self._terminal,
            )
            self._state = "authorize"
            return NeedAuthorization(self._request)
        self._state = "done"
        request, credit = self._request, self._credit
        assert request is not None
        assert credit is not None
        if len(response.data) != 4:
            return _malformed(step, response)
        return LoadDone(
            amount=self._amount,
            balance_before=request.balance,
            balance_after=request.balance + self._amount,
            counter=request.counter,
            tac=response.data,
            day=credit[0],
            time=credit[1],
        )

    def authorize(self, *, mac2: bytes, day: bytes, time: bytes) -> Transmit:
        """The host's MAC2 for the date and time it chose: CREDIT FOR LOAD."""
        if self._state != "authorize" or self._request is None:
            raise FlowError(f"Load.authorize() in state {self._state}")
        if len(mac2) != 4 or len(day) != 4 or len(time) != 3:
            raise ValueError("MAC2 is 4 bytes, date 4 BCD bytes, time 3 BCD bytes")
        self._credit = (day, time)
        self._state = "credit"
        req = self._request
        self.in_flight = InFlight(
            TxType.LOAD, self._amount, req.counter + 1, req.balance, 0, day, time
        )
        return Transmit(
            Command(0x80, 0x52, 0x00, 0x00, day + time + mac2, 0x04).encode(), Step.CREDIT
        )


# --- proof and maintenance ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProofFound:
    """The card completed the transaction: its MAC (MAC2) and TAC."""

    mac: bytes
    tac: bytes


@dataclass(frozen=True, slots=True)
class ProofMissing:
    """The card has no such completed transaction (``9406``): it never happened."""


class TransactionProof:
    """GET TRANSACTION PROOF for a transaction type and counter (INITIALIZE's counter + 1)."""

    def __init__(self, *, tx_type: TxType, counter: int) -> None:
        if not 0 <= counter <= 0xFFFF:
            raise ValueError(f"counter must fit 2 bytes, got {counter}")
        self._apdu = Command(0x80, 0x5A, 0x00, tx_type, counter.to_bytes(2, "big"), 8).encode()

    def start(self) -> Transmit:
        """The one command."""
        return Transmit(self._apdu, Step.PROOF)

    def receive(self, rapdu: bytes) -> ProofFound | ProofMissing | Refused:
        """Feed the card's answer."""
        response = _answer(rapdu, Step.PROOF)
        if isinstance(response, Refused):
            return response
        if response.sw == SW.MAC_NOT_AVAILABLE:
            return ProofMissing()
        if not response.ok:
            return _refused(Step.PROOF, response)
        if len(response.data) != 8:
            return _malformed(Step.PROOF, response)
        return ProofFound(response.data[:4], response.data[4:])


class BlockApplication:
    """GET CHALLENGE → APPLICATION BLOCK with the PSAM's maintenance key (hotlisted card)."""

    def __init__(self, *, psam: Psam, card: CardSnapshot) -> None:
        if card.alg is None:
            raise ValueError("the card's purse algorithm is unknown (no DF01 in its FCI)")
        self._psam = psam
        self._card = card
        self._alg = card.alg
        self._state = "new"

    def start(self) -> Transmit:
        """GET CHALLENGE."""
        self._state = "challenge"
        return Transmit(bytes.fromhex("0084000004"), Step.CHALLENGE)

    def receive(self, rapdu: bytes) -> Transmit | Refused | None:
        """Feed the card's answer; None when the application is blocked."""
        step = Step.CHALLENGE if self._state == "challenge" else Step.BLOCK
        response = _answer(rapdu, step)
        if isinstance(response, Refused):
            return response
        if not response.ok:
            return _refused(step, response)
        if step is Step.BLOCK:
            self._state = "done"
            return None
        header = bytes.fromhex("841E000004")
        try:
            code = self._psam.maintenance_mac(
                alg=self._alg,
                issuer_id=self._card.issuer_id,
                serial8=self._card.public.serial8,
                challenge=response.data,
                message=header,
            )
        except PsamError:
            return Refused(step, 0, "psam_error")
        self._state = "block"
        return Transmit(header + code, Step.BLOCK)


@dataclass(frozen=True, slots=True)
class PinResetDone:
    """The card took the new social-security PIN: its wrong tries are cleared and it is
    unlocked (R8)."""


class PinReset:
    """The outlet's PIN reset (R8): SELECT the social-security application → GET CHALLENGE →
    RESET RETRY COUNTER with the new PIN and the MAC under the PSAM's maintenance key.

    ``card`` is the transit application's snapshot (a :class:`ReadCard` first): the MAC key is
    diversified from its issuer id and serial, for its purse algorithm. A weak PIN (six identical
    or six consecutive digits) is refused ``weak_pin`` before anything is sent.
    """

    def __init__(self, *, psam: Psam, card: CardSnapshot, new_pin: str) -> None:
        if card.alg is None:
            raise ValueError("the card's purse algorithm is unknown (no DF01 in its FCI)")
        if len(new_pin) != 6 or not new_pin.isdigit():
            raise ValueError("a social-security PIN is 6 digits")
        self._psam = psam
        self._card = card
        self._alg = card.alg
        self._pin = bytes.fromhex(new_pin)
        self._weak = is_weak_pin(new_pin)
        self._state = "new"

    def start(self) -> Transmit | Refused:
        """SELECT the social-security application, or the refusal of a weak PIN."""
        if self._state != "new":
            raise FlowError("PinReset.start() called twice")
        if self._weak:
            self._state = "done"
            return Refused(Step.PIN_RESET, 0, "weak_pin")
        self._state = "select"
        return Transmit(Command(0x00, 0xA4, 0x04, 0x00, SOCIAL_AID, 256).encode(), Step.SELECT)

    def receive(self, rapdu: bytes) -> Transmit | PinResetDone | Refused:
        """Feed the card's answer."""
        step = {
            "select": Step.SELECT,
            "challenge": Step.CHALLENGE,
            "reset": Step.PIN_RESET,
        }.get(self._state)
        if step is None:
            raise FlowError(f"PinReset.receive() in state {self._state}")
        response = _answer(rapdu, step)
        if isinstance(response, Refused) or not response.ok:
            self._state = "done"
            return response if isinstance(response, Refused) else _refused(step, response)
        if step is Step.SELECT:
            self._state = "challenge"
            return Transmit(bytes.fromhex("0084000004"), Step.CHALLENGE)
        if step is Step.PIN_RESET:
            self._state = "done"
            return PinResetDone()
        header = bytes((0x84, 0x2C, 0x00, 0x00, len(self._pin) + 4))
        try:
            code = self._psam.maintenance_mac(
                alg=self._alg,
                issuer_id=self._card.issuer_id,
                serial8=self._card.public.serial8,
                challenge=response.data,
                message=header + self._pin,
            )
        except PsamError:
            self._state = "done"
            return Refused(step, 0, "psam_error")
        self._state = "reset"
        return Transmit(header + self._pin + code, Step.PIN_RESET)


def drive(reader: Reader, flow: ReadCard | Purchase | TransactionProof | PinReset) -> object:
    """Run a flow that needs nothing but the card to its end; returns its final event."""
    event: object = flow.start()
    while isinstance(event, Transmit):
        event = flow.receive(reader.transmit(event.apdu))
    return event


def now_fields(when: datetime) -> tuple[bytes, bytes]:
    """Date and time BCD fields (CST) of a moment, as DEBIT and CREDIT carry them."""
    return bcd_date(when.astimezone(CST).date()), bcd_time(when)

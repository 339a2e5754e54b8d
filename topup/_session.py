"""One card at the kiosk as a sans-IO state machine (STYLE §1): present it, then load it, move a
replaced card's balance onto it, or refund it.

``LoadSession(terminal_id=…, rules=…, action=…, pending=…, now=…)`` reads the card once (SELECT,
EF15, GET BALANCE); settles the loads and refunds of that card an earlier session left torn
(GET TRANSACTION PROOF: found → the host confirms it, missing → void); then does its action.  It
emits :class:`card.Transmit` for each APDU, :class:`HostCall` for each message to the host,
:class:`Intent` for a new row of the kiosk journal — before the host is asked for a load, so
before any CREDIT, and before a refund's DEBIT — and :class:`StatusChange` for each later state
of a row, and ends in a :class:`LoadResult` (a :class:`CardView` for :class:`Present`).

The shell feeds every answer back: ``receive(rapdu)`` from the card, ``answer(reply)`` from the
host, ``proceed()`` once a journal event is durable.  When the card leaves the field it calls
:meth:`LoadSession.card_lost`: the result is ``card_removed``, and a CREDIT or DEBIT whose answer
never came stays journalled for the card's next presentation to settle.  Nothing here reads a
clock, touches a reader, a host or a file; ``now`` is an aware datetime.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from farelab.card import (
    CST,
    SW,
    CardSnapshot,
    FlowError,
    Load,
    LoadDone,
    NeedAuthorization,
    ProofFound,
    ProofMissing,
    Psam,
    Purchase,
    PurchaseDone,
    ReadCard,
    Refused,
    Step,
    TransactionProof,
    Transmit,
    TxType,
)
from farelab.protocol import (
    authorize_message,
    confirm_message,
    quote_message,
    refund_check_message,
    refund_message,
    refund_record,
    transfer_message,
    void_message,
)
from farelab.topup._journal import PendingLoad
from farelab.topup._rules import AmountRules, check_amount, room

__all__ = [
    "Action",
    "CardView",
    "Event",
    "HostCall",
    "Intent",
    "LoadResult",
    "LoadSession",
    "Present",
    "Refund",
    "StatusChange",
    "TopUp",
    "Transfer",
    "new_request_id",
]


def new_request_id() -> str:
    """A unique id for one load's messages."""
    return uuid.uuid4().hex


# --- what a session does -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Present:
    """Read the card and settle what was torn on it; the session ends in a :class:`CardView`."""


@dataclass(frozen=True, slots=True)
class TopUp:
    """Load ``amount`` fen (None: the amount typed was not one)."""

    amount: int | None


@dataclass(frozen=True, slots=True)
class Transfer:
    """Move the balance of the replaced card ``old_serial`` onto this one, as the host computes
    it (R6): ``reason`` ``loss`` or ``exchange``, ``reported`` the day it was reported
    (YYYY-MM-DD), ``profile`` the issuer's rules."""

    old_serial: str
    reason: str
    reported: str
    profile: str


@dataclass(frozen=True, slots=True)
class Refund:
    """Empty the card with a purchase of its whole balance (with ``psam``'s purchase keys) and
    have the host count it as a cash refund."""

    psam: Psam


Action = Present | TopUp | Transfer | Refund


# --- what a session emits ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostCall:
    """Send ``message`` to the host; feed its reply to :meth:`LoadSession.answer`, or call
    :meth:`LoadSession.host_unreachable` if none comes."""

    message: dict[str, Any]

    @property
    def op(self) -> str:
        """The message's operation (``authorize``, ``confirm``, …)."""
        return str(self.message["op"])


@dataclass(frozen=True, slots=True)
class Intent:
    """A new row of the kiosk journal, ``authorized``: write it durably, then call
    :meth:`LoadSession.proceed`.  For a load (``kind`` ``load``) it comes before the host is
    asked, for a refund (``refund``, ``detail`` the record the host will need) before its DEBIT:
    from then on the card may take it at any instant."""

    id: str
    card_serial: str
    counter: int
    amount: int
    kind: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StatusChange:
    """Row ``id`` of the kiosk journal is now ``status`` (``credited`` with the card's ``tac``,
    ``confirmed``, ``void`` or ``refused``): write it, then call :meth:`LoadSession.proceed`."""

    id: str
    status: str
    tac: str = ""


@dataclass(frozen=True, slots=True)
class CardView:
    """What the kiosk shows when a card is presented."""

    serial: str
    balance_fen: int
    room_fen: int
    settled: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The outcome, as ``farelab topup load --json`` prints it (plus a message)."""

    result: str
    reason: str | None
    amount_fen: int
    balance_fen: int | None
    tac: str | None
    message: str
    settled: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The contract keys."""
        return {
            "result": self.result,
            "reason": self.reason,
            "amount_fen": self.amount_fen,
            "balance_fen": self.balance_fen,
            "tac": self.tac,
        }


Event = Transmit | HostCall | Intent | StatusChange | LoadResult | CardView


# --- the session ---------------------------------------------------------------------------


class _Stage(enum.Enum):
    """Where the session is, for what a lost card or a failed card means."""

    READ = enum.auto()  # reading and settling: nothing of this session is on the card
    LOAD = enum.auto()  # INITIALIZE FOR LOAD
    CREDIT = enum.auto()  # the CREDIT was sent: its outcome is only known from the card
    REFUND = enum.auto()  # INITIALIZE FOR PURCHASE
    DEBIT = enum.auto()  # the refund's DEBIT was sent
    DONE = enum.auto()


class _Waiting(enum.Enum):
    CARD = "the card's answer"
    HOST = "the host's answer"
    JOURNAL = "the journal"
    NOTHING = "nothing"


class _Known(enum.Enum):
    BY_STAGE = enum.auto()  # a refusal's balance: the one the session's stage knows


class _GetBalance:
    """GET BALANCE of the electronic purse."""

    def start(self) -> Transmit:
        return Transmit(bytes.fromhex("805C000204"), Step.READ)

    def receive(self, rapdu: bytes) -> int | Refused:
        sw = int.from_bytes(rapdu[-2:], "big") if len(rapdu) >= 2 else 0
        if sw != SW.OK or len(rapdu) != 6:
            return Refused(Step.READ, sw, "card_error")
        return int.from_bytes(rapdu[:4], "big")


_Flow = ReadCard | _GetBalance | TransactionProof | Load | Purchase


def _out_of_turn(*_: object) -> Event:
    raise FlowError("an answer to nothing the session asked")


def _yuan(fen: int) -> str:
    return f"{fen / 100:.2f}"


def _grant(reply: Mapping[str, Any]) -> tuple[bytes, bytes, bytes] | None:
    """MAC2, date and time of an ``authorized`` reply; None if they are not there as hex."""
    try:
        mac2, day, time = (bytes.fromhex(reply[key]) for key in ("mac2", "day", "time"))
    except (KeyError, TypeError, ValueError):
        return None
    if (len(mac2), len(day), len(time)) != (4, 4, 3):
        return None
    return mac2, day, time


def _fen(value: object) -> int:
    """An amount the host sent; 0 if it is not a whole number."""
    try:
        return int(str(value))
    except ValueError:
        return 0


class LoadSession:
    """One card at the kiosk.  Use: ``start()``, then feed each answer — ``receive()`` for a
    Transmit, ``answer()`` or ``host_unreachable()`` for a HostCall, ``proceed()`` once an Intent
    or StatusChange is written — until a LoadResult or CardView comes; ``card_lost()``,
    ``card_failed()`` or ``card_unusable()`` when a Transmit got no answer."""

    def __init__(
        self,
        *,
        terminal_id: bytes,
        action: Action,
        now: datetime,
        rules: AmountRules | None = None,
        pending: Sequence[PendingLoad] = (),
        new_id: Callable[[], str] = new_request_id,
    ) -> None:
        """
        Args:
            terminal_id: the kiosk's 6-byte terminal id, written into every load.
            action: what to do once the card is read and settled.
            now: the moment of the session (an aware datetime), for a refund's DEBIT.
            rules: the amounts this kiosk loads (R4 and its denominations).
            pending: the kiosk journal's unsettled rows (of any card; this card's are settled).
            new_id: where request ids come from (unique; a test may give fixed ones).
        """
        if now.tzinfo is None:
            raise ValueError("a kiosk session needs an aware datetime")
        if len(terminal_id) != 6:
            raise ValueError(f"terminal id must be 6 bytes, got {len(terminal_id)}")
        self.terminal_id = terminal_id
        self.action = action
        self.now = now
        self.rules = rules or AmountRules()
        self._pending = list(pending)
        self._new_id = new_id
        self._stage = _Stage.READ
        self._waiting = _Waiting.NOTHING
        self._flow: _Flow = ReadCard(records=[])
        self._on_card: Callable[[object], Event] = self._on_read
        self._on_reply: Callable[[Mapping[str, Any]], Event] = _out_of_turn
        self._on_silence: Callable[[str], Event] = _out_of_turn
        self._then: Callable[[], Event] = _out_of_turn
        self._snapshot: CardSnapshot | None = None
        self._balance: int | None = None
        self._settling: list[PendingLoad] = []
        self._notes: list[str] = []
        self._amount = 0
        self._id = ""
        self._record: dict[str, Any] = {}
        self._debit_sent = False
        self.done: LoadResult | CardView | None = None

    # --- driving --------------------------------------------------------------------------

    def start(self) -> Transmit:
        """The first APDU (SELECT)."""
        if self._waiting is not _Waiting.NOTHING or self.done is not None:
            raise FlowError("LoadSession.start() called twice")
        return self._transmit(self._flow.start())

    def receive(self, rapdu: bytes) -> Event:
        """Feed the card's answer to the last Transmit."""
        self._expect(_Waiting.CARD)
        self._waiting = _Waiting.NOTHING
        event = self._flow.receive(rapdu)
        if isinstance(event, Transmit):
            return self._on_transmit(event)
        return self._on_card(event)

    def answer(self, reply: Mapping[str, Any]) -> Event:
        """Feed the host's reply to the last HostCall."""
        self._expect(_Waiting.HOST)
        self._waiting = _Waiting.NOTHING
        return self._on_reply(reply)

    def host_unreachable(self, detail: str) -> Event:
        """No reply came to the last HostCall (``detail`` says why)."""
        self._expect(_Waiting.HOST)
        self._waiting = _Waiting.NOTHING
        return self._on_silence(detail)

    def proceed(self) -> Event:
        """The last Intent or StatusChange is durable in the journal."""
        self._expect(_Waiting.JOURNAL)
        self._waiting = _Waiting.NOTHING
        return self._then()

    def card_lost(self) -> Event:
        """The card left the field before the last Transmit's answer arrived."""
        self._expect(_Waiting.CARD)
        self._waiting = _Waiting.NOTHING
        return self._unanswered("card_removed", "the card left the reader")

    def card_failed(self, detail: str) -> Event:
        """The reader failed (not a removal) before the last Transmit's answer arrived: as
        unknown as a lost card, reported as ``card_error``."""
        self._expect(_Waiting.CARD)
        self._waiting = _Waiting.NOTHING
        return self._unanswered("card_error", detail)

    def card_unusable(self, detail: str, *, busy: bool = False) -> Event:
        """The last Transmit never reached the card, or the card could not commit it (a
        simulated card in another field — ``busy`` — or whose image cannot be read or written):
        nothing on the card changed."""
        self._expect(_Waiting.CARD)
        self._waiting = _Waiting.NOTHING
        reason = "card_busy" if busy else "card_error"
        stage = self._stage
        if stage is _Stage.CREDIT:
            text = f"{detail}; nothing was loaded"
            return self._void(self._refused("card_error", text, balance=self._balance))
        if stage is _Stage.DEBIT:
            text = f"{detail}; nothing was taken"
            result = self._refused("card_error", text, balance=self._balance)
            return self._mark(self._id, "void", then=lambda: self._finish(result))
        return self._finish(self._refused(reason, f"{detail}; nothing was done"))

    def _expect(self, waiting: _Waiting) -> None:
        if self.done is not None:
            raise FlowError("the session is over")
        if self._waiting is not waiting:
            raise FlowError(f"the session waits for {self._waiting.value}, not {waiting.value}")

    # --- emitting -------------------------------------------------------------------------

    def _transmit(self, event: Transmit) -> Transmit:
        self._waiting = _Waiting.CARD
        return event

    def _run(self, flow: _Flow, on_card: Callable[[object], Event]) -> Transmit:
        self._flow, self._on_card = flow, on_card
        return self._transmit(flow.start())

    def _on_transmit(self, event: Transmit) -> Event:
        flow = self._flow
        if event.step is Step.DEBIT and isinstance(flow, Purchase) and not self._debit_sent:
            return self._refund_intent(flow, event)
        return self._transmit(event)

    def _call(
        self,
        message: dict[str, Any],
        on_reply: Callable[[Mapping[str, Any]], Event],
        on_silence: Callable[[str], Event],
    ) -> HostCall:
        self._on_reply, self._on_silence = on_reply, on_silence
        self._waiting = _Waiting.HOST
        return HostCall(message)

    def _journal(self, event: Intent | StatusChange, then: Callable[[], Event]) -> Event:
        self._then = then
        self._waiting = _Waiting.JOURNAL
        return event

    def _mark(self, row: str, status: str, *, then: Callable[[], Event], tac: str = "") -> Event:
        return self._journal(StatusChange(row, status, tac), then)

    def _finish(self, result: LoadResult | CardView) -> LoadResult | CardView:
        self._stage = _Stage.DONE
        self.done = result
        return result

    # --- results --------------------------------------------------------------------------

    @property
    def _serial(self) -> str:
        return self._snapshot.serial if self._snapshot is not None else ""

    def _refused(
        self, reason: str, message: str, *, balance: int | _Known | None = _Known.BY_STAGE
    ) -> LoadResult:
        """A refusal.  Its amount is this session's (none while reading), its balance the one
        read — none while reading, nor while a CREDIT or DEBIT is unanswered — unless given."""
        stage = self._stage
        if balance is _Known.BY_STAGE:
            known = stage in (_Stage.LOAD, _Stage.REFUND)
            balance = self._balance if known else None
        amount = 0 if stage is _Stage.READ else self._amount
        return LoadResult("refused", reason, amount, balance, None, message, tuple(self._notes))

    def _unanswered(self, reason: str, what: str) -> Event:
        """The last command's answer never came (``what``: the card left, the reader failed)."""
        again = "present the card again to finish (nothing is lost or paid twice)"
        ending = {
            _Stage.CREDIT: f" while writing: {again}",
            _Stage.DEBIT: f" while taking the balance: {again}",
            _Stage.LOAD: "; nothing was loaded",
            _Stage.REFUND: "; nothing was taken",
        }.get(self._stage, "; present it again")
        return self._finish(self._refused(reason, what + ending))

    # --- reading --------------------------------------------------------------------------

    def _on_read(self, event: object) -> Event:
        if not isinstance(event, CardSnapshot):
            return self._finish(self._refused("card_error", "the card cannot be read; try again"))
        self._snapshot = event
        return self._run(_GetBalance(), self._on_balance)

    def _on_balance(self, event: object) -> Event:
        if not isinstance(event, int):
            return self._finish(self._refused("card_error", "the card cannot be read; try again"))
        self._balance = event
        self._settling = [p for p in self._pending if p.card_serial == self._serial]
        return self._settle_next()

    # --- settling what an earlier session left torn --------------------------------------------

    def _settle_next(self) -> Event:
        if not self._settling:
            return self._act()
        pending = self._settling.pop(0)
        refund = pending.kind == "refund"
        if pending.status != "authorized":
            if refund:
                return self._tell_refund(pending, pending.tac)
            return self._confirm_torn(pending, pending.tac)
        kind = TxType.PURCHASE if refund else TxType.LOAD
        proof = TransactionProof(tx_type=kind, counter=pending.counter + 1)
        return self._run(proof, lambda event: self._on_proof(pending, event))

    def _on_proof(self, pending: PendingLoad, event: object) -> Event:
        if isinstance(event, ProofFound):
            tac = event.tac.hex().upper()
            if pending.kind == "refund":
                return self._mark(
                    pending.id, "credited", tac=tac, then=lambda: self._tell_refund(pending, tac)
                )
            return self._mark(
                pending.id, "credited", tac=tac, then=lambda: self._confirm_torn(pending, tac)
            )
        if isinstance(event, ProofMissing):
            if pending.kind == "refund":
                self._notes.append(
                    "an interrupted refund never reached the card: nothing was taken"
                )
                return self._mark(pending.id, "void", then=self._settle_next)
            return self._call(
                void_message(pending.id),
                lambda _: self._voided_torn(pending),
                self._settle_unreachable,
            )
        sw = event.sw_hex if isinstance(event, Refused) else "0000"
        return self._finish(
            self._refused("card_error", f"the card did not answer GET TRANSACTION PROOF ({sw})")
        )

    def _voided_torn(self, pending: PendingLoad) -> Event:
        self._notes.append(
            f"an interrupted load of {_yuan(pending.amount)} yuan never reached the card: "
            "cancelled, nothing paid"
        )
        return self._mark(pending.id, "void", then=self._settle_next)

    def _confirm_torn(self, pending: PendingLoad, tac: str) -> Event:
        def on_reply(reply: Mapping[str, Any]) -> Event:
            if reply.get("result") != "confirmed":
                return self._settle_next()  # asked again at the card's next presentation
            self._notes.append(
                f"an interrupted load of {_yuan(pending.amount)} yuan had reached the card: "
                "confirmed"
            )
            return self._mark(pending.id, "confirmed", then=self._settle_next)

        return self._call(confirm_message(pending.id, tac), on_reply, self._settle_unreachable)

    def _tell_refund(self, pending: PendingLoad, tac: str) -> Event:
        try:
            record = json.loads(pending.detail)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            record = {}

        def on_reply(reply: Mapping[str, Any]) -> Event:
            result = reply.get("result")
            self._notes.append(f"a refund of {_yuan(pending.amount)} yuan: {result}")
            if result in ("refunded", "refused"):
                status = "confirmed" if result == "refunded" else "refused"
                return self._mark(pending.id, status, then=self._settle_next)
            return self._settle_next()

        def on_silence(detail: str) -> Event:
            return self._settle_unreachable("the host cannot be told of an interrupted refund")

        return self._call(refund_message(pending.id, record, tac), on_reply, on_silence)

    def _settle_unreachable(self, detail: str) -> Event:
        return self._finish(self._refused("host_unreachable", f"{detail}; no load is possible now"))

    # --- the action -------------------------------------------------------------------------

    def _card(self) -> tuple[CardSnapshot, int]:
        """The card as read (a FlowError before it was)."""
        if self._snapshot is None or self._balance is None:
            raise FlowError("the card was not read")
        return self._snapshot, self._balance

    def _act(self) -> Event:
        snapshot, balance = self._card()
        action = self.action
        if isinstance(action, Present):
            view = CardView(snapshot.serial, balance, room(balance, self.rules), tuple(self._notes))
            return self._finish(view)
        if isinstance(action, TopUp):
            return self._top_up(action.amount, None)
        if isinstance(action, Transfer):
            return self._ask_quote(action)
        return self._ask_refund(action)

    # --- loads ------------------------------------------------------------------------------

    def _top_up(self, amount: int | None, transfer: Transfer | None) -> Event:
        snapshot, balance = self._card()
        self._stage = _Stage.LOAD
        self._amount = amount or 0
        today = self.now.astimezone(CST).date()
        public = snapshot.public
        if not public.start <= today <= public.expiry:
            # R9: the card is refused outside its validity (its balance can still be refunded).
            when = (
                f"expired on {public.expiry}"
                if today > public.expiry
                else (f"valid only from {public.start}")
            )
            return self._finish(
                self._refused("expired", f"the card is {when}: no load (a refund is possible)")
            )
        problem = check_amount(amount, balance, self.rules)
        if problem is not None or amount is None:
            reason, message = problem or ("bad_amount", "no amount")
            return self._finish(self._refused(reason, message))
        flow = Load(terminal_id=self.terminal_id, card=snapshot, amount=amount)
        return self._run(flow, lambda event: self._on_init(flow, event, transfer))

    def _on_init(self, flow: Load, event: object, transfer: Transfer | None) -> Event:
        if not isinstance(event, NeedAuthorization):
            sw = event.sw if isinstance(event, Refused) else 0
            reason = "cap_exceeded" if sw == SW.CONDITIONS else "card_error"
            return self._finish(self._refused(reason, f"the card refused the load ({sw:04X})"))
        request = event.request
        self._id = self._new_id()
        if transfer is None:
            message = authorize_message(self._id, request)
        else:
            message = transfer_message(
                self._id,
                request,
                old_serial=transfer.old_serial,
                reason=transfer.reason,
                reported=transfer.reported,
                profile=transfer.profile,
            )
        # Journalled before the host is asked: a kiosk stopped at any later instant leaves a
        # row that the card's next presentation settles (proved, then confirmed or voided).
        intent = Intent(self._id, request.serial, request.counter, self._amount, "load")
        return self._journal(
            intent,
            lambda: self._call(
                message, lambda reply: self._on_grant(flow, reply), self._authorize_unreachable
            ),
        )

    def _authorize_unreachable(self, detail: str) -> Event:
        # The row stays authorized: the host may have granted it, so only the card can say.
        return self._finish(self._refused("host_unreachable", f"{detail}; nothing was loaded"))

    def _on_grant(self, flow: Load, reply: Mapping[str, Any]) -> Event:
        if reply.get("result") != "authorized":
            result = self._refused(
                str(reply.get("reason", "refused")),
                str(reply.get("detail", "the host refused the load")),
            )
            return self._mark(self._id, "void", then=lambda: self._finish(result))
        grant = _grant(reply)
        if grant is None:
            return self._void(self._refused("host_error", "the host's authorization is malformed"))
        mac2, day, time = grant
        self._stage = _Stage.CREDIT
        credit = flow.authorize(mac2=mac2, day=day, time=time)
        self._on_card = self._on_credit
        return self._transmit(credit)

    def _on_credit(self, event: object) -> Event:
        if not isinstance(event, LoadDone):
            # The card answered, and said no: the CREDIT did not happen.
            sw = event.sw_hex if isinstance(event, Refused) else "0000"
            text = f"the card refused the write ({sw})"
            return self._void(self._refused("card_error", text, balance=self._balance))
        tac = event.tac.hex().upper()
        loaded = LoadResult(
            "loaded",
            None,
            self._amount,
            event.balance_after,
            tac,
            f"loaded {_yuan(self._amount)} yuan",
            tuple(self._notes),
        )

        def on_reply(reply: Mapping[str, Any]) -> Event:
            if reply.get("result") == "confirmed":
                return self._mark(self._id, "confirmed", then=lambda: self._finish(loaded))
            return self._finish(loaded)

        def on_silence(detail: str) -> Event:
            return self._finish(loaded)  # the card has it; its next presentation confirms it

        return self._mark(
            self._id,
            "credited",
            tac=tac,
            then=lambda: self._call(confirm_message(self._id, tac), on_reply, on_silence),
        )

    def _void(self, result: LoadResult) -> Event:
        """This load never reached the card: the host releases it, then the journal; if the
        host cannot be told, the row stays authorized and the next presentation voids it."""
        return self._call(
            void_message(self._id),
            lambda _: self._mark(self._id, "void", then=lambda: self._finish(result)),
            lambda _: self._finish(result),
        )

    # --- transfers ----------------------------------------------------------------------------

    def _ask_quote(self, transfer: Transfer) -> Event:
        message = quote_message(
            self._new_id(),
            self._serial,
            old_serial=transfer.old_serial,
            reason=transfer.reason,
            reported=transfer.reported,
            profile=transfer.profile,
        )

        def on_reply(quote: Mapping[str, Any]) -> Event:
            amount = _fen(quote.get("amount_fen", 0))
            if quote.get("result") == "quote" and amount > 0:
                return self._top_up(amount, transfer)
            why = str(quote.get("reason") or "transfer_refused")
            message = f"no balance can move now ({why})"
            if quote.get("detail"):
                message += f": {quote['detail']}"
            if quote.get("available_on"):
                message += f"; it can from {quote['available_on']}"
            return self._finish(self._refused(why, message, balance=self._balance))

        def on_silence(detail: str) -> Event:
            return self._finish(self._refused("host_unreachable", f"{detail}; nothing was moved"))

        return self._call(message, on_reply, on_silence)

    # --- refunds ------------------------------------------------------------------------------

    def _ask_refund(self, refund: Refund) -> Event:
        snapshot, balance = self._card()
        # Asked before the card is emptied: a balance that moved to a replacement card is not
        # the rider's any more, and paying it out too would pay it twice.
        message = refund_check_message(self._new_id(), snapshot.serial, self.terminal_id)

        def on_reply(check: Mapping[str, Any]) -> Event:
            if check.get("result") != "ok":
                why = str(check.get("reason") or "refund_refused")
                text = f"no refund ({why}): {check.get('detail', '')}; the card is untouched"
                return self._finish(self._refused(why, text, balance=balance))
            self._stage = _Stage.REFUND
            self._amount = balance
            self._id = self._new_id()
            flow = Purchase(psam=refund.psam, card=snapshot, amount=balance, when=self.now)
            return self._run(flow, self._on_refunded)

        def on_silence(detail: str) -> Event:
            text = f"{detail}; no refund is possible now"
            return self._finish(self._refused("host_unreachable", text, balance=balance))

        return self._call(message, on_reply, on_silence)

    def _refund_intent(self, flow: Purchase, debit: Transmit) -> Event:
        snapshot, _ = self._card()
        init, flight = flow.init, flow.in_flight
        if init is None or flight is None:
            raise FlowError("a DEBIT before INITIALIZE FOR PURCHASE was answered")
        self._record = refund_record(
            card_serial=snapshot.serial,
            issuer=snapshot.issuer_id,
            alg=init.alg,
            amount=flight.amount,
            balance_before=flight.balance_before,
            card_counter=init.counter,
            ttc=flight.ttc,
            terminal=self.terminal_id,
            day=flight.day,
            time=flight.time,
        )
        intent = Intent(
            self._id,
            snapshot.serial,
            init.counter,
            self._amount,
            "refund",
            json.dumps(self._record),
        )

        def send() -> Event:
            self._debit_sent = True
            self._stage = _Stage.DEBIT
            return self._transmit(debit)

        return self._journal(intent, send)

    def _on_refunded(self, event: object) -> Event:
        amount = self._amount
        if not isinstance(event, PurchaseDone):
            result = self._refused("card_error", "the card refused the refund", balance=amount)
            if self._debit_sent:
                return self._mark(self._id, "void", then=lambda: self._finish(result))
            return self._finish(result)
        tac = event.tac.hex().upper()

        def on_reply(reply: Mapping[str, Any]) -> Event:
            if reply.get("result") == "refunded":
                done = LoadResult(
                    "refunded", None, amount, 0, tac, f"refunded {_yuan(amount)} yuan in cash"
                )
                return self._mark(self._id, "confirmed", then=lambda: self._finish(done))
            # No cash without the host's count: the card is emptied, and its value is either
            # the replacement card's already (refused) or waits for the host (an error).
            why = str(reply.get("reason") or reply.get("result"))
            text = f"no cash: the host did not count the refund ({why}; TAC {tac})"
            result = self._refused(why, text, balance=0)
            if reply.get("result") == "refused":
                return self._mark(self._id, "refused", then=lambda: self._finish(result))
            return self._finish(result)

        def on_silence(detail: str) -> Event:
            text = f"the card is emptied; the host will be told (TAC {tac})"
            return self._finish(self._refused("host_unreachable", text, balance=0))

        return self._mark(
            self._id,
            "credited",
            tac=tac,
            then=lambda: self._call(
                refund_message(self._id, self._record, tac), on_reply, on_silence
            ),
        )

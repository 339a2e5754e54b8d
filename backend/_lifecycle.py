"""A card's life, pure: its record and its history of events → its status at a moment, and
whether an action may be taken now (docs/card-life.md; rules R5–R9, R12 of docs/rules.md).

Nothing here reads a clock or waits: every time is an argument, and what lapses by itself (a
phone report, the wait before a found e-wallet is usable, a card's validity) is computed from the
history and the moment asked about. The shell (a store of cards and events, a CLI, the devices
that hotlist a card) calls :func:`check` before it records an event, and :func:`status` to
show a card.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from typing import Any, ClassVar, Literal

from farelab.backend._profiles import IssuerProfile, years_after
from farelab.card import CST

__all__ = [
    "ACTIONS",
    "STATES",
    "Cancel",
    "Card",
    "CardStatus",
    "EcardIssue",
    "Event",
    "Exchange",
    "Found",
    "LifecycleError",
    "MakeFormal",
    "PinOk",
    "PinReset",
    "PinWrong",
    "Refund",
    "Refusal",
    "Renew",
    "Replace",
    "ReportLoss",
    "Unfreeze",
    "balance_moves_on",
    "card_status",
    "check_action",
]

State = Literal["active", "reported", "frozen", "replaced", "cancelled", "expired"]
STATES: tuple[State, ...] = ("active", "reported", "frozen", "replaced", "cancelled", "expired")

EcardState = Literal["usable", "suspended", "none"]


def _aware(name: str, moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, not {moment!r}")


@dataclass(frozen=True, slots=True)
class Card:
    """A card's record.

    ``issued`` is the moment it was issued (aware); ``replaces`` the serial of the card it
    was issued in place of, and ``issued_after`` why: a ``loss`` (R6: Hangzhou opens its transit
    function only later), an ``exchange`` or a ``renewal``.  ``valid_until``: the last day of
    validity the card itself carries (EF15, written at issue); None: the profile's validity
    years from ``issued``.
    """

    serial: str
    profile: IssuerProfile
    issued: datetime
    replaces: str | None = None
    issued_after: Literal["loss", "exchange", "renewal"] | None = None
    valid_until: date | None = None

    def __post_init__(self) -> None:
        _aware("issued", self.issued)
        if (self.replaces is None) != (self.issued_after is None):
            raise ValueError("replaces and issued_after go together")

    @property
    def expires_on(self) -> date:
        """The first day the card is no longer valid (R9): the day after the last day the card
        carries, or else the issue date's anniversary after the profile's validity years
        (29 February → 1 March)."""
        if self.valid_until is not None:
            return self.valid_until + timedelta(days=1)
        return years_after(self.issued.astimezone(CST).date(), self.profile.validity_years)

    @property
    def expires(self) -> datetime:
        """The moment the card expires: the start of :attr:`expires_on` in China Standard Time."""
        return datetime.combine(self.expires_on, time(), CST)

    @property
    def renewable_from(self) -> datetime:
        """The start of the renewal window, the profile's ``renew_within_months`` before expiry
        (the same day of the month, or that month's last day)."""
        day = self.expires_on
        months = day.year * 12 + day.month - 1 - self.profile.renew_within_months
        year, month = divmod(months, 12)
        last = calendar.monthrange(year, month + 1)[1]
        return datetime.combine(date(year, month + 1, min(day.day, last)), time(), CST)

    @property
    def transit_from(self) -> datetime:
        """When the transit function opens: at issue, or for a card that replaced a lost one the
        profile's ``transit_reopens_after_loss`` later (R6, Hangzhou)."""
        if self.issued_after == "loss":
            return self.profile.after(self.profile.transit_reopens_after_loss, self.issued)
        return self.issued


@dataclass(frozen=True, slots=True)
class ReportLoss:
    """The holder reports the card lost: by ``phone`` (temporary, R7) or ``formal`` at an outlet
    (freezes the card; Nanjing's e-wallet too, R6)."""

    action: ClassVar[str] = "report_loss"
    at: datetime
    kind: Literal["phone", "formal"]


@dataclass(frozen=True, slots=True)
class MakeFormal:
    """A phone report made formal at an outlet before it lapsed."""

    action: ClassVar[str] = "make_formal"
    at: datetime


@dataclass(frozen=True, slots=True)
class Found:
    """The holder found the card while a phone report was in force: the report is withdrawn."""

    action: ClassVar[str] = "found"
    at: datetime


@dataclass(frozen=True, slots=True)
class Unfreeze:
    """A formally reported card found again and un-frozen at an outlet (Nanjing's e-wallet is
    usable the profile's ``wallet_usable_after_unfreeze`` later, R6)."""

    action: ClassVar[str] = "unfreeze"
    at: datetime


@dataclass(frozen=True, slots=True)
class Replace:
    """A replacement card ``new_serial`` for a card reported lost; a phone report becomes formal
    at this moment (the outlet takes the formal report)."""

    action: ClassVar[str] = "replace"
    at: datetime
    new_serial: str


@dataclass(frozen=True, slots=True)
class Exchange:
    """A damaged (or changed) card handed in for ``new_serial``."""

    action: ClassVar[str] = "exchange"
    at: datetime
    new_serial: str


@dataclass(frozen=True, slots=True)
class Refund:
    """The transit balance paid out in cash (退值); the card's transit function ends."""

    action: ClassVar[str] = "refund"
    at: datetime


@dataclass(frozen=True, slots=True)
class Renew:
    """The card renewed in its last months of validity by ``new_serial``; its balance moves (R9)."""

    action: ClassVar[str] = "renew"
    at: datetime
    new_serial: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """The card cancelled (注销): nothing more is possible with it."""

    action: ClassVar[str] = "cancel"
    at: datetime


@dataclass(frozen=True, slots=True)
class EcardIssue:
    """The electronic social-security card issued for this physical card (R12)."""

    action: ClassVar[str] = "ecard_issue"
    at: datetime


@dataclass(frozen=True, slots=True)
class PinWrong:
    """A wrong social-security PIN entered (R8)."""

    action: ClassVar[str] = "pin_wrong"
    at: datetime


@dataclass(frozen=True, slots=True)
class PinOk:
    """The right social-security PIN entered: the run of wrong ones ends (R8)."""

    action: ClassVar[str] = "pin_ok"
    at: datetime


@dataclass(frozen=True, slots=True)
class PinReset:
    """The PIN reset at an outlet, the only way to unlock it (R8)."""

    action: ClassVar[str] = "pin_reset"
    at: datetime


Event = (
    ReportLoss
    | MakeFormal
    | Found
    | Unfreeze
    | Replace
    | Exchange
    | Refund
    | Renew
    | Cancel
    | EcardIssue
    | PinWrong
    | PinOk
    | PinReset
)

_EVENT_TYPES: tuple[type[Event], ...] = (
    ReportLoss,
    MakeFormal,
    Found,
    Unfreeze,
    Replace,
    Exchange,
    Refund,
    Renew,
    Cancel,
    EcardIssue,
    PinWrong,
    PinOk,
    PinReset,
)
ACTIONS: tuple[str, ...] = tuple(t.action for t in _EVENT_TYPES)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why ``action`` may not be taken: ``reason`` a short code, ``detail`` a sentence for a
    person."""

    action: str
    reason: str
    detail: str


class LifecycleError(ValueError):
    """A history that could not have happened: an event out of order, or one :func:`check`
    refuses (its :class:`Refusal` is ``refusal``)."""

    def __init__(self, message: str, refusal: Refusal | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal


@dataclass(frozen=True, slots=True)
class CardStatus:
    """A card's status at a moment. :meth:`to_json` gives the keys a CLI prints; the other
    fields say more."""

    serial: str
    profile: str
    state: State
    transit_usable: bool  # R5, R6, R9
    social_security_usable: bool  # R7, R8, R9
    balance_fen: int | None
    balance_moves_on: date | None  # R6, R9
    ecard: EcardState  # R12
    expires_on: date
    reported_until: datetime | None
    pin_locked: bool
    pin_tries_left: int
    replaced_by: str | None

    def to_json(self) -> dict[str, Any]:
        """``serial``, ``profile``, ``state``, ``transit_usable``, ``social_security_usable``,
        ``balance_fen``, ``balance_moves_on`` (YYYY-MM-DD or null) and ``ecard``."""
        return {
            "serial": self.serial,
            "profile": self.profile,
            "state": self.state,
            "transit_usable": self.transit_usable,
            "social_security_usable": self.social_security_usable,
            "balance_fen": self.balance_fen,
            "balance_moves_on": (
                self.balance_moves_on.isoformat() if self.balance_moves_on else None
            ),
            "ecard": self.ecard,
        }


@dataclass(frozen=True, slots=True)
class _Life:
    """What a card's history so far has left."""

    last_at: datetime | None = None
    phone_until: datetime | None = None  # a phone report in force until then
    formal_at: datetime | None = None  # frozen by a formal report
    reported_at: datetime | None = None  # the report (phone or formal) under way
    blocked_from: datetime | None = None  # the social-security block of that report
    wallet_from: datetime | None = None  # an un-frozen e-wallet usable again
    ended: str | None = None  # replace, exchange, renew, cancel
    ended_at: datetime | None = None
    new_serial: str | None = None
    loss_formal_at: datetime | None = None  # the formal report a replacement followed
    refunded_at: datetime | None = None
    ecard: bool = False
    pin_day: date | None = None
    pin_wrong: int = 0
    pin_locked_at: datetime | None = None


def _state(card: Card, life: _Life, at: datetime) -> State:
    if life.ended == "cancel":
        return "cancelled"
    if life.ended is not None:
        return "replaced"
    if at >= card.expires:
        return "expired"
    if life.formal_at is not None:
        return "frozen"
    if life.phone_until is not None and at < life.phone_until:
        return "reported"
    return "active"


def _day(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(CST).strftime("%Y-%m-%d %H:%M")


def _refusal(card: Card, life: _Life, action: str, at: datetime) -> Refusal | None:
    """Why ``action`` may not be taken at ``at`` after ``life``; None if it may."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")

    def no(reason: str, detail: str) -> Refusal:
        return Refusal(action, reason, f"card {card.serial}: {detail}")

    if at < card.issued:
        return no("not_issued", f"issued only at {_day(card.issued)}")
    state = _state(card, life, at)
    if state == "cancelled":
        return no("cancelled", f"cancelled at {_day(life.ended_at)}: nothing more can be done")
    if state == "replaced":
        return no(
            "replaced",
            f"replaced by card {life.new_serial} at {_day(life.ended_at)}: act on that card",
        )
    if state == "expired":
        if action in ("refund", "cancel"):
            return _common(card, life, action, state=state, at=at, no=no)
        return no(
            "expired",
            f"expired on {card.expires_on} (R9): only its balance can be refunded, "
            "or the card cancelled",
        )
    return _common(card, life, action, state=state, at=at, no=no)


def _common(
    card: Card,
    life: _Life,
    action: str,
    *,
    state: State,
    at: datetime,
    no: Callable[[str, str], Refusal],
) -> Refusal | None:
    """The refusals of an action on a card that is active, reported, frozen or expired."""
    profile = card.profile
    reported = state in ("reported", "frozen")
    if action == "report_loss":
        if state == "reported":
            return no(
                "already_reported",
                f"reported by phone until {_day(life.phone_until)}: make it formal instead",
            )
        if state == "frozen":
            return no("already_reported", f"formally reported at {_day(life.formal_at)}")
        return None
    if action == "make_formal":
        if state == "frozen":
            return no("already_formal", f"formally reported at {_day(life.formal_at)}")
        if state != "reported":
            lapsed = (
                f"; the phone report of {_day(life.reported_at)} lapsed at "
                f"{_day(life.phone_until)} (R7)"
                if life.phone_until is not None
                else ""
            )
            return no("no_phone_report", f"no phone report is in force{lapsed}")
        return None
    if action == "found":
        if state == "frozen":
            return no("frozen", "formally reported: it is un-frozen at an outlet (unfreeze)")
        if state != "reported":
            return no("not_reported", "it is not reported lost")
        return None
    if action == "unfreeze":
        if state == "reported":
            return no("not_frozen", "only reported by phone: 'found' withdraws that report")
        if state != "frozen":
            return no("not_frozen", "it is not frozen")
        return None
    if action == "replace":
        if not reported:
            return no(
                "not_reported",
                "a replacement follows a loss report; a damaged card is exchanged",
            )
        return None
    if action == "exchange":
        if reported:
            return no("reported", "it is reported lost: a lost card is replaced, not exchanged")
        if profile.refund_before_replacement and life.refunded_at is None:
            return no(
                "refund_first",
                f"{profile.name} refunds the transit balance before a card is exchanged (R6)",
            )
        return None
    if action == "refund":
        if life.refunded_at is not None:
            return no("already_refunded", f"its balance was refunded at {_day(life.refunded_at)}")
        if reported:
            return no("reported", "it is reported lost: it is found or un-frozen first")
        if life.wallet_from is not None and at < life.wallet_from:
            return no(
                "wallet_waiting",
                f"its e-wallet is usable again only from {_day(life.wallet_from)} (R6)",
            )
        return None
    if action == "renew":
        if reported:
            return no("reported", "it is reported lost: a lost card is replaced, not renewed")
        if at < card.renewable_from:
            return no(
                "not_due",
                f"it is renewed only in its last {profile.renew_within_months} months, from "
                f"{card.renewable_from.date()} (it expires on {card.expires_on})",
            )
        return None
    if action == "cancel":
        return None
    if action == "ecard_issue":
        if life.ecard:
            return no("ecard_bound", "its electronic card is already issued (one to one, R12)")
        if reported:
            return no("reported", "it is reported lost: no electronic card for it (R12)")
        if life.pin_locked_at is not None:
            return no("pin_locked", "its PIN is locked: reset it at an outlet first (R8)")
        return None
    # pin_wrong, pin_ok, pin_reset
    if reported:
        return no("reported", "it is reported lost: its social-security function is blocked")
    if action != "pin_reset" and life.pin_locked_at is not None:
        return no(
            "pin_locked",
            f"its PIN locked at {_day(life.pin_locked_at)} after "
            f"{profile.pin_tries_per_day} wrong entries: only an outlet resets it (R8)",
        )
    return None


def _apply(card: Card, life: _Life, event: Event) -> _Life:
    """``life`` after ``event``, which :func:`_refusal` accepted."""
    profile = card.profile
    at = event.at
    life = replace(life, last_at=at)
    if life.phone_until is not None and at >= life.phone_until and life.formal_at is None:
        life = replace(life, phone_until=None, reported_at=None, blocked_from=None)
    if isinstance(event, ReportLoss):
        blocked = profile.after(profile.social_security_blocked_after, at)
        if event.kind == "phone":
            until = profile.after(profile.phone_report_lasts, at)
            return replace(life, phone_until=until, reported_at=at, blocked_from=blocked)
        return replace(life, formal_at=at, reported_at=at, blocked_from=blocked)
    if isinstance(event, MakeFormal):
        return replace(life, formal_at=at, phone_until=None)
    if isinstance(event, Found):
        return replace(life, phone_until=None, reported_at=None, blocked_from=None)
    if isinstance(event, Unfreeze):
        wallet = (
            profile.after(profile.wallet_usable_after_unfreeze, at)
            if profile.transit_reportable
            else None
        )
        return replace(
            life, formal_at=None, reported_at=None, blocked_from=None, wallet_from=wallet
        )
    if isinstance(event, Replace):
        formal = life.formal_at if life.formal_at is not None else at
        return replace(
            life,
            ended="replace",
            ended_at=at,
            new_serial=event.new_serial,
            loss_formal_at=formal,
        )
    if isinstance(event, Exchange | Renew):
        return replace(life, ended=event.action, ended_at=at, new_serial=event.new_serial)
    if isinstance(event, Cancel):
        return replace(life, ended="cancel", ended_at=at)
    if isinstance(event, Refund):
        return replace(life, refunded_at=at)
    if isinstance(event, EcardIssue):
        return replace(life, ecard=True)
    if isinstance(event, PinWrong):
        day = at.astimezone(CST).date()
        wrong = (life.pin_wrong if life.pin_day == day else 0) + 1
        locked = at if wrong >= profile.pin_tries_per_day else None
        return replace(life, pin_day=day, pin_wrong=wrong, pin_locked_at=locked)
    if isinstance(event, PinOk):
        return replace(life, pin_wrong=0)
    return replace(life, pin_wrong=0, pin_locked_at=None)


def _life(card: Card, events: Sequence[Event], until: datetime | None = None) -> _Life:
    """The history folded, up to ``until`` (all of it with None); LifecycleError if it could
    not have happened."""
    life = _Life()
    for event in events:
        if not isinstance(event, _EVENT_TYPES):
            raise TypeError(f"not a card event: {event!r}")
        _aware(f"{event.action}'s at", event.at)
        if until is not None and event.at > until:
            break
        if life.last_at is not None and event.at < life.last_at:
            raise LifecycleError(
                f"card {card.serial}: {event.action} at {_day(event.at)} comes before the "
                f"event before it ({_day(life.last_at)}): events are in time order"
            )
        refusal = _refusal(card, life, event.action, event.at)
        if refusal is not None:
            raise LifecycleError(
                f"{event.action} at {_day(event.at)} cannot have happened: {refusal.detail}",
                refusal,
            )
        life = _apply(card, life, event)
    return life


def check_action(card: Card, events: Sequence[Event], action: str, at: datetime) -> Refusal | None:
    """Why ``action`` (one of :data:`ACTIONS`) may not be taken on ``card`` at ``at`` after its
    ``events``; None when it may. ValueError for an unknown action, LifecycleError for a history
    that could not have happened or that goes past ``at``."""
    _aware("at", at)
    life = _life(card, events)
    if life.last_at is not None and at < life.last_at:
        raise LifecycleError(
            f"card {card.serial}: {action} at {_day(at)} comes before its last event "
            f"({_day(life.last_at)})"
        )
    return _refusal(card, life, action, at)


def _moves_on(card: Card, life: _Life) -> date | None:
    profile = card.profile
    if life.refunded_at is not None or life.ended_at is None:
        return None
    if life.ended == "replace":
        wait = profile.loss_balance_moves_after
        if wait is None or life.loss_formal_at is None:
            return None
        return profile.after(wait, life.loss_formal_at.astimezone(CST)).date()
    if life.ended == "exchange":
        wait = profile.exchange_balance_moves_after
        if wait is None or profile.refund_before_replacement:
            return None
        return profile.after(wait, life.ended_at.astimezone(CST)).date()
    if life.ended == "renew":
        return life.ended_at.astimezone(CST).date()
    return None


def balance_moves_on(card: Card, events: Sequence[Event]) -> date | None:
    """The day (China Standard Time) from which the card's transit balance may move to the card
    that replaced it (R6, R9); None when it never moves: not replaced, refunded, replaced after a
    loss by an issuer that keeps the balance on the lost card, or refunded before an exchange.

    After a loss: the profile's ``loss_balance_moves_after`` from the formal report (Nanjing: the
    same calendar date one year later, 29 February → 1 March); after an exchange: its
    ``exchange_balance_moves_after`` from the exchange (Nanjing: the 7th working day after);
    after a renewal: the renewal's day.
    """
    return _moves_on(card, _life(card, events))


def card_status(
    card: Card, events: Sequence[Event], at: datetime, *, balance_fen: int | None = None
) -> CardStatus:
    """The card's status at ``at`` from its ``events`` (those after ``at`` are not yet).

    ``balance_fen`` is the transit balance the ledger knows (None: unknown); a refunded card
    shows 0. LifecycleError for a history that could not have happened.
    """
    _aware("at", at)
    profile = card.profile
    life = _life(card, events, until=at)
    state = _state(card, life, at)
    locked = life.pin_locked_at is not None
    today = at.astimezone(CST).date()
    wrong_today = life.pin_wrong if life.pin_day == today else 0

    if state == "cancelled" or life.refunded_at is not None:
        transit = False
    elif state == "replaced":
        # R5: a lost card whose transit account cannot be reported rides on.
        transit = life.ended == "replace" and not profile.transit_reportable
    elif state == "expired" or at < card.transit_from:
        transit = False
    elif state == "frozen":
        transit = not profile.transit_reportable
    else:
        transit = life.wallet_from is None or at >= life.wallet_from

    if state == "active":
        social = not locked
    elif state in ("reported", "frozen"):
        social = not locked and life.blocked_from is not None and at < life.blocked_from
    else:
        social = False

    ecard: EcardState
    if not life.ecard or state in ("replaced", "cancelled"):
        ecard = "none"
    elif state in ("reported", "frozen", "expired") or locked:
        ecard = "suspended"
    else:
        ecard = "usable"

    return CardStatus(
        serial=card.serial,
        profile=profile.name,
        state=state,
        transit_usable=transit,
        social_security_usable=social,
        balance_fen=0 if life.refunded_at is not None else balance_fen,
        balance_moves_on=_moves_on(card, life),
        ecard=ecard,
        expires_on=card.expires_on,
        reported_until=life.phone_until if state == "reported" else None,
        pin_locked=locked,
        pin_tries_left=0 if locked else profile.pin_tries_per_day - wrong_today,
        replaced_by=life.new_serial,
    )

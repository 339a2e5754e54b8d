"""The backend's card records: each card with its issuer profile (``cards``), and the journal of
what was done to it (``card_events``), around the pure card-life core
(:mod:`farelab.backend._lifecycle`; docs/card-life.md).

Every action is checked by the core against the card's recorded events, then journalled with a
deterministic id (the card, the action, its moment and its arguments): the same action at the
same moment given twice is answered the same and recorded once. Nothing here reads a clock or
waits: the moment is an argument, and what lapses by itself is computed from the events.

The transit function reaches the devices through the ledger's hotlist (``backend params``
publishes it): after each action — and whenever a card's status is asked at or after its last
event — the card is on the hotlist exactly while its transit function may not be used (frozen
where the profile makes the transit account reportable, replaced, cancelled, refunded, expired,
or waiting for its e-wallet or its transit function to open), with that reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from farelab.backend._lifecycle import (
    STATES,
    Cancel,
    Card,
    CardStatus,
    EcardIssue,
    Event,
    Exchange,
    Found,
    LifecycleError,
    MakeFormal,
    PinReset,
    Refund,
    Renew,
    Replace,
    ReportLoss,
    Unfreeze,
    balance_moves_on,
    card_status,
    check_action,
)
from farelab.backend._store import Store
from farelab.backend._transfer import PROFILES, last_known_balance
from farelab.card import CST, fen_to_yuan

__all__ = [
    "CARD_ACTIONS",
    "NewCard",
    "card_action",
    "cards_by_state",
    "hotlist_refusal",
    "issue_card",
    "show_card",
    "transfer_terms",
]

#: The actions ``card_action`` takes, by the core's name.
CARD_ACTIONS: tuple[str, ...] = (
    "report_loss",
    "make_formal",
    "found",
    "unfreeze",
    "replace",
    "exchange",
    "refund",
    "renew",
    "cancel",
    "ecard_issue",
    "pin_reset",
)
_NEW_CARD = ("replace", "exchange", "renew")
_ISSUED_AFTER: dict[str, Literal["loss", "exchange", "renewal"]] = {
    "replace": "loss",
    "exchange": "exchange",
    "renew": "renewal",
}
# The hotlist reasons that lapse: an entry with one of them is lifted or renamed as the card's
# life goes on. Any other (replaced, cancelled, refunded, expired: for good; a clone, or a refund
# the host counted at a kiosk) stays as it is.
_LAPSING = ("frozen", "transit_waiting")


@dataclass(frozen=True, slots=True)
class NewCard:
    """A card about to enter the records: its 20-digit ``serial``, its issuer id (hex) and the
    balance its image holds (a new card holds none)."""

    serial: str
    issuer: str
    balance_fen: int
    valid_until: date | None = None  # the last valid day the card carries (EF15)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _event_id(serial: str, action: str, at: datetime, *args: str) -> str:
    """The same action on the same card at the same moment with the same arguments: one id."""
    text = "|".join((serial, action, str(_ms(at)), *args))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _record(store: Store, serial: str) -> tuple[Card, list[Event]] | None:
    """The card's record and its recorded events, in order; None for a card never issued."""
    row = store.execute(
        "SELECT profile, issued, replaces, issued_after, valid_until FROM cards WHERE serial = ?",
        (serial,),
    ).fetchone()
    if row is None:
        return None
    profile = PROFILES.get(str(row[0]))
    if profile is None:
        raise RuntimeError(f"card {serial} has profile {row[0]!r}, which is not shipped")
    card = Card(
        serial=serial,
        profile=profile,
        issued=datetime.fromisoformat(str(row[1])),
        replaces=row[2] or None,
        issued_after=row[3] or None,
        valid_until=date.fromisoformat(str(row[4])) if row[4] else None,
    )
    events: list[Event] = []
    for action, kind, new_serial, at_text in store.execute(
        "SELECT action, kind, new_serial, at FROM card_events WHERE card_serial = ? "
        "AND result = 'done' AND action <> 'issue' ORDER BY at_ms, n",
        (serial,),
    ).fetchall():
        events.append(_event(str(action), str(kind), str(new_serial), at_text))
    return card, events


def _event(action: str, kind: str, new_serial: str, at_text: str) -> Event:
    at = datetime.fromisoformat(at_text)
    if action == "report_loss":
        return ReportLoss(at, "formal" if kind == "formal" else "phone")
    if action == "replace":
        return Replace(at, new_serial)
    if action == "exchange":
        return Exchange(at, new_serial)
    if action == "renew":
        return Renew(at, new_serial)
    simple: dict[
        str, type[MakeFormal | Found | Unfreeze | Refund | Cancel | EcardIssue | PinReset]
    ] = {
        "make_formal": MakeFormal,
        "found": Found,
        "unfreeze": Unfreeze,
        "refund": Refund,
        "cancel": Cancel,
        "ecard_issue": EcardIssue,
        "pin_reset": PinReset,
    }
    return simple[action](at)


def _journal(
    store: Store,
    event_id: str,
    at: datetime,
    answer: dict[str, Any],
    *,
    kind: str = "",
    new_serial: str = "",
) -> None:
    """Journal an answer (its ``serial`` and ``action``) under ``event_id``."""
    serial, action = answer["serial"], answer["action"]
    n = store.execute(
        "SELECT coalesce(max(n), 0) + 1 FROM card_events WHERE card_serial = ?", (serial,)
    ).fetchone()[0]
    store.execute(
        "INSERT INTO card_events (id, card_serial, n, action, kind, new_serial, at, at_ms, "
        "result, reason, answer, recorded_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event_id,
            serial,
            int(n),
            action,
            kind,
            new_serial,
            at.isoformat(),
            _ms(at),
            answer["result"],
            answer.get("reason") or "",
            json.dumps(answer),
            int(time.time() * 1000),
        ),
    )


def _recorded(store: Store, event_id: str) -> dict[str, Any] | None:
    row = store.execute("SELECT answer FROM card_events WHERE id = ?", (event_id,)).fetchone()
    if row is None:
        return None
    answer: dict[str, Any] = json.loads(row[0])
    return answer


def _refused(serial: str, action: str, reason: str, detail: str) -> dict[str, Any]:
    return {
        "result": "refused",
        "reason": reason,
        "detail": detail,
        "serial": serial,
        "action": action,
    }


def _refuse(store: Store, event_id: str, at: datetime, answer: dict[str, Any]) -> dict[str, Any]:
    """Journal a refusal (an id of its own: refusing now does not answer a later retry that
    may be allowed) and give it back."""
    _journal(store, f"{event_id}-refused-{time.time_ns()}", at, answer)
    return answer


def _status(store: Store, card: Card, events: Sequence[Event], at: datetime) -> CardStatus:
    return card_status(card, events, at, balance_fen=last_known_balance(store, card.serial))


def _hotlist_reason(events: Sequence[Event], status: CardStatus) -> str | None:
    """Why the card's transit function may not be used now, as its hotlist reason; None if it
    may."""
    if status.transit_usable:
        return None
    if any(isinstance(e, Refund) for e in events):
        return "refunded"
    if status.state in ("cancelled", "replaced", "frozen", "expired"):
        return status.state
    return "transit_waiting"


def _sync_hotlist(store: Store, card: Card, events: Sequence[Event], at: datetime) -> None:
    """Put the card on the hotlist, or take it off, as its status at ``at`` says; only an entry
    whose reason lapses (frozen, transit_waiting) is lifted or renamed."""
    status = _status(store, card, events, at)
    reason = _hotlist_reason([e for e in events if e.at <= at], status)
    row = store.execute(
        "SELECT reason FROM hotlist WHERE card_serial = ?", (card.serial,)
    ).fetchone()
    if row is not None and str(row[0]) not in _LAPSING:
        return
    if reason is None:
        if row is not None:
            store.execute("DELETE FROM hotlist WHERE card_serial = ?", (card.serial,))
        return
    if row is None:
        store.execute(
            "INSERT INTO hotlist (card_serial, reason, added_ms) VALUES (?, ?, ?)",
            (card.serial, reason, int(time.time() * 1000)),
        )
    elif str(row[0]) != reason:
        store.execute("UPDATE hotlist SET reason = ? WHERE card_serial = ?", (reason, card.serial))


def lapse_hotlist(store: Store, at: datetime) -> list[str]:
    """Take off the hotlist every recorded card whose entry has lapsed by ``at`` (a wallet's
    wait after un-freezing over, a transit function now open), as the card-life core computes
    it: a parameters version published at ``at`` lists only what still holds. The serials
    lifted."""
    lifted: list[str] = []
    with store.transaction():
        listed = store.execute(
            "SELECT card_serial FROM hotlist WHERE reason IN (?, ?)", _LAPSING
        ).fetchall()
        for (serial,) in listed:
            record = _record(store, str(serial))
            if record is None:
                continue
            _sync_hotlist(store, *record, at)
            gone = store.execute(
                "SELECT 1 FROM hotlist WHERE card_serial = ?", (str(serial),)
            ).fetchone()
            if gone is None:
                lifted.append(str(serial))
    return lifted


def _enter(
    store: Store,
    new: NewCard,
    profile: str,
    at: datetime,
    *,
    replaces: str | None = None,
    issued_after: str | None = None,
) -> None:
    store.execute(
        "INSERT INTO cards (serial, issuer, profile, issued, replaces, issued_after, "
        "valid_until) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            new.serial,
            new.issuer,
            profile,
            at.isoformat(),
            replaces or "",
            issued_after or "",
            new.valid_until.isoformat() if new.valid_until is not None else "",
        ),
    )


def issue_card(store: Store, card: NewCard, *, profile: str, at: datetime) -> dict[str, Any]:
    """Enter ``card`` in the records with ``profile`` (a shipped profile's name), issued at
    ``at``: ``{"result": "done", "fee_fen", …the card's status}``, or refused
    ``already_issued``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown issuer profile {profile!r} ({', '.join(sorted(PROFILES))})")
    event_id = _event_id(card.serial, "issue", at, profile, card.issuer)
    with store.transaction():
        again = _recorded(store, event_id)
        if again is not None:
            return again
        if _record(store, card.serial) is not None:
            answer = _refused(
                card.serial, "issue", "already_issued", f"card {card.serial} is known"
            )
            return _refuse(store, event_id, at, answer)
        _enter(store, card, profile, at)
        record = _record(store, card.serial)
        if record is None:
            raise RuntimeError(f"card {card.serial} was not recorded")
        status = _status(store, *record, at)
        answer = {
            "result": "done",
            "reason": None,
            "action": "issue",
            "fee_fen": PROFILES[profile].fee_first_card_fen,
            **status.to_json(),
        }
        _journal(store, event_id, at, answer)
        _sync_hotlist(store, *record, at)
    return answer


def card_action(
    store: Store,
    serial: str,
    action: str,
    at: datetime,
    *,
    kind: Literal["phone", "formal"] | None = None,
    new: NewCard | None = None,
    on_card: Callable[[], tuple[str, str] | None] | None = None,
) -> dict[str, Any]:
    """Take ``action`` (one of :data:`CARD_ACTIONS`) on card ``serial`` at ``at``, if the core
    allows it: ``{"result": "done", "reason": null, "action", …the card's status}`` (a
    replacement also ``new_serial`` and ``fee_fen``), or ``{"result": "refused", "reason",
    "detail", …}`` with the core's reason, ``unknown_card``, ``before_last_event``,
    ``new_card_known`` or ``not_new``. ``kind`` is a loss report's; ``new`` the card that
    replaces this one (replace, exchange, renew).

    ``on_card`` does the action on the card itself (the PIN reset), once the core allowed it
    and before it is journalled: None when the card took it, else the card's reason and a
    sentence, journalled as the refusal. A repeated action is answered from the journal
    without it."""
    if action not in CARD_ACTIONS:
        raise ValueError(f"unknown action {action!r} (one of {', '.join(CARD_ACTIONS)})")
    if (action == "report_loss") != (kind is not None):
        raise ValueError("a loss report, and only a loss report, has a kind (phone or formal)")
    if (action in _NEW_CARD) != (new is not None):
        raise ValueError(f"{', '.join(_NEW_CARD)}, and only they, take the new card")
    new_serial = new.serial if new is not None else ""
    event_id = _event_id(serial, action, at, kind or "", new_serial)
    for attempt in range(5):
        try:
            return _act(store, serial, action, at, event_id, kind=kind, new=new, on_card=on_card)
        except store.integrity_errors:
            # The same action written by another process in the same instant (PostgreSQL):
            # the next attempt finds its answer and gives it.
            if attempt == 4:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise RuntimeError("unreachable")


def _act(
    store: Store,
    serial: str,
    action: str,
    at: datetime,
    event_id: str,
    *,
    kind: Literal["phone", "formal"] | None,
    new: NewCard | None,
    on_card: Callable[[], tuple[str, str] | None] | None,
) -> dict[str, Any]:
    new_serial = new.serial if new is not None else ""
    with store.transaction():
        again = _recorded(store, event_id)
        if again is not None:
            return again
        record = _record(store, serial)
        if record is None:
            answer = _refused(serial, action, "unknown_card", f"card {serial} was never issued")
            return _refuse(store, event_id, at, answer)
        card, events = record
        try:
            refusal = check_action(card, events, action, at)
        except LifecycleError as exc:
            answer = _refused(serial, action, "before_last_event", str(exc))
            return _refuse(store, event_id, at, answer)
        if refusal is None and new is not None:
            if _record(store, new.serial) is not None or new.serial == serial:
                answer = _refused(
                    serial, action, "new_card_known", f"card {new.serial} is already recorded"
                )
                return _refuse(store, event_id, at, answer)
            if new.balance_fen != 0:
                answer = _refused(
                    serial,
                    action,
                    "not_new",
                    f"card {new.serial} holds {new.balance_fen} fen: a new card holds none",
                )
                return _refuse(store, event_id, at, answer)
        if refusal is not None:
            answer = _refused(serial, action, refusal.reason, refusal.detail)
            return _refuse(store, event_id, at, answer)
        card_refusal = on_card() if on_card is not None else None
        if card_refusal is not None:
            answer = _refused(serial, action, *card_refusal)
            return _refuse(store, event_id, at, answer)
        events.append(_event(action, kind or "", new_serial, at.isoformat()))
        status = _status(store, card, events, at)
        answer = {"result": "done", "reason": None, "action": action, **status.to_json()}
        if new is not None:
            _enter(
                store,
                new,
                card.profile.name,
                at,
                replaces=serial,
                issued_after=_ISSUED_AFTER[action],
            )
            fee = card.profile.fee_replacement_fen if action != "renew" else 0
            answer |= {"new_serial": new.serial, "fee_fen": fee}
        _journal(store, event_id, at, answer, kind=kind or "", new_serial=new_serial)
        _sync_hotlist(store, card, events, at)
        if new is not None:
            new_record = _record(store, new.serial)
            if new_record is not None:
                _sync_hotlist(store, *new_record, at)
    return answer


def show_card(store: Store, serial: str, at: datetime) -> dict[str, Any]:
    """The card's status at ``at`` (``{"result": "done", "reason": null, …}`` with
    :meth:`CardStatus.to_json`'s keys), or refused ``unknown_card``. Asked at or after the
    card's last event, it also brings the card's hotlist entry up to that moment (a lapsed
    report, an e-wallet usable again)."""
    with store.transaction():
        record = _record(store, serial)
        if record is None:
            return _refused(serial, "status", "unknown_card", f"card {serial} was never issued")
        card, events = record
        status = _status(store, card, events, at)
        if not events or at >= events[-1].at:
            _sync_hotlist(store, card, events, at)
    return {"result": "done", "reason": None, **status.to_json()}


def cards_by_state(store: Store, at: datetime) -> dict[str, int]:
    """How many recorded cards are in each state at ``at`` (every state named, 0 or more)."""
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    for (serial,) in store.execute("SELECT serial FROM cards ORDER BY serial").fetchall():
        record = _record(store, str(serial))
        if record is not None:
            counts[card_status(*record, at).state] += 1
    return counts


# The hotlist reasons that are a recorded card's state: a kiosk's refusal names them.
_STATE_REASONS = ("frozen", "replaced", "cancelled", "expired")


def hotlist_refusal(store: Store, serial: str, listed: str) -> tuple[str, str] | None:
    """Why a card on the hotlist for ``listed`` is refused a load, in the rider's words: its
    state (``frozen``, ``replaced``, ``cancelled`` or ``expired``) and a sentence that says
    since when and what the rider does next, with the profile's fee for it (R13). None when
    the records do not know the card, or its entry is not one of its states (a clone, a refund
    the host counted, a transit function not yet open): the hotlist entry then speaks alone."""
    if listed not in _STATE_REASONS:
        return None
    record = _record(store, serial)
    if record is None:
        return None
    card, events = record
    profile = card.profile

    def fee(fen: int, what: str) -> str:
        return f"{what} costs {fen_to_yuan(fen)} yuan ({profile.name})"

    def day(at: datetime) -> str:
        return at.astimezone(CST).date().isoformat()

    replacement = fee(profile.fee_replacement_fen, "a replacement card")
    new_card = fee(profile.fee_first_card_fen, "a new card")
    if listed == "frozen":
        formal = next(
            (
                e.at
                for e in reversed(events)
                if isinstance(e, MakeFormal) or (isinstance(e, ReportLoss) and e.kind == "formal")
            ),
            None,
        )
        since = f" on {day(formal)}" if formal is not None else ""
        return listed, (
            f"card {serial} was reported lost{since} and is frozen: un-freeze it at an outlet "
            f"if it was found; {replacement}"
        )
    if listed == "replaced":
        ended = next(
            (e for e in reversed(events) if isinstance(e, Replace | Exchange | Renew)), None
        )
        if ended is None:
            return listed, f"card {serial} was replaced; {replacement}"
        if isinstance(ended, Renew):
            return listed, (
                f"card {serial} was renewed by card {ended.new_serial} on {day(ended.at)}: "
                "load that card"
            )
        return listed, (
            f"card {serial} was replaced by card {ended.new_serial} on {day(ended.at)}: load "
            f"that card; {replacement}"
        )
    if listed == "cancelled":
        cancel = next((e for e in reversed(events) if isinstance(e, Cancel)), None)
        since = f" on {day(cancel.at)}" if cancel is not None else ""
        return listed, f"card {serial} was cancelled{since}; {new_card}"
    return listed, (
        f"card {serial} expired on {card.expires_on} (R9): its balance is refunded at an "
        f"outlet; {new_card}"
    )


def transfer_terms(
    store: Store, old: str, *, new: str | None, reason: str, profile: str
) -> tuple[str | None, date | None] | None:
    """What the records say of moving card ``old``'s balance onto ``new`` (R6): None when the
    ledger has no record of ``old`` (the kiosk's word then decides); else a refusal reason and
    None, or None and the day from which it moves (the core's :func:`balance_moves_on`).

    Refused: ``not_replaced``; ``not_the_replacement`` (``new`` is not the card that replaced
    it); ``wrong_profile`` and ``wrong_reason`` (a loss for a replacement, an exchange for an
    exchange or a renewal); ``refunded``, ``no_transfer_after_loss``, ``refund_instead`` and
    ``no_transfer`` where nothing moves.
    """
    record = _record(store, old)
    if record is None:
        return None
    card, events = record
    ended = next((e for e in reversed(events) if isinstance(e, Replace | Exchange | Renew)), None)
    if ended is None:
        return "not_replaced", None
    if new is not None and new != ended.new_serial:
        return "not_the_replacement", None
    if profile != card.profile.name:
        return "wrong_profile", None
    if reason != ("loss" if isinstance(ended, Replace) else "exchange"):
        return "wrong_reason", None
    moves_on = balance_moves_on(card, events)
    if moves_on is not None:
        return None, moves_on
    if any(isinstance(e, Refund) for e in events):
        return "refunded", None
    if isinstance(ended, Replace):
        return "no_transfer_after_loss", None
    if card.profile.refund_before_replacement:
        return "refund_instead", None
    return "no_transfer", None

"""A card's life by issuer profile (docs/card-life.md; R5–R9, R12): each timeline walked with
explicit times, the expected moments worked out here from the rules, not read from the code."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farelab.backend import (
    ACTIONS,
    STATES,
    Cancel,
    Card,
    EcardIssue,
    Event,
    Exchange,
    Found,
    LifecycleError,
    MakeFormal,
    PinOk,
    PinReset,
    PinWrong,
    Refund,
    Renew,
    Replace,
    ReportLoss,
    Unfreeze,
    balance_moves_on,
    card_status,
    check_action,
    load_profiles,
)
from farelab.backend._transfer import decide
from farelab.card import CST

PROFILES = load_profiles()
MINUTE = timedelta(minutes=1)


def at(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=CST)


def card(profile: str, issued: datetime | None = None) -> Card:
    return Card(serial="1001", profile=PROFILES[profile], issued=issued or at(2026, 1, 15, 9))


def test_the_states_and_the_status_keys_are_the_contract() -> None:
    assert set(STATES) == {"active", "reported", "frozen", "replaced", "cancelled", "expired"}
    got = card_status(card("nanjing"), [], at(2026, 2, 1), balance_fen=800).to_json()
    assert got == {
        "serial": "1001",
        "profile": "nanjing",
        "state": "active",
        "transit_usable": True,
        "social_security_usable": True,
        "balance_fen": 800,
        "balance_moves_on": None,
        "ecard": "none",
    }


# --- Nanjing (R6, R7) ---


def test_r6_nanjing_formal_loss_moves_the_balance_exactly_one_year_after_the_report() -> None:
    c = card("nanjing")
    report = at(2026, 3, 10, 10, 30)
    events: list[Event] = [ReportLoss(report, "formal")]
    frozen = card_status(c, events, report)
    assert (frozen.state, frozen.transit_usable, frozen.social_security_usable) == (
        "frozen",
        False,
        False,
    )
    events.append(Replace(at(2026, 3, 12, 9), "2002"))
    one_year_on = date(2027, 3, 10)  # the same calendar date a year later
    assert balance_moves_on(c, events) == one_year_on
    replaced = card_status(c, events, at(2026, 3, 12, 9))
    assert (replaced.state, replaced.replaced_by, replaced.balance_moves_on) == (
        "replaced",
        "2002",
        one_year_on,
    )
    # The host's transfer quote agrees: not a day earlier.
    nanjing = PROFILES["nanjing"]
    early = decide(
        nanjing, reason="loss", reported=report.date(), today=date(2027, 3, 9), balance=800
    )
    assert (early.amount_fen, early.reason, early.available_on) == (0, "not_yet", one_year_on)
    due = decide(nanjing, reason="loss", reported=report.date(), today=one_year_on, balance=800)
    assert due.amount_fen == 800


def test_r6_nanjing_a_report_on_a_leap_day_moves_on_the_first_of_march() -> None:
    c = card("nanjing", issued=at(2027, 1, 1))
    events: list[Event] = [ReportLoss(at(2028, 2, 29, 11), "formal"), Replace(at(2028, 3, 1), "2")]
    assert balance_moves_on(c, events) == date(2029, 3, 1)


def test_r6_nanjing_a_replacement_after_a_phone_report_counts_from_the_replacement() -> None:
    c = card("nanjing")
    events: list[Event] = [
        ReportLoss(at(2026, 3, 9, 20), "phone"),
        Replace(at(2026, 3, 10, 9), "2002"),
    ]
    assert balance_moves_on(c, events) == date(2027, 3, 10)


def test_r6_nanjing_exchange_moves_the_balance_on_the_seventh_working_day() -> None:
    c = card("nanjing")
    # Fri 13 Nov 2026: 16–20 Nov are five working days, 23 and 24 Nov the sixth and seventh.
    events: list[Event] = [Exchange(at(2026, 11, 13, 15), "2002")]
    assert balance_moves_on(c, events) == date(2026, 11, 24)


def test_r6_nanjing_exchange_before_the_national_day_waits_past_the_holiday() -> None:
    c = card("nanjing")
    # Wed 30 Sep 2026: 1–7 Oct are holidays; 8, 9, 10 (a make-up Saturday), 12, 13, 14, 15 Oct.
    events: list[Event] = [Exchange(at(2026, 9, 30, 15), "2002")]
    assert balance_moves_on(c, events) == date(2026, 10, 15)


def test_r6_nanjing_a_found_wallet_is_usable_seven_working_days_after_unfreezing() -> None:
    c = card("nanjing")
    unfrozen = at(2026, 11, 20, 10)  # a Friday
    events: list[Event] = [ReportLoss(at(2026, 11, 18, 9), "formal"), Unfreeze(unfrozen)]
    after = card_status(c, events, unfrozen)
    assert (after.state, after.social_security_usable, after.transit_usable) == (
        "active",
        True,
        False,
    )
    usable = at(2026, 12, 1, 10)  # 23–27 Nov, 30 Nov, 1 Dec: the seventh working day
    assert not card_status(c, events, usable - MINUTE).transit_usable
    assert card_status(c, events, usable).transit_usable
    refusal = check_action(c, events, "refund", usable - MINUTE)
    assert refusal is not None
    assert refusal.reason == "wallet_waiting"


def test_r7_nanjing_phone_report_lapses_after_three_working_days_across_a_weekend() -> None:
    c = card("nanjing")
    events: list[Event] = [ReportLoss(at(2026, 11, 20, 15), "phone")]  # a Friday
    lapses = at(2026, 11, 25, 15)  # Mon 23, Tue 24, Wed 25
    before = card_status(c, events, lapses - MINUTE)
    assert (before.state, before.reported_until, before.social_security_usable) == (
        "reported",
        lapses,
        False,
    )
    assert before.transit_usable  # a phone report blocks the social-security function only
    after = card_status(c, events, lapses)
    assert (after.state, after.social_security_usable) == ("active", True)


def test_r7_nanjing_phone_report_lapses_later_across_a_holiday() -> None:
    c = card("nanjing")
    events: list[Event] = [ReportLoss(at(2026, 4, 3, 10), "phone")]  # Fri before Qingming
    lapses = at(2026, 4, 9, 10)  # 4–6 Apr weekend and holiday; Tue 7, Wed 8, Thu 9
    assert card_status(c, events, lapses - MINUTE).state == "reported"
    assert card_status(c, events, lapses).state == "active"


def test_r7_a_phone_report_made_formal_in_time_freezes() -> None:
    c = card("nanjing")
    events: list[Event] = [
        ReportLoss(at(2026, 11, 20, 15), "phone"),
        MakeFormal(at(2026, 11, 24, 9)),
    ]
    assert card_status(c, events, at(2026, 12, 20)).state == "frozen"


def test_r7_a_lapsed_phone_report_cannot_be_made_formal() -> None:
    c = card("nanjing")
    events: list[Event] = [ReportLoss(at(2026, 11, 20, 15), "phone")]
    refusal = check_action(c, events, "make_formal", at(2026, 11, 25, 15))
    assert refusal is not None
    assert refusal.reason == "no_phone_report"
    assert "lapsed" in refusal.detail


# --- Haining, Hangzhou (R7) ---


def test_r7_haining_phone_report_lasts_five_days_and_blocks_after_five_minutes() -> None:
    c = card("haining")
    report = at(2026, 11, 20, 15)
    events: list[Event] = [ReportLoss(report, "phone")]
    assert card_status(c, events, report + timedelta(minutes=4)).social_security_usable
    assert not card_status(c, events, report + timedelta(minutes=5)).social_security_usable
    lapses = at(2026, 11, 25, 15)  # five calendar days, the weekend counted
    assert card_status(c, events, lapses - MINUTE).state == "reported"
    assert card_status(c, events, lapses).state == "active"


def test_r7_hangzhou_phone_report_lasts_48_hours_and_blocks_within_an_hour() -> None:
    c = card("hangzhou")
    report = at(2026, 11, 20, 15)
    events: list[Event] = [EcardIssue(at(2026, 2, 1)), ReportLoss(report, "phone")]
    first = card_status(c, events, report)
    assert (first.state, first.ecard) == ("reported", "suspended")  # R12: at once
    assert first.social_security_usable  # blocked at the latest an hour after the report
    assert not card_status(c, events, report + timedelta(hours=1)).social_security_usable
    lapses = report + timedelta(hours=48)
    assert card_status(c, events, lapses - MINUTE).state == "reported"
    back = card_status(c, events, lapses)
    assert (back.state, back.ecard, back.social_security_usable) == ("active", "usable", True)


# --- R5: T-Union transit accounts ---


@pytest.mark.parametrize("profile", ["shanxi", "changzhou"])
def test_r5_a_lost_t_union_card_still_rides_while_social_security_is_blocked(
    profile: str,
) -> None:
    c = card(profile)
    events: list[Event] = [ReportLoss(at(2026, 5, 6, 9), "formal")]
    lost = card_status(c, events, at(2026, 5, 6, 9), balance_fen=1200)
    assert (lost.state, lost.transit_usable, lost.social_security_usable) == (
        "frozen",
        True,
        False,
    )
    events.append(Replace(at(2026, 5, 7, 9), "2002"))
    replaced = card_status(c, events, at(2026, 5, 8), balance_fen=1200)
    assert (replaced.state, replaced.transit_usable, replaced.balance_moves_on) == (
        "replaced",
        True,
        None,
    )


def test_r6_changzhou_refunds_before_an_exchange() -> None:
    c = card("changzhou")
    refusal = check_action(c, [], "exchange", at(2026, 6, 1, 10))
    assert refusal is not None
    assert refusal.reason == "refund_first"
    events: list[Event] = [Refund(at(2026, 6, 1, 10))]
    refunded = card_status(c, events, at(2026, 6, 1, 10), balance_fen=900)
    assert (refunded.balance_fen, refunded.transit_usable) == (0, False)
    assert check_action(c, events, "exchange", at(2026, 6, 1, 11)) is None
    events.append(Exchange(at(2026, 6, 1, 11), "2002"))
    assert balance_moves_on(c, events) is None


# --- Hangzhou (R6) ---


def test_r6_hangzhou_after_a_loss_the_new_card_rides_three_days_later_without_the_balance() -> None:
    old = card("hangzhou")
    replaced = at(2026, 7, 1, 10)
    events: list[Event] = [ReportLoss(at(2026, 6, 30, 20), "formal"), Replace(replaced, "2002")]
    assert balance_moves_on(old, events) is None
    new = Card(
        serial="2002",
        profile=PROFILES["hangzhou"],
        issued=replaced,
        replaces="1001",
        issued_after="loss",
    )
    opens = at(2026, 7, 4, 10)
    assert not card_status(new, [], opens - MINUTE).transit_usable
    assert card_status(new, [], opens).transit_usable
    assert card_status(new, [], replaced).social_security_usable


def test_r6_hangzhou_an_exchange_moves_the_balance_at_once() -> None:
    c = card("hangzhou")
    events: list[Event] = [Exchange(at(2026, 7, 1, 10), "2002")]
    assert balance_moves_on(c, events) == date(2026, 7, 1)
    new = Card(
        serial="2002",
        profile=PROFILES["hangzhou"],
        issued=at(2026, 7, 1, 10),
        replaces="1001",
        issued_after="exchange",
    )
    assert card_status(new, [], at(2026, 7, 1, 10)).transit_usable


# --- R9: validity ---


def test_r9_a_card_expires_ten_years_after_issue() -> None:
    c = card("nanjing", issued=at(2026, 1, 15, 9))
    expiry = at(2036, 1, 15)
    assert card_status(c, [], expiry - MINUTE).state == "active"
    expired = card_status(c, [], expiry, balance_fen=500)
    assert (expired.state, expired.transit_usable, expired.social_security_usable) == (
        "expired",
        False,
        False,
    )
    assert expired.expires_on == date(2036, 1, 15)
    assert check_action(c, [], "refund", expiry) is None  # the balance is still refundable
    refusal = check_action(c, [], "report_loss", expiry)
    assert refusal is not None
    assert refusal.reason == "expired"


def test_r9_a_card_issued_on_a_leap_day_expires_on_the_first_of_march() -> None:
    assert card("nanjing", issued=at(2028, 2, 29, 9)).expires_on == date(2038, 3, 1)


def test_r9_renewal_only_in_the_last_months_moves_the_balance() -> None:
    c = card("nanjing", issued=at(2026, 1, 15, 9))
    window = at(2035, 10, 15)  # three months before 15 Jan 2036 (renew_within_months)
    assert PROFILES["nanjing"].renew_within_months == 3
    refusal = check_action(c, [], "renew", window - MINUTE)
    assert refusal is not None
    assert refusal.reason == "not_due"
    assert "2035-10-15" in refusal.detail
    assert check_action(c, [], "renew", window) is None
    events: list[Event] = [Renew(at(2035, 11, 2, 10), "2002")]
    assert balance_moves_on(c, events) == date(2035, 11, 2)
    assert card_status(c, events, at(2035, 11, 2, 10)).state == "replaced"


# --- R12: the electronic card ---


def test_r12_the_ecard_follows_the_physical_card() -> None:
    c = card("nanjing")
    events: list[Event] = [EcardIssue(at(2026, 2, 1))]
    assert card_status(c, events, at(2026, 2, 1)).ecard == "usable"
    again = check_action(c, events, "ecard_issue", at(2026, 2, 2))
    assert again is not None
    assert again.reason == "ecard_bound"
    events.append(ReportLoss(at(2026, 3, 1, 9), "phone"))
    assert card_status(c, events, at(2026, 3, 1, 9)).ecard == "suspended"
    events.append(Found(at(2026, 3, 2, 9)))
    assert card_status(c, events, at(2026, 3, 2, 9)).ecard == "usable"
    events += [ReportLoss(at(2026, 4, 1, 9), "formal"), Replace(at(2026, 4, 2, 9), "2002")]
    assert card_status(c, events, at(2026, 4, 2, 9)).ecard == "none"
    new = Card(
        serial="2002",
        profile=PROFILES["nanjing"],
        issued=at(2026, 4, 2, 9),
        replaces="1001",
        issued_after="loss",
    )
    assert card_status(new, [], at(2026, 4, 2, 9)).ecard == "none"  # it is issued again
    assert card_status(new, [EcardIssue(at(2026, 4, 3))], at(2026, 4, 3)).ecard == "usable"


def test_r12_a_cancelled_card_has_no_ecard() -> None:
    c = card("haining")
    events: list[Event] = [EcardIssue(at(2026, 2, 1)), Cancel(at(2026, 3, 1))]
    cancelled = card_status(c, events, at(2026, 3, 1))
    assert (cancelled.state, cancelled.ecard, cancelled.transit_usable) == (
        "cancelled",
        "none",
        False,
    )


# --- R8: the PIN ---


@pytest.mark.parametrize(("profile", "tries"), [("nanjing", 5), ("haining", 6)])
def test_r8_wrong_pins_in_one_day_lock_until_an_outlet_resets(profile: str, tries: int) -> None:
    c = card(profile)
    day = at(2026, 3, 3, 9)
    events: list[Event] = [EcardIssue(day)]
    events += [PinWrong(day + i * MINUTE) for i in range(1, tries)]
    nearly = card_status(c, events, day + tries * MINUTE)
    assert (nearly.pin_locked, nearly.pin_tries_left) == (False, 1)
    events.append(PinWrong(day + tries * MINUTE))
    locked = card_status(c, events, day + tries * MINUTE)
    assert (locked.pin_locked, locked.social_security_usable, locked.ecard) == (
        True,
        False,
        "suspended",
    )
    assert locked.transit_usable  # the transit account has no PIN (R5)
    refusal = check_action(c, events, "pin_wrong", at(2026, 3, 9))
    assert refusal is not None
    assert refusal.reason == "pin_locked"
    events.append(PinReset(at(2026, 3, 9)))
    assert card_status(c, events, at(2026, 3, 9)).social_security_usable


def test_r8_wrong_pins_on_different_days_or_after_a_right_one_do_not_add_up() -> None:
    c = card("nanjing")
    events: list[Event] = [PinWrong(at(2026, 3, 3, 9, i)) for i in range(4)]
    events += [PinWrong(at(2026, 3, 4, 9))]
    assert not card_status(c, events, at(2026, 3, 4, 9)).pin_locked
    events += [PinWrong(at(2026, 3, 4, 10, i)) for i in range(3)]
    events += [PinOk(at(2026, 3, 4, 11))]
    events += [PinWrong(at(2026, 3, 4, 12, i)) for i in range(4)]
    assert not card_status(c, events, at(2026, 3, 4, 13)).pin_locked


# --- actions in the wrong state ---

ISSUED = at(2026, 1, 15, 9)
LATER = at(2026, 6, 1, 12)


@pytest.mark.parametrize(
    ("history", "action", "reason"),
    [
        ([Refund(at(2026, 5, 1))], "refund", "already_refunded"),
        ([Cancel(at(2026, 5, 1))], "replace", "cancelled"),
        ([], "unfreeze", "not_frozen"),
        ([ReportLoss(at(2026, 5, 31), "phone")], "unfreeze", "not_frozen"),
        ([], "make_formal", "no_phone_report"),
        ([ReportLoss(at(2026, 5, 31), "formal")], "make_formal", "already_formal"),
        ([], "found", "not_reported"),
        ([ReportLoss(at(2026, 5, 31), "formal")], "found", "frozen"),
        ([], "renew", "not_due"),
        ([], "replace", "not_reported"),
        ([ReportLoss(at(2026, 5, 31), "phone")], "report_loss", "already_reported"),
        ([ReportLoss(at(2026, 5, 31), "formal")], "report_loss", "already_reported"),
        ([ReportLoss(at(2026, 5, 31), "formal")], "exchange", "reported"),
        ([ReportLoss(at(2026, 5, 31), "formal")], "refund", "reported"),
        ([ReportLoss(at(2026, 5, 31), "phone")], "ecard_issue", "reported"),
        ([ReportLoss(at(2026, 5, 31), "phone")], "renew", "reported"),
        ([ReportLoss(at(2026, 5, 31), "phone")], "pin_wrong", "reported"),
    ],
)
def test_an_action_in_the_wrong_state_is_refused_with_its_reason(
    history: Sequence[Event], action: str, reason: str
) -> None:
    refusal = check_action(card("nanjing", issued=ISSUED), history, action, LATER)
    assert refusal is not None
    assert (refusal.action, refusal.reason) == (action, reason)
    assert "1001" in refusal.detail


@pytest.mark.parametrize("action", ACTIONS)
def test_every_action_on_a_cancelled_card_is_refused(action: str) -> None:
    refusal = check_action(card("nanjing"), [Cancel(at(2026, 5, 1))], action, LATER)
    assert refusal is not None
    assert refusal.reason == "cancelled"


@pytest.mark.parametrize("action", ACTIONS)
def test_every_action_on_a_replaced_card_is_refused(action: str) -> None:
    history: list[Event] = [ReportLoss(at(2026, 5, 1), "formal"), Replace(at(2026, 5, 2), "2")]
    refusal = check_action(card("nanjing"), history, action, LATER)
    assert refusal is not None
    assert refusal.reason == "replaced"
    assert "2" in refusal.detail


def test_an_action_before_the_card_was_issued_is_refused() -> None:
    refusal = check_action(card("nanjing", issued=ISSUED), [], "report_loss", ISSUED - MINUTE)
    assert refusal is not None
    assert refusal.reason == "not_issued"


def test_a_history_that_cannot_have_happened_is_refused() -> None:
    c = card("nanjing")
    with pytest.raises(LifecycleError, match="unfreeze") as caught:
        card_status(c, [Unfreeze(at(2026, 5, 1))], LATER)
    assert caught.value.refusal is not None
    assert caught.value.refusal.reason == "not_frozen"
    out_of_order: list[Event] = [Refund(at(2026, 5, 2)), Cancel(at(2026, 5, 1))]
    with pytest.raises(LifecycleError, match="time order"):
        card_status(c, out_of_order, LATER)
    with pytest.raises(ValueError, match="unknown action"):
        check_action(c, [], "lose", LATER)
    with pytest.raises(ValueError, match="aware"):
        card_status(c, [], datetime(2026, 5, 1))  # noqa: DTZ001


def test_events_after_the_moment_asked_about_are_not_yet() -> None:
    c = card("nanjing")
    events: list[Event] = [ReportLoss(at(2026, 5, 1), "formal")]
    assert card_status(c, events, at(2026, 4, 30)).state == "active"


@given(
    minutes=st.integers(min_value=0, max_value=60 * 24 * 330),
)
def test_r7_a_nanjing_phone_report_lapses_at_the_same_time_on_the_third_working_day(
    minutes: int,
) -> None:
    report = at(2026, 1, 20) + timedelta(minutes=minutes)
    holidays = PROFILES["nanjing"].holidays
    workdays = PROFILES["nanjing"].workdays
    day, left = report.date(), 3
    while left:
        day += timedelta(days=1)
        if day in workdays or (day.weekday() < 5 and day not in holidays):
            left -= 1
    lapses = datetime.combine(day, report.timetz())
    events: list[Event] = [ReportLoss(report, "phone")]
    c = card("nanjing")
    assert card_status(c, events, lapses - MINUTE).state == "reported"
    assert card_status(c, events, lapses).state == "active"

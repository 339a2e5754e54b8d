"""Issuer profiles as data (docs/card-life.md): the shipped profiles say what the rules say, a
user's file replaces or adds profiles by name, and every bad key is refused by name; working days
skip weekends and the profile's holidays."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farelab.backend import (
    Duration,
    IssuerProfile,
    ProfileError,
    load_profiles,
    working_days_after,
)
from farelab.card import CST

SHIPPED = load_profiles()

# The State Council's 2026 arrangement, written out here from the notice, not read from the code.
CN_2026_HOLIDAYS = {
    *(date(2026, 1, d) for d in (1, 2, 3)),
    *(date(2026, 2, d) for d in range(15, 24)),
    *(date(2026, 4, d) for d in (4, 5, 6)),
    *(date(2026, 5, d) for d in range(1, 6)),
    *(date(2026, 6, d) for d in (19, 20, 21)),
    *(date(2026, 9, d) for d in (25, 26, 27)),
    *(date(2026, 10, d) for d in range(1, 8)),
}
CN_2026_WORKDAYS = {
    date(2026, 1, 4),
    date(2026, 2, 14),
    date(2026, 2, 28),
    date(2026, 5, 9),
    date(2026, 9, 20),
    date(2026, 10, 10),
}


def test_the_shipped_profiles_are_the_five_of_the_contract() -> None:
    assert set(SHIPPED) == {"shanxi", "changzhou", "nanjing", "haining", "hangzhou"}
    assert all(p.name == name for name, p in SHIPPED.items())


def test_r5_a_t_union_transit_account_cannot_be_reported_lost() -> None:
    assert not SHIPPED["shanxi"].transit_reportable
    assert not SHIPPED["changzhou"].transit_reportable
    assert not SHIPPED["hangzhou"].transit_reportable  # 城市通 不挂失
    assert SHIPPED["nanjing"].transit_reportable  # R6: the e-wallet is frozen by a formal report


def test_r6_balances_by_profile() -> None:
    nanjing = SHIPPED["nanjing"]
    assert nanjing.loss_balance_moves_after == Duration(1, "years")
    assert nanjing.exchange_balance_moves_after == Duration(7, "working days")
    assert nanjing.wallet_usable_after_unfreeze == Duration(7, "working days")
    hangzhou = SHIPPED["hangzhou"]
    assert hangzhou.loss_balance_moves_after is None
    assert hangzhou.exchange_balance_moves_after == Duration(0, "days")
    assert hangzhou.transit_reopens_after_loss == Duration(3, "days")
    for name in ("changzhou", "shanxi"):
        assert SHIPPED[name].refund_before_replacement
        assert SHIPPED[name].exchange_balance_moves_after is None


def test_r7_phone_reports_lapse_and_formal_reports_block() -> None:
    assert SHIPPED["nanjing"].phone_report_lasts == Duration(3, "working days")
    assert SHIPPED["haining"].phone_report_lasts == Duration(5, "days")
    assert SHIPPED["hangzhou"].phone_report_lasts == Duration(48, "hours")
    assert SHIPPED["nanjing"].social_security_blocked_after == Duration(0, "days")
    assert SHIPPED["hangzhou"].social_security_blocked_after == Duration(1, "hours")


def test_r8_initial_pins_and_tries() -> None:
    assert SHIPPED["nanjing"].initial_pin == "888888"
    assert SHIPPED["haining"].initial_pin == "123456"
    assert SHIPPED["nanjing"].pin_tries_per_day == 5
    assert SHIPPED["haining"].pin_tries_per_day == 6


def test_r9_ten_years_and_r13_fees() -> None:
    assert {p.validity_years for p in SHIPPED.values()} == {10}
    assert {p.fee_first_card_fen for p in SHIPPED.values()} == {2000}
    assert SHIPPED["nanjing"].fee_replacement_fen == 3000
    assert SHIPPED["hangzhou"].fee_replacement_fen == 2500


def test_the_shipped_calendar_is_mainland_china_2026() -> None:
    for profile in SHIPPED.values():
        assert profile.holidays == CN_2026_HOLIDAYS
        assert profile.workdays == CN_2026_WORKDAYS


def test_working_days_skip_weekends() -> None:
    assert working_days_after(date(2026, 11, 20), 7) == date(2026, 12, 1)  # Fri + 7 → Tue


def test_working_days_skip_holidays_and_count_make_up_days() -> None:
    # Wed 30 Sep + 1: 1–7 Oct are holidays, so Thu 8 Oct.
    assert working_days_after(date(2026, 9, 30), 1, CN_2026_HOLIDAYS) == date(2026, 10, 8)
    # Fri 9 Oct + 1: Saturday 10 Oct is a make-up working day.
    assert working_days_after(date(2026, 10, 9), 1, CN_2026_HOLIDAYS, CN_2026_WORKDAYS) == date(
        2026, 10, 10
    )
    assert working_days_after(date(2026, 10, 9), 1, CN_2026_HOLIDAYS) == date(2026, 10, 12)


def _is_working(day: date, holidays: set[date]) -> bool:
    return day.weekday() < 5 and day not in holidays


@given(
    day=st.dates(min_value=date(2025, 1, 1), max_value=date(2027, 12, 31)),
    n=st.integers(min_value=0, max_value=40),
    holidays=st.sets(st.dates(min_value=date(2025, 1, 1), max_value=date(2028, 6, 30))),
)
def test_working_days_after_counts_exactly_n_working_days(
    day: date, n: int, holidays: set[date]
) -> None:
    end = working_days_after(day, n, holidays)
    between = [day + timedelta(days=i) for i in range(1, (end - day).days + 1)]
    assert sum(_is_working(d, holidays) for d in between) == n
    assert n == 0 or _is_working(end, holidays)
    assert end >= day
    assert working_days_after(day, n + 1, holidays) > end


def test_durations_parse_and_refuse() -> None:
    assert Duration.parse("3 working days") == Duration(3, "working days")
    assert Duration.parse("1 hour") == Duration(1, "hours")
    assert Duration.parse("48 hours") == Duration(48, "hours")
    for bad in ("three days", "3 fortnights", "-1 days", "3", ""):
        with pytest.raises(ValueError, match="not a duration"):
            Duration.parse(bad)


def test_a_year_after_a_leap_day_is_the_first_of_march() -> None:
    leap = datetime(2028, 2, 29, 9, 30, tzinfo=CST)
    assert Duration(1, "years").after(leap) == datetime(2029, 3, 1, 9, 30, tzinfo=CST)
    assert Duration(4, "years").after(leap) == datetime(2032, 2, 29, 9, 30, tzinfo=CST)
    plain = datetime(2026, 3, 10, 9, 30, tzinfo=CST)
    assert Duration(1, "years").after(plain) == datetime(2027, 3, 10, 9, 30, tzinfo=CST)


def _profile_toml(name: str, **changes: str) -> str:
    """A complete profile table as TOML, Nanjing's values with ``changes`` (TOML values)."""
    values = {
        "title": '"Test issuer"',
        "transit_reportable": "true",
        "phone_report_lasts": '"3 working days"',
        "social_security_blocked_after": '"0 days"',
        "wallet_usable_after_unfreeze": '"7 working days"',
        "loss_balance_moves_after": '"1 year"',
        "exchange_balance_moves_after": '"7 working days"',
        "refund_before_replacement": "false",
        "transit_reopens_after_loss": '"0 days"',
        "initial_pin": '"888888"',
        "pin_tries_per_day": "5",
        "validity_years": "10",
        "renew_within_months": "3",
        "fee_first_card_fen": "2000",
        "fee_replacement_fen": "3000",
    }
    for key, value in changes.items():
        if value == "":
            values.pop(key)
        else:
            values[key] = value
    body = "\n".join(f"{k} = {v}" for k, v in values.items())
    return f"[profiles.{name}]\n{body}\n"


def _user_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profiles.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_user_file_replaces_a_profile_by_name_and_adds_new_ones(tmp_path: Path) -> None:
    path = _user_file(
        tmp_path,
        _profile_toml("nanjing", fee_replacement_fen="3500")
        + _profile_toml("suzhou", phone_report_lasts='"2 days"'),
    )
    profiles = load_profiles(path)
    assert set(profiles) == set(SHIPPED) | {"suzhou"}
    assert profiles["nanjing"].fee_replacement_fen == 3500
    assert profiles["suzhou"].phone_report_lasts == Duration(2, "days")
    assert profiles["hangzhou"] == SHIPPED["hangzhou"]
    # Without a calendar of its own a user's profile gets the shipped default one.
    assert profiles["suzhou"].holidays == CN_2026_HOLIDAYS


def test_a_user_file_may_give_its_own_calendar(tmp_path: Path) -> None:
    path = _user_file(
        tmp_path,
        "default_holidays = [2027-01-01]\n"
        + _profile_toml("suzhou")
        + _profile_toml("wuxi", holidays="[2027-02-01]"),
    )
    profiles = load_profiles(path)
    assert profiles["suzhou"].holidays == {date(2027, 1, 1)}
    assert profiles["wuxi"].holidays == {date(2027, 2, 1)}
    assert isinstance(profiles["wuxi"], IssuerProfile)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (_profile_toml("suzhou", phone_report_lasts_days="3"), "phone_report_lasts_days"),
        (_profile_toml("suzhou", phone_report_lasts=""), "phone_report_lasts"),
        (_profile_toml("suzhou", phone_report_lasts='"3 weeks"'), "phone_report_lasts"),
        (_profile_toml("suzhou", pin_tries_per_day='"five"'), "pin_tries_per_day"),
        (_profile_toml("suzhou", pin_tries_per_day="0"), "pin_tries_per_day"),
        (_profile_toml("suzhou", initial_pin="888888"), "initial_pin"),
        (_profile_toml("suzhou", initial_pin='"88888"'), "initial_pin"),
        (_profile_toml("suzhou", transit_reportable='"yes"'), "transit_reportable"),
        (_profile_toml("suzhou", fee_replacement_fen="-1"), "fee_replacement_fen"),
        (_profile_toml("suzhou", holidays='["2026-10-01"]'), "holidays"),
        ("default_holidayz = []\n", "default_holidayz"),
        ("profiles = 3\n", "profiles"),
        ("[profiles]\nsuzhou = 3\n", "suzhou"),
    ],
)
def test_a_user_file_with_a_bad_key_is_refused_naming_it(
    tmp_path: Path, text: str, named: str
) -> None:
    path = _user_file(tmp_path, text)
    with pytest.raises(ProfileError, match=named) as caught:
        load_profiles(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_user_file_that_is_not_toml_or_missing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not TOML"):
        load_profiles(_user_file(tmp_path, "[profiles.suzhou\n"))
    with pytest.raises(ProfileError, match="cannot be read"):
        load_profiles(tmp_path / "absent.toml")

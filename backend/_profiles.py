"""Issuer profiles as data: what each issuer allows over a card's life (docs/card-life.md).

The profiles ship with farelab in ``profiles.toml``; a user's own TOML file of the same shape
replaces shipped profiles by name and adds new ones. Durations are written as ``"3 working
days"``, ``"48 hours"``, ``"1 year"``, and computed here, purely, against a profile's calendar
(its holidays and make-up working days).
"""

from __future__ import annotations

import calendar
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from farelab.card import CST

__all__ = [
    "Duration",
    "IssuerProfile",
    "ProfileError",
    "load_profiles",
    "working_days_after",
    "years_after",
]

Unit = Literal["minutes", "hours", "days", "working days", "years"]

_UNITS: dict[str, Unit] = {
    "minute": "minutes",
    "minutes": "minutes",
    "hour": "hours",
    "hours": "hours",
    "day": "days",
    "days": "days",
    "working day": "working days",
    "working days": "working days",
    "year": "years",
    "years": "years",
}


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file, the profile and the key."""


def working_days_after(
    day: date, n: int, holidays: Collection[date] = (), workdays: Collection[date] = ()
) -> date:
    """The ``n``-th working day after ``day`` (``day`` itself when ``n`` is 0).

    A working day is Monday to Friday unless it is in ``holidays``, or any day in ``workdays``
    (the weekend days an official calendar makes working days).
    """
    if n < 0:
        raise ValueError(f"n must not be negative, not {n}")
    current = day
    left = n
    while left > 0:
        current += timedelta(days=1)
        if current in workdays or (current.weekday() < 5 and current not in holidays):
            left -= 1
    return current


def years_after(day: date, n: int) -> date:
    """The same calendar date ``n`` years after ``day``; 29 February becomes 1 March in a common
    year, the first day on which ``n`` whole years have passed."""
    year = day.year + n
    if day.month == 2 and day.day == 29 and not calendar.isleap(year):
        return date(year, 3, 1)
    return day.replace(year=year)


@dataclass(frozen=True, slots=True)
class Duration:
    """A wait written in a profile: ``n`` minutes, hours, days, working days or years.

    Minutes, hours and days run from the moment (days keep its clock time); working days land at
    the moment's clock time on the ``n``-th working day after its date; years on the same
    calendar date (:func:`years_after`).
    """

    n: int
    unit: Unit

    @classmethod
    def parse(cls, text: str) -> Duration:
        """``"3 working days"`` → ``Duration(3, "working days")``; ValueError otherwise."""
        number, _, unit = text.strip().partition(" ")
        if not number.isdigit() or " ".join(unit.split()) not in _UNITS:
            raise ValueError(
                f"{text!r} is not a duration like '3 working days', '48 hours' or '1 year'"
            )
        return cls(int(number), _UNITS[" ".join(unit.split())])

    def after(
        self, moment: datetime, holidays: Collection[date] = (), workdays: Collection[date] = ()
    ) -> datetime:
        """The moment this long after ``moment`` (an aware datetime, in its own time zone)."""
        if self.unit == "minutes":
            return moment + timedelta(minutes=self.n)
        if self.unit == "hours":
            return moment + timedelta(hours=self.n)
        if self.unit == "days":
            return moment + timedelta(days=self.n)
        if self.unit == "working days":
            day = working_days_after(moment.date(), self.n, holidays, workdays)
            return datetime.combine(day, moment.timetz())
        return datetime.combine(years_after(moment.date(), self.n), moment.timetz())

    def on(
        self, day: date, holidays: Collection[date] = (), workdays: Collection[date] = ()
    ) -> date:
        """The date this long after ``day`` (hours and minutes counted from its start)."""
        start = datetime.combine(day, time(), CST)
        return self.after(start, holidays, workdays).date()

    def __str__(self) -> str:
        return f"{self.n} {self.unit}"


@dataclass(frozen=True, slots=True)
class IssuerProfile:
    """One issuer's rules over a card's life; the rule ids are docs/rules.md's.

    ``loss_balance_moves_after`` / ``exchange_balance_moves_after``: when the old card's transit
    balance moves to its replacement, counted from the formal loss report / the exchange; None
    means it never moves.
    """

    name: str
    title: str
    transit_reportable: bool  # R5/R6: False — a lost card still rides
    phone_report_lasts: Duration  # R7
    social_security_blocked_after: Duration  # R7: from a report to the block
    wallet_usable_after_unfreeze: Duration  # R6
    loss_balance_moves_after: Duration | None  # R6
    exchange_balance_moves_after: Duration | None  # R6
    refund_before_replacement: bool  # R6
    transit_reopens_after_loss: Duration  # R6: on the card that replaced a lost one
    initial_pin: str  # R8
    pin_tries_per_day: int  # R8
    validity_years: int  # R9
    renew_within_months: int  # R9
    fee_first_card_fen: int  # R13
    fee_replacement_fen: int  # R13
    holidays: frozenset[date] = field(default=frozenset())
    workdays: frozenset[date] = field(default=frozenset())

    def after(self, duration: Duration, moment: datetime) -> datetime:
        """``duration`` after ``moment`` on this issuer's calendar."""
        return duration.after(moment, self.holidays, self.workdays)

    def on(self, duration: Duration, day: date) -> date:
        """``duration`` after ``day`` on this issuer's calendar."""
        return duration.on(day, self.holidays, self.workdays)

    def working_days_after(self, day: date, n: int) -> date:
        """The ``n``-th working day after ``day`` on this issuer's calendar."""
        return working_days_after(day, n, self.holidays, self.workdays)


_KINDS: dict[str, str] = {
    "title": "str",
    "transit_reportable": "bool",
    "phone_report_lasts": "duration",
    "social_security_blocked_after": "duration",
    "wallet_usable_after_unfreeze": "duration",
    "loss_balance_moves_after": "duration?",
    "exchange_balance_moves_after": "duration?",
    "refund_before_replacement": "bool",
    "transit_reopens_after_loss": "duration",
    "initial_pin": "pin",
    "pin_tries_per_day": "count",
    "validity_years": "count",
    "renew_within_months": "count",
    "fee_first_card_fen": "fen",
    "fee_replacement_fen": "fen",
    "holidays": "dates?",
    "workdays": "dates?",
}
_TOP_KEYS = ("default_holidays", "default_workdays", "profiles")


def _value(where: str, kind: str, raw: Any) -> Any:
    """A profile key's value checked against its kind; ProfileError naming ``where``."""
    base = kind.rstrip("?")
    ok: bool
    if base == "str":
        ok = isinstance(raw, str) and raw.strip() != ""
    elif base == "bool":
        ok = isinstance(raw, bool)
    elif base == "duration":
        if isinstance(raw, str):
            try:
                return Duration.parse(raw)
            except ValueError as exc:
                raise ProfileError(f"{where}: {exc}") from None
        ok = False
    elif base == "pin":
        ok = isinstance(raw, str) and len(raw) == 6 and raw.isdigit()
    elif base in ("count", "fen"):
        ok = isinstance(raw, int) and not isinstance(raw, bool) and raw >= (base == "count")
    else:
        return _dates(where, raw)
    if not ok:
        wanted = {
            "str": "a non-empty string",
            "bool": "true or false",
            "pin": "6 digits in a string",
            "count": "a whole number of at least 1",
            "fen": "a whole number of fen, 0 or more",
        }[base]
        raise ProfileError(f"{where}: must be {wanted}, not {raw!r}")
    return raw


def _dates(where: str, raw: Any) -> frozenset[date]:
    if not isinstance(raw, list) or not all(
        isinstance(d, date) and not isinstance(d, datetime) for d in raw
    ):
        raise ProfileError(f"{where}: must be a list of dates (2026-10-01, …), not {raw!r}")
    return frozenset(raw)


def _profiles_of(
    source: str,
    doc: Mapping[str, Any],
    holidays: frozenset[date],
    workdays: frozenset[date],
) -> dict[str, IssuerProfile]:
    for key in doc:
        if key not in _TOP_KEYS:
            raise ProfileError(f"{source}: unknown key {key!r} (known: {', '.join(_TOP_KEYS)})")
    if "default_holidays" in doc:
        holidays = _dates(f"{source}: default_holidays", doc["default_holidays"])
    if "default_workdays" in doc:
        workdays = _dates(f"{source}: default_workdays", doc["default_workdays"])
    table = doc.get("profiles", {})
    if not isinstance(table, dict):
        raise ProfileError(f"{source}: profiles must be a table of [profiles.NAME] tables")
    out: dict[str, IssuerProfile] = {}
    for name, entry in table.items():
        where = f"{source}: profiles.{name}"
        if not isinstance(entry, dict):
            raise ProfileError(f"{where}: must be a table")
        for key in entry:
            if key not in _KINDS:
                raise ProfileError(f"{where}: unknown key {key!r}")
        values: dict[str, Any] = {}
        for key, kind in _KINDS.items():
            if key not in entry:
                if kind.endswith("?"):
                    continue
                raise ProfileError(f"{where}: missing key {key!r}")
            values[key] = _value(f"{where}.{key}", kind, entry[key])
        values.setdefault("loss_balance_moves_after", None)
        values.setdefault("exchange_balance_moves_after", None)
        values.setdefault("holidays", holidays)
        values.setdefault("workdays", workdays)
        out[name] = IssuerProfile(name=name, **values)
    return out


def _read(source: str, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not TOML: {exc}") from None


def load_profiles(path: Path | None = None) -> dict[str, IssuerProfile]:
    """The issuer profiles by name: farelab's shipped ones, and with ``path`` a user's TOML file
    of the same shape on top (its profiles replace shipped ones of the same name whole, new names
    are added; its ``default_holidays`` / ``default_workdays`` apply to its own profiles).

    Every unknown, missing or ill-typed key is refused with :class:`ProfileError` naming it.
    """
    shipped_text = resources.files("farelab.backend").joinpath("profiles.toml").read_text("utf-8")
    shipped = _read("profiles.toml (shipped)", shipped_text)
    profiles = _profiles_of("profiles.toml (shipped)", shipped, frozenset(), frozenset())
    if path is None:
        return profiles
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot be read: {exc.strerror}") from None
    default_holidays = _dates("shipped default_holidays", shipped.get("default_holidays", []))
    default_workdays = _dates("shipped default_workdays", shipped.get("default_workdays", []))
    return profiles | _profiles_of(
        str(path), _read(str(path), text), default_holidays, default_workdays
    )

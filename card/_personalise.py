"""Issuing a card: the personalisation an issuer's bureau does, producing a card image."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

from farelab.card._crypto import Alg
from farelab.card._files import CardType, PublicInfo, full_serial, holder_file, management_file
from farelab.card._image import CardImage, SocialSecurity
from farelab.card._keys import DEMO_ISSUER_ID, DEMO_KEYS, IssuerKeys, card_keys

__all__ = ["VALIDITY_YEARS", "personalise"]

VALIDITY_YEARS = 10
"""R9: a card is valid for 10 years."""


def _add_years(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def personalise(
    *,
    serial: str,
    issued: date,
    alg: Alg = Alg.TDES,
    card_type: CardType = CardType.ADULT,
    balance: int = 0,
    expires: date | None = None,
    issuer_id: bytes = DEMO_ISSUER_ID,
    keys: IssuerKeys = DEMO_KEYS,
    initial_pin: str = "888888",
    pin_try_limit: int = 5,
    transit: bool = True,
) -> CardImage:
    """A freshly issued card image.

    Args:
        serial: the card number, up to 20 digits (left-padded with zeros).
        issued: start date of validity; ``expires`` defaults to 10 years later (R9).
        alg: purse algorithm, 3DES (``00``) or SM4 (``04``).
        card_type: EF15 issuer data / EF17 card type.
        balance: initial transit balance in fen, at most 100000 (R4).
        issuer_id: 8-byte issuer id (EF15 bytes 0–7); keys are diversified from it.
        keys: the issuer's master keys; the card receives only its diversified keys.
        initial_pin: the social-security PIN at issue (Nanjing 888888, Haining 123456).
        pin_try_limit: wrong PIN entries in one day that lock it (Nanjing 5, Haining 6).
        transit: False issues a card with only the bank and social-security applications
            (no transit application: SELECT of its AID is ``6A82``).
    """
    if not serial.isdigit() or len(serial) > 20:
        raise ValueError(f"card serial must be 1 to 20 digits, got {serial!r}")
    if not 0 <= balance <= 100_000:
        raise ValueError(f"initial balance must be 0..100000 fen (1000 yuan), got {balance}")
    if len(issuer_id) != 8:
        raise ValueError(f"issuer id must be 8 bytes, got {len(issuer_id)}")
    if len(initial_pin) != 6 or not initial_pin.isdigit():
        raise ValueError("the initial PIN must be 6 digits")
    expiry = expires if expires is not None else _add_years(issued, VALIDITY_YEARS)
    if expiry < issued:
        raise ValueError(f"expiry {expiry} is before the start date {issued}")
    public = PublicInfo(issuer_id, full_serial(serial), issued, expiry, card_type)
    holder = ("SERIAL" + public.serial).encode("ascii").ljust(64, b"\x00")
    return CardImage(
        alg=alg,
        ef15=public.encode(),
        ef16=holder_file(card_type),
        ef17=management_file(public.city_code, card_type),
        keys=card_keys(keys, alg, issuer_id, public.serial8),
        balance=balance,
        social=replace(
            SocialSecurity(),
            holder=holder,
            pin=initial_pin,
            initial_pin=initial_pin,
            try_limit=pin_try_limit,
        ),
        transit=transit,
    )

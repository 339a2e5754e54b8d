"""The validator's PSAM: terminal id, TTC and the purchase master keys, never the load key.

A real PSAM is itself a smart card; this one is a small synchronous object the terminal flows
call.  It diversifies each card's purchase key, issues MAC1 (consuming one terminal transaction
counter, the TTC) and checks the card's MAC2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from farelab.card._crypto import Alg, mac, session_key
from farelab.card._files import CST, bcd_date, bcd_time
from farelab.card._keys import IssuerKeys, diversify_card_key

__all__ = ["Psam", "PsamError", "PsamKeys", "PurchaseTicket"]


class PsamError(Exception):
    """The PSAM cannot serve this card: unknown issuer, or its TTC is exhausted."""


@dataclass(frozen=True, slots=True)
class PsamKeys:
    """The master keys a PSAM holds for one issuer: purchase and maintenance only."""

    purchase: bytes
    maintenance: bytes

    @classmethod
    def of(cls, keys: IssuerKeys) -> PsamKeys:
        """The PSAM's share of an issuer's keys (the load and TAC masters stay elsewhere)."""
        return cls(purchase=keys.purchase, maintenance=keys.maintenance)


@dataclass(frozen=True, slots=True)
class PurchaseTicket:
    """MAC1 and everything the PSAM needs again to check MAC2."""

    ttc: int
    day: bytes
    time: bytes
    mac1: bytes
    session_key: bytes
    alg: Alg
    amount: int

    @property
    def debit_data(self) -> bytes:
        """The 15 data bytes of DEBIT FOR PURCHASE: TTC, date, time, MAC1."""
        return self.ttc.to_bytes(4, "big") + self.day + self.time + self.mac1


class Psam:
    """A terminal's secure access module."""

    def __init__(
        self, *, terminal_id: bytes, issuers: Mapping[bytes, PsamKeys], ttc: int = 1
    ) -> None:
        """
        Args:
            terminal_id: the 6-byte terminal id written into every transaction.
            issuers: purchase/maintenance master keys by 8-byte issuer id.
            ttc: the next terminal transaction counter to use (persisted by the device).
        """
        if len(terminal_id) != 6:
            raise ValueError(f"terminal id must be 6 bytes, got {len(terminal_id)}")
        if not 0 <= ttc <= 0xFFFFFFFF:
            raise ValueError(f"TTC must fit 4 bytes, got {ttc}")
        self.terminal_id = terminal_id
        self._issuers = dict(issuers)
        self._ttc = ttc

    @property
    def ttc(self) -> int:
        """The next TTC this PSAM will use."""
        return self._ttc

    def knows(self, issuer_id: bytes) -> bool:
        """True if this PSAM holds keys for the issuer."""
        return issuer_id in self._issuers

    def _keys(self, issuer_id: bytes) -> PsamKeys:
        try:
            return self._issuers[issuer_id]
        except KeyError:
            raise PsamError(f"no purchase key for issuer {issuer_id.hex().upper()}") from None

    def purchase(
        self,
        *,
        alg: Alg,
        issuer_id: bytes,
        serial8: bytes,
        random: bytes,
        counter: int,
        amount: int,
        tx_type: int,
        when: datetime,
    ) -> PurchaseTicket:
        """MAC1 for a DEBIT FOR PURCHASE; consumes one TTC."""
        if self._ttc > 0xFFFFFFFF:
            raise PsamError("the PSAM's TTC is exhausted")
        dpk = diversify_card_key(alg, self._keys(issuer_id).purchase, issuer_id, serial8)
        ttc = self._ttc.to_bytes(4, "big")
        sespk = session_key(alg, dpk, random + counter.to_bytes(2, "big") + ttc[2:4])
        day, time = bcd_date(when.astimezone(CST).date()), bcd_time(when)
        body = amount.to_bytes(4, "big") + bytes((tx_type,)) + self.terminal_id + day + time
        ticket = PurchaseTicket(self._ttc, day, time, mac(alg, sespk, body), sespk, alg, amount)
        self._ttc += 1
        return ticket

    def check_mac2(self, ticket: PurchaseTicket, mac2: bytes) -> bool:
        """True if the card's MAC2 proves it debited ``ticket.amount``."""
        return mac(ticket.alg, ticket.session_key, ticket.amount.to_bytes(4, "big")) == mac2

    def maintenance_mac(
        self, *, alg: Alg, issuer_id: bytes, serial8: bytes, challenge: bytes, message: bytes
    ) -> bytes:
        """MAC for APPLICATION BLOCK/UNBLOCK (see :func:`card.maintenance_mac`)."""
        damk = diversify_card_key(alg, self._keys(issuer_id).maintenance, issuer_id, serial8)
        return mac(alg, session_key(alg, damk, challenge.ljust(8, b"\x00")), message)

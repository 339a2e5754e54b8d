"""The host end of the card protocol: load authorization and TAC verification.

The load master key exists only here (docs/card-protocol.md B4): a kiosk forwards the card's
INITIALIZE FOR LOAD answer, the host checks MAC1 and the 1000-yuan cap (R4) and answers with MAC2.
The backend uses :class:`TacVerifier` to check every uploaded transaction.  Both are pure.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from farelab.card._crypto import Alg, Diversifier, MacKey, diversify, mac, session_key, tac_key
from farelab.card._files import CST, TxType, bcd_date, bcd_time
from farelab.card._image import MAX_BALANCE_FEN
from farelab.card._keys import IssuerKeys, diversify_card_key
from farelab.card._terminal import LoadRequest

__all__ = ["LoadAuthority", "LoadAuthorization", "LoadRefusal", "TacVerifier"]


@dataclass(frozen=True, slots=True)
class LoadAuthorization:
    """The host says yes: MAC2 for CREDIT FOR LOAD, over the date and time it chose."""

    mac2: bytes
    day: bytes
    time: bytes


@dataclass(frozen=True, slots=True)
class LoadRefusal:
    """The host says no: ``reason`` is ``unknown_issuer``, ``bad_mac1``, ``bad_amount`` or
    ``cap_exceeded``."""

    reason: str
    detail: str


class LoadAuthority:
    """Authorizes loads for the issuers whose load master keys it holds."""

    def __init__(self, *, issuers: Mapping[bytes, IssuerKeys], cap: int = MAX_BALANCE_FEN) -> None:
        """``issuers``: master keys by 8-byte issuer id; ``cap``: the balance ceiling in fen."""
        self._issuers = dict(issuers)
        self._cap = cap

    def _seslk(self, req: LoadRequest) -> bytes | None:
        keys = self._issuers.get(req.issuer_id)
        if keys is None:
            return None
        dlk = diversify_card_key(req.alg, keys.load, req.issuer_id, req.serial8)
        return session_key(req.alg, dlk, req.random + req.counter.to_bytes(2, "big") + b"\x80\x00")

    def authorize(self, req: LoadRequest, *, when: datetime) -> LoadAuthorization | LoadRefusal:
        """Check MAC1, the amount and the cap; MAC2 over the load at ``when``."""
        seslk = self._seslk(req)
        if seslk is None:
            return LoadRefusal("unknown_issuer", f"no load key for issuer {req.issuer_id.hex()}")
        amount = req.amount.to_bytes(4, "big")
        mac1 = mac(req.alg, seslk, req.balance.to_bytes(4, "big") + amount + b"\x02" + req.terminal)
        if mac1 != req.mac1:
            return LoadRefusal("bad_mac1", "MAC1 does not verify: not a genuine card answer")
        if req.amount <= 0:
            return LoadRefusal("bad_amount", "a load must be positive")
        if req.balance + req.amount > self._cap:
            room = max(self._cap - req.balance, 0)
            return LoadRefusal(
                "cap_exceeded",
                f"balance {req.balance} + {req.amount} fen passes {self._cap}; "
                f"at most {room} fen may be added",
            )
        day, time = bcd_date(when.astimezone(CST).date()), bcd_time(when)
        mac2 = mac(req.alg, seslk, amount + b"\x02" + req.terminal + day + time)
        return LoadAuthorization(mac2, day, time)


class TacVerifier:
    """Checks TACs with the issuers' TAC master keys.

    The per-card MAC keys are derived on first use and kept in a least-recently-used cache of
    at most ``cache_size`` cards: a backend sees each card many times a day, but a city has
    millions of cards, and each cached key holds a set-up cipher (about 1.3 KB).
    """

    DEFAULT_CACHE_SIZE = 100_000

    def __init__(
        self, *, issuers: Mapping[bytes, bytes], cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        """``issuers``: TAC master key (16 bytes) by 8-byte issuer id; ``cache_size``: how
        many cards' MAC keys to keep (0 keeps none)."""
        if cache_size < 0:
            raise ValueError(f"cache_size must be 0 or more, not {cache_size}")
        self._issuers = dict(issuers)
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[Alg, bytes, bytes], MacKey] = OrderedDict()
        # The first diversification level depends on the issuer only: set up once.
        self._issuer_keys: dict[tuple[Alg, bytes], Diversifier] = {}

    @classmethod
    def of(
        cls, issuers: Mapping[bytes, IssuerKeys], *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> TacVerifier:
        """From full issuer key sets (only the TAC masters are kept)."""
        return cls(issuers={iid: keys.tac for iid, keys in issuers.items()}, cache_size=cache_size)

    @property
    def cached(self) -> int:
        """How many cards' MAC keys the cache holds now."""
        return len(self._cache)

    def _key(self, alg: Alg, issuer_id: bytes, serial8: bytes) -> MacKey | None:
        cache_key = (alg, issuer_id, serial8)
        cached = self._cache.get(cache_key)
        if cached is not None:
            self._cache.move_to_end(cache_key)
            return cached
        issuer_key = self._issuer_keys.get((alg, issuer_id))
        if issuer_key is None:
            master = self._issuers.get(issuer_id)
            if master is None:
                return None
            issuer_key = Diversifier(alg, diversify(alg, master, issuer_id))
            self._issuer_keys[(alg, issuer_id)] = issuer_key
        key = MacKey(alg, tac_key(alg, issuer_key.diversify(serial8)))
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.popitem(last=False)
            self._cache[cache_key] = key
        return key

    def purchase_tac(
        self,
        *,
        alg: Alg,
        issuer_id: bytes,
        serial8: bytes,
        amount: int,
        tx_type: int,
        terminal: bytes,
        ttc: int,
        day: bytes,
        time: bytes,
    ) -> bytes | None:
        """The TAC a genuine card computes for a purchase; None for an unknown issuer."""
        key = self._key(alg, issuer_id, serial8)
        if key is None:
            return None
        return key.compute(_purchase_body(amount, tx_type, terminal, ttc, day, time))

    def tac(
        self,
        *,
        alg: Alg,
        issuer_id: bytes,
        serial8: bytes,
        tx_type: int,
        amount: int,
        terminal: bytes,
        day: bytes,
        time: bytes,
        ttc: int,
        counter: int,
        balance_after: int,
    ) -> bytes | None:
        """The TAC a genuine card computes for a transaction of ``tx_type``: a load's (over
        ``balance_after`` and the card's online ``counter``) or a purchase's (over the terminal's
        ``ttc``); None for an unknown issuer."""
        if tx_type == TxType.LOAD:
            return self.load_tac(
                alg=alg,
                issuer_id=issuer_id,
                serial8=serial8,
                balance_after=balance_after,
                counter=counter,
                amount=amount,
                terminal=terminal,
                day=day,
                time=time,
            )
        return self.purchase_tac(
            alg=alg,
            issuer_id=issuer_id,
            serial8=serial8,
            amount=amount,
            tx_type=tx_type,
            terminal=terminal,
            ttc=ttc,
            day=day,
            time=time,
        )

    def purchase_tacs(
        self, purchases: Iterable[tuple[Alg, bytes, bytes, int, int, bytes, int, bytes, bytes]]
    ) -> list[bytes | None]:
        """The TACs of many purchases, each given as (alg, issuer id, serial8, amount,
        transaction type, terminal, TTC, day, time): for each, what :meth:`purchase_tac` gives.

        One call for a backend's whole batch: no keyword call per TAC, and the cache looked up
        in place (verifying a batch's TACs took about 7 µs a record instead of 8)."""
        out: list[bytes | None] = []
        append = out.append
        cache, key_of, cache_size = self._cache, self._key, self._cache_size
        for alg, issuer_id, serial8, amount, tx_type, terminal, ttc, day, time in purchases:
            cache_key = (alg, issuer_id, serial8)
            key = cache.get(cache_key)
            if key is None:
                key = key_of(alg, issuer_id, serial8)
                if key is None:
                    append(None)
                    continue
            elif cache_size:
                cache.move_to_end(cache_key)
            append(key.compute(_purchase_body(amount, tx_type, terminal, ttc, day, time)))
        return out

    def load_tac(
        self,
        *,
        alg: Alg,
        issuer_id: bytes,
        serial8: bytes,
        balance_after: int,
        counter: int,
        amount: int,
        terminal: bytes,
        day: bytes,
        time: bytes,
    ) -> bytes | None:
        """The TAC a genuine card computes for a load (``counter``: INITIALIZE's)."""
        key = self._key(alg, issuer_id, serial8)
        if key is None:
            return None
        body = (
            balance_after.to_bytes(4, "big")
            + counter.to_bytes(2, "big")
            + amount.to_bytes(4, "big")
            + bytes((TxType.LOAD,))
            + terminal
            + day
            + time
        )
        return key.compute(body)


def _purchase_body(  # noqa: PLR0917 - the TAC's fields in the card's order
    amount: int, tx_type: int, terminal: bytes, ttc: int, day: bytes, time: bytes
) -> bytes:
    """What a purchase's TAC is computed over: amount, transaction type, terminal, TTC, day and
    time, as the card puts them together."""
    return (
        amount.to_bytes(4, "big")
        + bytes((tx_type,))
        + terminal
        + ttc.to_bytes(4, "big")
        + day
        + time
    )

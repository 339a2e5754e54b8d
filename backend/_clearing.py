"""Clearing and settlement between operators and issuers, with numpy.

Every counted transaction is a flow of money between two parties: a ride (purchase) is owed by
the card's issuer — who holds the rider's prepaid float — to the operator who carried the rider;
a top-up (load) is owed by the operator whose kiosk took the cash to the card's issuer.  The
flows are summed per day into a payer × payee matrix (one ``bincount``), bilateral amounts are
netted (``F − Fᵀ``), and each party's net position is what it receives less what it pays.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from farelab.backend._store import Store
from farelab.card import CST

__all__ = ["Clearing", "clear", "clear_ledger"]

DAY_MS = 86_400_000
_CST_OFFSET_MS = 8 * 3_600_000
CHUNK = 1 << 14  # transactions summed at a time: the buffers stay in the CPU cache


@dataclass(frozen=True)
class Clearing:
    """The result: parties, days, the flow matrix and the net positions."""

    parties: list[str]
    days: list[str]
    flows: npt.NDArray[np.int64]  # [day, payer, payee], fen
    transactions: int

    @property
    def bilateral(self) -> npt.NDArray[np.int64]:
        """Netted bilateral amounts over all days: [i, j] > 0 means i pays j."""
        total = self.flows.sum(axis=0)
        net: npt.NDArray[np.int64] = np.maximum(total - total.T, 0)
        return net

    @property
    def positions(self) -> npt.NDArray[np.int64]:
        """Net position per day and party: receivable − payable, fen. Each day sums to 0."""
        net: npt.NDArray[np.int64] = self.flows.sum(axis=1) - self.flows.sum(axis=2)
        return net

    def settlements(self) -> list[dict[str, Any]]:
        """The payments that settle all days: payer, payee, amount."""
        out = []
        net = self.bilateral
        for i, j in zip(*np.nonzero(net), strict=True):
            out.append(
                {"payer": self.parties[i], "payee": self.parties[j], "amount_fen": int(net[i, j])}
            )
        return sorted(out, key=lambda r: (-r["amount_fen"], r["payer"], r["payee"]))

    def to_json(self) -> dict[str, Any]:
        """Everything, JSON-able."""
        positions = self.positions
        return {
            "transactions": self.transactions,
            "days": self.days,
            "parties": self.parties,
            "positions": {
                day: {p: int(positions[d, k]) for k, p in enumerate(self.parties)}
                for d, day in enumerate(self.days)
            },
            "net_positions": {
                p: int(v) for p, v in zip(self.parties, positions.sum(axis=0), strict=True)
            },
            "settlements": self.settlements(),
        }

    def to_csv(self) -> str:
        """One row per day and party: day, party, receivable, payable, net (fen)."""
        lines = ["day,party,receivable_fen,payable_fen,net_fen"]
        receivable = self.flows.sum(axis=1)
        payable = self.flows.sum(axis=2)
        for d, day in enumerate(self.days):
            for k, party in enumerate(self.parties):
                r, p = int(receivable[d, k]), int(payable[d, k])
                if r or p:
                    lines.append(f"{day},{party},{r},{p},{r - p}")
        return "\n".join(lines) + "\n"


def clear(
    *,
    issuers: npt.NDArray[np.int64],
    operators: npt.NDArray[np.int64],
    days: npt.NDArray[np.int64],
    loads: npt.NDArray[np.bool_],
    amounts: npt.NDArray[np.int64],
    issuer_names: list[str],
    operator_names: list[str],
    day_names: list[str],
) -> Clearing:
    """Clear coded transactions: ``issuers``/``operators``/``days`` index the name lists.

    The flows are summed a chunk at a time (:data:`CHUNK` transactions) into one small
    day × payer × payee table: the index arithmetic then stays in the CPU's cache, and ten
    million transactions cost a few small buffers instead of half a gigabyte of fresh
    temporaries (whose page faults took most of the time)."""
    n_issuers = len(issuer_names)
    parties = [f"issuer:{n}" for n in issuer_names] + [f"operator:{n}" for n in operator_names]
    p = len(parties)
    n_days = max(len(day_names), 1)
    size = n_days * p * p
    kind: type[np.signedinteger[Any]] = np.int32 if size < 2**31 else np.int64
    flows = np.zeros(size, dtype=np.int64)
    count = len(amounts)
    issuer_buf: npt.NDArray[Any] = np.empty(min(CHUNK, count), dtype=kind)
    party_buf: npt.NDArray[Any] = np.empty_like(issuer_buf)
    index_buf: npt.NDArray[Any] = np.empty_like(issuer_buf)
    for start in range(0, count, CHUNK):
        end = min(start + CHUNK, count)
        issuer, operator, index = (b[: end - start] for b in (issuer_buf, party_buf, index_buf))
        np.copyto(issuer, issuers[start:end], casting="unsafe")
        np.copyto(operator, operators[start:end], casting="unsafe")
        operator += n_issuers  # the operator's party number
        # a ride: the issuer pays the operator; a load: the operator pays the issuer
        np.multiply(issuer, p, out=index)
        index += operator
        load = np.asarray(loads[start:end], dtype=np.bool_)
        if load.any():
            index[load] = operator[load] * p + issuer[load]
        index += days[start:end].astype(kind) * (p * p)
        # float sums of one chunk's amounts are exact (far below 2**53 fen)
        summed = np.bincount(index, weights=amounts[start:end], minlength=size)
        flows += np.rint(summed).astype(np.int64)
    table = flows.reshape(n_days, p, p)
    return Clearing(parties, day_names, table[: len(day_names)], count)


def clear_ledger(store: Store, *, day: str | None = None) -> Clearing:
    """Clear what the ledger counts (optionally one CST day, YYYY-MM-DD)."""
    # A transfer moves an issuer's float from an old card to a new one: no money changes hands.
    query = (
        "SELECT issuer, operator, at_ms, tx_type, amount FROM transactions "
        "WHERE verdict = 'ok' AND kind <> 'transfer'"
    )
    args: tuple[Any, ...] = ()
    if day is not None:
        start = datetime.fromisoformat(day).replace(tzinfo=CST)
        start_ms = int(start.timestamp() * 1000)
        query += " AND at_ms >= ? AND at_ms < ?"
        args = (start_ms, start_ms + DAY_MS)
    rows = store.execute(query, args).fetchall()
    if not rows:
        return Clearing([], [], np.zeros((0, 0, 0), dtype=np.int64), 0)
    issuer_col, operator_col, at, tx_type, amount = (np.array(c) for c in zip(*rows, strict=True))
    issuer_names, issuers = np.unique(issuer_col.astype(str), return_inverse=True)
    operator_names, operators = np.unique(operator_col.astype(str), return_inverse=True)
    day_index = (at.astype(np.int64) + _CST_OFFSET_MS) // DAY_MS
    day_codes, days = np.unique(day_index, return_inverse=True)
    day_names = [datetime.fromtimestamp(int(d) * 86_400, UTC).date().isoformat() for d in day_codes]
    return clear(
        issuers=issuers.astype(np.int64),
        operators=operators.astype(np.int64),
        days=days.astype(np.int64),
        loads=tx_type.astype(np.int64) == 2,
        amounts=amount.astype(np.int64),
        issuer_names=[str(x) for x in issuer_names],
        operator_names=[str(x) or "unknown" for x in operator_names],
        day_names=day_names,
    )

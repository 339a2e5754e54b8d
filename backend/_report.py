"""``farelab backend report``: what the ledger holds, and what it found wrong."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from backend._store import Store

__all__ = ["report"]

PURCHASE_TYPES = (6, 9)


def _gaps(store: Store) -> tuple[int, list[dict[str, Any]]]:
    """Missing device sequence numbers (uploads never seen) and card counters (taps never
    seen), over what the ledger holds."""
    details: list[dict[str, Any]] = []
    total = 0
    for device, low, high, n in store.execute(
        "SELECT device, min(seq), max(seq), count(*) FROM transactions GROUP BY device"
    ).fetchall():
        missing = (high - low + 1) - n
        if low > 1:
            missing += low - 1
        if missing:
            details.append({"kind": "device_seq", "device": device, "missing": missing})
            total += missing
    for serial, tx_kind, low, high, n in store.execute(
        "SELECT card_serial, CASE WHEN tx_type = 2 THEN 'load' ELSE 'purchase' END, "
        "min(card_counter), max(card_counter), count(*) FROM transactions "
        "WHERE verdict IN ('ok', 'forged', 'clone') GROUP BY 1, 2"
    ).fetchall():
        missing = (high - low + 1) - n
        if missing > 0:
            details.append(
                {"kind": "card_counter", "card_serial": serial, "of": tx_kind, "missing": missing}
            )
            total += missing
    return total, details


def _balance_anomalies(store: Store) -> list[dict[str, Any]]:
    """Cards whose consecutive counted transactions do not chain: balance before the next one
    must be balance before this one, minus a purchase or plus a load."""
    rows = store.execute(
        "SELECT card_serial, at_ms, tx_type, amount, balance_before FROM transactions "
        "WHERE verdict = 'ok' ORDER BY card_serial, at_ms, tx_type"
    ).fetchall()
    out: list[dict[str, Any]] = []
    previous: tuple[str, int] | None = None
    for serial, _, tx_type, amount, before in rows:
        if previous is not None and previous[0] == serial and previous[1] != before:
            out.append(
                {"card_serial": serial, "expected_before": previous[1], "balance_before": before}
            )
        after = before + amount if tx_type == 2 else before - amount
        previous = (serial, after)
    return out


def report(store: Store) -> dict[str, Any]:
    """The report as a JSON-able dict."""
    (count, purchases, loads, transfers) = store.execute(
        "SELECT count(*), "
        "coalesce(sum(CASE WHEN tx_type IN (6, 9) THEN amount ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN tx_type = 2 AND kind <> 'transfer' THEN amount ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN kind = 'transfer' THEN amount ELSE 0 END), 0) "
        "FROM transactions WHERE verdict = 'ok'"
    ).fetchone()
    verdicts = dict(
        store.execute("SELECT verdict, count(*) FROM transactions GROUP BY verdict").fetchall()
    )
    duplicates = store.execute(
        "SELECT coalesce(max(value), 0) FROM counters WHERE name = 'duplicates'"
    ).fetchone()[0]
    quarantined = dict(
        store.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall()
    )
    clones = store.execute(
        "SELECT count(DISTINCT card_serial) FROM anomalies WHERE kind = 'clone'"
    ).fetchone()[0]
    gaps, gap_details = _gaps(store)
    by_operator: dict[str, dict[str, int]] = defaultdict(
        lambda: {"transactions": 0, "amount_fen": 0}
    )
    for operator, n, amount in store.execute(
        "SELECT operator, count(*), sum(amount) FROM transactions WHERE verdict = 'ok' "
        "GROUP BY operator"
    ).fetchall():
        by_operator[operator] = {"transactions": n, "amount_fen": int(amount)}
    by_issuer: dict[str, dict[str, int]] = {}
    for issuer, n, amount in store.execute(
        "SELECT issuer, count(*), sum(amount) FROM transactions WHERE verdict = 'ok' "
        "GROUP BY issuer"
    ).fetchall():
        by_issuer[issuer] = {"transactions": n, "amount_fen": int(amount)}
    anomalies = _balance_anomalies(store)
    return {
        "transactions": count,
        "purchase_fen": int(purchases),
        "load_fen": int(loads),
        "transfer_fen": int(transfers),
        "duplicates": int(duplicates),
        "forged": verdicts.get("forged", 0),
        "grey": verdicts.get("grey", 0),
        "void": verdicts.get("void", 0),
        "unknown_issuer": verdicts.get("unknown_issuer", 0),
        "gaps": gaps,
        "gap_details": gap_details[:100],
        "clones": clones,
        "hotlist": store.hotlist(),
        "quarantined": sum(quarantined.values()),
        "quarantine_reasons": quarantined,
        "balance_anomalies": len(anomalies),
        "balance_anomaly_details": anomalies[:100],
        "by_operator": dict(by_operator),
        "by_issuer": by_issuer,
    }

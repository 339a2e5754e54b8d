"""``farelab backend report``: what the ledger holds, and what it found wrong."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from farelab.backend._cards import cards_by_state
from farelab.backend._ingest import SEQ_JUMP
from farelab.backend._store import Store

__all__ = ["ANOMALY_KEYS", "report"]

#: The report's key for each kind of anomaly the ledger records at ingest.
ANOMALY_KEYS = {
    "journal_reset": "journal_resets",
    "conflicting_duplicate": "conflicting_duplicates",
    "replay": "replays",
    "field_mismatch": "field_mismatches",
    "wrong_device": "wrong_device",
    "wrong_kind": "wrong_kind",
    "bad_time": "bad_time",
    "time_mismatch": "time_mismatches",
    "balance_break": "balance_breaks",
    "seq_jump": "seq_jumps",
}

PURCHASE_TYPES = (6, 9)


# A journal's missing sequence numbers: the hole before each row, per device and journal epoch.
_SEQ_HOLES = (
    "WITH h AS (SELECT device, seq - coalesce(lag(seq) OVER (PARTITION BY device, epoch "
    "ORDER BY seq), 0) - 1 AS hole FROM transactions) "
    "SELECT device, coalesce(sum(CASE WHEN hole <= ? THEN hole ELSE 0 END), 0), "
    "coalesce(sum(CASE WHEN hole > ? THEN 1 ELSE 0 END), 0) "
    "FROM h WHERE hole > 0 GROUP BY device ORDER BY device"
)


def _gaps(store: Store) -> tuple[int, int, list[dict[str, Any]]]:
    """Missing device sequence numbers (uploads never seen, per device and journal epoch),
    implausible jumps (a hole wider than :data:`SEQ_JUMP` counts once as a jump, not as that
    many gaps) and missing card counters (taps never seen), over what the ledger holds."""
    details: list[dict[str, Any]] = []
    total = jumps = 0
    for device, holes, wide in store.execute(_SEQ_HOLES, (SEQ_JUMP, SEQ_JUMP)).fetchall():
        missing, jumped = int(holes), int(wide)
        if missing:
            details.append({"kind": "device_seq", "device": device, "missing": missing})
            total += missing
        if jumped:
            details.append({"kind": "device_seq_jump", "device": device, "jumps": jumped})
            jumps += jumped
    for serial, tx_kind, low, high, n in store.execute(
        "SELECT card_serial, CASE WHEN tx_type = 2 THEN 'load' ELSE 'purchase' END, "
        "min(card_counter), max(card_counter), count(*) FROM transactions "
        "WHERE verdict IN ('ok', 'clone') GROUP BY 1, 2"
    ).fetchall():
        missing = (high - low + 1) - n
        if missing > 0:
            details.append(
                {"kind": "card_counter", "card_serial": serial, "of": tx_kind, "missing": missing}
            )
            total += missing
    return total, jumps, details


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
    gaps, _, gap_details = _gaps(store)
    found = dict(store.execute("SELECT kind, count(*) FROM anomalies GROUP BY kind").fetchall())
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
        **{key: int(found.get(kind, 0)) for kind, key in ANOMALY_KEYS.items()},
        "anomalies": {str(kind): int(n) for kind, n in sorted(found.items())},
        "clones": clones,
        "hotlist": store.hotlist(),
        "quarantined": sum(quarantined.values()),
        "quarantine_reasons": quarantined,
        "balance_anomalies": len(anomalies),
        "balance_anomaly_details": anomalies[:100],
        "by_operator": dict(by_operator),
        "by_issuer": by_issuer,
        "cards_by_state": cards_by_state(store, datetime.now(UTC)),
    }

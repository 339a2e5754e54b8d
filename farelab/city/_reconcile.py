"""The reconciliation: at the end of a city, is every fen where it should be?

Pure: it takes what the shell read — the card images at start and end, every device's journal,
the ledger, the kiosk's loads and the clearing's totals — and says, with the card and the
transactions involved, every place where they disagree.  Three checks:

1. **Money, per card**: balance at start + loads − fares = balance at end, with the ledger's
   counted transactions of that card number (summed over the images that carry it: a cloned
   card's copy spends from the same account number).  A difference that the ledger's uncounted
   records of that card explain to the fen (a clone's replays, say) is reported as explained.
2. **One for one**: every transaction a device journalled as done is in the ledger once, under
   the same device and sequence number, with the same card and amount, and the ledger holds
   nothing a journal does not.  A transaction still *pending* in a journal (the card left after
   DEBIT and was never presented to that device again) is a difference.
3. **Clearing**: what clearing moved between parties equals the ledger's counted amounts, and
   the net positions sum to zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CardBalance", "JournalTx", "LedgerTx", "LoadRow", "Reconciliation", "reconcile"]

PURCHASES = (6, 9)
LOAD = 2


@dataclass(frozen=True, slots=True)
class CardBalance:
    """One card image: its file, its number, its balance when issued and at the end."""

    file: str
    serial: str
    start_fen: int
    end_fen: int


@dataclass(frozen=True, slots=True)
class JournalTx:
    """A transaction of a device's journal."""

    device: str
    seq: int
    status: str  # pending | completed | void
    card_serial: str
    amount_fen: int
    tx_type: int


@dataclass(frozen=True, slots=True)
class LedgerTx:
    """A row of the ledger's transactions."""

    device: str
    seq: int
    verdict: str
    status: str
    card_serial: str
    amount_fen: int
    tx_type: int
    kind: str

    def as_json(self) -> dict[str, Any]:
        """As a difference lists it."""
        return {
            "device": self.device,
            "seq": self.seq,
            "verdict": self.verdict,
            "card": self.card_serial,
            "amount_fen": self.amount_fen,
            "tx_type": self.tx_type,
        }


@dataclass(frozen=True, slots=True)
class LoadRow:
    """A load the host authorized: its id, card, amount and how it ended."""

    id: str
    card_serial: str
    amount_fen: int
    status: str  # authorized | confirmed | void | refused


@dataclass
class Reconciliation:
    """The verdict: ``reconciled`` only when ``differences`` is empty."""

    differences: list[dict[str, Any]] = field(default_factory=list)
    explained: dict[str, int] = field(default_factory=dict)
    cards: int = 0
    journalled: int = 0
    ledger: int = 0
    counted_fen: int = 0

    @property
    def reconciled(self) -> bool:
        """True when nothing disagrees."""
        return not self.differences

    def as_json(self) -> dict[str, Any]:
        """The summary's part."""
        return {
            "reconciled": self.reconciled,
            "differences": self.differences,
            "explained": self.explained,
            "cards": self.cards,
            "journalled": self.journalled,
            "ledger_rows": self.ledger,
            "counted_fen": self.counted_fen,
        }


def _money(out: Reconciliation, cards: Sequence[CardBalance], ledger: Sequence[LedgerTx]) -> None:
    by_card: dict[str, list[CardBalance]] = defaultdict(list)
    for c in cards:
        by_card[c.serial].append(c)
    rows: dict[str, list[LedgerTx]] = defaultdict(list)
    for t in ledger:
        rows[t.card_serial].append(t)
    for serial, images in sorted(by_card.items()):
        mine = rows.get(serial, [])
        counted = [t for t in mine if t.verdict == "ok" and t.kind != "transfer"]
        loads = sum(t.amount_fen for t in counted if t.tx_type == LOAD)
        fares = sum(t.amount_fen for t in counted if t.tx_type in PURCHASES)
        start = sum(c.start_fen for c in images)
        end = sum(c.end_fen for c in images)
        missing = start + loads - fares - end  # fen gone from the cards that no count explains
        if missing == 0:
            continue
        uncounted = [
            t
            for t in mine
            if t.verdict not in ("ok",) and t.status == "completed" and t.tx_type in PURCHASES
        ]
        if uncounted and sum(t.amount_fen for t in uncounted) == missing:
            for t in uncounted:
                out.explained[t.verdict] = out.explained.get(t.verdict, 0) + 1
            continue
        out.differences.append(
            {
                "kind": "card_balance",
                "card": serial,
                "files": [c.file for c in images],
                "detail": f"start {start} + loads {loads} - fares {fares} = "
                f"{start + loads - fares} fen, but the card holds {end}",
                "transactions": [t.as_json() for t in mine],
            }
        )


def _one_for_one(
    out: Reconciliation, journals: Sequence[JournalTx], ledger: Sequence[LedgerTx]
) -> None:
    devices = {j.device for j in journals}
    in_ledger: dict[tuple[str, int], list[LedgerTx]] = defaultdict(list)
    for t in ledger:
        if t.device in devices:
            in_ledger[(t.device, t.seq)].append(t)
    seen: set[tuple[str, int]] = set()
    for j in journals:
        key = (j.device, j.seq)
        seen.add(key)
        rows = in_ledger.get(key, [])
        where = {"device": j.device, "seq": j.seq, "card": j.card_serial}
        if j.status == "pending":
            out.differences.append(
                {
                    "kind": "grey_unresolved",
                    **where,
                    "detail": "journalled pending (the card left after DEBIT) and never "
                    "presented to this device again",
                }
            )
            continue
        if j.status == "void":
            continue  # never charged; the ledger may or may not have heard of it
        if not rows:
            out.differences.append(
                {"kind": "not_in_ledger", **where, "detail": f"{j.amount_fen} fen journalled"}
            )
        elif len(rows) > 1:
            out.differences.append(
                {
                    "kind": "ledger_twice",
                    **where,
                    "transactions": [t.as_json() for t in rows],
                    "detail": "the ledger holds it more than once",
                }
            )
        elif (rows[0].card_serial, rows[0].amount_fen) != (j.card_serial, j.amount_fen):
            out.differences.append(
                {
                    "kind": "ledger_differs",
                    **where,
                    "detail": f"journal {j.amount_fen} fen, ledger {rows[0].amount_fen} fen "
                    f"of card {rows[0].card_serial}",
                }
            )
    for key, rows in sorted(in_ledger.items()):
        if key not in seen:
            out.differences.append(
                {
                    "kind": "not_in_journal",
                    "device": key[0],
                    "seq": key[1],
                    "transactions": [t.as_json() for t in rows],
                    "detail": "the ledger holds a transaction no journal has",
                }
            )


def _loads(out: Reconciliation, loads: Sequence[LoadRow]) -> None:
    for load in loads:
        if load.status == "authorized":
            out.differences.append(
                {
                    "kind": "load_unsettled",
                    "card": load.card_serial,
                    "load": load.id,
                    "detail": f"{load.amount_fen} fen authorized, neither confirmed nor "
                    "voided (the card never came back to a kiosk)",
                }
            )


def reconcile(
    cards: Sequence[CardBalance],
    journals: Sequence[JournalTx],
    ledger: Sequence[LedgerTx],
    loads: Sequence[LoadRow] = (),
    *,
    clearing_fen: int | None = None,
    clearing_net: Iterable[int] = (),
    verdicts: Mapping[str, int] | None = None,
) -> Reconciliation:
    """Every disagreement between the cards, the journals, the ledger and the clearing.

    Args:
        cards: every card image, at start and end.
        journals: every validator journal's transactions.
        ledger: the ledger's transactions (validators' and kiosks').
        loads: the host's load authorizations.
        clearing_fen: the total clearing moved between parties (None: not checked).
        clearing_net: each party's net position.
        verdicts: the ledger's count of each verdict; ``forged`` must be 0 in a city that
            forges nothing.
    """
    out = Reconciliation(cards=len(cards), journalled=len(journals), ledger=len(ledger))
    _money(out, cards, ledger)
    _one_for_one(out, journals, ledger)
    _loads(out, loads)
    counted = sum(t.amount_fen for t in ledger if t.verdict == "ok" and t.kind != "transfer")
    out.counted_fen = counted
    if clearing_fen is not None and clearing_fen != counted:
        out.differences.append(
            {
                "kind": "clearing_total",
                "detail": f"clearing moved {clearing_fen} fen, the ledger counts {counted}",
            }
        )
    net = sum(clearing_net)
    if net != 0:
        out.differences.append(
            {"kind": "clearing_net", "detail": f"net positions sum to {net} fen, not 0"}
        )
    forged = (verdicts or {}).get("forged", 0)
    if forged:
        out.differences.append(
            {"kind": "forged", "detail": f"{forged} transactions with a forged TAC"}
        )
    return out

"""One top-up kiosk: present a card, see what it may take, load it — host-authorized, under the
1000-yuan cap at three layers, and safe against a pulled card or a killed kiosk.

Card I/O is synchronous and runs through ``run`` (the reader's own thread, or a direct call for
an in-process card); the host is awaited.  The order that makes tearing safe: the load is
journalled as *authorized* before CREDIT leaves, and on every presentation of a card its
unsettled loads are resolved first with GET TRANSACTION PROOF: found → confirmed with its TAC
(the rider was paid, the host is told), missing → void (the rider pays nothing).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from farelab.card import (
    SW,
    CardBusyError,
    CardRemovedError,
    CardSnapshot,
    ImageError,
    Load,
    LoadDone,
    NeedAuthorization,
    ProofFound,
    ProofMissing,
    Psam,
    Purchase,
    PurchaseDone,
    ReadCard,
    Reader,
    ReaderError,
    Refused,
    Step,
    TransactionProof,
    Transmit,
    TxType,
)
from farelab.card._faults import checkpoint
from farelab.protocol import authorize_message
from farelab.topup._host import Host, HostUnreachableError, new_request_id
from farelab.topup._journal import KioskJournal, PendingLoad
from farelab.topup._rules import AmountRules, check_amount, room

__all__ = ["KILL_POINTS", "CardView", "Kiosk", "LoadResult", "Run", "terminal_for"]

KILL_POINTS = (
    "kiosk_after_init",
    "kiosk_after_journal",
    "kiosk_after_authorize",
    "kiosk_after_credit",
    "kiosk_after_credited",
    "kiosk_after_confirm",
)
"""Crash-test points of a load (``FARELAB_KILL_AT``, see :mod:`card._faults`)."""

T = TypeVar("T")
Run = Callable[[Callable[[Reader], T]], Awaitable[T]]


def terminal_for(kiosk_id: str) -> bytes:
    """The 6-byte terminal id ``farelab topup`` gives the kiosk ``kiosk_id``."""
    return (0xF0000000 + sum(kiosk_id.encode()) % 0xFFFF).to_bytes(6, "big")


@dataclass(frozen=True, slots=True)
class CardView:
    """What the kiosk shows when a card is presented."""

    serial: str
    balance_fen: int
    room_fen: int
    settled: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The outcome, as ``farelab topup load --json`` prints it (plus a message)."""

    result: str
    reason: str | None
    amount_fen: int
    balance_fen: int | None
    tac: str | None
    message: str
    settled: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The contract keys."""
        return {
            "result": self.result,
            "reason": self.reason,
            "amount_fen": self.amount_fen,
            "balance_fen": self.balance_fen,
            "tac": self.tac,
        }


def _read(reader: Reader) -> tuple[CardSnapshot | Refused, int | None]:
    flow = ReadCard(records=[])
    event: object = flow.start()
    while isinstance(event, Transmit):
        event = flow.receive(reader.transmit(event.apdu))
    if not isinstance(event, CardSnapshot):
        return event if isinstance(event, Refused) else Refused(Step.READ, 0, "card_error"), None
    answer = reader.transmit(bytes.fromhex("805C000204"))
    if answer[-2:] != b"\x90\x00" or len(answer) != 6:
        return Refused(Step.READ, int.from_bytes(answer[-2:], "big"), "card_error"), None
    return event, int.from_bytes(answer[:4], "big")


def _refund_detail(snapshot: CardSnapshot, alg: str, psam: Psam, flow: Purchase) -> dict[str, Any]:
    flight, init = flow.in_flight, flow.init
    assert flight is not None
    assert init is not None
    return {
        "card_serial": snapshot.serial,
        "issuer": snapshot.issuer_id.hex().upper(),
        "alg": alg,
        "amount": flight.amount,
        "balance_before": flight.balance_before,
        "card_counter": init.counter,
        "ttc": flight.ttc,
        "terminal": psam.terminal_id.hex().upper(),
        "day": flight.day.hex(),
        "time": flight.time.hex(),
    }


class Kiosk:
    """A kiosk with its terminal id, host, journal and amount rules."""

    def __init__(
        self,
        *,
        kiosk_id: str,
        terminal_id: bytes,
        host: Host,
        journal: KioskJournal,
        rules: AmountRules | None = None,
    ) -> None:
        """``terminal_id``: the 6-byte id written into every load."""
        self.kiosk_id = kiosk_id
        self.terminal_id = terminal_id
        self.host = host
        self.journal = journal
        self.rules = rules or AmountRules()

    async def _settle(self, run: Run[Any], serial: str) -> list[str]:
        """Resolve this card's unsettled loads (torn earlier); raises HostUnreachableError."""
        notes: list[str] = []
        for unsettled in self.journal.unsettled(serial):
            pending = unsettled
            if pending.kind == "refund":
                notes.extend(await self._settle_refund(run, pending))
                continue
            if pending.status == "authorized":
                proof = TransactionProof(tx_type=TxType.LOAD, counter=pending.counter + 1)

                def ask(reader: Reader, proof: TransactionProof = proof) -> object:
                    return proof.receive(reader.transmit(proof.start().apdu))

                found = await run(ask)
                if isinstance(found, ProofFound):
                    self.journal.credited(pending.id, found.tac.hex().upper())
                    pending = PendingLoad(
                        pending.id,
                        serial,
                        pending.counter,
                        pending.amount,
                        "credited",
                        found.tac.hex().upper(),
                    )
                elif isinstance(found, ProofMissing):
                    await self.host.call({"id": pending.id, "op": "void"})
                    self.journal.void(pending.id)
                    notes.append(
                        f"an interrupted load of {pending.amount / 100:.2f} yuan never "
                        "reached the card: cancelled, nothing paid"
                    )
                    continue
                else:
                    raise CardRemovedError("the card did not answer GET TRANSACTION PROOF")
            answer = await self.host.call({"id": pending.id, "op": "confirm", "tac": pending.tac})
            if answer.get("result") == "confirmed":
                self.journal.confirmed(pending.id)
                notes.append(
                    f"an interrupted load of {pending.amount / 100:.2f} yuan had reached "
                    "the card: confirmed"
                )
        return notes

    async def present(self, run: Run[Any]) -> CardView | LoadResult:
        """Read the card, settle anything torn, and say what it may take."""
        try:
            snapshot, balance = await run(_read)
            if not isinstance(snapshot, CardSnapshot) or balance is None:
                return self._refused("card_error", 0, None, "the card cannot be read; try again")
            notes = await self._settle(run, snapshot.serial)
            if notes:
                _, balance = await run(_read)
                assert balance is not None
        except (CardRemovedError, ReaderError):
            return self._refused(
                "card_error", 0, None, "the card left the reader; present it again"
            )
        except ImageError as exc:
            return self._card_fault(exc, 0, None)
        except HostUnreachableError as exc:
            return self._refused("host_unreachable", 0, None, f"{exc}; no load is possible now")
        return CardView(snapshot.serial, balance, room(balance, self.rules), tuple(notes))

    def _refused(
        self,
        reason: str,
        amount: int,
        balance: int | None,
        message: str,
        settled: tuple[str, ...] = (),
    ) -> LoadResult:
        return LoadResult("refused", reason, amount, balance, None, message, settled)

    def _card_fault(self, exc: ImageError, amount: int, balance: int | None) -> LoadResult:
        """A simulated card that cannot be used — in another field (``card_busy``), its image
        unreadable or unwritable (``card_error``) — before anything reached it."""
        reason = "card_busy" if isinstance(exc, CardBusyError) else "card_error"
        return self._refused(reason, amount, balance, f"{exc}; nothing was done")

    async def load(
        self,
        run: Run[Any],
        amount: int | None,
        progress: Callable[[str], None] = lambda _: None,
        *,
        transfer: dict[str, Any] | None = None,
    ) -> LoadResult:
        """Present, check, authorize, credit, confirm.  ``transfer`` (old_serial, reason,
        reported, profile) makes it the host-authorized move of an old card's balance (R6)."""
        view = await self.present(run)
        if isinstance(view, LoadResult):
            return view
        problem = check_amount(amount, view.balance_fen, self.rules)
        if problem is not None or amount is None:
            reason, message = problem or ("bad_amount", "no amount")
            return self._refused(reason, amount or 0, view.balance_fen, message, view.settled)
        progress("asking the card")
        try:
            snapshot, _ = await run(_read)
            if not isinstance(snapshot, CardSnapshot):
                return self._refused(
                    "card_error", amount, view.balance_fen, "the card cannot be read"
                )
            flow = Load(terminal_id=self.terminal_id, card=snapshot, amount=amount)
            event = await run(lambda r: flow.receive(r.transmit(flow.start().apdu)))
        except (CardRemovedError, ReaderError):
            return self._refused(
                "card_error",
                amount,
                view.balance_fen,
                "the card left the reader; nothing was loaded",
            )
        except ImageError as exc:
            return self._card_fault(exc, amount, view.balance_fen)
        if not isinstance(event, NeedAuthorization):
            reason = "cap_exceeded" if event.sw == SW.CONDITIONS else "card_error"
            return self._refused(
                reason, amount, view.balance_fen, f"the card refused the load ({event.sw_hex})"
            )
        load_id = new_request_id()
        checkpoint("kiosk_after_init")
        # Journalled before the host is asked: a kiosk killed at any later instant leaves a
        # record that the next presentation settles (proved, then confirmed or voided).
        self.journal.authorized(load_id, snapshot.serial, event.request.counter, amount)
        checkpoint("kiosk_after_journal")
        progress("asking the host")
        try:
            request = authorize_message(load_id, event.request)
            if transfer is not None:
                request.update(transfer, op="transfer")
            answer = await self.host.call(request)
        except HostUnreachableError as exc:
            return self._refused(
                "host_unreachable", amount, view.balance_fen, f"{exc}; nothing was loaded"
            )
        checkpoint("kiosk_after_authorize")
        if answer.get("result") != "authorized":
            self.journal.void(load_id)
            return self._refused(
                str(answer.get("reason", "refused")),
                amount,
                view.balance_fen,
                str(answer.get("detail", "the host refused the load")),
            )
        progress("writing — keep the card still")
        credit = flow.authorize(
            mac2=bytes.fromhex(answer["mac2"]),
            day=bytes.fromhex(answer["day"]),
            time=bytes.fromhex(answer["time"]),
        )
        try:
            done = await run(lambda r: flow.receive(r.transmit(credit.apdu)))
        except (CardRemovedError, ReaderError):
            return self._refused(
                "card_error",
                amount,
                None,
                "the card left while writing: present "
                "it again to finish (nothing is lost or paid twice)",
            )
        except ImageError as exc:
            # The simulated card could not write its image: it did not commit the CREDIT.
            await self._void(load_id)
            return self._refused(
                "card_error", amount, view.balance_fen, f"{exc}; nothing was loaded"
            )
        if not isinstance(done, LoadDone):
            # The card answered, and said no: CREDIT did not happen.
            await self._void(load_id)
            return self._refused(
                "card_error",
                amount,
                view.balance_fen,
                f"the card refused the write ({done.sw_hex})",
            )
        checkpoint("kiosk_after_credit")
        tac = done.tac.hex().upper()
        self.journal.credited(load_id, tac)
        checkpoint("kiosk_after_credited")
        progress("confirming")
        try:
            confirmed = await self.host.call({"id": load_id, "op": "confirm", "tac": tac})
            checkpoint("kiosk_after_confirm")
            if confirmed.get("result") == "confirmed":
                self.journal.confirmed(load_id)
        except HostUnreachableError:
            pass  # the card has it; the next presentation or run confirms it with the host
        return LoadResult(
            "loaded",
            None,
            amount,
            done.balance_after,
            tac,
            f"loaded {amount / 100:.2f} yuan",
            view.settled,
        )

    async def transfer(
        self, run: Run[Any], *, old_serial: str, reason: str, reported: str, profile: str
    ) -> LoadResult:
        """Move a replaced card's balance onto this one, as the host computes it (R6); the host
        refuses a card that may not take it (the old card itself, a hotlisted or replaced card,
        one that already received a transfer)."""
        view = await self.present(run)
        if isinstance(view, LoadResult):
            return view
        details = {
            "old_serial": old_serial,
            "reason": reason,
            "reported": reported,
            "profile": profile,
        }
        try:
            quote = await self.host.call(
                {
                    "id": new_request_id(),
                    "op": "transfer_quote",
                    "card_serial": view.serial,
                    **details,
                }
            )
        except HostUnreachableError as exc:
            return self._refused("host_unreachable", 0, None, f"{exc}; nothing was moved")
        amount = int(quote.get("amount_fen", 0))
        if quote.get("result") != "quote" or amount <= 0:
            why = str(quote.get("reason") or "transfer_refused")
            when = quote.get("available_on")
            message = f"no balance can move now ({why})"
            if quote.get("detail"):
                message += f": {quote['detail']}"
            if when:
                message += f"; it can from {when}"
            return self._refused(why, 0, view.balance_fen, message)
        return await self.load(run, amount, transfer=details)

    async def refund(self, run: Run[Any], psam: Psam) -> LoadResult:
        """Empty the card with a purchase of its whole balance and have the host count it as a
        cash refund (Changzhou 退值 before a replacement); the card is then hotlisted."""
        view = await self.present(run)
        if isinstance(view, LoadResult):
            return view
        try:
            snapshot, balance = await run(_read)
        except (CardRemovedError, ReaderError):
            return self._refused(
                "card_error", 0, None, "the card left the reader; present it again"
            )
        except ImageError as exc:
            return self._card_fault(exc, 0, None)
        if not isinstance(snapshot, CardSnapshot) or balance is None:
            return self._refused("card_error", 0, None, "the card cannot be read; try again")
        # Asked before the card is emptied: a balance that moved to a replacement card is not
        # the rider's any more, and paying it out too would pay it twice.
        check_message = {
            "id": new_request_id(),
            "op": "refund_check",
            "card_serial": snapshot.serial,
            "terminal": self.terminal_id.hex().upper(),
        }
        try:
            check = await self.host.call(check_message)
        except HostUnreachableError as exc:
            return self._refused(
                "host_unreachable", 0, balance, f"{exc}; no refund is possible now"
            )
        if check.get("result") != "ok":
            why = str(check.get("reason") or "refund_refused")
            return self._refused(
                why,
                0,
                balance,
                f"no refund ({why}): {check.get('detail', '')}; the card is untouched",
            )
        flow = Purchase(psam=psam, card=snapshot, amount=balance, when=datetime.now(UTC))
        refund_id = new_request_id()

        def debit(reader: Reader) -> object:
            event: object = flow.start()
            while isinstance(event, Transmit):
                if event.step is Step.DEBIT and flow.in_flight is not None and flow.init:
                    # Journalled before the DEBIT leaves: a pulled card is settled next time.
                    detail = _refund_detail(snapshot, flow.init.alg.label, psam, flow)
                    self.journal.refund_intent(
                        refund_id, snapshot.serial, flow.init.counter, balance, json.dumps(detail)
                    )
                event = flow.receive(reader.transmit(event.apdu))
            return event

        try:
            done = await run(debit)
        except (CardRemovedError, ReaderError):
            return self._refused(
                "card_error",
                balance,
                None,
                "the card left the reader; present "
                "it again to finish (nothing is lost or paid twice)",
            )
        except ImageError as exc:
            # The simulated card could not write its image: it did not commit the DEBIT.
            self.journal.void(refund_id)
            return self._refused("card_error", balance, balance, f"{exc}; nothing was taken")
        if not isinstance(done, PurchaseDone):
            self.journal.void(refund_id)
            return self._refused("card_error", balance, balance, "the card refused the refund")
        tac = done.tac.hex().upper()
        self.journal.credited(refund_id, tac)
        answer = await self._finish_refund(refund_id, tac)
        if answer is None:
            return self._refused(
                "host_unreachable",
                balance,
                0,
                f"the card is emptied; the host will be told (TAC {tac})",
            )
        if answer.get("result") != "refunded":
            # No cash without the host's count: the card is emptied, and its value is either
            # the replacement card's already (refused) or waits for the host (an error).
            why = str(answer.get("reason") or answer.get("result"))
            return self._refused(
                why, balance, 0, f"no cash: the host did not count the refund ({why}; TAC {tac})"
            )
        return LoadResult(
            "refunded", None, balance, 0, tac, f"refunded {balance / 100:.2f} yuan in cash"
        )

    async def _finish_refund(self, refund_id: str, tac: str) -> dict[str, Any] | None:
        """Tell the host about a completed refund; its answer, None if it cannot be reached.
        The journal keeps the refund unsettled unless the host counted (or refused) it."""
        pending = [p for p in self.journal.unsettled() if p.id == refund_id]
        if not pending:
            return {"result": "refunded"}
        record = {**json.loads(pending[0].detail), "id": refund_id, "op": "refund", "tac": tac}
        try:
            answer = await self.host.call(record)
        except HostUnreachableError:
            return None
        if answer.get("result") == "refunded":
            self.journal.confirmed(refund_id)
        elif answer.get("result") == "refused":
            self.journal.refused(refund_id)
        return answer

    async def _settle_refund(self, run: Run[Any], pending: PendingLoad) -> list[str]:
        tac = pending.tac
        if pending.status == "authorized":
            proof = TransactionProof(tx_type=TxType.PURCHASE, counter=pending.counter + 1)

            def ask(reader: Reader) -> object:
                return proof.receive(reader.transmit(proof.start().apdu))

            found = await run(ask)
            if isinstance(found, ProofMissing):
                self.journal.void(pending.id)
                return ["an interrupted refund never reached the card: nothing was taken"]
            if not isinstance(found, ProofFound):
                raise CardRemovedError("the card did not answer GET TRANSACTION PROOF")
            tac = found.tac.hex().upper()
            self.journal.credited(pending.id, tac)
        answer = await self._finish_refund(pending.id, tac)
        if answer is None:
            raise HostUnreachableError("the host cannot be told of an interrupted refund")
        return [f"a refund of {pending.amount / 100:.2f} yuan: {answer.get('result')}"]

    async def _void(self, load_id: str) -> None:
        try:
            await self.host.call({"id": load_id, "op": "void"})
        except HostUnreachableError:
            return  # stays authorized: the next presentation proves and voids it
        self.journal.void(load_id)

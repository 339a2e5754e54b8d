"""One top-up kiosk: the shell that drives a :class:`LoadSession` over a reader, a host and the
kiosk journal (STYLE §1: the rules live in the session, the I/O here).

Card I/O is synchronous and runs through ``run`` (the reader's own thread, or a direct call for
an in-process card), one hop for each run of APDUs; the host is awaited; the journal is written
before the session goes on, so a load is journalled as *authorized* before the host is asked
(and so before its CREDIT), and a refund before its DEBIT.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from farelab.card import (
    CardBusyError,
    CardRemovedError,
    FlowError,
    ImageError,
    Psam,
    Reader,
    ReaderError,
    Step,
    Transmit,
    checkpoint,
)
from farelab.topup._host import Host, HostUnreachableError
from farelab.topup._journal import KioskJournal
from farelab.topup._rules import AmountRules
from farelab.topup._session import (
    Action,
    CardView,
    Event,
    HostCall,
    Intent,
    LoadResult,
    LoadSession,
    Present,
    Refund,
    StatusChange,
    TopUp,
    Transfer,
)

__all__ = ["KILL_POINTS", "CardView", "Kiosk", "LoadResult", "Run", "terminal_for"]

KILL_POINTS = (
    "kiosk_after_init",
    "kiosk_after_journal",
    "kiosk_after_authorize",
    "kiosk_after_credit",
    "kiosk_after_credited",
    "kiosk_after_confirm",
)
"""Crash-test points of a load (``FARELAB_KILL_AT``, see :func:`farelab.card.checkpoint`)."""

T = TypeVar("T")
Run = Callable[[Callable[[Reader], T]], Awaitable[T]]
"""How the kiosk reaches its reader: ``await run(fn)`` calls ``fn(reader)`` where the reader
lives (its own thread for PC/SC)."""

_AFTER_REPLY = {
    "authorize": "kiosk_after_authorize",
    "transfer": "kiosk_after_authorize",
    "confirm": "kiosk_after_confirm",
}
_PROGRESS = {
    "authorize": "asking the host",
    "transfer": "asking the host",
    "confirm": "confirming",
}


def terminal_for(kiosk_id: str) -> bytes:
    """The 6-byte terminal id ``farelab topup`` gives the kiosk ``kiosk_id``."""
    return (0xF0000000 + sum(kiosk_id.encode()) % 0xFFFF).to_bytes(6, "big")


def _exchange(session: LoadSession, event: Transmit, reader: Reader) -> Event:
    """Run the session's APDUs on ``reader`` until it wants something else (on the reader's
    thread: one hop for the whole run)."""
    try:
        following = session.receive(reader.transmit(event.apdu))
        while isinstance(following, Transmit):
            following = session.receive(reader.transmit(following.apdu))
    except CardRemovedError:
        return session.card_lost()
    except CardBusyError as exc:
        return session.card_unusable(str(exc), busy=True)
    except ImageError as exc:
        return session.card_unusable(str(exc))
    except ReaderError as exc:
        return session.card_failed(str(exc))
    return following


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
        """
        Args:
            kiosk_id: this kiosk's id (its host's name for it).
            terminal_id: the 6-byte id written into every load.
            host: where load messages go (the backend over MQTT, or an in-process host).
            journal: the kiosk's journal of loads and refunds.
            rules: the amounts this kiosk loads (default: any amount up to the cap).
        """
        self.kiosk_id = kiosk_id
        self.terminal_id = terminal_id
        self.host = host
        self.journal = journal
        self.rules = rules or AmountRules()

    async def present(self, run: Run[Any]) -> CardView | LoadResult:
        """Read the card, settle anything torn, and say what it may take."""
        return await self._drive(run, Present())

    async def load(
        self,
        run: Run[Any],
        amount: int | None,
        progress: Callable[[str], None] = lambda _: None,
    ) -> LoadResult:
        """Present, check, authorize, credit, confirm ``amount`` fen."""
        return self._result(await self._drive(run, TopUp(amount), progress))

    async def transfer(
        self, run: Run[Any], *, old_serial: str, reason: str, reported: str, profile: str
    ) -> LoadResult:
        """Move a replaced card's balance onto this one, as the host computes it (R6); the host
        refuses a card that may not take it (the old card itself, a hotlisted or replaced card,
        one that already received a transfer)."""
        action = Transfer(old_serial, reason, reported, profile)
        return self._result(await self._drive(run, action))

    async def refund(self, run: Run[Any], psam: Psam) -> LoadResult:
        """Empty the card with a purchase of its whole balance and have the host count it as a
        cash refund (Changzhou 退值 before a replacement); the card is then hotlisted."""
        return self._result(await self._drive(run, Refund(psam)))

    @staticmethod
    def _result(outcome: CardView | LoadResult) -> LoadResult:
        if isinstance(outcome, CardView):
            raise FlowError("only a presentation ends in a card view")
        return outcome

    async def _drive(
        self,
        run: Run[Any],
        action: Action,
        progress: Callable[[str], None] = lambda _: None,
    ) -> CardView | LoadResult:
        """Drive one session to its end."""
        session = LoadSession(
            terminal_id=self.terminal_id,
            action=action,
            now=datetime.now(UTC),
            rules=self.rules,
            pending=self.journal.unsettled(),
        )
        progress("asking the card")
        event: Event = session.start()
        while True:
            if isinstance(event, Transmit):
                if event.step is Step.CREDIT:
                    progress("writing — keep the card still")
                event = await run(partial(_exchange, session, event))
            elif isinstance(event, HostCall):
                event = await self._ask(session, event, progress)
            elif isinstance(event, Intent | StatusChange):
                self._write(event)
                event = session.proceed()
            else:
                return event

    async def _ask(
        self, session: LoadSession, call: HostCall, progress: Callable[[str], None]
    ) -> Event:
        op = call.op
        if op in _PROGRESS:
            progress(_PROGRESS[op])
        try:
            reply = await self.host.call(call.message)
        except HostUnreachableError as exc:
            return session.host_unreachable(str(exc))
        if op in _AFTER_REPLY:
            checkpoint(_AFTER_REPLY[op])
        return session.answer(reply)

    def _write(self, event: Intent | StatusChange) -> None:
        journal = self.journal
        if isinstance(event, Intent):
            checkpoint("kiosk_after_init")
            if event.kind == "refund":
                journal.refund_intent(
                    event.id, event.card_serial, event.counter, event.amount, event.detail
                )
            else:
                journal.authorized(event.id, event.card_serial, event.counter, event.amount)
            checkpoint("kiosk_after_journal")
            return
        if event.status == "credited":
            checkpoint("kiosk_after_credit")
            journal.credited(event.id, event.tac)
            checkpoint("kiosk_after_credited")
        elif event.status == "confirmed":
            journal.confirmed(event.id)
        elif event.status == "void":
            journal.void(event.id)
        else:
            journal.refused(event.id)

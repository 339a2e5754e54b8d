"""``farelab topup kiosk``: the interactive kiosk a person uses (rich, in a terminal).

Present card → balance and the most it may take → choose an amount → "keep the card still"
while writing → receipt (amount, balance, TAC, time).  With ``--reader sim`` the "card" is a card
image file whose path the person types; with ``--reader pcsc:NAME`` it is whatever card is in
that reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.panel import Panel
from rich.prompt import Prompt
from rich.table import Table

from farelab.card import (
    CST,
    ImageError,
    InProcessReader,
    Reader,
    ReaderError,
    SimulatedCard,
    TraceWriter,
    TracingReader,
    fen_to_yuan,
)
from farelab.topup import CardView, Kiosk, LoadResult, host_closed_after, parse_amount

__all__ = ["run_kiosk"]

T = TypeVar("T")
CHOICES = ("10", "20", "50", "100")
# Refusals after which another amount cannot help: the card or the host is gone.
_ENDS_THE_CARD = frozenset({"host_unreachable", "card_removed", "card_busy", "card_error"})


class _Session:
    """One presented card."""

    def __init__(self, reader: Reader, trace: TraceWriter | None = None) -> None:
        self.reader = reader
        self._exchanges = reader if trace is None else TracingReader(reader, trace)

    async def run(self, fn: Callable[[Reader], T]) -> T:
        return await asyncio.to_thread(fn, self._exchanges)


def _present(
    console: Console, spec: str, pcsc: Reader | None, trace: TraceWriter | None
) -> _Session | None:
    """Wait for a card; None when the person wants to stop."""
    if pcsc is not None:
        console.print("[bold]Present a card[/bold] to the reader (Ctrl-C to close the kiosk)…")
        while not pcsc.wait_for_card(0.5):
            pass
        pcsc.connect()
        return _Session(pcsc, trace)
    path = Prompt.ask(
        "[bold]Card image to present[/bold] (empty to close the kiosk)",
        console=console,
        default="",
        show_default=False,
    )
    if not path.strip():
        return None
    try:
        card = SimulatedCard.from_file(Path(path.strip()))
    except ImageError as exc:
        console.print(f"[red]{exc}[/red]")
        return _Session(InProcessReader(spec))
    reader = InProcessReader(spec)
    reader.insert(card)
    return _Session(reader, trace)


def _card_panel(view: CardView) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_row("Card", view.serial)
    table.add_row("Balance", f"{fen_to_yuan(view.balance_fen)} yuan")
    table.add_row(
        "You may add",
        f"at most [bold]{fen_to_yuan(view.room_fen)}[/bold] yuan "
        "(the balance never passes 1000 yuan)",
    )
    return Panel(table, title="T-Union transit account", expand=False)


def _receipt(result: LoadResult) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_row("Loaded", f"{fen_to_yuan(result.amount_fen)} yuan")
    table.add_row("Balance", f"{fen_to_yuan(result.balance_fen or 0)} yuan")
    table.add_row("TAC", result.tac or "")
    table.add_row("Time", datetime.now(CST).strftime("%Y-%m-%d %H:%M:%S"))
    return Panel(table, title="Receipt", border_style="green", expand=False)


async def _serve_card(console: Console, kiosk: Kiosk, session: _Session) -> None:
    view = await kiosk.present(session.run)
    if isinstance(view, LoadResult):
        console.print(f"[red]{view.message}[/red]")
        return
    for note in view.settled:
        console.print(f"[yellow]{note}[/yellow]")
    console.print(_card_panel(view))
    if view.room_fen <= 0:
        console.print("This card is full: no top-up is possible.")
        return
    while True:
        choice = Prompt.ask(
            f"Amount in yuan ({' / '.join(CHOICES)} or any amount; empty to cancel)",
            console=console,
            default="",
            show_default=False,
        )
        if not choice.strip():
            return
        with console.status("Writing — [bold]keep the card still[/bold]…"):
            result = await kiosk.load(session.run, parse_amount(choice))
        if result.result == "loaded":
            console.print(_receipt(result))
            return
        console.print(f"[red]Refused ({result.reason}):[/red] {result.message}")
        if result.reason in _ENDS_THE_CARD:
            return


def run_kiosk(
    kiosk: Kiosk,
    *,
    reader_spec: str,
    console: Console | None = None,
    trace: TraceWriter | None = None,
) -> None:
    """The kiosk's loop until the person closes it; ``trace``: where the APDU exchanges with
    each card are recorded, if anywhere."""
    console = console or Console(highlight=False)
    console.print(
        Panel(
            "[bold]farelab top-up kiosk[/bold]\nT-Union transit account, loads up to 1000 yuan",
            expand=False,
        )
    )
    pcsc: Reader | None = None
    if reader_spec.startswith("pcsc:"):
        from farelab.card import PcscReader  # noqa: PLC0415 - pyscard only for PC/SC readers

        pcsc = PcscReader(reader_spec.removeprefix("pcsc:"))
    while True:
        try:
            session = _present(console, reader_spec, pcsc, trace)
        except ReaderError as exc:
            console.print(f"[red]{exc}[/red]")
            return
        if session is None:
            console.print("Kiosk closed.")
            return
        if session.reader.wait_for_card(0):
            asyncio.run(host_closed_after(kiosk.host, _serve_card(console, kiosk, session)))
        if isinstance(session.reader, InProcessReader):
            session.reader.remove()  # the card leaves the field: another reader may have it
        if pcsc is not None:
            console.print("Please take the card.")
            pcsc.disconnect()
            while not pcsc.wait_for_removal(0.5):
                pass

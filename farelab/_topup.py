"""``farelab topup``: host-authorized loads at a kiosk, one-shot for scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import platformdirs

from farelab._errors import CliError
from farelab._options import trace_writer
from farelab.backend import LocalHost, StoreError, load_profiles
from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    ImageError,
    InProcessReader,
    Psam,
    PsamKeys,
    Reader,
    ReaderError,
    SimulatedCard,
    TracingReader,
    fen_to_yuan,
    shown,
)
from farelab.protocol import BrokerURL, check_client_id, lines_of
from farelab.topup import (
    AmountRules,
    Host,
    HostUnreachableError,
    Kiosk,
    KioskJournal,
    KioskJournalError,
    LoadResult,
    MqttHost,
    Run,
    host_closed_after,
    parse_amount,
    terminal_for,
)

__all__ = ["HOST_LEDGER", "KIOSK_JOURNAL", "register", "state_folder"]

T = TypeVar("T")

HOST_LEDGER = "farelab-host.db"
"""The in-process host's ledger, by default in :func:`state_folder`."""
KIOSK_JOURNAL = "farelab-kiosk.db"
"""The kiosk journal, by default in :func:`state_folder`."""


def state_folder() -> Path:
    """Where ``farelab topup`` keeps its state files unless told otherwise: the user's data
    folder (``$XDG_DATA_HOME/farelab``, by default ``~/.local/share/farelab`` on Linux)."""
    return platformdirs.user_data_path("farelab")


def _default_state(name: str) -> Path:
    """A state file in :func:`state_folder`, the folder made if it is not there."""
    folder = state_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(
            f"cannot make the folder for farelab's state {folder}: {exc.strerror}"
        ) from None
    return folder / name


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``topup`` and its subcommands."""
    topup = sub.add_parser(
        "topup",
        help="the top-up kiosk: host-authorized loads under the 1000-yuan cap",
        description="Load money onto a card's transit account. The load key lives only at the "
        "host: the backend over --broker, or an in-process host with the demo keys.",
    )
    cmds = topup.add_subparsers(dest="topup_command", required=True, metavar="SUBCOMMAND")
    load = cmds.add_parser(
        "load",
        help="load one card once (for scripts)",
        description="Load CARD (a card image) with --amount yuan. Prints what happened; with "
        '--json: {"result": "loaded"|"refused", "reason", "amount_fen", "balance_fen", "tac"}. '
        "Reasons: cap_exceeded, bad_amount, host_unreachable, card_removed (the card left: a "
        "load it may have taken is settled when it is presented again), card_busy, "
        "card_error, or the host's. Exit status 0 when loaded, 1 when refused, 2 for bad "
        "options or files.",
    )
    load.add_argument(
        "card",
        type=Path,
        nargs="?",
        metavar="CARD",
        help="card image file (or use --reader for a card in a PC/SC reader)",
    )
    load.add_argument(
        "--reader",
        metavar="pcsc:NAME",
        help='take the card from a PC/SC reader, e.g. "pcsc:Virtual PCD 00 00"',
    )
    load.add_argument("--amount", required=True, metavar="YUAN", help="amount in yuan")
    _common(load)
    load.add_argument("--json", action="store_true", help="print JSON for scripts")
    load.set_defaults(func=_load)
    refund = cmds.add_parser(
        "refund",
        help="refund a card's transit balance before it is replaced (Changzhou 退值)",
        description="Empty the card with a purchase of its whole balance at this outlet (the "
        "PSAM holds the demo purchase keys), have the host count it as a cash refund, and "
        'hotlist the card. --json prints the load\'s keys with "result": "refunded"|"refused". '
        "Exit status 0 when refunded, 1 when refused, 2 for bad options or files.",
    )
    refund.add_argument("card", type=Path, nargs="?", metavar="CARD", help="card image file")
    refund.add_argument("--reader", metavar="pcsc:NAME", help="take the card from a PC/SC reader")
    _common(refund)
    refund.add_argument("--json", action="store_true", help="print JSON for scripts")
    refund.set_defaults(func=_refund)

    transfer = cmds.add_parser(
        "transfer",
        help="move a replaced card's balance onto its replacement (R6)",
        description="The host computes from its ledger what may move from the old card, by the "
        "issuer's profile (nanjing: one year after a loss report, 7 working days after an "
        "exchange; hangzhou and haining: nothing after a loss, everything on an exchange; "
        "changzhou and shanxi: refund instead; docs/card-life.md), and authorizes it as a load "
        "on the new CARD. --json and the exit status as for load.",
    )
    transfer.add_argument("card", type=Path, nargs="?", metavar="CARD", help="the new card's image")
    transfer.add_argument("--reader", metavar="pcsc:NAME", help="take the card from a PC/SC reader")
    transfer.add_argument("--old", required=True, metavar="SERIAL", help="the old card's serial")
    transfer.add_argument("--reason", required=True, choices=["loss", "exchange"])
    transfer.add_argument(
        "--reported",
        required=True,
        metavar="YYYY-MM-DD",
        help="the day of the loss report or of the exchange request",
    )
    transfer.add_argument("--profile", required=True, choices=sorted(load_profiles()))
    _common(transfer)
    transfer.add_argument("--json", action="store_true", help="print JSON for scripts")
    transfer.set_defaults(func=_transfer)

    kiosk = cmds.add_parser(
        "kiosk",
        help="the interactive kiosk (a terminal UI)",
        description="Present a card, see its balance and the most it may take, choose an "
        "amount, keep the card still while it is written, get a receipt. With --reader sim "
        "the kiosk asks for a card image path; with --reader pcsc:NAME it waits for a card.",
    )
    kiosk.add_argument(
        "--reader",
        default="sim",
        metavar="sim|pcsc:NAME",
        help="where cards are presented (default sim)",
    )
    _common(kiosk)
    kiosk.set_defaults(func=_kiosk)
    serve = cmds.add_parser(
        "serve",
        help="a kiosk that takes load requests on stdin (for scripts and the city)",
        description='A long-running kiosk: each stdin line is a load request {"card": PATH, '
        '"amount_fen": N} (a card image and the amount in fen); each is answered by one stdout '
        'line, as \'load --json\' prints it plus "card": {"card", "result": "loaded"|"refused", '
        '"reason", "amount_fen", "balance_fen", "tac"} (a request that cannot be read is '
        'refused "bad_request", with "detail"). Requests are served one at a time, in order; '
        "the command ends when stdin ends. It says 'farelab topup: serving' on stderr once "
        "ready.",
    )
    _common(serve)
    serve.set_defaults(func=_serve)


def _common(parser: argparse.ArgumentParser) -> None:
    folder = state_folder()
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="the backend's MQTT broker (default: an in-process host with the demo keys and "
        "a ledger of its own, --db)",
    )
    parser.add_argument(
        "--db",
        type=Path,
        metavar="FILE",
        help=f"the in-process host's ledger, without --broker (default {folder / HOST_LEDGER})",
    )
    parser.add_argument(
        "--kiosk",
        default="kiosk-1",
        metavar="ID",
        help="this kiosk's id (its MQTT username; default kiosk-1)",
    )
    parser.add_argument(
        "--terminal",
        metavar="HEX12",
        help="this kiosk's 6-byte terminal id, as the host's device registry has it (default: "
        "0000F000 and four hex digits made from --kiosk)",
    )
    parser.add_argument(
        "--journal",
        type=Path,
        metavar="DB",
        help=f"the kiosk's journal of loads (default {folder / KIOSK_JOURNAL})",
    )
    parser.add_argument(
        "--unit",
        default="0.01",
        metavar="YUAN",
        help="loads are multiples of this (default 0.01; e.g. 10)",
    )
    parser.add_argument(
        "--minimum", default="0.01", metavar="YUAN", help="the smallest load (default 0.01)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="wait this long for the host before refusing (default 5)",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="append every APDU exchange with the card to FILE, one JSON line each "
        "(read it with 'farelab trace show')",
    )


class _InProcessHost:
    """The in-process host, whose own failures (its ledger refusing a write) reach the kiosk as
    a host that did not answer — a refusal with the host's words — never as a traceback."""

    def __init__(self, local: LocalHost) -> None:
        self._local = local

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._local.call(message)
        except (StoreError, sqlite3.Error) as exc:
            raise HostUnreachableError(f"the in-process host failed: {exc}") from None


def make_kiosk(args: argparse.Namespace) -> tuple[Kiosk, Callable[[], None]]:
    """The kiosk the options describe, and how to close it."""
    unit, minimum = parse_amount(args.unit), parse_amount(args.minimum)
    if not unit or unit <= 0 or minimum is None or minimum <= 0:
        raise CliError("--unit and --minimum must be positive amounts in yuan")
    try:
        check_client_id(args.kiosk, "--kiosk")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    terminal = terminal_for(args.kiosk)
    if args.terminal is not None:
        try:
            terminal = bytes.fromhex(args.terminal)
        except ValueError:
            terminal = b""
        if len(terminal) != 6:
            raise CliError(f"--terminal {shown(args.terminal)} is not 12 hex digits")
    if args.broker and args.db is not None:
        raise CliError("--db is the in-process host's ledger: with --broker the backend keeps it")
    ledger = None if args.broker else args.db or _default_state(HOST_LEDGER)
    try:
        journal = KioskJournal(args.journal or _default_state(KIOSK_JOURNAL))
    except KioskJournalError as exc:
        raise CliError(str(exc)) from None
    closers: list[Callable[[], None]] = [journal.close]
    host: Host
    try:
        if ledger is None:
            host = MqttHost(BrokerURL.parse(args.broker), args.kiosk, timeout=args.timeout)
        else:
            local = LocalHost(ledger, args.kiosk, terminal=terminal)
            host = _InProcessHost(local)
            closers.append(local.close)
    except (ValueError, StoreError) as exc:
        journal.close()
        raise CliError(str(exc)) from None
    kiosk = Kiosk(
        kiosk_id=args.kiosk,
        terminal_id=terminal,
        host=host,
        journal=journal,
        rules=AmountRules(unit_fen=unit, minimum_fen=minimum),
    )

    def close() -> None:
        for closer in closers:
            closer()

    return kiosk, close


def _reader(args: argparse.Namespace) -> Reader:
    if (args.card is None) == (args.reader is None):
        raise CliError("give either CARD (a card image) or --reader pcsc:NAME")
    if args.reader is not None:
        if not args.reader.startswith("pcsc:"):
            raise CliError('--reader must be "pcsc:<reader name>"')
        from farelab.card import PcscReader  # noqa: PLC0415 - pyscard only for PC/SC readers

        try:
            pcsc = PcscReader(args.reader.removeprefix("pcsc:"))
            if not pcsc.wait_for_card(5):
                raise CliError(f"no card in {shown(pcsc.name)} after 5 s")
            pcsc.connect()
        except ReaderError as exc:
            raise CliError(str(exc)) from None
        return pcsc
    try:
        card = SimulatedCard.from_file(args.card)
    except ImageError as exc:
        raise CliError(str(exc)) from None
    # The card enters the field (and takes its image's lock) at its first command; a card in
    # another field makes the action's result "card_busy".
    memory = InProcessReader("kiosk")
    memory.insert(card)
    return memory


def _kiosk(args: argparse.Namespace) -> int:
    from farelab._kiosk_ui import run_kiosk  # noqa: PLC0415 - rich only for the interactive UI

    if args.reader != "sim" and not args.reader.startswith("pcsc:"):
        raise CliError('--reader must be "sim" or "pcsc:<reader name>"')
    trace = trace_writer(args.trace)
    kiosk, close = make_kiosk(args)
    try:
        run_kiosk(kiosk, reader_spec=args.reader, trace=trace)
    except ReaderError as exc:
        raise CliError(str(exc)) from None
    except (KeyboardInterrupt, EOFError):
        print()
    finally:
        close()
        if trace is not None:
            trace.close()
    return 0


def _one_shot(
    args: argparse.Namespace,
    action: Callable[[Kiosk, Run[Any]], Coroutine[Any, Any, LoadResult]],
    *,
    ok: str,
) -> int:
    """Open the reader and the kiosk, run one action on the presented card, report it."""
    trace = trace_writer(args.trace)
    reader = _reader(args)
    kiosk, close = make_kiosk(args)
    exchanges: Reader = reader if trace is None else TracingReader(reader, trace)

    async def run(fn: Callable[[Reader], T]) -> T:
        return fn(exchanges)

    try:
        result = asyncio.run(host_closed_after(kiosk.host, action(kiosk, run)))
    finally:
        if isinstance(reader, InProcessReader):
            reader.remove()  # the card leaves the field: another reader may have it now
        close()
        if trace is not None:
            trace.close()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        for note in result.settled:
            print(f"note: {note}")
        balance = (
            ""
            if result.balance_fen is None
            else f"; balance {fen_to_yuan(result.balance_fen)} yuan"
        )
        tac = f"; TAC {result.tac}" if result.tac else ""
        print(f"{result.result}: {result.message}{balance}{tac}")
    return 0 if result.result == ok else 1


def _request(line: str) -> tuple[Path, int]:
    """A serve request's card and amount; ValueError naming what is wrong."""
    try:
        doc = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError("not a JSON object") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    card, amount = doc.get("card"), doc.get("amount_fen")
    if not isinstance(card, str) or not card:
        raise ValueError('"card" must be a card image path')
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError('"amount_fen" must be a whole number of fen, more than 0')
    return Path(card), amount


def _serve(args: argparse.Namespace) -> int:
    trace = trace_writer(args.trace)
    kiosk, close = make_kiosk(args)

    def answer(doc: dict[str, Any]) -> None:
        print(json.dumps(doc, ensure_ascii=False), flush=True)

    async def requests() -> AsyncIterator[str]:
        """stdin's lines until it ends or SIGTERM/SIGINT (a load under way is finished)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"farelab topup: serving as {args.kiosk}", file=sys.stderr, flush=True)
        stopping = asyncio.ensure_future(stop.wait())
        lines = aiter(lines_of(sys.stdin))
        try:
            while True:
                line = asyncio.ensure_future(anext(lines))
                await asyncio.wait({line, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not line.done():
                    line.cancel()
                    return
                try:
                    yield line.result()
                except StopAsyncIteration:
                    return
        finally:
            stopping.cancel()

    async def serve() -> None:
        async for line in requests():
            if not line.strip():
                continue
            try:
                path, amount = _request(line)
                card = SimulatedCard.from_file(path)
            except (ValueError, ImageError) as exc:
                answer(
                    {
                        "card": None,
                        "result": "refused",
                        "reason": "bad_request",
                        "detail": str(exc),
                        "amount_fen": 0,
                        "balance_fen": None,
                        "tac": None,
                    }
                )
                continue
            reader = InProcessReader("kiosk")
            reader.insert(card)
            exchanges: Reader = reader if trace is None else TracingReader(reader, trace)

            async def run(fn: Callable[[Reader], T], exchanges: Reader = exchanges) -> T:
                return fn(exchanges)

            try:
                result = await kiosk.load(run, amount)
            finally:
                reader.remove()  # out of the field: a validator may take the card now
            answer({"card": str(path), **result.to_json()})

    try:
        asyncio.run(host_closed_after(kiosk.host, serve()))
    finally:
        close()
        if trace is not None:
            trace.close()
    return 0


def _load(args: argparse.Namespace) -> int:
    amount = parse_amount(args.amount)
    return _one_shot(args, lambda kiosk, run: kiosk.load(run, amount), ok="loaded")


def _refund(args: argparse.Namespace) -> int:
    def refund(kiosk: Kiosk, run: Run[Any]) -> Coroutine[Any, Any, LoadResult]:
        keys = {DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)}
        return kiosk.refund(run, Psam(terminal_id=kiosk.terminal_id, issuers=keys))

    return _one_shot(args, refund, ok="refunded")


def _transfer(args: argparse.Namespace) -> int:
    try:
        date.fromisoformat(args.reported)
    except ValueError:
        raise CliError(f"--reported {shown(args.reported)} is not a date (YYYY-MM-DD)") from None
    if not (args.old.isascii() and args.old.isdigit()) or len(args.old) > 20:
        raise CliError("--old must be a card serial (up to 20 digits)")

    def transfer(kiosk: Kiosk, run: Run[Any]) -> Coroutine[Any, Any, LoadResult]:
        return kiosk.transfer(
            run,
            old_serial=args.old,
            reason=args.reason,
            reported=args.reported,
            profile=args.profile,
        )

    return _one_shot(args, transfer, ok="loaded")

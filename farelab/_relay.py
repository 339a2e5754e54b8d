"""``farelab card relay``: a card in any PC/SC reader, in pcscd's virtual reader."""

from __future__ import annotations

import argparse
import contextlib
import threading

from farelab._card import DEFAULT_VPCD, _behaviour, parse_vpcd
from farelab._errors import CliError
from farelab._options import append_log, trace_writer
from farelab._signals import stop_on_signals
from farelab.card import (
    BehavingCard,
    BehaviourState,
    CardEndpoint,
    ReaderError,
    ReaderUnavailableError,
    TracingEndpoint,
    ViccError,
    relay,
    shown,
)

__all__ = ["relay_command"]


def _source(text: str) -> str:
    kind, sep, name = text.partition(":")
    if kind != "pcsc" or not sep or not name:
        raise CliError(f'--from {shown(text)} is not "pcsc:READER"')
    return name


def _target(text: str) -> tuple[str, int]:
    kind, sep, where = text.partition(":")
    if kind != "vpcd":
        raise CliError(f"--to {shown(text)} is not vpcd or vpcd:HOST:PORT")
    try:
        return parse_vpcd(where if sep else DEFAULT_VPCD)
    except CliError:
        raise CliError(f"--to {shown(text)} is not vpcd or vpcd:HOST:PORT") from None


def relay_command(args: argparse.Namespace) -> int:
    """Run the relay until Ctrl-C or SIGTERM; CliError for a missing reader or vpcd."""
    name = _source(args.source)
    host, port = _target(args.to)
    behaviour = _behaviour(args)
    # Imported here: pyscard loads with it.
    from farelab.card import PcscReader  # noqa: PLC0415

    try:
        probe = PcscReader(name)
        try:
            present = probe.wait_for_card(0)
        finally:
            probe.close()
    except ReaderError as exc:
        raise CliError(str(exc)) from None
    stop = threading.Event()
    stop_on_signals(stop)
    relayed = 0
    with contextlib.ExitStack() as stack:
        trace = trace_writer(args.trace)
        if trace is not None:
            stack.callback(trace.close)
        log = append_log(stack, args.log)
        # One behaviour for the whole run: its counts go on from one presentation to the next.
        state = None if behaviour is None else BehaviourState(behaviour)

        def wrap(card: CardEndpoint) -> CardEndpoint:
            if state is not None:
                card = BehavingCard(card, state, log=log)
            if trace is not None:
                card = TracingEndpoint(card, trace, name=name)  # as the terminal saw it
            return card

        def on_card(atr: bytes) -> None:
            nonlocal relayed
            relayed += 1
            print(f"card in {name!r} (ATR {atr.hex().upper()}) relayed", flush=True)

        def on_leave() -> None:
            print("card left the virtual reader", flush=True)

        print(
            f"relaying the card in PC/SC reader {name!r} to vpcd at {host}:{port}; Ctrl-C to stop",
            flush=True,
        )
        if not present:
            print(f"no card in {name!r} yet: waiting for one", flush=True)
        try:
            relay(
                lambda: PcscReader(name),
                stop=stop,
                host=host,
                port=port,
                wrap=wrap,
                on_card=on_card,
                on_leave=on_leave,
            )
        except ViccError as exc:
            raise CliError(str(exc)) from None
        except ReaderUnavailableError as exc:
            raise CliError(f"the reader {name!r} went away: {exc}") from None
        except ReaderError as exc:
            raise CliError(f"relay stopped: {exc}") from None
    print(f"relay stopped; {relayed} card presentations relayed")
    return 0

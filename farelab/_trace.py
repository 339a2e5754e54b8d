"""``farelab trace``: read APDU traces as a protocol analyser shows them, and compare two."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from farelab._errors import CliError
from farelab.card import (
    Exchange,
    TraceError,
    TraceEvent,
    decode_apdu,
    find_tears,
    format_trace,
    read_trace,
    sw_meaning,
)

__all__ = ["exchange_json", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``trace`` and its subcommands."""
    trace = sub.add_parser(
        "trace",
        help="read APDU traces: decode one, or set two side by side",
        description="Read the APDU traces that --trace FILE writes (card serve, validator run "
        "and replay, topup load and kiosk): one JSON object an exchange.",
    )
    cmds = trace.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")
    show = cmds.add_parser(
        "show",
        help="decode a trace, one exchange a line",
        description="Print one exchange a line: its number, time, reader and elapsed time, the "
        "command's name and its PBOC fields (amounts in yuan, counters, terminal id, date and "
        "time, MAC1/MAC2/TAC), the status word and what it means, and the fields of the "
        "answer; a DEBIT or CREDIT that got no answer is marked TORN, and the GET TRANSACTION "
        "PROOF that later asked about it says whether the card committed it.",
    )
    show.add_argument("path", type=Path, metavar="FILE", help="trace file (JSON lines)")
    show.add_argument("--full", action="store_true", help="print long data fields whole")
    show.add_argument(
        "--json", action="store_true", help="print each decoded exchange as a JSON line"
    )
    show.set_defaults(func=_show)
    diff = cmds.add_parser(
        "diff",
        help="set two traces side by side",
        description="Set the exchanges of two traces side by side, in order: '=' the same "
        "command and answer, '~' the same command name with other bytes, '!' another command "
        "or one side missing. Exits 0 when they are the same, 1 when they differ.",
    )
    diff.add_argument("a", type=Path, metavar="A", help="first trace file")
    diff.add_argument("b", type=Path, metavar="B", help="second trace file")
    diff.set_defaults(func=_diff)


def _read(path: Path) -> list[Exchange | TraceEvent]:
    try:
        return read_trace(path)
    except TraceError as exc:
        raise CliError(str(exc)) from None


def exchange_json(number: int, item: Exchange, note: str | None) -> dict[str, Any]:
    """One exchange decoded, as ``trace show --json`` prints it."""
    decoded = decode_apdu(item.command, item.response)
    return {
        "n": number,
        "time": item.time,
        "reader": item.reader,
        "elapsed_ms": item.elapsed_ms,
        "name": decoded.name,
        "fields": decoded.fields,
        "sw": None if item.sw is None else f"{item.sw:04X}",
        "meaning": None if item.sw is None else sw_meaning(item.sw),
        "answer": decoded.answer,
        "error": item.error,
        "note": note,
    }


def _show(args: argparse.Namespace) -> int:
    items = _read(args.path)
    if not args.json:
        for line in format_trace(items, full=args.full):
            print(line)
        return 0
    notes = find_tears(items)
    number = 0
    for index, item in enumerate(items):
        if isinstance(item, Exchange):
            number += 1
            doc = exchange_json(number, item, notes.get(index))
            print(json.dumps(doc, ensure_ascii=False))
    return 0


def _summary(item: Exchange | None) -> str:
    if item is None:
        return ""
    name = decode_apdu(item.command).name
    return f"{name} {'----' if item.sw is None else f'{item.sw:04X}'}"


def _mark(a: Exchange | None, b: Exchange | None) -> str:
    if a is None or b is None:
        return "!"
    if a.command == b.command and a.rapdu == b.rapdu:
        return "="
    if decode_apdu(a.command).name == decode_apdu(b.command).name:
        return "~"
    return "!"


def _diff(args: argparse.Namespace) -> int:
    left = [i for i in _read(args.a) if isinstance(i, Exchange)]
    right = [i for i in _read(args.b) if isinstance(i, Exchange)]
    width = max([len(str(args.a)), *(len(_summary(i)) for i in left), 10])
    print(f"{'#':>4}  {args.a!s:<{width}}     {args.b}")
    differ = 0
    for index in range(max(len(left), len(right))):
        a = left[index] if index < len(left) else None
        b = right[index] if index < len(right) else None
        mark = _mark(a, b)
        differ += mark != "="
        print(f"{index + 1:>4}  {_summary(a):<{width}}  {mark}  {_summary(b)}")
    if differ:
        print(f"{differ} of {max(len(left), len(right))} exchanges differ", file=sys.stderr)
        return 1
    return 0

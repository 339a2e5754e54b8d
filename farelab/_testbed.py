"""``farelab testbed``: put a terminal farelab did not write in front of farelab's cards, and
score it against the card zoo's answer key (:mod:`farelab.testbed`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO
from xml.etree import ElementTree as ET

from farelab._errors import CliError
from farelab.card import (
    CST,
    Behaviour,
    BehaviourError,
    CardRemovedError,
    KeysFileError,
    Reader,
    ReaderError,
    ViccError,
    describe_path,
    format_trace,
    load_keys_file,
)
from farelab.testbed import (
    CardCheckError,
    CardResult,
    DebitKeys,
    Presence,
    RunError,
    check_card,
    describe_expect,
    load_manifest,
    run_zoo,
    select_cards,
    vpcd_port,
)

__all__ = ["junit_xml", "register"]

DEFAULT_READER = "Virtual PCD 00 00"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most 3600")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``testbed`` and its subcommands."""
    testbed = sub.add_parser(
        "testbed",
        help="score a terminal farelab did not write against the card zoo's answer key",
        description="A testbed for other people's validators and kiosks (docs/testbed.md).",
    )
    cmds = testbed.add_subparsers(dest="testbed_command", required=True, metavar="SUBCOMMAND")
    run = cmds.add_parser(
        "run",
        help="present every zoo card to the terminal under test and judge what it did",
        description="Present each card of a zoo (farelab card zoo) in pcscd's virtual reader, "
        "one after the other; wait until the terminal under test is done with it (it powers "
        "the card down after its first APDU, or sends no APDU for --quiet seconds after its "
        "first, or --timeout passes), take it away, and compare the "
        "card's end state — purchases, balance, records, counters, TACs, blocking — with the "
        "zoo's answer key. Prints a table (the exchanges of every failing card), and exits 0 "
        "when every card passed, 1 when one failed, 2 on bad input.",
    )
    run.add_argument("--zoo", type=Path, required=True, metavar="DIR", help="the zoo's folder")
    run.add_argument(
        "--reader",
        action="append",
        metavar="[DEVICE=]NAME",
        help="the virtual reader the terminal under test reads (default "
        f"{DEFAULT_READER!r}); DEVICE=NAME for one device of the zoo (a gate zoo's "
        "zoo-entry and zoo-exit in two readers), repeatable",
    )
    run.add_argument("--vpcd-host", default="127.0.0.1", metavar="HOST", help="where vpcd listens")
    run.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="take a card away after S seconds at most (default 10)",
    )
    run.add_argument(
        "--quiet",
        type=_seconds,
        default=0.5,
        metavar="S",
        help="the terminal is done with a card after S seconds without an APDU, if it does "
        "not power the card down first (default 0.5)",
    )
    run.add_argument(
        "--cases", metavar="CASE,…", help="present only these cases of the zoo (comma-separated)"
    )
    run.add_argument(
        "--device", action="append", metavar="ID", help="present only the cards of this device"
    )
    run.add_argument("--junit", type=Path, metavar="FILE", help="write a JUnit XML report")
    run.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    run.add_argument(
        "--trace", type=Path, metavar="FILE", help="append every exchange the cards saw"
    )
    run.add_argument(
        "--kind",
        choices=("validator", "kiosk"),
        default="validator",
        help="the kind of terminal under test: validator (default), or kiosk (the zoo's "
        "kiosk cards, each to be loaded with the amount its answer key names)",
    )
    run.add_argument(
        "--kiosk-command",
        metavar="CMD",
        help="with --kind kiosk: the command that makes the kiosk under test load the card "
        "in the reader, run once a card, {amount} replaced by the amount in yuan (e.g. "
        "\"farelab topup load --reader 'pcsc:Virtual PCD 00 00' --amount {amount}\")",
    )
    run.add_argument(
        "--behaviour",
        type=Path,
        metavar="FILE",
        help="each card misbehaves by these rules (docs/testbed.md, card behaviours); a card "
        "that leaves the field is put back after it was away, as a rider taps again",
    )
    run.add_argument(
        "--log", type=Path, metavar="FILE", help="append each behaviour firing as a JSON line"
    )
    run.set_defaults(func=_run)
    card = cmds.add_parser(
        "card",
        help="check that a card in a reader answers as a T-Union card must, without changing it",
        description="Run farelab's terminal against the card in a PC/SC reader: SELECT of each "
        "application (transit, social security, bank, the PSE and the PPSE), the transit "
        "files and records, GET BALANCE and the status words of malformed commands — none of "
        "which changes the card. With --keys FILE --allow-debit it also buys one fen and "
        "checks MAC2, the TAC (with the issuer's TAC key), the transaction proof and the "
        "balance after. Prints a table (check, expected, seen, conforms); exits 0 when every "
        "check conforms, 1 when one does not, 2 on bad input or a reader it cannot use.",
    )
    card.add_argument(
        "--reader", required=True, metavar="pcsc:NAME", help="the PC/SC reader holding the card"
    )
    card.add_argument(
        "--wait",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="wait up to S seconds for a card in the reader (default 5)",
    )
    card.add_argument(
        "--keys",
        type=Path,
        metavar="FILE",
        help="the issuer's master keys (TOML), for --allow-debit: never the demo keys by default",
    )
    card.add_argument(
        "--allow-debit",
        action="store_true",
        help="with --keys: buy one fen (the card's balance drops by 0.01 yuan) and check its TAC",
    )
    card.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    card.set_defaults(func=_card)


def _slots(
    readers: Sequence[str] | None, devices: set[str], host: str
) -> dict[str, tuple[str, int]]:
    """``--reader`` values → each device's vpcd slot."""
    slots: dict[str, tuple[str, int]] = {}
    default: tuple[str, int] | None = None
    for text in readers or [DEFAULT_READER]:
        device, sep, name = text.partition("=")
        try:
            slot = (host, vpcd_port(name if sep else text))
        except RunError as exc:
            raise CliError(f"--reader: {exc}") from None
        if not sep:
            default = slot
        elif device not in devices:
            known = ", ".join(sorted(devices))
            raise CliError(f"--reader {text!r}: the zoo has no device {device!r} ({known})")
        else:
            slots[device] = slot
    if default is not None:
        for device in devices:
            slots.setdefault(device, default)
    return slots


_ENDS = {
    "power-off": "powered down",
    "quiet": "--quiet",
    "timeout": "--timeout",
    "gone": "left by themselves",
}


def _timing(results: Sequence[CardResult]) -> str:
    n = len(results)
    if not n:
        return "no card presented"

    def mean(values: Sequence[float]) -> float:
        return sum(values) / n

    total = sum(r.seconds for r in results)
    presences: list[Presence] = [r.presence for r in results]
    first = mean([p.to_first_apdu for p in presences])
    busy = mean([p.busy for p in presences])
    quiet = mean([p.quiet for p in presences])
    removal = mean([p.removal for p in presences])
    rest = mean([r.seconds for r in results]) - first - busy - quiet - removal
    ends = ", ".join(
        f"{sum(p.ended_by == end for p in presences)} {words}"
        for end, words in _ENDS.items()
        if any(p.ended_by == end for p in presences)
    )
    return (
        f"{n} cards in {total:.1f} s, {total / n:.2f} s a card: {first:.2f} s until the "
        f"terminal's first APDU (pcscd's presence poll and the terminal's), {busy:.2f} s of "
        f"APDUs, {quiet:.2f} s until the terminal was done ({ends}), {removal:.2f} s until "
        f"pcscd saw the card gone (its presence poll), {rest * 1000:.0f} ms the rest"
    )


def _row(result: CardResult) -> str:
    verdict = "pass" if result.passed else "FAIL"
    return (
        f"{result.entry.file:<40} {describe_expect(result.entry.expect):<50} "
        f"{result.seen.describe():<44} {verdict}"
    )


def _report_failure(result: CardResult) -> None:
    for problem in result.seen.problems:
        print(f"    ! {problem}")
    for line in format_trace(result.trace):
        print(f"    {line}")
    for line in result.output.splitlines():
        print(f"    | {line}")


def junit_xml(network: str, results: Sequence[CardResult]) -> bytes:
    """The results as a JUnit XML document (one testcase a card)."""
    failed = sum(not r.passed for r in results)
    suites = ET.Element("testsuites")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"farelab testbed ({network})",
        tests=str(len(results)),
        failures=str(failed),
        errors="0",
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for result in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"zoo.{network}",
            name=f"{result.entry.file} {result.entry.case}",
            time=f"{result.seconds:.3f}",
        )
        if not result.passed:
            failure = ET.SubElement(
                case,
                "failure",
                message="; ".join(result.seen.problems),
                type="conformance",
            )
            failure.text = "\n".join(
                [
                    f"expected: {describe_expect(result.entry.expect)}",
                    f"seen:     {result.seen.describe()}",
                    *format_trace(result.trace),
                ]
            )
    document: bytes = ET.tostring(suites, encoding="utf-8", xml_declaration=True)
    return document


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CliError(f"{describe_path(path)}: cannot write: {exc.strerror or exc}") from None


def _run(args: argparse.Namespace) -> int:
    kiosk_command: list[str] | None = None
    if args.kind == "kiosk":
        if args.kiosk_command is None:
            raise CliError("--kind kiosk needs --kiosk-command (how to tell the kiosk the amount)")
        try:
            kiosk_command = shlex.split(args.kiosk_command)
        except ValueError as exc:
            raise CliError(f"--kiosk-command: {exc}") from None
        if not kiosk_command:
            raise CliError("--kiosk-command is empty")
    elif args.kiosk_command is not None:
        raise CliError("--kiosk-command needs --kind kiosk")
    behaviour: Behaviour | None = None
    if args.behaviour is not None:
        try:
            behaviour = Behaviour.load(args.behaviour)
        except BehaviourError as exc:
            raise CliError(str(exc)) from None
    elif args.log is not None:
        raise CliError("--log needs --behaviour")
    try:
        manifest = load_manifest(args.zoo)
        cases = None if args.cases is None else {c.strip() for c in args.cases.split(",")}
        devices = None if args.device is None else set(args.device)
        cards = select_cards(
            manifest, cases=cases, devices=devices, kiosk=kiosk_command is not None
        )
    except RunError as exc:
        raise CliError(str(exc)) from None
    slots = _slots(args.reader, {c.device for c in cards}, args.vpcd_host)
    print(f"{'card':<40} {'expected':<50} {'seen':<44} result", flush=True)

    def show(result: CardResult) -> None:
        print(_row(result), flush=True)
        if not result.passed:
            _report_failure(result)

    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        log: TextIO | None = None
        if args.log is not None:
            try:
                log = stack.enter_context(args.log.open("a", encoding="utf-8"))
            except OSError as exc:
                raise CliError(f"{describe_path(args.log)}: {exc.strerror or exc}") from None
        try:
            results = run_zoo(
                manifest,
                cards,
                slots=slots,
                quiet=args.quiet,
                timeout=args.timeout,
                trace=args.trace,
                behaviour=behaviour,
                log=log,
                kiosk_command=kiosk_command,
                on_result=show,
            )
        except (RunError, ViccError) as exc:
            raise CliError(str(exc)) from None
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    print(
        f"{passed} of {len(results)} cards passed, {failed} failed "
        f"({time.monotonic() - began:.1f} s); {_timing(results)}"
    )
    if args.json is not None:
        doc: dict[str, Any] = {
            "cards": len(results),
            "passed": passed,
            "failed": failed,
            "results": [r.to_json() for r in results],
        }
        _write(args.json, (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode())
    if args.junit is not None:
        _write(args.junit, junit_xml(manifest.network, results))
    sys.stdout.flush()
    return 0 if failed == 0 else 1


def _connect(reader: Reader, deadline: float) -> None:
    """Power the card up; pcscd reports a card present before it has powered it, and a connect
    in between is told the card is unpowered: try again until ``deadline``."""
    while True:
        try:
            reader.connect()
        except CardRemovedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return


def _card(args: argparse.Namespace) -> int:
    if args.allow_debit and args.keys is None:
        raise CliError("--allow-debit needs --keys FILE: the issuer's keys the purchase uses")
    if args.keys is not None and not args.allow_debit:
        raise CliError("--keys is for the one-fen purchase: add --allow-debit to make it")
    kind, sep, name = args.reader.partition(":")
    if not sep or kind != "pcsc" or not name:
        raise CliError(f"--reader {args.reader!r}: expected pcsc:NAME")
    debit: DebitKeys | None = None
    if args.keys is not None:
        try:
            debit = DebitKeys(load_keys_file(args.keys), datetime.now(CST))
        except KeysFileError as exc:
            raise CliError(str(exc)) from None
    from farelab.card import PcscReader  # noqa: PLC0415 - loads pyscard

    try:
        reader = PcscReader(name)
    except ReaderError as exc:
        raise CliError(str(exc)) from None
    try:
        deadline = time.monotonic() + args.wait
        if not reader.wait_for_card(args.wait):
            raise CliError(f"no card in {reader.name!r} after {args.wait:g} s")
        _connect(reader, deadline)
        report = check_card(reader, debit=debit)
    except (ReaderError, CardCheckError) as exc:
        raise CliError(str(exc)) from None
    finally:
        reader.disconnect()
    width = max(len(c.name) for c in report.checks)
    print(f"{'check':<{width}}  {'expected':<52} {'seen':<42} conforms")
    for c in report.checks:
        verdict = "yes" if c.conforms else "NO"
        print(f"{c.name:<{width}}  {c.expected:<52} {c.seen:<42} {verdict}")
    failed = sum(not c.conforms for c in report.checks)
    mode = "one fen debited" if report.debited else "read-only"
    print(
        f"{len(report.checks) - failed} of {len(report.checks)} checks conform, {failed} do "
        f"not ({mode})"
    )
    if args.json is not None:
        text = json.dumps(report.to_json(), ensure_ascii=False, indent=2) + "\n"
        _write(args.json, text.encode())
    sys.stdout.flush()
    return 0 if report.conforms else 1

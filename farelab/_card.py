"""``farelab card``: issue, inspect and present simulated cards."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from farelab._errors import CliError
from farelab._options import append_log, trace_writer
from farelab._signals import stop_on_signals

# What issuing and reading a card image needs; presenting a card (the applet, the vpcd client,
# fault injection) is imported by the subcommands that do it, so that ``card show`` starts fast.
from farelab.card import (
    CST,
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    Alg,
    BusRecord,
    CardImage,
    CardType,
    ImageError,
    ImageLock,
    IssuerKeys,
    KeysFileError,
    LogRecord,
    MetroRecord,
    TripRecord,
    TxType,
    describe_path,
    fen_to_yuan,
    load_image,
    load_keys_file,
    parse_bcd_date,
    personalise,
    save_image,
    shown,
    yuan_to_fen,
)

if TYPE_CHECKING:
    from farelab.card import Behaviour, CardEndpoint, TraceWriter

__all__ = ["card_json", "parse_vpcd", "register"]

DEFAULT_VPCD = "127.0.0.1:35963"
_TX_NAMES = {TxType.LOAD: "load", TxType.PURCHASE: "purchase", TxType.CAPP_PURCHASE: "composite"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``card`` and its subcommands."""
    card = sub.add_parser(
        "card",
        help="issue, inspect and present simulated T-Union cards",
        description="Issue, inspect and present simulated T-Union cards. A card is a JSON "
        "image file; every transaction the card commits is written back to it atomically.",
    )
    cmds = card.add_subparsers(dest="card_command", required=True, metavar="SUBCOMMAND")

    new = cmds.add_parser(
        "new",
        help="personalise a new card image",
        description="Write a personalised card image with the demo issuer's keys "
        "(docs/card-protocol.md B4), or the master keys of --keys FILE.",
    )
    new.add_argument("path", type=Path, metavar="PATH", help="card image file to write")
    new.add_argument(
        "--balance",
        default="0",
        metavar="YUAN",
        help="initial transit balance in yuan, 0 to 1000 (default 0)",
    )
    new.add_argument(
        "--alg", choices=["3des", "sm4"], default="3des", help="purse algorithm (default 3des)"
    )
    new.add_argument(
        "--type",
        dest="card_type",
        default="adult",
        choices=[t.label for t in CardType],
        help="card type (default adult)",
    )
    new.add_argument(
        "--serial", metavar="DIGITS", help="card number, up to 20 digits (default: random)"
    )
    new.add_argument(
        "--issued", metavar="YYYY-MM-DD", help="start of validity (default: today, China time)"
    )
    new.add_argument(
        "--expires", metavar="YYYY-MM-DD", help="expiry date (default: 10 years after --issued, R9)"
    )
    new.add_argument(
        "--issuer",
        metavar="HEX16",
        default=DEMO_ISSUER_ID.hex().upper(),
        help="8-byte issuer id in hex (default: the demo issuer 1310000000000000)",
    )
    new.add_argument(
        "--keys",
        type=Path,
        metavar="FILE",
        help="TOML file of issuer master keys: purchase, load, tac, maintenance "
        "(32 hex digits each) and an optional integer version",
    )
    new.add_argument(
        "--profile",
        metavar="NAME",
        help="issuer profile (docs/card-life.md) whose social-security initial PIN and daily "
        "try limit the card takes (R8; default: 888888 and 5)",
    )
    new.add_argument("--force", action="store_true", help="overwrite an existing PATH")
    new.set_defaults(func=_new)

    show = cmds.add_parser(
        "show",
        help="decode a card image",
        description="Decode a card image: public data, balance, EF18 log, "
        "EF1A transit records, EF1E trips.",
    )
    show.add_argument("path", type=Path, metavar="PATH", help="card image file")
    show.add_argument("--json", action="store_true", help="print JSON for scripts")
    show.set_defaults(func=_show)

    serve = cmds.add_parser(
        "serve",
        help="present the card to pcscd's virtual reader until stopped",
        description="Connect the card to vpcd (pcscd's vsmartcard driver) so that it sits in "
        "the 'Virtual PCD' reader for any PC/SC program, until Ctrl-C or SIGTERM.",
    )
    serve.add_argument(
        "path", type=Path, nargs="?", metavar="PATH", help="card image file (or --from-trace)"
    )
    serve.add_argument(
        "--vpcd",
        default=DEFAULT_VPCD,
        metavar="HOST:PORT",
        help=f"where vpcd listens (default {DEFAULT_VPCD})",
    )
    serve.add_argument(
        "--behaviour",
        type=Path,
        metavar="FILE",
        help="misbehave as this TOML file's rules say: vanish, delay, status, corrupt, mute, "
        "reset on chosen commands (docs/testbed.md)",
    )
    serve.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help="append each rule that fires to FILE as a JSON line (with --behaviour)",
    )
    serve.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="append every APDU exchange the card answers to FILE, one JSON line each "
        "(read it with 'farelab trace show')",
    )
    serve.add_argument(
        "--from-trace",
        type=Path,
        metavar="FILE",
        help="instead of a card image, a stub card that answers from a recorded trace: a "
        "command other than the one recorded next is answered 6F00 and logged",
    )
    serve.set_defaults(func=_serve)

    tap = cmds.add_parser(
        "tap",
        help="present the card once, then take it away",
        description="Present the card to vpcd for --hold seconds, as a hand would, then remove "
        "it. The command reports the card's balance before and after.",
    )
    tap.add_argument("path", type=Path, metavar="PATH", help="card image file")
    tap.add_argument(
        "--vpcd",
        default=DEFAULT_VPCD,
        metavar="HOST:PORT",
        help=f"where vpcd listens (default {DEFAULT_VPCD})",
    )
    tap.add_argument(
        "--hold",
        type=float,
        default=1.5,
        metavar="SECONDS",
        help="how long the card stays in the field (default 1.5; pcscd notices a "
        "card within about 0.4 s)",
    )
    tap.set_defaults(func=_tap)

    relay = cmds.add_parser(
        "relay",
        help="make a card in any PC/SC reader appear in pcscd's virtual reader",
        description="Relay the card in a PC/SC reader into vpcd's virtual reader, so that a "
        "terminal under test talks to that card while farelab records the exchanges (--trace) "
        "and makes the card misbehave (--behaviour). Each card put in the reader is presented; "
        "a card taken out of it leaves the virtual reader. Until Ctrl-C or SIGTERM.",
    )
    relay.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="pcsc:READER",
        help="the PC/SC reader the card is in (a prefix of its name picks the first match)",
    )
    relay.add_argument(
        "--to",
        default="vpcd",
        metavar="vpcd[:HOST:PORT]",
        help=f"the virtual reader's vpcd (default vpcd:{DEFAULT_VPCD}; port 35964 is the "
        "second slot, 'Virtual PCD 00 01')",
    )
    relay.add_argument(
        "--behaviour",
        type=Path,
        metavar="FILE",
        help="make the relayed card misbehave as this TOML file's rules say (docs/testbed.md)",
    )
    relay.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help="append each rule that fires to FILE as a JSON line (with --behaviour)",
    )
    relay.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="append every APDU exchange relayed to FILE, one JSON line each, as the terminal "
        "saw it (read it with 'farelab trace show')",
    )
    relay.set_defaults(func=_relay)

    zoo = cmds.add_parser(
        "zoo",
        help="write card images for a terminal's edge cases, with an answer key",
        description="Write into DIR a card image for each edge state a validator (or, with "
        "--kiosk, a top-up kiosk) must get right, DIR/validator.toml (the devices in farelab's "
        "configuration format: whitelist, hotlist, station or route fare) and "
        "DIR/manifest.json: for each card, its case and what a correct terminal does with it, "
        "as farelab's own validator decides at the zoo's moment (--at). See docs/testbed.md.",
    )
    zoo.add_argument("dir", type=Path, metavar="DIR", help="folder to write (new or empty)")
    zoo.add_argument("--network", required=True, metavar="NAME", help="a shipped network")
    where = zoo.add_mutually_exclusive_group(required=True)
    where.add_argument("--station", metavar="S", help="metro gates (entry and exit) at S")
    where.add_argument("--bus", metavar="FARE_YUAN", help="a bus with this route fare")
    zoo.add_argument("--kiosk", action="store_true", help="add a top-up kiosk's cards")
    zoo.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of serials and randoms (default 0)"
    )
    zoo.add_argument(
        "--keys",
        type=Path,
        metavar="FILE",
        help="issuer master keys the cards carry (TOML, as card new --keys; default: demo keys)",
    )
    zoo.add_argument(
        "--at",
        metavar="ISO-8601",
        help="the moment the answer key assumes, with offset (default: now)",
    )
    zoo.add_argument(
        "--reader",
        default="sim",
        metavar="READER",
        help='the devices\' reader in validator.toml: "sim" (default) or "pcsc:NAME"',
    )
    zoo.set_defaults(func=_zoo)


def _relay(args: argparse.Namespace) -> int:
    # The relay reads a PC/SC reader (pyscard): loaded only when it runs.
    from farelab._relay import relay_command  # noqa: PLC0415

    return relay_command(args)


def _zoo(args: argparse.Namespace) -> int:
    # The zoo prices its cards with the validator's rules (numpy): loaded only when it runs.
    from farelab._zoo import zoo_command  # noqa: PLC0415

    return zoo_command(args)


def _parse_day(text: str | None, what: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise CliError(f"{what} {shown(text)} is not a date (YYYY-MM-DD)") from None


def _new(args: argparse.Namespace) -> int:
    import secrets  # noqa: PLC0415  (hashlib and OpenSSL: the other card commands do without)

    path: Path = args.path
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long to be a file, say
        raise CliError(f"{describe_path(path)}: cannot be a card image: {exc.strerror}") from None
    if exists and not args.force:
        raise CliError(f"{describe_path(path)} already exists; use --force to overwrite it")
    try:
        balance = yuan_to_fen(args.balance, what="--balance")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not 0 <= balance <= 100_000:
        raise CliError(f"--balance must be 0 to 1000 yuan (R4), got {shown(args.balance)}")
    try:
        issuer = bytes.fromhex(args.issuer)
    except ValueError:
        raise CliError(f"--issuer {shown(args.issuer)} is not hex") from None
    if len(issuer) != 8:
        raise CliError(f"--issuer must be 16 hex digits (8 bytes), got {shown(args.issuer)}")
    keys: IssuerKeys = DEMO_KEYS
    if args.keys is not None:
        try:
            keys = load_keys_file(args.keys)
        except KeysFileError as exc:
            raise CliError(str(exc)) from None
    serial = args.serial if args.serial is not None else f"{secrets.randbelow(10**20):020d}"
    if not serial.isdigit() or not 1 <= len(serial) <= 20:
        raise CliError(f"--serial must be 1 to 20 digits, got {shown(serial)}")
    issued = _parse_day(args.issued, "--issued") or datetime.now(CST).date()
    expires = _parse_day(args.expires, "--expires")
    pin_rules: dict[str, Any] = {}
    if args.profile is not None:
        # Only here: the backend's import would slow every other card command.
        from farelab.backend import load_profiles  # noqa: PLC0415

        profiles = load_profiles()
        profile = profiles.get(args.profile)
        if profile is None:
            raise CliError(
                f"--profile {shown(args.profile)} is not a profile "
                f"(one of {', '.join(sorted(profiles))})"
            )
        pin_rules = {
            "initial_pin": profile.initial_pin,
            "pin_try_limit": profile.pin_tries_per_day,
        }
    try:
        image = personalise(
            serial=serial,
            issued=issued,
            alg=Alg.from_label(args.alg),
            card_type=CardType.from_label(args.card_type),
            balance=balance,
            expires=expires,
            issuer_id=issuer,
            keys=keys,
            **pin_rules,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    # A card overwritten with --force may be in a field: wait for it like any other user.
    lock = ImageLock(path)
    try:
        lock.acquire()
        save_image(path, image)
    except ImageError as exc:
        raise CliError(str(exc)) from None
    finally:
        lock.release()
    public = image.public
    profile_note = f", {args.profile} profile" if args.profile is not None else ""
    print(
        f"card {public.serial} ({public.card_type.label}, {image.alg.label}{profile_note}) "
        f"written to {describe_path(path)}: "
        f"balance {fen_to_yuan(image.balance)} yuan, valid {public.start} to {public.expiry}"
    )
    return 0


def _load(path: Path) -> CardImage:
    try:
        return load_image(path)
    except ImageError as exc:
        raise CliError(str(exc)) from None


def _bcd_day(raw: bytes) -> str:
    try:
        day = parse_bcd_date(raw)
    except ValueError:
        return raw.hex().upper()
    return day.isoformat() if day else ""


def _bcd_clock(raw: bytes) -> str:
    text = raw.hex()
    return f"{text[0:2]}:{text[2:4]}:{text[4:6]}" if text.isdigit() else text.upper()


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _hex(raw: bytes) -> str:
    return raw.hex().upper()


def _metro_json(raw: bytes) -> dict[str, Any]:
    try:
        rec = MetroRecord.decode(raw)
    except ValueError as exc:
        return {"raw": _hex(raw), "error": str(exc)}
    return {
        "status": rec.status.name.lower(),
        "entry_station": _hex(rec.entry_station),
        "entry_line": rec.entry_line,
        "entry_terminal": _hex(rec.entry_terminal),
        "entry_time": _iso(rec.entry_time),
        "entry_city": rec.entry_city,
        "exit_station": _hex(rec.exit_station),
        "exit_line": rec.exit_line,
        "exit_terminal": _hex(rec.exit_terminal),
        "exit_time": _iso(rec.exit_time),
        "marked_amount_fen": rec.marked_amount,
        "entry_amount_fen": rec.entry_amount,
        "balance_after_entry_fen": rec.balance_after_entry,
        "exit_amount_fen": rec.exit_amount,
        "raw": _hex(raw),
    }


def _bus_json(raw: bytes) -> dict[str, Any]:
    try:
        rec = BusRecord.decode(raw)
    except ValueError as exc:
        return {"raw": _hex(raw), "error": str(exc)}
    return {
        "status": "boarded" if rec.status == BusRecord.BOARDED else "none",
        "route": _hex(rec.route),
        "terminal": _hex(rec.terminal),
        "time": _iso(rec.time),
        "amount_fen": rec.amount,
        "balance_after_fen": rec.balance_after,
        "transfers": rec.transfers,
        "raw": _hex(raw),
    }


def _trip_json(raw: bytes) -> dict[str, Any]:
    try:
        rec = TripRecord.decode(raw)
    except ValueError as exc:
        return {"raw": _hex(raw), "error": str(exc)}
    return {
        "type": _TX_NAMES.get(TxType(rec.tx_type), f"{rec.tx_type:02X}")
        if rec.tx_type in TxType._value2member_map_
        else f"{rec.tx_type:02X}",
        "industry": rec.industry.name.lower(),
        "terminal": _hex(rec.terminal),
        "line": rec.line,
        "station": _hex(rec.station),
        "amount_fen": rec.amount,
        "balance_fen": rec.balance,
        "time": rec.time.isoformat(),
        "city": rec.city,
        "counter": rec.counter,
    }


def card_json(image: CardImage) -> dict[str, Any]:
    """The decoded card, as ``farelab card show --json`` prints it (a damaged EF15's fields
    as null, its bytes under ``ef15``)."""
    public = None if image.ef15_damaged else image.public
    log = []
    for raw in image.log:
        rec = LogRecord.decode(raw)
        log.append(
            {
                "counter": rec.counter,
                "type": _TX_NAMES.get(TxType(rec.tx_type), "unknown")
                if rec.tx_type in TxType._value2member_map_
                else "unknown",
                "type_code": f"{rec.tx_type:02X}",
                "amount_fen": rec.amount,
                "terminal": _hex(rec.terminal),
                "date": _bcd_day(rec.day),
                "time": _bcd_clock(rec.time),
            }
        )
    social = image.social
    return {
        "serial": image.serial,
        "issuer": _hex(image.ef15[:8]),
        "city": image.ef15[2:4].hex(),
        "type": public.card_type.label if public else None,
        "alg": image.alg.label,
        "start": public.start.isoformat() if public else None,
        "expires": public.expiry.isoformat() if public else None,
        **({"ef15": _hex(image.ef15)} if public is None else {}),
        "balance_fen": image.balance,
        "balance_yuan": fen_to_yuan(image.balance),
        "max_balance_fen": image.max_balance,
        "offline_counter": image.offline_counter,
        "online_counter": image.online_counter,
        "blocked": image.blocked,
        "log": log,
        "transit": {"metro": _metro_json(image.metro), "bus": _bus_json(image.bus)},
        "trips": [_trip_json(r) for r in image.trips],
        "social_security": {
            "pin_changed": social.pin_changed,
            "pin_locked": social.locked,
            "pin_failures": social.failures,
        },
    }


def _show(args: argparse.Namespace) -> int:
    doc = card_json(_load(args.path))
    if args.json:
        json.dump(doc, sys.stdout, ensure_ascii=False, indent=2)
        print()
        return 0
    flags = "  BLOCKED (hotlisted)" if doc["blocked"] else ""
    print(f"card {doc['serial']}  {doc['type']}, {doc['alg']}, issuer {doc['issuer']}{flags}")
    print(f"  valid      {doc['start']} to {doc['expires']}")
    print(
        f"  balance    {doc['balance_yuan']} yuan ({doc['balance_fen']} fen); "
        f"{doc['offline_counter']} purchases, {doc['online_counter']} loads"
    )
    metro = doc["transit"]["metro"]
    if metro.get("status") not in (None, "none"):
        when = metro["entry_time"] if metro["status"] == "entered" else metro["exit_time"]
        print(f"  metro      {metro['status']} at {when}")
    bus = doc["transit"]["bus"]
    if bus.get("status") == "boarded":
        print(f"  bus        boarded at {bus['time']}, paid {fen_to_yuan(bus['amount_fen'])}")
    if doc["log"]:
        print("  log (EF18, newest first):")
        print("    ctr  type       amount    terminal      date        time")
        for rec in doc["log"]:
            print(
                f"    {rec['counter']:>3}  {rec['type']:<9}  {fen_to_yuan(rec['amount_fen']):>7}  "
                f"{rec['terminal']}  {rec['date']:<10}  {rec['time']}"
            )
    else:
        print("  log        empty")
    return 0


def parse_vpcd(text: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port); CliError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--vpcd {shown(text)} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _behaviour(args: argparse.Namespace) -> Behaviour | None:
    """``--behaviour``'s rules, checked (CliError naming the bad key)."""
    from farelab.card import Behaviour, BehaviourError  # noqa: PLC0415

    if args.behaviour is None:
        if args.log is not None:
            raise CliError("--log needs --behaviour")
        return None
    try:
        return Behaviour.load(args.behaviour)
    except BehaviourError as exc:
        raise CliError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    host, port = parse_vpcd(args.vpcd)
    if (args.path is None) == (args.from_trace is None):
        raise CliError("card serve takes a card image PATH or --from-trace FILE (one of them)")
    if args.from_trace is not None:
        return _serve_trace(args, host, port)
    behaviour = _behaviour(args)
    with contextlib.ExitStack() as stack:
        trace = trace_writer(args.trace)
        if trace is not None:
            stack.callback(trace.close)
        log = append_log(stack, args.log)
        return _serve_card(args.path, host, port, behaviour, log, trace=trace)


def _serve_trace(args: argparse.Namespace, host: str, port: int) -> int:
    """``card serve --from-trace``: the recording answers, and leaves the field where the
    recorded card left it (a torn exchange), coming back at once as a hand would."""
    import logging  # noqa: PLC0415

    from farelab.card import TraceCard, TraceError, TracingEndpoint, ViccClient, ViccError  # noqa: PLC0415

    if args.behaviour is not None:
        raise CliError("--behaviour applies to a card image, not to --from-trace")
    try:
        recorded = TraceCard.from_file(args.from_trace)
    except TraceError as exc:
        raise CliError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format="farelab card: %(message)s")
    stop = threading.Event()
    stop_on_signals(stop)
    trace = trace_writer(args.trace)
    card: CardEndpoint = recorded if trace is None else TracingEndpoint(recorded, trace)
    print(
        f"recording {describe_path(args.from_trace)} ({recorded.remaining} exchanges) presented "
        f"to vpcd at {host}:{port} (reader 'Virtual PCD'); Ctrl-C to take it away",
        flush=True,
    )
    try:
        while not stop.is_set():
            client = ViccClient(card, host=host, port=port, drop_after=recorded.tears_after)
            client.connect(timeout=5.0)
            client.serve(stop=stop)
    except ViccError as exc:
        raise CliError(str(exc)) from None
    finally:
        if trace is not None:
            trace.close()
    print(
        f"recording removed; {recorded.remaining} exchanges not asked for, "
        f"{recorded.mismatches} commands not in it"
    )
    return 0


def _serve_card(
    path: Path,
    host: str,
    port: int,
    behaviour: Behaviour | None,
    log: TextIO | None,
    *,
    trace: TraceWriter | None = None,
) -> int:
    from farelab.card import (  # noqa: PLC0415
        BehavingCard,
        SimulatedCard,
        TracingEndpoint,
        ViccError,
        vicc_serve,
    )

    try:
        sim = SimulatedCard.from_file(path)
    except ImageError as exc:
        raise CliError(str(exc)) from None
    card: CardEndpoint = sim if behaviour is None else BehavingCard(sim, behaviour, log=log)
    if trace is not None:
        card = TracingEndpoint(card, trace)  # what the terminal saw, misbehaviour included
    stop = threading.Event()
    stop_on_signals(stop)
    print(
        f"card {sim.image.serial} presented to vpcd at {host}:{port} "
        "(reader 'Virtual PCD'); Ctrl-C to take it away",
        flush=True,
    )
    try:
        vicc_serve(card, host=host, port=port, stop=stop)
    except (ViccError, ImageError) as exc:
        raise CliError(str(exc)) from None
    finally:
        sim.close()
    print(f"card removed; balance {fen_to_yuan(sim.image.balance)} yuan")
    return 0


def _tap(args: argparse.Namespace) -> int:
    from farelab.card import SimulatedCard, ViccError, vicc_tap  # noqa: PLC0415

    host, port = parse_vpcd(args.vpcd)
    if not 0 < args.hold <= 3600:
        raise CliError("--hold must be between 0 and 3600 seconds")
    try:
        sim = SimulatedCard.from_file(args.path)
    except ImageError as exc:
        raise CliError(str(exc)) from None
    before = sim.image.balance
    try:
        vicc_tap(sim, host=host, port=port, hold=args.hold)
    except (ViccError, ImageError) as exc:
        raise CliError(str(exc)) from None
    finally:
        sim.close()
    after = sim.image.balance
    print(
        f"card {sim.image.serial} tapped for {args.hold:g} s: {sim.apdus} APDUs, "
        f"balance {fen_to_yuan(before)} -> {fen_to_yuan(after)} yuan"
    )
    return 0

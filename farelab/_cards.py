"""``farelab cards``: a card's life in the backend's records — issue, report lost, find,
un-freeze, replace, exchange, refund, renew, cancel, the e-card, the PIN reset — each action
checked by the card-life core, journalled once, and carried to the devices through the ledger's
hotlist (docs/card-life.md)."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from farelab._errors import CliError
from farelab._topup import HOST_LEDGER, state_folder
from farelab.backend import (
    NewCard,
    Store,
    StoreError,
    card_action,
    issue_card,
    load_profiles,
    show_card,
)
from farelab.card import (
    CST,
    DEMO_KEYS,
    CardSnapshot,
    ImageError,
    InProcessReader,
    IssuerKeys,
    KeysFileError,
    PinReset,
    PinResetDone,
    Psam,
    PsamKeys,
    ReadCard,
    Reader,
    ReaderError,
    Refused,
    SimulatedCard,
    drive,
    fen_to_yuan,
    load_image,
    load_keys_file,
)
from farelab.protocol import card_serial_of

__all__ = ["register"]

# Each subcommand: the core's action, and its help.
_ACTIONS: dict[str, tuple[str, str]] = {
    "report-loss": ("report_loss", "report the card lost, by --phone (lapses) or --formal"),
    "make-formal": ("make_formal", "make a phone report formal (the card is frozen)"),
    "found": ("found", "withdraw a phone report: the card was found"),
    "unfreeze": ("unfreeze", "un-freeze a formally reported card found again"),
    "replace": ("replace", "replace a card reported lost by the --new card"),
    "exchange": ("exchange", "exchange a damaged card for the --new card"),
    "renew": ("renew", "renew a card in its last months by the --new card"),
    "refund": ("refund", "record the transit balance refunded (the cash: 'topup refund')"),
    "cancel": ("cancel", "cancel the card"),
    "ecard-issue": ("ecard_issue", "issue the card's electronic social-security card"),
}
_OUTCOME = (
    'With --json: {"result": "done"|"refused", "reason", ...}. Exit status 0 when done, 1 when '
    "refused, 2 for bad options or files."
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cards`` and its subcommands."""
    cards = sub.add_parser(
        "cards",
        help="card records: issue, report lost, replace, refund, cancel; status and e-card",
        description="A card's life in the backend's records by its issuer's profile "
        "(docs/card-life.md): every action checked against the card's recorded events, "
        "journalled once (the same action at the same --at is answered the same), and carried "
        "to the devices through the ledger's hotlist. The moment is --at (ISO 8601 with its "
        "offset; default now): what lapses by itself is computed from it, never by a timer.",
    )
    cmds = cards.add_subparsers(dest="cards_command", required=True, metavar="ACTION")
    profiles = sorted(load_profiles())
    issue = cmds.add_parser(
        "issue",
        help="enter a card in the records with its issuer profile",
        description=f"Enter CARD (a card image, holding no balance) with --profile; prints the "
        f"fee charged and its status. {_OUTCOME}",
    )
    issue.add_argument("card", type=Path, metavar="CARD", help="the card's image")
    issue.add_argument("--profile", required=True, choices=profiles, help="its issuer's profile")
    _common(issue)
    issue.set_defaults(func=_issue)
    for name, doc in (
        ("status", "the card's state, transit, social security, balance and e-card"),
        ("ecard-status", "the card's electronic social-security card: usable, suspended, none"),
    ):
        show = cmds.add_parser(
            name,
            help=doc,
            description=f"{doc[0].upper()}{doc[1:]} at --at. Asked at or after the card's last "
            f"event, it also brings the card's hotlist entry up to that moment. {_OUTCOME}",
        )
        show.add_argument("serial", metavar="SERIAL", help="the card's serial")
        _common(show)
        show.set_defaults(func=_show, ecard_only=name == "ecard-status")
    for name, (action, doc) in _ACTIONS.items():
        cmd = cmds.add_parser(name, help=doc, description=f"{doc[0].upper()}{doc[1:]}. {_OUTCOME}")
        cmd.add_argument("serial", metavar="SERIAL", help="the card's serial")
        if action == "report_loss":
            kind = cmd.add_mutually_exclusive_group(required=True)
            kind.add_argument("--phone", dest="kind", action="store_const", const="phone")
            kind.add_argument("--formal", dest="kind", action="store_const", const="formal")
        if action in ("replace", "exchange", "renew"):
            cmd.add_argument(
                "--new",
                required=True,
                type=Path,
                metavar="CARD",
                help="the new card's image (it enters the records with this card's profile)",
            )
        _common(cmd)
        cmd.set_defaults(func=_act, action=action)
    _pin_reset_parser(cmds)


def _pin_reset_parser(cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doc = "reset the card's social-security PIN at an outlet (unlocks it, R8)"
    cmd = cmds.add_parser(
        "pin-reset",
        help=doc,
        description=f"Reset the card's social-security PIN at an outlet (unlocks it, R8): "
        f"checked by the card-life core, then written to the card with RESET RETRY COUNTER "
        f"under the issuer's maintenance key, then journalled. The PIN is never printed. "
        f"{_OUTCOME}",
    )
    cmd.add_argument("serial", metavar="SERIAL", help="the card's serial")
    where = cmd.add_mutually_exclusive_group(required=True)
    where.add_argument("--card", type=Path, metavar="CARD", help="the card's image")
    where.add_argument(
        "--reader", metavar="pcsc:NAME", help="the card in this PC/SC reader instead"
    )
    cmd.add_argument(
        "--new-pin",
        required=True,
        metavar="NNNNNN",
        help="the new PIN, 6 digits, neither six identical nor six consecutive ones",
    )
    cmd.add_argument(
        "--keys",
        type=Path,
        metavar="FILE",
        help="TOML file of the issuer's master keys (its maintenance key signs the reset; "
        "default: the demo issuer's)",
    )
    _common(cmd)
    cmd.set_defaults(func=_pin_reset, action="pin_reset")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--at",
        metavar="TIME",
        help="the moment, ISO 8601 with its offset, e.g. 2026-11-20T15:00+08:00 (default now)",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        help="the ledger's database URL (default: the in-process top-up host's, "
        f"sqlite:///{state_folder() / HOST_LEDGER})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _moment(text: str | None) -> datetime:
    if text is None:
        return datetime.now(CST)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--at {text[:40]!r} is not an ISO 8601 time") from None
    if at.utcoffset() is None:
        raise CliError(f"--at {text[:40]!r} has no offset (e.g. +08:00 for China time)")
    return at


def _serial(text: str) -> str:
    try:
        return card_serial_of(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _new_card(path: Path, option: str) -> NewCard:
    try:
        image = load_image(path)
        issuer = image.public.issuer_id.hex().upper()
    except (ImageError, ValueError) as exc:
        raise CliError(f"{option}: {exc}") from None
    return NewCard(
        serial=image.serial,
        issuer=issuer,
        balance_fen=image.balance,
        valid_until=image.public.expiry,  # the validity written on the card at issue (R9)
    )


def _store(url: str | None) -> Store:
    if url is None:
        folder = state_folder()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"cannot make the folder {folder}: {exc.strerror}") from None
        url = f"sqlite:///{folder / HOST_LEDGER}"
    try:
        return Store(url)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def _print(args: argparse.Namespace, answer: dict[str, Any]) -> int:
    done = answer["result"] == "done"
    if args.json:
        print(json.dumps(answer))
    elif not done:
        print(f"refused ({answer['reason']}): {answer['detail']}")
    else:
        print(_line(answer))
    return 0 if done else 1


def _line(answer: dict[str, Any]) -> str:
    """A done answer in words."""
    if "state" not in answer:
        return f"card {answer['serial']}: e-card {answer['ecard']}"
    words = [
        f"card {answer['serial']} ({answer['profile']}): {answer['state']}",
        f"transit {'usable' if answer['transit_usable'] else 'not usable'}",
        f"social security {'usable' if answer['social_security_usable'] else 'blocked'}",
        f"e-card {answer['ecard']}",
    ]
    if answer["balance_fen"] is not None:
        words.append(f"balance {fen_to_yuan(answer['balance_fen'])} yuan")
    if answer["balance_moves_on"] is not None:
        words.append(f"balance moves on {answer['balance_moves_on']}")
    if answer.get("new_serial"):
        words.append(f"new card {answer['new_serial']}")
    if "fee_fen" in answer:
        words.append(f"fee {fen_to_yuan(answer['fee_fen'])} yuan")
    return "; ".join(words)


def _issue(args: argparse.Namespace) -> int:
    at = _moment(args.at)
    card = _new_card(args.card, "CARD")
    store = _store(args.db)
    try:
        answer = issue_card(store, card, profile=args.profile, at=at)
    finally:
        store.close()
    return _print(args, answer)


def _show(args: argparse.Namespace) -> int:
    at = _moment(args.at)
    serial = _serial(args.serial)
    store = _store(args.db)
    try:
        answer = show_card(store, serial, at)
    finally:
        store.close()
    if args.ecard_only and answer["result"] == "done":
        answer = {k: answer[k] for k in ("result", "reason", "serial", "ecard")}
    return _print(args, answer)


def _act(args: argparse.Namespace) -> int:
    at = _moment(args.at)
    serial = _serial(args.serial)
    new = _new_card(args.new, "--new") if getattr(args, "new", None) is not None else None
    store = _store(args.db)
    try:
        answer = card_action(
            store, serial, args.action, at, kind=getattr(args, "kind", None), new=new
        )
    finally:
        store.close()
    return _print(args, answer)


def _pin_reader(args: argparse.Namespace) -> tuple[Reader, SimulatedCard | None]:
    """The reader the card is in, and the simulated card when it is an image file."""
    if args.reader is not None:
        if not args.reader.startswith("pcsc:"):
            raise CliError(f"--reader {args.reader[:40]!r} is not pcsc:NAME")
        from farelab.card import PcscReader  # noqa: PLC0415 - pyscard only for PC/SC readers

        try:
            return PcscReader(args.reader.removeprefix("pcsc:")), None
        except ReaderError as exc:
            raise CliError(str(exc)) from None
    try:
        sim = SimulatedCard.from_file(args.card)
    except ImageError as exc:
        raise CliError(f"--card: {exc}") from None
    reader = InProcessReader()
    reader.insert(sim)
    return reader, sim


def _reset_on_card(
    reader: Reader, serial: str, keys: IssuerKeys, pin: str
) -> tuple[str, str] | None:
    """The PIN reset on the card in ``reader``: None when it took it, else why not."""
    try:
        snap = drive(reader, ReadCard(records=()))
        if not isinstance(snap, CardSnapshot):
            return "card_error", "the card's transit application could not be read"
        if snap.serial != serial:
            return "wrong_card", f"the card presented is {snap.serial}, not {serial}"
        psam = Psam(terminal_id=bytes(6), issuers={snap.issuer_id: PsamKeys.of(keys)})
        result = drive(reader, PinReset(psam=psam, card=snap, new_pin=pin))
    except (ReaderError, ImageError) as exc:
        return "card_error", str(exc)
    if isinstance(result, PinResetDone):
        return None
    if isinstance(result, Refused) and result.reason == "weak_pin":
        return "weak_pin", "the new PIN is six identical or six consecutive digits (R8)"
    if isinstance(result, Refused):
        return result.reason, f"the card refused the PIN reset ({result.sw_hex})"
    return "card_error", "the PIN reset ended without an answer"


def _pin_reset(args: argparse.Namespace) -> int:
    at = _moment(args.at)
    serial = _serial(args.serial)
    pin: str = args.new_pin
    if len(pin) != 6 or not pin.isdigit():
        raise CliError("--new-pin must be 6 digits")
    keys: IssuerKeys = DEMO_KEYS
    if args.keys is not None:
        try:
            keys = load_keys_file(args.keys)
        except KeysFileError as exc:
            raise CliError(str(exc)) from None
    reader, sim = _pin_reader(args)
    store = _store(args.db)
    try:
        answer = card_action(
            store,
            serial,
            "pin_reset",
            at,
            on_card=lambda: _reset_on_card(reader, serial, keys, pin),
        )
    finally:
        store.close()
        if sim is not None:
            sim.close()
    return _print(args, answer)

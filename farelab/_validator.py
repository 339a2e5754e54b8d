"""``farelab validator``: run validators, or replay taps through them deterministically."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from farelab._errors import CliError
from farelab._options import append_log, trace_writer
from farelab.card import describe_path
from farelab.protocol import ParamsError
from farelab.validator import (
    PULL_STEPS,
    Config,
    ConfigError,
    Journal,
    JournalError,
    Parameters,
    ReplayError,
    load_config,
    load_params,
    parse_taps,
    positive_seconds,
    replay,
    result_json,
)
from farelab.validator import run as run_loop

if TYPE_CHECKING:
    from farelab.validator import MqttUplink, UplinkProcess

__all__ = ["register"]

CONFIG_HELP = """\
The configuration is one TOML file describing one or more devices:

  [journal]                       # optional; replay uses --journal or memory
  path = "journal.db"             # SQLite (WAL); relative to the config file
  synchronous = "normal"          # "full" also survives a power cut (one fsync per commit)
  max_outbox = 1000000            # bound on records waiting for the uplink

  [psam]                          # optional
  keys = "keys.toml"              # issuer master keys (default: the demo issuer's test keys)

  [[validator]]
  id = "bus-7"                    # 1-64 letters, digits, '.', '_', '-' (its broker username)
  kind = "bus"                    # or "metro-gate"
  network = "taiyuan"             # shipped: taiyuan, changzhou, nanjing, beijing; or FILE[:NAME]
  route = "7"                     # bus: route code (up to 4 characters)
  route_fare = 1.0                # bus: base fare in yuan, whole fen, at most 1000
                                  # (default: the network's bus fare)
  line = "L2"                     # metro-gate: line key or number
  station = "大南门"              # metro-gate: Chinese or pinyin name ("Dananmen")
  direction = "both"              # metro-gate: "entry", "exit" or "both" (decided by the card)
  terminal_id = "000000000B07"    # the PSAM's 6-byte terminal id, hex
  whitelist = ["1310000000000000"]  # accepted issuer ids (R10)
  hotlist = []                    # card serials to refuse and block
  reader = "sim"                  # or "pcsc:<reader name>", e.g. "pcsc:Virtual PCD 00 00"
  mqtt_password = "…"             # the device's own broker password (its username is its id)
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``validator`` and its subcommands."""
    validator = sub.add_parser(
        "validator",
        help="bus and metro validators: run them, or replay taps",
        description="Bus and metro validators: decide in well under 100 ms, debit offline "
        "through the PSAM, journal durably before showing the result.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = validator.add_subparsers(dest="validator_command", required=True, metavar="SUBCOMMAND")
    run = cmds.add_parser(
        "run",
        help="run the validators of a config on their readers",
        description="Run every device of the config: PC/SC readers are watched for cards; "
        'devices with reader = "sim" take tap requests on stdin, one JSON object a line: '
        '{"device": ID, "card": PATH} (or "from_trace": TRACE.jsonl in place of "card": a stub '
        'card answering from a recording), optionally with "at" (ISO-8601 with offset: the tap\'s '
        'time, for a simulated clock) and "pull_after" (as in replay). Each tap prints one JSON '
        "line (as replay does, plus "
        '"at" and "beep": pass|stop). With only sim readers the command ends when stdin '
        "ends; otherwise on Ctrl-C or SIGTERM.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, required=True, metavar="FILE", help="device config")
    run.add_argument(
        "--journal",
        type=Path,
        metavar="DB",
        help="journal file (default: the config's [journal] path, else "
        "validator-journal.db beside the config)",
    )
    run.add_argument(
        "--broker",
        metavar="URL",
        help="upload the journal's outbox to this MQTT broker and take parameters from it "
        "(mqtt://[user:password@]host[:port], mqtts:// for TLS)",
    )
    run.add_argument(
        "--uplink",
        choices=("process", "thread"),
        default="process",
        help="where the uplink runs: a process of its own at idle priority, so that taps never "
        "wait for it (default), or a thread of this process (one process less)",
    )
    run.add_argument(
        "--params",
        type=Path,
        metavar="FILE",
        help='parameters file, applied whenever it changes: {"version": N, '
        '"hotlist": [...], "whitelist": [...]}',
    )
    _trace_option(run)
    run.set_defaults(func=_run)

    rp = cmds.add_parser(
        "replay",
        help="replay a taps file deterministically, in-process",
        description='Replay taps in-process. Each input line: {"device": ID, "card": PATH, '
        '"at": ISO-8601 with offset, "pull_after": optional, one of '
        + ", ".join(PULL_STEPS)
        + ' — the card leaves right after that command reached it}; "from_trace": '
        'TRACE.jsonl in place of "card" taps a stub card that answers from a recording; '
        '"behaviour": FILE.toml makes the card misbehave as the file\'s rules say. '
        "Each output line (JSON): "
        "device, card_serial, result, reason, fare_fen, balance_fen, tac, grey. Card images are "
        "updated as the taps go.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument("--config", type=Path, required=True, metavar="FILE", help="device config")
    rp.add_argument(
        "--taps",
        type=Path,
        required=True,
        metavar="TAPS.jsonl",
        help="taps to replay, one JSON object a line ('-' for stdin)",
    )
    rp.add_argument(
        "--journal",
        type=Path,
        metavar="DB",
        help="journal file (default: the config's [journal] path, else memory)",
    )
    rp.add_argument(
        "--broker",
        metavar="URL",
        help="after the taps, upload the outbox to this MQTT broker and return once "
        "the backend has acknowledged all of it",
    )
    rp.add_argument(
        "--upload-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="give up waiting for acknowledgements after this long (default 30); "
        "what is still pending is sent by the next run with the same journal",
    )
    rp.add_argument(
        "--behaviour-log",
        type=Path,
        metavar="FILE",
        help='append each firing of a taps line\'s "behaviour" rules to FILE, one JSON line '
        "each (the tap's time, line, device and card, the rule, the command and the action)",
    )
    _trace_option(rp)
    rp.set_defaults(func=_replay)


def _trace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="append every APDU exchange with the cards to FILE, one JSON line each "
        "(read it with 'farelab trace show')",
    )


def _seconds(text: str) -> float:
    try:
        return positive_seconds(text, "a timeout")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    if args.params is not None:
        try:  # a file that is not there now would be applied silently whenever it appears
            load_params(args.params, Parameters())
        except ParamsError as exc:
            raise CliError(f"--params {exc}") from None
    path = args.journal or config.journal or args.config.parent / "validator-journal.db"
    try:
        journal = Journal(path, synchronous=config.synchronous, max_outbox=config.max_outbox)
    except JournalError as exc:
        raise CliError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format="farelab validator: %(message)s")
    names = ", ".join(f"{dc.device.id} ({dc.device.reader})" for dc in config.devices)
    print(
        f"farelab validator: running {names}; journal {describe_path(path)}",
        file=sys.stderr,
        flush=True,
    )

    in_thread = _uplink(args.broker, config)
    uplink: MqttUplink | UplinkProcess | None = in_thread
    if in_thread is not None and args.uplink == "process":
        from farelab.validator import UplinkProcess  # noqa: PLC0415

        uplink = UplinkProcess.like(in_thread)
    trace = trace_writer(args.trace)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_loop(
            config,
            journal,
            source=sys.stdin,
            out=sys.stdout,
            params_file=args.params,
            uplink=uplink,
            stop=stop,
            trace=trace,
        )

    try:
        asyncio.run(main())
    finally:
        journal.close()
        if trace is not None:
            trace.close()
    return 0


def _replay(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    try:
        if str(args.taps) == "-":
            taps = parse_taps(iter(sys.stdin), config)
        else:
            with args.taps.open(encoding="utf-8") as f:
                taps = parse_taps(iter(f), config)
    except OSError as exc:
        raise CliError(f"{describe_path(args.taps)}: cannot read: {exc.strerror}") from None
    except ReplayError as exc:
        raise CliError(f"{describe_path(args.taps)}: {exc}") from None
    path = args.journal or config.journal or ":memory:"
    try:
        journal = Journal(path, synchronous=config.synchronous, max_outbox=config.max_outbox)
    except JournalError as exc:
        raise CliError(str(exc)) from None
    uplink = _uplink(args.broker, config)
    if uplink is not None and path == ":memory:":
        raise CliError(
            "--broker needs a journal file (--journal DB or [journal] path), so "
            "that what is not yet acknowledged survives this run"
        )
    trace = trace_writer(args.trace)
    try:
        with contextlib.ExitStack() as stack:
            log = append_log(stack, args.behaviour_log)
            for result in replay(config, taps, journal, trace=trace, behaviour_log=log):
                print(json.dumps(result_json(result), ensure_ascii=False), flush=True)
        if uplink is not None:
            return asyncio.run(_drain(uplink, journal, args.upload_timeout))
    except ReplayError as exc:
        raise CliError(f"{describe_path(args.taps)}: {exc}") from None
    finally:
        journal.close()
        if trace is not None:
            trace.close()
    return 0


def _uplink(url: str | None, config: Config) -> MqttUplink | None:
    if url is None:
        return None
    # The MQTT client is loaded only for a command that uploads.
    from farelab.protocol import BrokerURL  # noqa: PLC0415
    from farelab.validator import MqttUplink  # noqa: PLC0415

    try:
        broker = BrokerURL.parse(url)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    passwords = {dc.device.id: dc.mqtt_password for dc in config.devices if dc.mqtt_password}
    return MqttUplink(broker, [dc.device.id for dc in config.devices], passwords=passwords)


async def _drain(uplink: MqttUplink, journal: Journal, timeout: float) -> int:
    """Upload until the backend has acknowledged the whole outbox, or time out saying so."""
    from farelab.protocol import cancel_and_wait  # noqa: PLC0415

    task = asyncio.create_task(uplink.run(journal))
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            pending = await asyncio.to_thread(uplink.pending, journal)
            if pending == 0:
                acked = sum(s.records_acked for s in uplink.stats.values())
                print(
                    f"farelab validator: uploaded; the backend acknowledged {acked} records",
                    file=sys.stderr,
                )
                return 0
            if asyncio.get_running_loop().time() > deadline:
                states = ", ".join(f"{d}: {s.state.value}" for d, s in uplink.stats.items())
                print(
                    f"farelab validator: upload timed out after {timeout:g} s; {pending} "
                    f"records still pending in {describe_path(journal.path)} ({states}); "
                    "the next run with this journal sends them",
                    file=sys.stderr,
                )
                return 3
            await asyncio.sleep(0.1)
    finally:
        await cancel_and_wait(task)

"""APDU traces: ``--trace FILE`` records each exchange as a JSON line, ``farelab trace show``
decodes a recorded validator session as an analyser would, ``trace diff`` sets two side by
side, and a card answering from a recording (``from_trace``, ``card serve --from-trace``) makes
the validator reach the result the original card did."""

from __future__ import annotations

import json
import logging
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from farelab.card import (
    MISMATCH_SW,
    CardRemovedError,
    Exchange,
    InProcessReader,
    SimulatedCard,
    TraceCard,
    TraceError,
    TraceEvent,
    TraceWriter,
    TracingEndpoint,
    TracingReader,
    decode_apdu,
    find_tears,
    read_trace,
    sw_meaning,
)
from tests.cli_support import DEVICES, card, farelab, start_farelab

SESSION = [
    ("gate-in", "2026-11-23T08:00:00+08:00", None),
    ("bus-1", "2026-11-23T09:00:00+08:00", "DEBIT"),  # torn: the card leaves before the answer
    ("bus-1", "2026-11-23T09:00:09+08:00", None),  # the next tap settles it
]
RESULT_KEYS = ("device", "card_serial", "result", "reason", "fare_fen", "balance_fen", "tac")


def config(tmp_path: Path, reader: str = "sim") -> Path:
    path = tmp_path / "devices.toml"
    path.write_text(DEVICES.format(reader=reader))
    return path


def replay(tmp_path: Path, taps: list[dict[str, str]], *extra: str) -> list[dict[str, object]]:
    result = farelab(
        "validator",
        "replay",
        "--config",
        str(config(tmp_path)),
        "--taps",
        "-",
        *extra,
        stdin="".join(json.dumps(t) + "\n" for t in taps),
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(x) for x in result.stdout.splitlines()]


def recorded_session(tmp_path: Path) -> tuple[Path, list[dict[str, object]]]:
    """The three taps of SESSION on one card, recorded by ``validator replay --trace``."""
    path, trace = card(tmp_path), tmp_path / "session.jsonl"
    taps = [{"device": d, "card": str(path), "at": at} for d, at, _ in SESSION]
    for tap, (_, _, pull) in zip(taps, SESSION, strict=True):
        if pull is not None:
            tap["pull_after"] = pull
    return trace, replay(tmp_path, taps, "--trace", str(trace))


def outcome(lines: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [tuple(x[k] for k in RESULT_KEYS) for x in lines]


def test_each_exchange_is_a_json_line_with_time_reader_command_response_sw_and_elapsed(
    tmp_path: Path,
) -> None:
    trace, _ = recorded_session(tmp_path)
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert len(lines) == 19
    for line in lines:
        assert set(line) >= {"time", "reader", "command", "response", "sw", "elapsed_ms"}
        assert line["time"].endswith("+00:00")
        assert line["reader"] == "sim"
    assert lines[0]["command"] == "00A4040008A00000063201010500"
    assert lines[0]["sw"] == "9000"
    torn = lines[14]
    assert torn["command"].startswith("80540100")
    assert (torn["response"], torn["sw"]) == (None, None)
    assert "pulled" in torn["error"]


def test_trace_show_decodes_a_recorded_validator_session(tmp_path: Path) -> None:
    trace, results = recorded_session(tmp_path)
    shown = farelab("trace", "show", str(trace))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 19  # one exchange a line
    assert "SELECT" in lines[0]
    assert "aid=A000000632010105" in lines[0]
    assert "READ RECORD  sfi=1E record=1  -> 6A83 record not found" in lines[2]
    init = lines[11]
    assert "INITIALIZE FOR CAPP" in init
    assert "amount=0.50 terminal=000000000B01" in init
    assert "-> 9000 success: balance=20.00 offline_counter=1" in init
    debit = lines[7]
    assert "DEBIT FOR PURCHASE  terminal_counter=1 at=2026-11-23 08:00:00 mac1=" in debit
    assert f"tac={results[0]['tac']}" in debit
    assert "mac2=" in debit
    assert "TORN" in lines[14]
    assert "no answer" in lines[14]
    proof = lines[18]
    assert "GET TRANSACTION PROOF  type=composite purchase counter=2" in proof
    assert f"tac={results[2]['tac']}" in proof
    assert "proof of the transaction torn at #15: the card committed it" in proof


def test_trace_show_json_decodes_fields_by_name(tmp_path: Path) -> None:
    trace, _ = recorded_session(tmp_path)
    shown = farelab("trace", "show", "--json", str(trace))
    docs = [json.loads(x) for x in shown.stdout.splitlines()]
    assert docs[11]["name"] == "INITIALIZE FOR CAPP"
    assert docs[11]["fields"] == {"key": "01", "amount": "0.50", "terminal": "000000000B01"}
    assert docs[11]["answer"]["balance"] == "20.00"
    assert docs[2]["meaning"] == "record not found"
    assert docs[14]["sw"] is None
    assert docs[14]["note"].startswith("TORN")


def test_replay_from_the_recording_reaches_the_original_result(tmp_path: Path) -> None:
    trace, original = recorded_session(tmp_path)
    again = tmp_path / "again.jsonl"
    taps = [{"device": d, "from_trace": str(trace), "at": at} for d, at, _ in SESSION]
    results = replay(tmp_path, taps, "--trace", str(again))
    assert outcome(results) == outcome(original)
    assert [r["result"] for r in results] == ["accepted", "rejected", "accepted"]
    same = farelab("trace", "diff", str(trace), str(again))
    assert same.returncode == 0, same.stdout
    assert same.stdout.count(" = ") == 19


def test_run_from_the_recording_at_another_time_reaches_the_original_result(
    tmp_path: Path,
) -> None:
    trace, original = recorded_session(tmp_path)
    requests = "".join(
        json.dumps({"device": d, "from_trace": str(trace)}) + "\n" for d, _, _ in SESSION
    )
    run = farelab(
        "validator",
        "run",
        "--config",
        str(config(tmp_path)),
        "--journal",
        str(tmp_path / "run.db"),
        stdin=requests,
    )
    assert run.returncode == 0, run.stderr
    results = [json.loads(x) for x in run.stdout.splitlines()]
    # The debits carry today's time, not the recording's: answered as recorded all the same.
    assert outcome(results) == outcome(original)
    assert "differs from the recording in its data only" in run.stderr


def test_trace_diff_sets_two_sessions_side_by_side(tmp_path: Path) -> None:
    trace, _ = recorded_session(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    path = card(other, balance=3000)
    replay(
        other,
        [{"device": "bus-1", "card": str(path), "at": "2026-11-23T10:00:00+08:00"}],
        "--trace",
        str(other / "bus.jsonl"),
    )
    diff = farelab("trace", "diff", str(trace), str(other / "bus.jsonl"))
    assert diff.returncode == 1
    rows = diff.stdout.splitlines()
    assert len(rows) == 1 + 19
    assert marks(rows)[:3] == ["=", "~", "="]  # the gate reads record 1, the bus record 2
    assert "READ RECORD 9000" in rows[2]
    assert marks(rows)[7:] == ["!"] * 12  # the bus session has 7 exchanges
    assert "19 of 19 exchanges differ" not in diff.stderr
    assert "exchanges differ" in diff.stderr


def marks(rows: list[str]) -> list[str]:
    """The marks of ``trace diff``'s rows (after its header)."""
    found = [re.search(r"  ([=~!])(  |$)", row) for row in rows[1:]]
    return [m.group(1) if m else "?" for m in found]


def test_a_trace_card_answers_a_command_not_recorded_6F00_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    select_ = bytes.fromhex("00A4040008A00000063201010500")
    stub = TraceCard([Exchange("t", "r", select_, b"\x6f\x00", 0x9000, 0.1)])
    with caplog.at_level(logging.WARNING, logger="farelab.trace"):
        assert stub.transmit(bytes.fromhex("805C000204")) == MISMATCH_SW.to_bytes(2, "big")
    assert "recorded 00A4040008A00000063201010500" in caplog.text
    assert stub.mismatches == 1
    assert stub.transmit(select_) == b"\x6f\x00\x90\x00"  # the recording did not move on
    assert stub.transmit(select_) == b"\x6f\x00"  # past its end
    assert stub.remaining == 0


def test_an_exact_trace_card_refuses_a_debit_with_other_data() -> None:
    recorded = bytes.fromhex("805401000F" + "00000001" + "20261123090000" + "AABBCCDD" + "08")
    other = recorded[:-5] + bytes.fromhex("11223344") + b"\x08"
    item = Exchange("t", "r", recorded, bytes(8), 0x9000, 0.1)
    assert TraceCard([item]).transmit(other) == bytes(8) + b"\x90\x00"
    assert TraceCard([item], exact=True).transmit(other) == b"\x6f\x00"


def test_a_trace_card_leaves_the_field_where_the_recorded_card_did(tmp_path: Path) -> None:
    debit = bytes.fromhex("805401000F" + "00" * 15 + "08")
    stub = TraceCard([Exchange("t", "r", debit, None, None, 0.1, "card pulled")])
    reader = InProcessReader()
    reader.insert(stub)
    reader.pull_after(stub.tears_after)
    trace = tmp_path / "t.jsonl"
    writer = TraceWriter(trace)
    with pytest.raises(Exception, match="pulled"):
        TracingReader(reader, writer).transmit(debit)
    writer.close()
    (item,) = read_trace(trace)
    assert isinstance(item, Exchange)
    assert item.sw is None
    assert find_tears([item]) == {0: "TORN: no answer; the card may or may not have committed"}


def test_power_up_and_down_are_recorded_with_the_atr(tmp_path: Path) -> None:
    sim = SimulatedCard.from_file(card(tmp_path))
    reader = InProcessReader()
    reader.insert(sim)
    trace = tmp_path / "t.jsonl"
    writer = TraceWriter(trace)
    traced = TracingReader(reader, writer)
    atr = traced.connect()
    traced.transmit(bytes.fromhex("00A4040008A00000063201010500"))
    traced.transmit(bytes.fromhex("805C000204"))
    traced.disconnect()
    writer.close()
    sim.close()
    first, _, balance, last = read_trace(trace)
    assert isinstance(first, TraceEvent)
    assert (first.event, first.atr) == ("connect", atr)
    assert isinstance(balance, Exchange)
    assert decode_apdu(balance.command, balance.response).answer == {"balance": "20.00"}
    assert isinstance(last, TraceEvent)
    assert last.event == "disconnect"
    assert TraceCard.from_file(trace).atr() == atr


@pytest.mark.parametrize(
    ("sw", "meaning"),
    [
        (0x9000, "success"),
        (0x9401, "insufficient balance"),
        (0x9406, "MAC not available (no such completed transaction)"),
        (0x6C0F, "wrong Le: 15 bytes available"),
        (0x63C2, "wrong PIN, 2 tries left"),
        (0x1234, "unknown status word"),
    ],
)
def test_status_words_say_what_they_mean(sw: int, meaning: str) -> None:
    assert sw_meaning(sw) == meaning


def test_a_bad_trace_line_is_named(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"time": "t", "reader": "r", "command": "00A4", "sw": "9000"}\n')
    with pytest.raises(TraceError, match='line 1: "response" and "sw"'):
        read_trace(trace)
    shown = farelab("trace", "show", str(trace))
    assert shown.returncode == 2
    assert "line 1" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_topup_load_records_its_exchanges(tmp_path: Path) -> None:
    path, trace = card(tmp_path, balance=1000), tmp_path / "load.jsonl"
    load = farelab(
        "topup",
        "load",
        str(path),
        "--amount",
        "5",
        "--db",
        str(tmp_path / "host.db"),
        "--journal",
        str(tmp_path / "kiosk.db"),
        "--trace",
        str(trace),
    )
    assert load.returncode == 0, load.stderr
    shown = farelab("trace", "show", str(trace)).stdout
    assert "INITIALIZE FOR LOAD  key=01 amount=5.00" in shown
    assert "balance=10.00 online_counter=0" in shown
    assert "CREDIT FOR LOAD  at=" in shown
    assert "-> 9000 success: tac=" in shown


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_a_card_served_from_trace_through_pcscd_gets_the_original_result(
    tmp_path: Path,
) -> None:
    devices = config(tmp_path, reader="pcsc:Virtual PCD 00 00")
    path = card(tmp_path)
    recorded, served = tmp_path / "validator.jsonl", tmp_path / "served.jsonl"

    def validator(journal: str, trace: Path) -> subprocess.Popen[str]:
        return start_farelab(
            *("validator", "run", "--config", str(devices)),
            *("--journal", str(tmp_path / journal), "--trace", str(trace)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def first_result(proc: subprocess.Popen[str]) -> dict[str, object]:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready
        doc: dict[str, object] = json.loads(proc.stdout.readline())
        return doc

    proc = validator("j1.db", recorded)
    try:
        time.sleep(1.0)
        tap = farelab("card", "tap", str(path), "--hold", "1.5")
        assert tap.returncode == 0, tap.stderr
        original = first_result(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert (original["result"], original["fare_fen"], original["balance_fen"]) == (
        "accepted",
        50,
        1950,
    )

    proc = validator("j2.db", tmp_path / "second.jsonl")
    stub = start_farelab(
        *("card", "serve", "--from-trace", str(recorded)),
        *("--trace", str(served)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        again = first_result(proc)
    finally:
        stub.send_signal(signal.SIGTERM)
        stub.wait(10)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert outcome([again]) == outcome([original])
    # What the stub card answered, recorded on its side: the same session, but the debit
    # (and the records cached with it) carry today's time.
    rows = farelab("trace", "diff", str(recorded), str(served)).stdout.splitlines()
    assert len(rows) > 4
    for row, mark in zip(rows[1:], marks(rows), strict=True):
        assert mark == ("~" if "DEBIT" in row or "UPDATE CAPP" in row else "="), row


class _Vanishing:
    """A card that leaves the field at its first command."""

    def power_on(self) -> bytes:
        return b"\x3b\x00"

    def power_off(self) -> None:
        pass

    def atr(self) -> bytes:
        return b"\x3b\x00"

    def transmit(self, apdu: bytes) -> bytes:
        raise CardRemovedError("the card left the field")


def test_the_card_side_records_a_card_that_leaves_instead_of_answering(tmp_path: Path) -> None:
    trace = tmp_path / "card.jsonl"
    writer = TraceWriter(trace)
    card_side = TracingEndpoint(_Vanishing(), writer)
    with pytest.raises(CardRemovedError):
        card_side.transmit(bytes.fromhex("805C000204"))
    writer.close()
    (item,) = read_trace(trace)
    assert isinstance(item, Exchange)
    assert (item.reader, item.sw, item.error) == ("card", None, "the card left the field")

"""``farelab testbed run``: the conformance run scores farelab's own validator 100 % through
pcscd on a gate zoo and a bus zoo, catches two deliberately wrong terminals on the cards that
expose them (with the failing exchanges in its reports), and judges a card's end state by the
answer key in-process."""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from farelab.card import (
    CST,
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    CardImage,
    CardSnapshot,
    Exchange,
    InProcessReader,
    Psam,
    PsamKeys,
    Purchase,
    ReadCard,
    SimulatedCard,
    TraceWriter,
    TracingReader,
    drive,
    load_image,
    read_trace,
)
from farelab.testbed import (
    Expect,
    RunError,
    ZooEntry,
    build_zoo,
    judge,
    load_manifest,
    select_cards,
    vpcd_port,
    write_zoo,
)
from farelab.validator import shipped_networks
from tests.cli_support import ROOT, farelab

ENTRY_TERMINAL = "0A0000000001"
BUS_TERMINAL = "0B0000000001"

# A terminal that skips a rule: it reads the card and buys ``fare`` whatever the card holds
# or says — no minimum balance at a metro entry (R3), no look at a torn last transaction.
WRONG_TERMINAL = """
import sys
from datetime import datetime
from farelab.card import (
    CST, DEMO_ISSUER_ID, DEMO_KEYS, CardSnapshot, PcscReader, Psam, PsamKeys, Purchase,
    ReadCard, ReaderError, drive,
)

reader = PcscReader(sys.argv[1])
psam = Psam(terminal_id=bytes.fromhex(sys.argv[2]),
            issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
fare = int(sys.argv[3])
print("ready", flush=True)
while True:
    if not reader.wait_for_card(0.5):
        continue
    try:
        reader.connect()
        card = drive(reader, ReadCard())
        if isinstance(card, CardSnapshot):
            drive(reader, Purchase(psam=psam, card=card, amount=fare, when=datetime.now(CST)))
    except ReaderError:
        pass
    finally:
        reader.disconnect()
    reader.wait_for_removal(30)
"""


def make_zoo(folder: Path, *, station: str | None = None, bus_fen: int | None = None) -> Path:
    """A zoo for now (its torn card's answer holds for 50 s), its devices on vpcd's readers:
    a gate zoo's entry on "Virtual PCD 00 00", its exit on "Virtual PCD 00 01"."""
    network = shipped_networks()["taiyuan" if station is not None else "changzhou"]
    zoo = build_zoo(
        network=network,
        at=datetime.now(CST).replace(microsecond=0),
        station=station,
        bus_fare_fen=bus_fen,
        reader="pcsc:Virtual PCD 00 00",
    )
    write_zoo(folder, zoo)
    config = folder / "validator.toml"
    text = config.read_text()
    if station is not None:
        at = text.index('id = "zoo-exit"')
        text = text[:at] + text[at:].replace("Virtual PCD 00 00", "Virtual PCD 00 01", 1)
    config.write_text(text)
    return folder


@contextmanager
def terminal(*command: str, ready: str) -> Iterator[subprocess.Popen[str]]:
    """A terminal under test, started and waited for until it prints ``ready`` (on stdout or
    stderr), stopped at the end."""
    proc = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 15
        said = ""
        while ready not in said and time.monotonic() < deadline:
            out, _, _ = select.select([proc.stdout, proc.stderr], [], [], 1)
            for stream in out:
                said += stream.readline()
        assert ready in said, said
        time.sleep(1.0)  # its readers open and poll
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(zoo: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    report = zoo / "report.json"
    result = farelab(
        "testbed", "run", "--zoo", str(zoo), "--json", str(report), *extra, timeout=240
    )
    doc = json.loads(report.read_text()) if report.exists() else {}
    return result, doc


def results_by_case(doc: dict[str, object]) -> dict[str, dict[str, object]]:
    results = doc["results"]
    assert isinstance(results, list)
    return {r["case"]: r for r in results}


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_farelab_validator_passes_every_card_of_a_gate_zoo(tmp_path: Path) -> None:
    zoo = make_zoo(tmp_path / "zoo", station="Dananmen")
    junit = tmp_path / "junit.xml"
    validator = ("-m", "farelab", "validator", "run", "--config", str(zoo / "validator.toml"))
    with terminal(*validator, "--journal", str(tmp_path / "j.db"), ready="running"):
        result, doc = run(
            zoo,
            "--reader",
            "zoo-entry=Virtual PCD 00 00",
            "--reader",
            "zoo-exit=Virtual PCD 00 01",
            "--junit",
            str(junit),
        )
    assert result.returncode == 0, result.stdout + result.stderr
    cards = len(load_manifest(zoo).cards)
    assert set(doc) == {"cards", "passed", "failed", "results"}
    assert (doc["cards"], doc["passed"], doc["failed"]) == (cards, cards, 0)
    assert f"{cards} of {cards} cards passed" in result.stdout
    for entry in results_by_case(doc).values():
        assert set(entry) == {"file", "case", "expected", "seen", "pass", "trace"}
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == (str(cards), "0")


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_farelab_validator_passes_every_card_of_a_bus_zoo(tmp_path: Path) -> None:
    zoo = make_zoo(tmp_path / "zoo", bus_fen=200)
    validator = ("-m", "farelab", "validator", "run", "--config", str(zoo / "validator.toml"))
    with terminal(*validator, "--journal", str(tmp_path / "j.db"), ready="running"):
        result, doc = run(zoo, "--quiet", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    cards = len(load_manifest(zoo).cards)
    assert (doc["cards"], doc["passed"], doc["failed"]) == (cards, cards, 0)
    # each card's turn ended when the validator powered it down, not after --quiet
    assert f"({cards} powered down)" in result.stdout
    torn = results_by_case(doc)["torn_last_transaction"]
    assert torn["pass"] is True


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_an_entry_gate_that_lets_a_rider_in_under_the_maximum_fare_fails(tmp_path: Path) -> None:
    zoo = make_zoo(tmp_path / "zoo", station="Dananmen")
    script = tmp_path / "lax_gate.py"
    script.write_text(WRONG_TERMINAL)
    junit = tmp_path / "junit.xml"
    cases = "balance_one_fen_under_max_fare,balance_zero,balance_at_max_fare"
    recorded = tmp_path / "run.jsonl"
    with terminal(str(script), "Virtual PCD 00 00", ENTRY_TERMINAL, "0", ready="ready"):
        result, doc = run(zoo, "--cases", cases, "--junit", str(junit), "--trace", str(recorded))
    assert result.returncode == 1, result.stdout + result.stderr
    by_case = results_by_case(doc)
    assert (doc["cards"], doc["passed"], doc["failed"]) == (3, 1, 2)
    assert by_case["balance_at_max_fare"]["pass"] is True
    for case in ("balance_one_fen_under_max_fare", "balance_zero"):
        failing = by_case[case]
        assert failing["pass"] is False
        seen = failing["seen"]
        assert isinstance(seen, dict)
        assert seen["problems"][0] == "a purchase where none was expected"
        trace = failing["trace"]
        assert isinstance(trace, list)
        assert any(x.get("command", "").startswith("805401") for x in trace)  # its DEBIT
    # the table shows the failing exchanges, decoded
    assert "FAIL" in result.stdout
    assert "DEBIT FOR PURCHASE" in result.stdout
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("failures") == "2"
    failures = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert all("DEBIT FOR PURCHASE" in (c.findtext("failure") or "") for c in failures)
    # --trace: every card's exchanges, which trace show decodes
    shown = farelab("trace", "show", str(recorded))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("DEBIT FOR PURCHASE") == 3


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_a_card_no_terminal_touches_is_taken_away_at_the_timeout(tmp_path: Path) -> None:
    zoo = make_zoo(tmp_path / "zoo", bus_fen=200)
    result, doc = run(zoo, "--cases", "expired_yesterday,balance_at_fare", "--timeout", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    by_case = results_by_case(doc)
    assert by_case["expired_yesterday"]["pass"] is True  # untouched is what a refusal leaves
    seen = by_case["balance_at_fare"]["seen"]
    assert isinstance(seen, dict)
    assert seen["apdus"] == 0
    assert seen["problems"] == [
        "no purchase where one was expected",
        "balance 1.90, expected 0.00",
    ]
    assert "untouched (no APDU)" in result.stdout


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_a_bus_validator_that_debits_again_after_a_tear_fails(tmp_path: Path) -> None:
    zoo = make_zoo(tmp_path / "zoo", bus_fen=200)
    fare = next(c.expect.fare_fen for c in load_manifest(zoo).cards if c.case == "balance_at_fare")
    script = tmp_path / "greedy_bus.py"
    script.write_text(WRONG_TERMINAL)
    cases = "torn_last_transaction,balance_at_fare"
    with terminal(str(script), "Virtual PCD 00 00", BUS_TERMINAL, str(fare), ready="ready"):
        result, doc = run(zoo, "--cases", cases)
    assert result.returncode == 1, result.stdout + result.stderr
    by_case = results_by_case(doc)
    assert by_case["balance_at_fare"]["pass"] is True
    torn = by_case["torn_last_transaction"]
    assert torn["pass"] is False
    seen = torn["seen"]
    assert isinstance(seen, dict)
    assert seen["problems"][0] == (
        "a purchase where none was expected: the card was debited again after its last "
        "transaction tore"
    )
    assert "DEBIT FOR PURCHASE" in result.stdout


TEAR_AFTER_DEBIT = """
[[rule]]        # the first DEBIT commits, then the card leaves before its answer does
when = { command = "DEBIT", occurrence = 1 }
do = { action = "vanish", moment = "after", away_ms = 1000 }
"""


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_farelab_validator_settles_a_tap_torn_by_the_card_without_a_second_debit(
    tmp_path: Path,
) -> None:
    zoo = make_zoo(tmp_path / "zoo", bus_fen=200)
    rules = tmp_path / "tear.toml"
    rules.write_text(TEAR_AFTER_DEBIT)
    log = tmp_path / "firings.jsonl"
    validator = ("-m", "farelab", "validator", "run", "--config", str(zoo / "validator.toml"))
    with terminal(*validator, "--journal", str(tmp_path / "j.db"), ready="running"):
        result, doc = run(
            zoo,
            "--cases",
            "balance_at_fare,expiring_today",
            "--behaviour",
            str(rules),
            "--log",
            str(log),
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (doc["cards"], doc["passed"]) == (2, 2)
    assert [json.loads(x)["do"] for x in log.read_text().splitlines()] == ["vanish", "vanish"]
    for entry in results_by_case(doc).values():
        trace = entry["trace"]
        assert isinstance(trace, list)
        commands = [x["command"][:4] for x in trace if "command" in x]
        torn = [x for x in trace if x.get("command", "").startswith("8054")]
        assert torn[0]["response"] is None  # the DEBIT the card left during
        assert "805A" in commands[commands.index(torn[0]["command"][:4]) :]  # its proof asked


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_a_terminal_that_debits_again_when_the_torn_card_comes_back_fails(
    tmp_path: Path,
) -> None:
    zoo = make_zoo(tmp_path / "zoo", bus_fen=200)
    fare = next(c.expect.fare_fen for c in load_manifest(zoo).cards if c.case == "expiring_today")
    rules = tmp_path / "tear.toml"
    rules.write_text(TEAR_AFTER_DEBIT)
    script = tmp_path / "greedy_bus.py"
    script.write_text(WRONG_TERMINAL)
    with terminal(str(script), "Virtual PCD 00 00", BUS_TERMINAL, str(fare), ready="ready"):
        result, doc = run(zoo, "--cases", "expiring_today", "--behaviour", str(rules))
    assert result.returncode == 1, result.stdout + result.stderr
    seen = results_by_case(doc)["expiring_today"]["seen"]
    assert isinstance(seen, dict)
    assert seen["debits_fen"] == [fare, fare]
    assert seen["problems"][0] == "2 purchases where one was expected"


def kiosk_zoo(folder: Path) -> Path:
    network = shipped_networks()["taiyuan"]
    at = datetime.now(CST).replace(microsecond=0)
    write_zoo(folder, build_zoo(network=network, at=at, bus_fare_fen=100, kiosk=True))
    return folder


def topup_load(tmp_path: Path, amount: str) -> str:
    """farelab's kiosk, loading ``amount`` onto the card in the virtual reader."""
    return shlex.join(
        [
            sys.executable,
            "-m",
            "farelab",
            "topup",
            "load",
            "--reader",
            "pcsc:Virtual PCD 00 00",
            "--amount",
            amount,
            "--db",
            str(tmp_path / "host.db"),
            "--journal",
            str(tmp_path / "kiosk.db"),
            "--json",
        ]
    )


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_farelab_kiosk_passes_every_kiosk_card(tmp_path: Path) -> None:
    zoo = kiosk_zoo(tmp_path / "zoo")
    command = topup_load(tmp_path, "{amount}")
    result, doc = run(zoo, "--kind", "kiosk", "--kiosk-command", command)
    assert result.returncode == 0, result.stdout + result.stderr
    by_case = results_by_case(doc)
    assert set(by_case) == {"kiosk_most_loadable", "kiosk_one_fen_over_cap", "kiosk_at_cap_one_fen"}
    seen = by_case["kiosk_most_loadable"]["seen"]
    assert isinstance(seen, dict)
    assert (seen["result"], seen["loads_fen"], seen["balance_fen"]) == ("loaded", [1000], 100_000)
    assert seen["tac_valid"] is True


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_a_kiosk_that_loads_another_amount_fails(tmp_path: Path) -> None:
    zoo = kiosk_zoo(tmp_path / "zoo")
    command = topup_load(tmp_path, "5")
    result, doc = run(
        zoo, "--kind", "kiosk", "--kiosk-command", command, "--cases", "kiosk_most_loadable"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    seen = results_by_case(doc)["kiosk_most_loadable"]["seen"]
    assert isinstance(seen, dict)
    assert seen["problems"][0] == "loaded 5.00, expected 10.00"
    assert '"result": "loaded"' in result.stdout  # the kiosk's own words, under the failure


# In-process: the judging itself, and bad input.


def bus_zoo(tmp_path: Path) -> Path:
    network = shipped_networks()["changzhou"]
    zoo = build_zoo(network=network, at=datetime.now(CST).replace(microsecond=0), bus_fare_fen=200)
    write_zoo(tmp_path / "zoo", zoo)
    return tmp_path / "zoo"


def naive_taps(
    image: CardImage, fare: int, taps: int, trace: Path
) -> tuple[CardImage, list[Exchange]]:
    """``taps`` purchases of ``fare`` by the zoo bus's terminal, in-process; the card after,
    and the exchanges."""
    card = SimulatedCard(image)
    psam = Psam(
        terminal_id=bytes.fromhex(BUS_TERMINAL),
        issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)},
    )
    writer = TraceWriter(trace)
    for _ in range(taps):
        inner = InProcessReader()
        inner.insert(card)
        reader = TracingReader(inner, writer)
        reader.connect()
        snapshot = drive(reader, ReadCard())
        assert isinstance(snapshot, CardSnapshot)
        drive(reader, Purchase(psam=psam, card=snapshot, amount=fare, when=datetime.now(CST)))
        reader.disconnect()
    writer.close()
    return card.image, [x for x in read_trace(trace) if isinstance(x, Exchange)]


def entry(zoo: Path, case: str) -> ZooEntry:
    return next(c for c in load_manifest(zoo).cards if c.case == case)


def test_an_accepted_card_passes_with_one_purchase_of_the_fare_and_a_valid_tac(
    tmp_path: Path,
) -> None:
    zoo = bus_zoo(tmp_path)
    card = entry(zoo, "balance_at_fare")
    before = load_image(zoo / card.file)
    after, exchanges = naive_taps(before, card.expect.fare_fen, 1, tmp_path / "t.jsonl")
    seen = judge(
        card, before, after, exchanges, terminal_id=bytes.fromhex(BUS_TERMINAL), keys=DEMO_KEYS
    )
    assert seen.problems == ()
    assert (seen.result, seen.tac_valid, seen.balance_fen) == ("accepted", True, 0)


def test_a_purchase_whose_tac_does_not_verify_fails(tmp_path: Path) -> None:
    zoo = bus_zoo(tmp_path)
    card = entry(zoo, "balance_at_fare")
    before = load_image(zoo / card.file)
    after, exchanges = naive_taps(before, card.expect.fare_fen, 1, tmp_path / "t.jsonl")
    other_keys = replace(DEMO_KEYS, tac=bytes(16))
    seen = judge(
        card, before, after, exchanges, terminal_id=bytes.fromhex(BUS_TERMINAL), keys=other_keys
    )
    assert seen.tac_valid is False
    assert "a TAC does not verify with the issuer's keys" in seen.problems


def test_a_second_debit_fails_an_accepted_card(tmp_path: Path) -> None:
    zoo = bus_zoo(tmp_path)
    card = entry(zoo, "expiring_today")
    before = load_image(zoo / card.file)
    after, exchanges = naive_taps(before, card.expect.fare_fen, 2, tmp_path / "t.jsonl")
    seen = judge(card, before, after, exchanges, terminal_id=None, keys=DEMO_KEYS)
    assert seen.result == "debited 2 times"
    assert seen.problems[0] == "2 purchases where one was expected"


def test_a_refused_card_must_come_out_as_it_went_in(tmp_path: Path) -> None:
    zoo = bus_zoo(tmp_path)
    card = entry(zoo, "expired_yesterday")
    before = load_image(zoo / card.file)
    assert judge(card, before, before, [], terminal_id=None, keys=DEMO_KEYS).problems == ()
    hot = entry(zoo, "hotlisted")
    image = load_image(zoo / hot.file)
    seen = judge(hot, image, image, [], terminal_id=None, keys=DEMO_KEYS)
    assert seen.problems == ("a hotlisted card was not blocked",)
    blocked = image.replace(blocked=True)
    assert judge(hot, image, blocked, [], terminal_id=None, keys=DEMO_KEYS).problems == ()
    wrong = ZooEntry(card.file, card.case, card.device, Expect("rejected", "expired", 0, None))
    seen = judge(wrong, before, blocked, [], terminal_id=None, keys=DEMO_KEYS)
    assert seen.problems == ("the card was blocked",)


def test_virtual_readers_map_to_vpcd_ports() -> None:
    assert vpcd_port("Virtual PCD 00 00") == 35963
    assert vpcd_port("Virtual PCD 00 01") == 35964
    with pytest.raises(RunError, match="not one of vpcd's virtual readers"):
        vpcd_port("ACS ACR122U 00 00")


def test_cases_and_devices_select_cards_and_unknown_names_are_refused(tmp_path: Path) -> None:
    manifest = load_manifest(bus_zoo(tmp_path))
    chosen = select_cards(manifest, cases={"hotlisted", "balance_zero"}, devices=None)
    assert [c.case for c in chosen] == ["balance_zero", "hotlisted"]
    with pytest.raises(RunError, match="no case nope"):
        select_cards(manifest, cases={"nope"}, devices=None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--kind", "kiosk"), "--kind kiosk needs --kiosk-command"),
        (("--kind", "kiosk", "--kiosk-command", "true"), "the zoo has no kiosk cards"),
        (("--kiosk-command", "true"), "--kiosk-command needs --kind kiosk"),
        (("--behaviour", "no-rules.toml"), "no-rules.toml"),
        (("--log", "firings.jsonl"), "--log needs --behaviour"),
        (("--cases", "no_such_case"), "no case no_such_case in the zoo"),
        (("--reader", "Some Reader"), "not one of vpcd's virtual readers"),
        (("--reader", "zoo-gate=Virtual PCD 00 00"), "the zoo has no device 'zoo-gate'"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    zoo = bus_zoo(tmp_path)
    result = farelab("testbed", "run", "--zoo", str(zoo), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_without_a_zoo_exits_2(tmp_path: Path) -> None:
    result = farelab("testbed", "run", "--zoo", str(tmp_path))
    assert result.returncode == 2
    assert "manifest.json: cannot read" in result.stderr

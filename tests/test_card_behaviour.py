"""Card behaviours: a behaviour file's rules fire in order, deterministically, and every action
acts out in-process and through pcscd as a terminal would see it in a real field."""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from farelab._cli import main
from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    TRANSIT_AID,
    BehavingCard,
    Behaviour,
    BehaviourError,
    BehaviourState,
    CardRemovedError,
    CardSnapshot,
    InProcessReader,
    MemoryStore,
    Psam,
    PsamKeys,
    Purchase,
    PurchaseDone,
    ReadCard,
    ReaderError,
    SimulatedCard,
    TraceWriter,
    TracingEndpoint,
    command_name,
    drive,
    load_image,
    personalise,
    save_image,
)
from tests.cli_support import DEVICES, farelab, start_farelab
from tests.validator_support import T0, Lab, gate, new_card

SELECT = bytes.fromhex("00A40400") + bytes((len(TRANSIT_AID),)) + TRANSIT_AID
GET_BALANCE = bytes.fromhex("805C000204")


def psam() -> Psam:
    """A fresh PSAM: its transaction counter goes into the TAC, so twins need twin PSAMs."""
    return Psam(
        terminal_id=bytes.fromhex("0000000000C3"),
        issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)},
    )


WHEN = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def rules(*items: dict[str, Any], seed: int = 0) -> Behaviour:
    return Behaviour.from_dict({"seed": seed, "rule": list(items)})


def plain_card(balance: int = 5000) -> SimulatedCard:
    image = personalise(serial="4242", issued=date(2026, 1, 1), balance=balance)
    return SimulatedCard(image, store=MemoryStore(), entropy=bytes)


def balance_of(answer: bytes) -> int:
    assert answer[-2:] == b"\x90\x00"
    return int.from_bytes(answer[:4], "big")


def pay(reader: InProcessReader, amount: int = 200) -> object:
    snapshot = drive(reader, ReadCard(records=[]))
    assert isinstance(snapshot, CardSnapshot)
    return drive(reader, Purchase(psam=psam(), card=snapshot, amount=amount, when=WHEN))


# --- the file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"rule": [{"when": {"command": "DEBT"}, "do": "vanish"}]}, "rule[1].when.command"),
        ({"rule": [{"do": {"action": "explode"}}]}, "rule[1].do.action"),
        ({"rule": [{"do": "explode"}]}, "rule[1].do"),
        ({"rule": [{"when": {"comand": "DEBIT"}, "do": "mute"}]}, "rule[1].when.comand"),
        ({"rule": [{"do": {"action": "delay", "secs": 3}}]}, "rule[1].do.secs"),
        ({"rule": [{"do": "mute"}, {"then": 1, "do": "mute"}]}, "rule[2].then"),
        ({"rules": []}, "rules"),
    ],
)
def test_a_behaviour_naming_an_unknown_command_action_or_key_is_refused_with_the_key(
    doc: dict[str, Any], key: str
) -> None:
    with pytest.raises(BehaviourError) as refused:
        Behaviour.from_dict(doc)
    assert str(refused.value).startswith(f"{key}: ")


def test_card_serve_refuses_a_bad_behaviour_file_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = tmp_path / "card.json"
    save_image(card, plain_card().image)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nwhen = { command = "DEBT" }\ndo = "vanish"\n')
    assert main(["card", "serve", str(card), "--behaviour", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "bad.toml" in err
    assert "rule[1].when.command: unknown command 'DEBT'" in err


def test_commands_are_named_as_rules_name_them() -> None:
    assert command_name(SELECT) == "SELECT"
    assert command_name(GET_BALANCE) == "GET_BALANCE"
    assert command_name(bytes.fromhex("805001020B")) == "INIT_PURCHASE"
    assert command_name(bytes.fromhex("805000020B")) == "INIT_LOAD"
    assert command_name(bytes.fromhex("80540100")) == "DEBIT"
    assert command_name(bytes.fromhex("00840000")) is None


def test_the_first_matching_rule_fires_on_the_nth_occurrence_only() -> None:
    state = BehaviourState(
        rules(
            {"when": {"command": "GET_BALANCE", "occurrence": 2}, "do": "mute"},
            {"when": {"command": "GET_BALANCE"}, "do": {"action": "status", "sw": "6A82"}},
        )
    )
    fired = [state.decide(GET_BALANCE) for _ in range(3)]
    assert [f.rule.number if f else None for f in fired] == [2, 1, 2]
    assert state.decide(SELECT) is None


def test_a_rule_for_a_presentation_fires_on_that_presentation_only() -> None:
    state = BehaviourState(rules({"when": {"presentation": 2}, "do": "reset"}))
    state.arrive()
    assert state.decide(SELECT) is None
    state.arrive()
    fired = state.decide(SELECT)
    assert fired is not None
    # occurrences count over the card's whole life, presentations included
    assert (fired.presentation, fired.command, fired.occurrence) == (2, "SELECT", 2)


def test_probability_draws_are_the_same_for_the_same_seed() -> None:
    def draws(seed: int) -> list[bool]:
        state = BehaviourState(rules({"when": {"probability": 0.5}, "do": "mute"}, seed=seed))
        return [state.decide(SELECT) is not None for _ in range(64)]

    assert draws(7) == draws(7)
    assert 10 < sum(draws(7)) < 54
    assert draws(7) != draws(8)


# --- in-process ----------------------------------------------------------------------------


def test_in_process_vanish_before_the_debit_leaves_the_field_and_nothing_is_debited() -> None:
    log = io.StringIO()
    card = BehavingCard(
        plain_card(), rules({"when": {"command": "DEBIT"}, "do": "vanish"}), log=log
    )
    reader = InProcessReader()
    reader.insert(card)
    with pytest.raises(CardRemovedError):
        pay(reader)
    assert reader.card is None
    assert card.card.image.balance == 5000  # type: ignore[attr-defined]
    line = json.loads(log.getvalue())
    assert (line["command"], line["do"], line["moment"], line["presentation"]) == (
        "DEBIT",
        "vanish",
        "before",
        1,
    )


def test_in_process_vanish_after_the_debit_commits_then_leaves() -> None:
    sim = plain_card()
    card = BehavingCard(
        sim, rules({"when": {"command": "DEBIT"}, "do": {"action": "vanish", "moment": "after"}})
    )
    reader = InProcessReader()
    reader.insert(card)
    with pytest.raises(CardRemovedError):
        pay(reader, 200)
    assert reader.card is None
    assert sim.image.balance == 4800


def test_a_validator_tap_against_vanish_after_debit_is_settled_on_the_next_tap() -> None:
    entry, exit_ = gate("taiyuan", "尖草坪"), gate("taiyuan", "长风街")
    lab = Lab([entry, exit_])
    sim = new_card(balance=2000)
    behaviour = BehaviourState(
        rules(
            {
                "when": {"command": "DEBIT", "occurrence": 1},
                "do": {"action": "vanish", "moment": "after"},
            }
        )
    )
    settled = settle_after_tear(lab, entry.id, exit_.id, sim, behaviour, in_process_tap)
    assert settled == 2000 - sim.image.balance


def in_process_tap(lab: Lab, device: str, card: BehavingCard, at: float) -> Any:
    reader = InProcessReader()
    reader.insert(card)
    return lab.validators[device].tap(reader, T0 + timedelta(seconds=at))


def settle_after_tear(
    lab: Lab,
    entry: str,
    exit_: str,
    sim: SimulatedCard,
    behaviour: BehaviourState,
    tap: Any,
) -> int:
    """Entry torn by the card leaving after its DEBIT, exit on the next tap: the exit settles
    the torn entry; returns what the journal counts as charged."""
    before = sim.image.offline_counter
    first = tap(lab, entry, BehavingCard(sim, behaviour), 0)
    assert first.grey
    assert sim.image.offline_counter == before + 1  # the DEBIT was committed
    assert set(lab.journal.pending()) == {"00000000000000001001"}
    second = tap(lab, exit_, BehavingCard(sim, behaviour), 1800)
    assert second.result == "accepted"
    assert second.resolution is not None
    assert second.resolution.completed
    assert not lab.journal.pending()
    assert sim.image.offline_counter == before + 2  # one entry, one exit: nothing doubled
    return lab.charged(sim.image.public.serial)


def test_in_process_delay_answers_after_the_delay() -> None:
    slept: list[float] = []
    card = BehavingCard(
        plain_card(),
        rules({"when": {"command": "GET_BALANCE"}, "do": {"action": "delay", "ms": 250}}),
        sleep=slept.append,
    )
    reader = InProcessReader()
    reader.insert(card)
    reader.transmit(SELECT)
    assert balance_of(reader.transmit(GET_BALANCE)) == 5000
    assert slept == [0.25]


def test_in_process_status_answers_the_status_word_with_no_effect() -> None:
    sim = plain_card()
    card = BehavingCard(
        sim, rules({"when": {"command": "DEBIT"}, "do": {"action": "status", "sw": "9302"}})
    )
    reader = InProcessReader()
    reader.insert(card)
    pay(reader)
    assert sim.image.balance == 5000
    assert sim.image.offline_counter == 0


@pytest.mark.parametrize("field", ["mac", "tac"])
def test_in_process_corrupt_flips_the_debits_mac2_or_tac(field: str) -> None:
    twin_reader = InProcessReader()
    twin_reader.insert(plain_card())
    honest = pay(twin_reader)
    sim = plain_card()
    reader = InProcessReader()
    reader.insert(
        BehavingCard(
            sim, rules({"when": {"command": "DEBIT"}, "do": {"action": "corrupt", "field": field}})
        )
    )
    bent = pay(reader)
    assert isinstance(honest, PurchaseDone)
    assert isinstance(bent, PurchaseDone)
    assert sim.image.balance == 4800  # the purchase happened; only its answer is wrong
    if field == "mac":
        assert (honest.mac2_valid, bent.mac2_valid) == (True, False)
    else:
        assert bent.tac == bytes(b ^ 0xFF for b in honest.tac)


def test_in_process_corrupt_data_flips_the_answers_bytes() -> None:
    card = BehavingCard(plain_card(), rules({"when": {"command": "GET_BALANCE"}, "do": "corrupt"}))
    reader = InProcessReader()
    reader.insert(card)
    reader.transmit(SELECT)
    assert reader.transmit(GET_BALANCE) == (5000 ^ 0xFFFFFFFF).to_bytes(4, "big") + b"\x90\x00"


def test_in_process_mute_never_answers_until_the_card_is_removed() -> None:
    card = BehavingCard(plain_card(), rules({"when": {"command": "GET_BALANCE"}, "do": "mute"}))
    reader = InProcessReader()
    reader.insert(card)
    reader.transmit(SELECT)
    outcome: list[BaseException] = []

    def terminal() -> None:
        try:
            reader.transmit(GET_BALANCE)
        except CardRemovedError as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=terminal)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # no answer yet
    reader.remove()
    waiting.join(2)
    assert len(outcome) == 1


def test_in_process_mute_with_a_terminal_that_gives_up_takes_the_card_away() -> None:
    card = BehavingCard(plain_card(), rules({"when": {"command": "GET_BALANCE"}, "do": "mute"}))
    reader = InProcessReader(mute_wait=0)
    reader.insert(card)
    reader.transmit(SELECT)
    with pytest.raises(CardRemovedError):
        reader.transmit(GET_BALANCE)
    assert reader.card is None


def test_in_process_reset_leaves_and_comes_back_at_once() -> None:
    card = BehavingCard(
        plain_card(), rules({"when": {"command": "GET_BALANCE", "occurrence": 1}, "do": "reset"})
    )
    reader = InProcessReader()
    reader.insert(card)
    reader.transmit(SELECT)
    with pytest.raises(CardRemovedError):
        reader.transmit(GET_BALANCE)
    assert reader.card is card
    assert card.state.presentation == 2
    reader.transmit(SELECT)  # a new session: the application must be selected again
    assert balance_of(reader.transmit(GET_BALANCE)) == 5000


# --- through pcscd -------------------------------------------------------------------------


class Served:
    """A card served to vpcd on a background thread as ``farelab card serve`` does."""

    def __init__(self, card: BehavingCard) -> None:
        from farelab.card import vicc_serve  # noqa: PLC0415

        self.card = card
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=vicc_serve, args=(card,), kwargs={"stop": self.stop}, daemon=True
        )
        self.thread.start()

    def remove(self) -> None:
        self.stop.set()
        self.thread.join(5)
        from farelab.card import VIRTUAL_READER, PcscReader  # noqa: PLC0415

        probe = PcscReader(VIRTUAL_READER)
        try:
            assert probe.wait_for_removal(3)
        finally:
            probe.close()


def connect(reader: Any) -> None:
    """Power the card up.  pcscd reports a card present as soon as vpcd has its connection, and
    powers it a moment later: a connect in between gets "card is unpowered", so retry a while."""
    deadline = time.monotonic() + 2
    while True:
        try:
            reader.connect()
        except CardRemovedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return


@pytest.fixture
def pcsc(pcscd: None) -> Iterator[Any]:
    from farelab.card import VIRTUAL_READER, PcscReader  # noqa: PLC0415

    reader = PcscReader(VIRTUAL_READER)
    yield reader
    reader.close()


@pytest.fixture
def serve(pcsc: Any) -> Iterator[Any]:
    held: list[Served] = []

    def start(behaviour: Behaviour, sim: SimulatedCard | None = None) -> BehavingCard:
        card = BehavingCard(sim or plain_card(), behaviour)
        held.append(Served(card))
        assert pcsc.wait_for_card(3)
        return card

    yield start
    for served in held:
        served.remove()


@pytest.mark.pcsc
def test_pcscd_vanish_makes_the_reader_see_the_card_leave_and_come_back(
    pcsc: Any, serve: Any
) -> None:
    serve(rules({"when": {"command": "SELECT", "occurrence": 1}, "do": "vanish"}))
    connect(pcsc)
    with pytest.raises(CardRemovedError):
        pcsc.transmit(SELECT)
    assert pcsc.wait_for_removal(3)
    assert pcsc.wait_for_card(3)  # back after away_ms
    connect(pcsc)
    assert pcsc.transmit(SELECT)[-2:] == b"\x90\x00"


@pytest.mark.pcsc
def test_pcscd_reset_leaves_and_comes_back_as_a_new_presentation(pcsc: Any, serve: Any) -> None:
    card = serve(rules({"when": {"command": "GET_BALANCE", "occurrence": 1}, "do": "reset"}))
    connect(pcsc)
    pcsc.transmit(SELECT)
    with pytest.raises(CardRemovedError):
        pcsc.transmit(GET_BALANCE)
    assert pcsc.wait_for_removal(3)
    assert pcsc.wait_for_card(3)
    connect(pcsc)
    pcsc.transmit(SELECT)
    assert balance_of(pcsc.transmit(GET_BALANCE)) == 5000
    assert card.state.presentation == 2


@pytest.mark.pcsc
def test_pcscd_delay_answers_after_the_delay(pcsc: Any, serve: Any) -> None:
    serve(rules({"when": {"command": "GET_BALANCE"}, "do": {"action": "delay", "ms": 600}}))
    connect(pcsc)
    pcsc.transmit(SELECT)
    started = time.monotonic()
    assert balance_of(pcsc.transmit(GET_BALANCE)) == 5000
    assert time.monotonic() - started >= 0.6


@pytest.mark.pcsc
def test_pcscd_corrupt_flips_the_answers_bytes(pcsc: Any, serve: Any) -> None:
    serve(rules({"when": {"command": "GET_BALANCE"}, "do": "corrupt"}))
    connect(pcsc)
    pcsc.transmit(SELECT)
    assert pcsc.transmit(GET_BALANCE) == (5000 ^ 0xFFFFFFFF).to_bytes(4, "big") + b"\x90\x00"


@pytest.mark.pcsc
def test_pcscd_corrupt_mac2_is_seen_by_the_terminal(pcsc: Any, serve: Any) -> None:
    sim = plain_card()
    serve(rules({"when": {"command": "DEBIT"}, "do": {"action": "corrupt", "field": "mac"}}), sim)
    connect(pcsc)
    snapshot = drive(pcsc, ReadCard(records=[]))
    assert isinstance(snapshot, CardSnapshot)
    done = drive(pcsc, Purchase(psam=psam(), card=snapshot, amount=200, when=WHEN))
    assert isinstance(done, PurchaseDone)
    assert not done.mac2_valid
    assert sim.image.balance == 4800


@pytest.mark.pcsc
def test_pcscd_mute_never_answers_until_the_card_is_removed(pcsc: Any, pcscd: None) -> None:
    card = BehavingCard(plain_card(), rules({"when": {"command": "GET_BALANCE"}, "do": "mute"}))
    served = Served(card)
    assert pcsc.wait_for_card(3)
    connect(pcsc)
    pcsc.transmit(SELECT)
    outcome: list[BaseException] = []

    def terminal() -> None:
        try:
            pcsc.transmit(GET_BALANCE)
        except ReaderError as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=terminal, daemon=True)
    waiting.start()
    waiting.join(0.8)
    assert waiting.is_alive()  # no answer while the card is in the field
    served.remove()
    waiting.join(5)
    assert len(outcome) == 1
    assert isinstance(outcome[0], CardRemovedError)


@pytest.mark.pcsc
def test_pcscd_a_validator_tap_against_vanish_after_debit_is_settled_on_the_next_tap(
    pcsc: Any, pcscd: None
) -> None:
    entry, exit_ = gate("taiyuan", "尖草坪"), gate("taiyuan", "长风街")
    lab = Lab([entry, exit_])
    sim = new_card(balance=2000)
    behaviour = BehaviourState(
        rules(
            {
                "when": {"command": "DEBIT", "occurrence": 1},
                "do": {"action": "vanish", "moment": "after", "away_ms": 500},
            }
        )
    )
    card = BehavingCard(sim, behaviour)
    served = Served(card)

    def pcsc_tap(lab: Lab, device: str, _: BehavingCard, at: float) -> Any:
        assert pcsc.wait_for_card(5)
        connect(pcsc)
        try:
            return lab.validators[device].tap(pcsc, T0 + timedelta(seconds=at))
        finally:
            pcsc.disconnect()
            if at == 0:
                assert pcsc.wait_for_removal(3)  # the reader saw the card leave

    try:
        settled = settle_after_tear(lab, entry.id, exit_.id, sim, behaviour, pcsc_tap)
    finally:
        served.remove()
    assert settled == 2000 - sim.image.balance


@pytest.mark.pcsc
def test_card_serve_with_a_behaviour_answers_the_status_word_and_logs_it(
    pcsc: Any, tmp_path: Path
) -> None:
    path = tmp_path / "card.json"
    save_image(path, plain_card().image)
    behaviour = tmp_path / "status.toml"
    behaviour.write_text(
        '[[rule]]\nwhen = { command = "GET_BALANCE", occurrence = 1 }\n'
        'do = { action = "status", sw = "6A82" }\n'
    )
    log = tmp_path / "firings.jsonl"
    options = ["--behaviour", str(behaviour), "--log", str(log)]
    served = start_farelab("card", "serve", str(path), *options, stdout=subprocess.PIPE)
    try:
        assert served.stdout is not None
        assert "presented" in served.stdout.readline()
        assert pcsc.wait_for_card(5)
        connect(pcsc)
        pcsc.transmit(SELECT)
        assert pcsc.transmit(GET_BALANCE) == b"\x6a\x82"
        assert balance_of(pcsc.transmit(GET_BALANCE)) == 5000
    finally:
        served.terminate()
        served.wait(10)
    assert pcsc.wait_for_removal(3)
    lines = [json.loads(t) for t in log.read_text().splitlines()]
    assert [(x["rule"], x["command"], x["do"], x["sw"]) for x in lines] == [
        (1, "GET_BALANCE", "status", "6A82")
    ]


# --- the replay ----------------------------------------------------------------------------

VANISH_AFTER_DEBIT = """
[[rule]]
when = { command = "DEBIT", occurrence = 1 }
do = { action = "vanish", moment = "after" }

[[rule]]
when = { command = "SELECT", presentation = 3 }
do = "mute"
"""


def replay(
    tmp_path: Path, taps: list[dict[str, Any]], *extra: str
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="sim"))
    stdin = "".join(json.dumps(t) + "\n" for t in taps)
    return farelab(
        "validator", "replay", "--config", str(config), "--taps", "-", *extra, stdin=stdin
    )


def test_replay_taps_lines_name_a_behaviour_whose_counts_go_on_from_line_to_line(
    tmp_path: Path,
) -> None:
    from tests.cli_support import card  # noqa: PLC0415

    path = card(tmp_path)
    behaviour = tmp_path / "vanish.toml"
    behaviour.write_text(VANISH_AFTER_DEBIT)
    at = ("09:00:00", "09:00:09", "09:30:00")
    taps = [
        {
            "device": "bus-1",
            "card": str(path),
            "at": f"2026-11-23T{t}+08:00",
            "behaviour": str(behaviour),
        }
        for t in at
    ]
    log = tmp_path / "firings.jsonl"
    result = replay(tmp_path, taps, "--behaviour-log", str(log))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [(x["result"], x["reason"], x["grey"]) for x in lines] == [
        ("rejected", "card_removed", True),  # debited, then the card vanished
        ("accepted", "recovered", False),  # the next tap settles it: charged once
        ("rejected", "card_removed", False),  # the third presentation: muted, taken away
    ]
    assert load_image(path).balance == 2000 - 50
    # Each firing is one JSON line at the tap's own time, naming the line, device and card.
    firings = [json.loads(x) for x in log.read_text().splitlines()]
    assert [
        (f["time"], f["line"], f["device"], f["card"], f["rule"], f["command"], f["do"])
        for f in firings
    ] == [
        ("2026-11-23T09:00:00.000+08:00", 1, "bus-1", str(path), 1, "DEBIT", "vanish"),
        ("2026-11-23T09:30:00.000+08:00", 3, "bus-1", str(path), 2, "SELECT", "mute"),
    ]
    # The same taps on another copy of the card give the same log: nothing in it comes from the
    # wall clock (the APDUs differ only by the MAC1 that the card's fresh random goes into).
    again = tmp_path / "again"
    again.mkdir()
    path2 = card(again)
    taps2 = [dict(t, card=str(path2)) for t in taps]
    log2 = tmp_path / "firings2.jsonl"
    assert replay(again, taps2, "--behaviour-log", str(log2)).returncode == 0

    def same(line: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in line.items() if k not in ("card", "apdu")}

    assert [same(json.loads(x)) for x in log2.read_text().splitlines()] == list(map(same, firings))


def test_replay_refuses_a_behaviour_naming_an_unknown_command_with_the_key(
    tmp_path: Path,
) -> None:
    from tests.cli_support import card  # noqa: PLC0415

    behaviour = tmp_path / "bad.toml"
    behaviour.write_text('[[rule]]\nwhen = { command = "PAY" }\ndo = "vanish"\n')
    taps = [
        {
            "device": "bus-1",
            "card": str(card(tmp_path)),
            "at": "2026-11-23T09:00:00+08:00",
            "behaviour": str(behaviour),
        }
    ]
    result = replay(tmp_path, taps)
    assert result.returncode != 0
    assert "line 1" in result.stderr
    assert "rule[1].when.command: unknown command 'PAY'" in result.stderr


@pytest.mark.pcsc
def test_pcscd_a_card_tapped_once_that_resets_comes_back_while_the_hand_holds_it(
    pcsc: Any, pcscd: None
) -> None:
    from farelab.card import vicc_tap  # noqa: PLC0415

    card = BehavingCard(
        plain_card(), rules({"when": {"command": "SELECT", "occurrence": 1}, "do": "reset"})
    )
    held = threading.Thread(target=vicc_tap, args=(card,), kwargs={"hold": 4.0}, daemon=True)
    held.start()
    try:
        assert pcsc.wait_for_card(3)
        connect(pcsc)
        with pytest.raises(CardRemovedError):
            pcsc.transmit(SELECT)
        assert pcsc.wait_for_removal(3)
        assert pcsc.wait_for_card(3)
        connect(pcsc)
        assert pcsc.transmit(SELECT)[-2:] == b"\x90\x00"
        assert card.state.presentation == 2
    finally:
        held.join(6)
    assert pcsc.wait_for_removal(3)


def test_presentations_are_counted_through_a_recording_wrapper(tmp_path: Path) -> None:
    """``card serve --behaviour --trace`` serves the misbehaving card inside the trace recorder:
    the transport's word that the card entered a field must still reach it."""
    card = BehavingCard(
        plain_card(), rules({"when": {"presentation": 2}, "do": {"action": "status", "sw": "6A82"}})
    )
    trace = TraceWriter(tmp_path / "t.jsonl")
    recorded = TracingEndpoint(card, trace)
    reader = InProcessReader()
    reader.insert(recorded)
    assert reader.transmit(SELECT)[-2:] == b"\x90\x00"
    reader.remove()
    reader.insert(recorded)
    assert card.state.presentation == 2
    assert reader.transmit(SELECT)[-2:] == b"\x6a\x82"
    trace.close()

"""The social-security PIN (R8): the outlet's reset through the sans-IO flow ``PinReset``, and
each issuer profile's initial PIN and try limit on a card issued with ``card new --profile``."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from farelab.backend import IssuerProfile, load_profiles
from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    CardImage,
    CardSnapshot,
    InProcessReader,
    MemoryStore,
    PinReset,
    PinResetDone,
    Psam,
    PsamKeys,
    ReadCard,
    Refused,
    SimulatedCard,
    Step,
    Transmit,
    drive,
    load_image,
    personalise,
)
from tests.cli_support import farelab as run_farelab

TODAY = date(2026, 3, 2)
SELECT_SOCIAL = bytes.fromhex("00A4040006D1560000010000")
READ_HOLDER = bytes.fromhex("00B0850000")
PROFILES = load_profiles()
DEMO_PSAM_KEYS = PsamKeys.of(DEMO_KEYS)


def verify(pin: str) -> bytes:
    return bytes.fromhex("00200000" + "03" + pin)


def sw(answer: bytes) -> int:
    return int.from_bytes(answer[-2:], "big")


def reader_for(image: CardImage) -> tuple[InProcessReader, SimulatedCard]:
    card = SimulatedCard(image, store=MemoryStore(), today=lambda: TODAY)
    reader = InProcessReader()
    reader.insert(card)
    return reader, card


def psam(keys: PsamKeys = DEMO_PSAM_KEYS) -> Psam:
    return Psam(terminal_id=bytes.fromhex("000000000042"), issuers={DEMO_ISSUER_ID: keys})


def snapshot(reader: InProcessReader) -> CardSnapshot:
    snap = drive(reader, ReadCard(records=()))
    assert isinstance(snap, CardSnapshot)
    return snap


def lock(reader: InProcessReader, pin: str, tries: int) -> list[int]:
    """Wrong VERIFYs up to the try limit; the status words, then a VERIFY of the right PIN."""
    assert sw(reader.transmit(SELECT_SOCIAL)) == 0x9000
    words = [sw(reader.transmit(verify("135792"))) for _ in range(tries)]
    return [*words, sw(reader.transmit(verify(pin)))]


def nanjing_card() -> CardImage:
    profile = PROFILES["nanjing"]
    image = personalise(
        serial="5200",
        issued=date(2026, 1, 1),
        initial_pin=profile.initial_pin,
        pin_try_limit=profile.pin_tries_per_day,
    )
    # The holder changed the PIN: from now on it is asked.
    return image.replace(social=replace(image.social, pin="271828"))


def test_a_locked_pin_reset_at_the_outlet_verifies_with_the_new_pin_R8() -> None:
    reader, card = reader_for(nanjing_card())
    snap = snapshot(reader)
    assert lock(reader, "271828", 5) == [0x63C4, 0x63C3, 0x63C2, 0x63C1, 0x63C0, 0x6983]
    assert card.image.social.locked

    assert drive(reader, PinReset(psam=psam(), card=snap, new_pin="314159")) == PinResetDone()

    assert not card.image.social.locked
    assert sw(reader.transmit(SELECT_SOCIAL)) == 0x9000
    assert sw(reader.transmit(READ_HOLDER)) == 0x6982  # a changed PIN is asked
    assert sw(reader.transmit(verify("314159"))) == 0x9000
    assert sw(reader.transmit(READ_HOLDER)) == 0x9000


def test_a_pin_reset_under_another_issuer_s_maintenance_key_is_refused_by_the_card() -> None:
    reader, card = reader_for(nanjing_card())
    snap = snapshot(reader)
    lock(reader, "271828", 5)
    other = PsamKeys.of(replace(DEMO_KEYS, maintenance=bytes(range(0x40, 0x50))))

    result = drive(reader, PinReset(psam=psam(other), card=snap, new_pin="314159"))

    assert result == Refused(Step.PIN_RESET, 0x9302, "mac_invalid")
    assert card.image.social.locked
    assert card.image.social.pin == "271828"


@pytest.mark.parametrize("weak", ["000000", "999999", "123456", "987654", "456789"])
def test_a_weak_new_pin_is_refused_before_anything_is_sent_R8(weak: str) -> None:
    flow = PinReset(psam=psam(), card=snapshot(reader_for(nanjing_card())[0]), new_pin=weak)
    assert flow.start() == Refused(Step.PIN_RESET, 0, "weak_pin")


def test_the_flow_sends_select_challenge_then_the_reset_with_its_mac() -> None:
    reader, _ = reader_for(nanjing_card())
    flow = PinReset(psam=psam(), card=snapshot(reader), new_pin="314159")
    steps = []
    event: object = flow.start()
    while isinstance(event, Transmit):
        steps.append((event.step, event.apdu[:5].hex().upper()))
        event = flow.receive(reader.transmit(event.apdu))
    assert event == PinResetDone()
    assert steps == [
        (Step.SELECT, "00A4040006"),
        (Step.CHALLENGE, "0084000004"),
        (Step.PIN_RESET, "842C000007"),
    ]


def test_a_pin_that_is_not_six_digits_is_a_caller_error() -> None:
    snap = snapshot(reader_for(nanjing_card())[0])
    with pytest.raises(ValueError, match="6 digits"):
        PinReset(psam=psam(), card=snap, new_pin="31415")


# --- each profile's initial PIN and try limit (R8) --------------------------------------------


def new_card(tmp_path: Path, profile: str) -> CardImage:
    path = tmp_path / f"{profile}.json"
    out = run_farelab(
        "card", "new", str(path), "--serial", "5300", "--issued", "2026-01-01",
        "--profile", profile,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return load_image(path)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_card_new_with_a_profile_takes_its_initial_pin_and_try_limit_R8(
    tmp_path: Path, name: str
) -> None:
    profile: IssuerProfile = PROFILES[name]
    image = new_card(tmp_path, name)
    assert (image.social.pin, image.social.initial_pin) == (profile.initial_pin,) * 2
    assert image.social.try_limit == profile.pin_tries_per_day

    reader, _ = reader_for(image)
    assert sw(reader.transmit(SELECT_SOCIAL)) == 0x9000
    assert sw(reader.transmit(READ_HOLDER)) == 0x9000  # the initial PIN is not asked
    assert sw(reader.transmit(verify(profile.initial_pin))) == 0x9000
    words = lock(reader, profile.initial_pin, profile.pin_tries_per_day)
    assert words[-2:] == [0x63C0, 0x6983]
    assert words[0] == 0x6300 | 0xC0 | (profile.pin_tries_per_day - 1)


def test_nanjing_and_haining_initial_pins_and_try_limits_R8(tmp_path: Path) -> None:
    nanjing, haining = new_card(tmp_path, "nanjing"), new_card(tmp_path, "haining")
    assert (nanjing.social.initial_pin, nanjing.social.try_limit) == ("888888", 5)
    assert (haining.social.initial_pin, haining.social.try_limit) == ("123456", 6)


def test_card_new_with_an_unknown_profile_exits_2(tmp_path: Path) -> None:
    out = run_farelab("card", "new", str(tmp_path / "x.json"), "--profile", "atlantis")
    assert out.returncode == 2
    assert not (tmp_path / "x.json").exists()


def test_card_new_without_a_profile_keeps_the_default_pin(tmp_path: Path) -> None:
    path = tmp_path / "plain.json"
    assert run_farelab("card", "new", str(path), "--serial", "5301").returncode == 0
    social = json.loads(path.read_text())["social"]
    assert (social["pin"], social["try_limit"]) == ("888888", 5)

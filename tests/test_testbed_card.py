"""``farelab testbed card``: farelab's terminal checks a card in a reader without changing it —
every check of farelab's own card conforms, read-only its image stays byte for byte the same,
with the issuer's keys one fen is bought and its TAC verifies, and a card that answers a wrong
status word is reported not conforming."""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path

import pytest

from farelab.card import (
    CST,
    DEMO_KEYS,
    BehavingCard,
    Behaviour,
    InProcessReader,
    IssuerKeys,
    MemoryStore,
    SimulatedCard,
    load_image,
    personalise,
    save_image,
)
from farelab.testbed import DebitKeys, check_card
from tests.cli_support import farelab, start_farelab

READER = "pcsc:Virtual PCD 00 00"

WRONG_BALANCE_SW = """
[[rule]]
when = { command = "GET_BALANCE", occurrence = 1 }
do = { action = "status", sw = "6A82" }
"""


def issued(balance: int = 5000) -> SimulatedCard:
    image = personalise(serial="4242", issued=date(2026, 1, 1), balance=balance)
    return SimulatedCard(image, store=MemoryStore(), entropy=bytes)


def in_reader(card: SimulatedCard | BehavingCard) -> InProcessReader:
    reader = InProcessReader()
    reader.insert(card)
    reader.connect()
    return reader


def keys_file(path: Path) -> Path:
    path.write_text(
        f'purchase = "{DEMO_KEYS.purchase.hex()}"\n'
        f'load = "{DEMO_KEYS.load.hex()}"\n'
        f'tac = "{DEMO_KEYS.tac.hex()}"\n'
        f'maintenance = "{DEMO_KEYS.maintenance.hex()}"\n'
    )
    return path


# --- in-process ----------------------------------------------------------------------------


def test_farelab_card_conforms_read_only_and_is_left_unchanged() -> None:
    card = issued()
    before = card.image.to_json()
    report = check_card(in_reader(card))
    assert report.conforms, [c for c in report.checks if not c.conforms]
    assert not report.debited
    assert card.image.to_json() == before
    names = {c.name for c in report.checks}
    for name in ("SELECT transit application", "SELECT PPSE (2PAY.SYS.DDF01)", "1-byte APDU (80)"):
        assert name in names


def test_the_one_fen_purchase_drops_the_balance_one_fen_and_its_tac_verifies() -> None:
    card = issued()
    report = check_card(in_reader(card), debit=DebitKeys(DEMO_KEYS, datetime.now(CST)))
    assert report.conforms, [c for c in report.checks if not c.conforms]
    assert report.debited
    assert card.image.balance == 4999
    by_name = {c.name: c for c in report.checks}
    assert by_name["TAC of the purchase"].conforms


def test_a_tac_under_other_keys_does_not_conform() -> None:
    other = IssuerKeys(
        purchase=DEMO_KEYS.purchase,
        load=DEMO_KEYS.load,
        tac=bytes(16),
        maintenance=DEMO_KEYS.maintenance,
    )
    report = check_card(in_reader(issued()), debit=DebitKeys(other, datetime.now(CST)))
    assert [c.name for c in report.checks if not c.conforms] == ["TAC of the purchase"]


def test_a_card_answering_a_wrong_status_word_to_get_balance_does_not_conform() -> None:
    card = BehavingCard(issued(), Behaviour.from_dict(tomllib.loads(WRONG_BALANCE_SW)))
    report = check_card(in_reader(card))
    assert not report.conforms
    failing = [c for c in report.checks if not c.conforms]
    assert (failing[0].name, failing[0].seen) == ("GET BALANCE", "6A82")


def test_a_card_without_the_transit_application_does_not_conform() -> None:
    image = personalise(serial="77", issued=date(2026, 1, 1), transit=False)
    card = SimulatedCard(image, store=MemoryStore(), entropy=bytes)
    report = check_card(in_reader(card))
    by_name = {c.name: c for c in report.checks}
    assert not report.conforms
    assert by_name["SELECT transit application"].seen == "6A82"
    assert by_name["SELECT bank application"].conforms


def test_the_report_as_json_names_check_expected_seen_conforms() -> None:
    doc = check_card(in_reader(issued())).to_json()
    assert set(doc) == {"reader", "conforms", "debited", "checks"}
    checks = doc["checks"]
    assert isinstance(checks, list)
    assert set(checks[0]) == {"check", "expected", "seen", "conforms"}


# --- the command ---------------------------------------------------------------------------


def test_allow_debit_needs_keys_and_keys_need_allow_debit(tmp_path: Path) -> None:
    result = farelab("testbed", "card", "--reader", READER, "--allow-debit")
    assert result.returncode == 2
    assert "--allow-debit needs --keys" in result.stderr
    keys = keys_file(tmp_path / "keys.toml")
    result = farelab("testbed", "card", "--reader", READER, "--keys", str(keys))
    assert result.returncode == 2
    assert "add --allow-debit" in result.stderr


def test_a_reader_that_is_not_pcsc_is_refused() -> None:
    result = farelab("testbed", "card", "--reader", "sim")
    assert result.returncode == 2
    assert "pcsc:NAME" in result.stderr


# --- through pcscd -------------------------------------------------------------------------


@contextmanager
def served(path: Path, *options: str) -> Iterator[None]:
    """``farelab card serve`` of the image at ``path`` in pcscd's first virtual reader."""
    proc = start_farelab("card", "serve", str(path), *options, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert "presented" in proc.stdout.readline()
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def checked(
    tmp_path: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    result = farelab("testbed", "card", "--reader", READER, "--json", str(report), *extra)
    doc = json.loads(report.read_text()) if report.exists() else {}
    return result, doc


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_farelab_card_through_pcscd_conforms_and_its_image_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    save_image(path, issued().image)
    original = path.read_bytes()
    with served(path):
        result, doc = checked(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert doc["conforms"] is True
    assert doc["debited"] is False
    assert "checks conform, 0 do not (read-only)" in result.stdout
    assert path.read_bytes() == original


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_allow_debit_through_pcscd_buys_one_fen_whose_tac_verifies(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    save_image(path, issued().image)
    keys = keys_file(tmp_path / "keys.toml")
    with served(path):
        result, doc = checked(tmp_path, "--keys", str(keys), "--allow-debit")
    assert result.returncode == 0, result.stdout + result.stderr
    assert doc["debited"] is True
    checks = doc["checks"]
    assert isinstance(checks, list)
    tac = next(c for c in checks if c["check"] == "TAC of the purchase")
    assert tac["conforms"] is True
    assert load_image(path).balance == 4999


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_a_card_served_with_a_wrong_get_balance_status_is_reported_not_conforming(
    tmp_path: Path,
) -> None:
    path = tmp_path / "card.json"
    save_image(path, issued().image)
    behaviour = tmp_path / "wrong.toml"
    behaviour.write_text(WRONG_BALANCE_SW)
    with served(path, "--behaviour", str(behaviour)):
        result, doc = checked(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert doc["conforms"] is False
    checks = doc["checks"]
    assert isinstance(checks, list)
    failing = [(c["check"], c["seen"]) for c in checks if not c["conforms"]]
    assert failing[0] == ("GET BALANCE", "6A82")
    assert "NO" in result.stdout

"""A card pulled at every command of ``farelab topup load``, ``refund``, ``transfer`` and of the
``topup kiosk`` flow: the command ends with its documented JSON (or the kiosk's message), reason
``card_removed``, exit status 1 (the kiosk carries on and closes with 0), never a traceback; and
when the card is presented again, what was torn is settled — the card's balance and the host's
ledger agree, nothing is lost or paid twice, and nothing is left open."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pytest

from farelab._cli import main
from farelab.card import InProcessReader, load_image, personalise, save_image

KEYS = {"result", "reason", "amount_fen", "balance_fen", "tac"}


class Field:
    """Every in-process reader of this process loses its card at the ``pull_at``-th command
    (the command reaches the card, its answer never comes back)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pull_at: int | None = None
        self.sent = 0
        real = InProcessReader.transmit

        def transmit(reader: InProcessReader, apdu: bytes) -> bytes:
            self.sent += 1
            if self.sent == self.pull_at:
                reader.pull_after(lambda _: True)
            return real(reader, apdu)

        monkeypatch.setattr(InProcessReader, "transmit", transmit)

    def pulling(self, k: int | None) -> None:
        self.pull_at, self.sent = k, 0


class Kiosk:
    """``farelab topup`` run in-process in its own folder, its state files there."""

    def __init__(self, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.folder = folder
        self.capsys = capsys
        self.state = ["--db", str(folder / "host.db"), "--journal", str(folder / "kiosk.db")]

    def card(self, name: str, serial: str, balance: int) -> str:
        path = self.folder / name
        save_image(path, personalise(serial=serial, issued=date(2026, 1, 1), balance=balance))
        return str(path)

    def json(self, *args: str) -> tuple[int, dict[str, object]]:
        """One one-shot command with --json: its exit status and its JSON."""
        status = main(["topup", *args, "--json", *self.state])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err, err
        assert status in (0, 1), err
        doc: dict[str, object] = json.loads(out)
        assert set(doc) == KEYS
        return status, doc

    def ledger(self, query: str, *args: str) -> int:
        with sqlite3.connect(self.folder / "host.db") as db:
            return int(db.execute(query, args).fetchone()[0])

    def assert_settled(self, card: str, before: int) -> None:
        """The card's money moved exactly as the host counted it; nothing is left open."""
        serial = load_image(Path(card)).public.serial
        loaded = self.ledger(
            "SELECT coalesce(sum(amount), 0) FROM loads WHERE card_serial = ? "
            "AND status = 'confirmed' AND kind != 'refund'",
            serial,
        )
        refunded = self.ledger(
            "SELECT coalesce(sum(amount), 0) FROM loads WHERE card_serial = ? AND kind = 'refund'",
            serial,
        )
        assert load_image(Path(card)).balance == before + loaded - refunded
        assert self.ledger("SELECT count(*) FROM loads WHERE status = 'authorized'") == 0
        with sqlite3.connect(self.folder / "kiosk.db") as db:
            open_rows = db.execute(
                "SELECT count(*) FROM loads WHERE status IN ('authorized', 'credited')"
            ).fetchone()[0]
        assert open_rows == 0


@pytest.fixture
def field(monkeypatch: pytest.MonkeyPatch) -> Field:
    return Field(monkeypatch)


@pytest.fixture
def kiosk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Kiosk:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return Kiosk(tmp_path, capsys)


def commands(field: Field, action: Callable[[], object]) -> int:
    """How many commands ``action`` sends when nothing is pulled."""
    field.pulling(None)
    action()
    return field.sent


# Each action sends SELECT, GET BALANCE, INITIALIZE and its CREDIT or DEBIT: 4 commands.
EVERY_COMMAND = range(1, 5)


def test_every_command_is_reached(field: Field, kiosk: Kiosk) -> None:
    card = kiosk.card("c.json", "41", 1000)
    assert commands(field, lambda: kiosk.json("load", card, "--amount", "5")) == 4
    assert commands(field, lambda: kiosk.json("refund", card)) == 4


@pytest.mark.parametrize("k", EVERY_COMMAND)
def test_topup_load_pulled_at_every_command(field: Field, kiosk: Kiosk, k: int) -> None:
    card = kiosk.card("c.json", "41", 1000)
    field.pulling(k)
    status, doc = kiosk.json("load", card, "--amount", "50")
    assert (status, doc["result"], doc["reason"]) == (1, "refused", "card_removed")
    assert doc["amount_fen"] == (0 if k <= 2 else 5000)
    field.pulling(None)
    status, again = kiosk.json("load", card, "--amount", "1")
    assert (status, again["result"]) == (0, "loaded")
    assert load_image(Path(card)).balance == (6100 if k == 4 else 1100)
    kiosk.assert_settled(card, 1000)


@pytest.mark.parametrize("k", EVERY_COMMAND)
def test_topup_refund_pulled_at_every_command(field: Field, kiosk: Kiosk, k: int) -> None:
    card = kiosk.card("c.json", "42", 4321)
    field.pulling(k)
    status, doc = kiosk.json("refund", card)
    assert (status, doc["result"], doc["reason"]) == (1, "refused", "card_removed")
    field.pulling(None)
    status, again = kiosk.json("load", card, "--amount", "1")
    if k == 4:  # the DEBIT emptied the card: the host counts the refund, and hotlists the card
        assert (status, again["reason"]) == (1, "hotlisted")
        assert load_image(Path(card)).balance == 0
    else:
        assert (status, again["result"]) == (0, "loaded")
        assert load_image(Path(card)).balance == 4421
    kiosk.assert_settled(card, 4321)


@pytest.mark.parametrize("k", EVERY_COMMAND)
def test_topup_transfer_pulled_at_every_command(field: Field, kiosk: Kiosk, k: int) -> None:
    old = kiosk.card("old.json", "43", 0)
    new = kiosk.card("new.json", "44", 0)
    assert kiosk.json("load", old, "--amount", "30")[0] == 0
    transfer = ["transfer", new, "--old", "43", "--reason", "exchange"]
    transfer += ["--reported", "2026-11-01", "--profile", "hangzhou"]
    field.pulling(k)
    status, doc = kiosk.json(*transfer)
    assert (status, doc["result"], doc["reason"]) == (1, "refused", "card_removed")
    field.pulling(None)
    status, again = kiosk.json("load", new, "--amount", "1")
    assert (status, again["result"]) == (0, "loaded")
    moved = 3000 if k == 4 else 0
    assert load_image(Path(new)).balance == moved + 100
    if k != 4:  # the old card's balance can still move, once
        assert kiosk.json(*transfer)[1]["amount_fen"] == 3000
    assert load_image(Path(new)).balance == 3100
    assert kiosk.json(*transfer)[1]["reason"] in ("already_transferred", "already_received")
    kiosk.assert_settled(new, 0)


class Person:
    """Answers the interactive kiosk's prompts: the card once, then an empty line to close;
    the amount once, then an empty line to take the card back."""

    def __init__(self, card: str, amount: str) -> None:
        self.answers = {"Card image": [card], "Amount in yuan": [amount]}

    def ask(self, prompt: str, *_: object, **__: object) -> str:
        for start, answers in self.answers.items():
            if start in prompt:
                return answers.pop(0) if answers else ""
        raise AssertionError(prompt)


def run_kiosk(kiosk: Kiosk, monkeypatch: pytest.MonkeyPatch, person: Person) -> str:
    monkeypatch.setattr("farelab._kiosk_ui.Prompt.ask", person.ask)
    status = main(["topup", "kiosk", *kiosk.state])
    out, err = kiosk.capsys.readouterr()
    assert "Traceback" not in out + err
    assert status == 0, err
    assert "Kiosk closed" in out
    return " ".join(out.split())


def test_the_kiosk_flow_sends_six_commands(
    field: Field, kiosk: Kiosk, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = kiosk.card("c.json", "49", 0)
    run = lambda: run_kiosk(kiosk, monkeypatch, Person(card, "5"))  # noqa: E731
    assert commands(field, run) == 6  # presented (2), then loaded (4)


@pytest.mark.parametrize("k", range(1, 7))
def test_the_kiosk_flow_pulled_at_every_command(
    field: Field, kiosk: Kiosk, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    card = kiosk.card("c.json", "45", 1000)
    field.pulling(k)
    screen = run_kiosk(kiosk, monkeypatch, Person(card, "50"))
    assert "left the reader" in screen
    if k > 2:
        assert "Refused (card_removed)" in screen
    field.pulling(None)
    screen = run_kiosk(kiosk, monkeypatch, Person(card, ""))
    assert "at most" in screen  # presented again: the card's panel
    assert load_image(Path(card)).balance == (6000 if k == 6 else 1000)
    if k == 6:
        assert "had reached the card: confirmed" in screen
    kiosk.assert_settled(card, 1000)

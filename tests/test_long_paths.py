"""A path no file can have (longer than the system allows) is one short error line, never a
traceback and never the whole path again."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from farelab._cli import main
from farelab.card import personalise, save_image

LONG = "x" * 100_000


@pytest.mark.parametrize(
    "args",
    [
        ["card", "new", f"/nonexistent/{LONG}"],
        ["topup", "load", "CARD", "--amount", "1", "--journal", f"/nonexistent/{LONG}"],
        ["backend", "devices", "add", "--config", f"/nonexistent/{LONG}", "--db", "DB"],
    ],
    ids=["card-new", "topup-journal", "devices-config"],
)
def test_a_path_too_long_for_a_file_is_one_short_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    card = tmp_path / "card.json"
    save_image(card, personalise(serial="4242", issued=date(2026, 1, 1), balance=0))
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    argv = [str(card) if a == "CARD" else db if a == "DB" else a for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err[:500]
    assert len(err) < 400

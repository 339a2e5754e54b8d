"""The interactive kiosk driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import os
import re
import sys
from datetime import date
from pathlib import Path

import pexpect

from farelab.card import load_image, personalise, save_image
from tests.cli_support import ROOT

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_person_loads_a_card_at_the_kiosk(tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    save_image(card, personalise(serial="3141", issued=date(2026, 1, 1), balance=90_000))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "90", "TERM": "xterm"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "farelab", "topup", "kiosk"],
        cwd=str(tmp_path),
        env=env,
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 90),
    )
    transcript: list[str] = []
    try:
        child.expect("Card image to present")
        child.sendline(str(card))
        child.expect("at most")
        child.expect("Amount in yuan")
        child.sendline("200")
        child.expect(r"Refused \(cap_exceeded\)")
        child.expect("Amount in yuan")
        child.sendline("0.001")
        child.expect(r"Refused \(bad_amount\)")
        child.expect("Amount in yuan")
        child.sendline("100")
        child.expect("Receipt")
        child.expect("Card image to present")
        transcript.append(child.before)
        child.sendline("")
        child.expect("Kiosk closed")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    screen = ANSI.sub("", "".join(transcript))
    assert "1000.00 yuan" in screen
    assert "TAC" in screen
    assert load_image(card).balance == 100_000

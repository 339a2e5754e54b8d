"""``farelab demo`` runs end to end, through pcscd too, and tells the story it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_support import farelab


@pytest.mark.pcsc
@pytest.mark.usefixtures("pcscd")
def test_demo_runs_in_process_through_pcscd_and_on_the_validators(tmp_path: Path) -> None:
    result = farelab("demo", "--dir", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[in-process] bus fare 2.00 yuan: balance 50.00 -> 48.00" in out
    assert "[pcscd] bus fare 2.00 yuan" in out
    assert out.count("verified with the TAC key") == 2
    assert out.count("refused by the card (6985 cap_exceeded)") == 2
    assert "the rider taps again: accepted, recovered, fare 2.70" in out
    assert "0 pending" in out
    assert "uploaded 4 records; 0 left in the outbox" in out
    assert "ledger: 3 transactions, purchases 3.20 yuan, 0 forged" in out
    assert "settlement: issuer:1310000000000000 pays operator:TAIYUAN 3.20 yuan" in out
    assert (tmp_path / "demo-card.json").exists()

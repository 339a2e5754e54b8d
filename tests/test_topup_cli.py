"""``farelab topup load`` as scripts use it: the JSON contract, exit codes, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

from card import load_image, personalise, save_image


def topup(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "farelab", "topup", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_load_json_contract_and_exit_codes(tmp_path: Path) -> None:
    card = tmp_path / "c.json"
    save_image(card, personalise(serial="9", issued=date(2026, 1, 1), balance=99_000))
    ok = topup(tmp_path, "load", str(card), "--amount", "10", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {
        "result": "loaded",
        "reason": None,
        "amount_fen": 1000,
        "balance_fen": 100_000,
        "tac": json.loads(ok.stdout)["tac"],
    }
    refused = topup(tmp_path, "load", str(card), "--amount", "0.01", "--json")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["reason"] == "cap_exceeded"
    assert load_image(card).balance == 100_000


def test_unreachable_broker_is_host_unreachable(tmp_path: Path) -> None:
    card = tmp_path / "c.json"
    save_image(card, personalise(serial="9", issued=date(2026, 1, 1)))
    out = topup(
        tmp_path,
        "load",
        str(card),
        "--amount",
        "10",
        "--json",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--timeout",
        "2",
    )
    assert json.loads(out.stdout)["reason"] == "host_unreachable"
    assert load_image(card).balance == 0


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    card = tmp_path / "c.json"
    save_image(card, personalise(serial="9", issued=date(2026, 1, 1)))
    (tmp_path / "bad.db").write_text("not sqlite")
    for args, message in (
        (("load", str(card), "--amount", "1", "--journal", "bad.db"), "not a usable kiosk journal"),
        (("load", str(tmp_path / "missing.json"), "--amount", "1"), "no such card image"),
        (("load", "--amount", "1"), "give either CARD"),
        (
            (
                "transfer",
                str(card),
                "--old",
                "1",
                "--reason",
                "loss",
                "--reported",
                "soon",
                "--profile",
                "nanjing",
            ),
            "is not a date",
        ),
    ):
        out = topup(tmp_path, *args)
        assert out.returncode == 2, args
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr

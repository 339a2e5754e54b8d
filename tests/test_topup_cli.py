"""``farelab topup load`` as scripts use it: the JSON contract, exit codes, clear errors."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from datetime import date
from pathlib import Path

import pytest

from farelab._cli import main
from farelab.card import load_image, personalise, save_image
from tests.cli_support import farelab


def topup(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``farelab topup …`` in ``cwd``, its state files in ``cwd/data``."""
    return farelab("topup", *args, cwd=cwd, env={**os.environ, "XDG_DATA_HOME": str(cwd / "data")})


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


def test_another_program_s_file_is_not_taken_as_the_kiosk_journal(tmp_path: Path) -> None:
    from farelab.backend._store import Store  # noqa: PLC0415
    from farelab.validator._journal import Journal  # noqa: PLC0415

    card = tmp_path / "c.json"
    save_image(card, personalise(serial="9", issued=date(2026, 1, 1)))
    Store(f"sqlite:///{tmp_path / 'ledger.db'}").close()
    Journal(tmp_path / "validator.db").close()
    with sqlite3.connect(tmp_path / "other.db") as other:
        other.execute("CREATE TABLE loads (truck TEXT)")
    for name, what in (
        ("ledger.db", "backend ledger"),
        ("validator.db", "validator journal"),
        ("other.db", "another program's database"),
    ):
        before = (tmp_path / name).read_bytes()
        out = topup(tmp_path, "load", str(card), "--amount", "1", "--journal", name)
        assert out.returncode == 2, out.stderr
        assert "not a usable kiosk journal" in out.stderr
        assert what in out.stderr
        assert "Traceback" not in out.stderr
        assert (tmp_path / name).read_bytes() == before
    assert load_image(card).balance == 0


def test_a_folder_as_journal_and_a_bad_kiosk_id_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    card = tmp_path / "c.json"
    save_image(card, personalise(serial="9", issued=date(2026, 1, 1)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    load = ["topup", "load", str(card), "--amount", "1"]
    assert main([*load, "--journal", str(tmp_path)]) == 2
    assert "it is a folder" in capsys.readouterr().err
    for broker in ([], ["--broker", "mqtt://127.0.0.1:1"]):
        assert main([*load, "--kiosk", "a/#", *broker]) == 2
        assert "--kiosk 'a/#' must be 1-64 letters" in capsys.readouterr().err
    assert load_image(card).balance == 0


def test_the_host_knows_the_kiosk_by_its_registered_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    card = tmp_path / "c.json"
    save_image(card, personalise(serial="9", issued=date(2026, 1, 1)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    load = ["topup", "load", str(card), "--amount", "1", "--json", "--kiosk", "k-7"]
    assert main([*load, "--terminal", "0000F0000ABC"]) == 0  # registered with this terminal
    assert main([*load]) == 1  # the same kiosk at another terminal
    outs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(o["result"], o["reason"]) for o in outs] == [
        ("loaded", None),
        ("refused", "wrong_terminal"),
    ]
    assert main([*load, "--terminal", "XYZ"]) == 2
    assert "--terminal 'XYZ' is not 12 hex digits" in capsys.readouterr().err
    assert load_image(card).balance == 100


def test_a_host_that_fails_inside_is_a_clean_refusal_not_a_traceback(tmp_path: Path) -> None:
    """Two images of one serial (a copied card) through one ledger: the in-process host cannot
    count the second card's load under a counter it has counted; the kiosk says so cleanly."""
    state = ("--db", "host.db", "--journal", "kiosk.db", "--json")
    for name in ("a.json", "b.json"):
        save_image(tmp_path / name, personalise(serial="77", issued=date(2026, 1, 1)))
    first = topup(tmp_path, "load", "a.json", "--amount", "1", *state)
    assert (first.returncode, json.loads(first.stdout)["result"]) == (0, "loaded")
    for _ in range(2):  # the copy, then the copy presented again
        out = topup(tmp_path, "load", "b.json", "--amount", "1", *state)
        assert "Traceback" not in out.stderr, out.stderr
        assert out.returncode in (0, 1)
        doc = json.loads(out.stdout)
        assert set(doc) == {"result", "reason", "amount_fen", "balance_fen", "tac"}
        assert doc["result"] in ("loaded", "refused")

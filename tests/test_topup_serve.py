"""``farelab topup serve``: a long-running kiosk answering one JSON line per load request."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from farelab.card import load_image
from tests.cli_support import farelab, start_farelab


def test_serve_answers_each_request_in_order_and_refuses_bad_ones(tmp_path: Path) -> None:
    new = farelab(
        "card",
        "new",
        str(tmp_path / "c.json"),
        "--balance",
        "10",
        "--serial",
        "3100001",
        "--issued",
        "2026-01-01",
    )
    assert new.returncode == 0, new.stderr
    card = str(tmp_path / "c.json")
    requests = [
        {"card": card, "amount_fen": 5000},
        {"card": card, "amount_fen": 100_000},  # over the cap
        "nonsense",
        {"card": str(tmp_path / "nope.json"), "amount_fen": 5},
        {"card": card, "amount_fen": True},
        {"card": card, "amount_fen": 0},
        {"card": card, "amount_fen": 100},
    ]
    stdin = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests)
    result = farelab(
        "topup",
        "serve",
        "--db",
        str(tmp_path / "host.db"),
        "--journal",
        str(tmp_path / "kiosk.db"),
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr
    assert "farelab topup: serving as kiosk-1" in result.stderr
    answers = [json.loads(x) for x in result.stdout.splitlines()]
    assert [(a["result"], a["reason"], a["card"]) for a in answers] == [
        ("loaded", None, card),
        ("refused", "cap_exceeded", card),
        ("refused", "bad_request", None),
        ("refused", "bad_request", None),
        ("refused", "bad_request", None),
        ("refused", "bad_request", None),
        ("loaded", None, card),
    ]
    assert answers[0]["balance_fen"] == 6000
    assert answers[-1]["balance_fen"] == 6100
    assert "no such card image" in answers[3]["detail"]
    assert "amount_fen" in answers[4]["detail"]
    assert {"card", "result", "reason", "amount_fen", "balance_fen", "tac"} <= answers[0].keys()
    assert load_image(Path(card)).balance == 6100


def test_serve_stops_at_sigterm_while_its_stdin_is_still_open(tmp_path: Path) -> None:
    proc = start_farelab(
        "topup",
        "serve",
        "--db",
        str(tmp_path / "host.db"),
        "--journal",
        str(tmp_path / "kiosk.db"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        assert "serving" in proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0  # stopped cleanly, stdin still open
    finally:
        proc.kill()
        proc.communicate()

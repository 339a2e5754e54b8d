"""Kill a real kiosk process at every step of a load, the card in pcscd's virtual reader
(``farelab card serve``); after the card is presented again, the host's ledger and the card
agree: no load lost, none paid twice."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from datetime import date
from pathlib import Path

import pytest

from farelab.card import load_image, personalise, save_image
from farelab.topup import KILL_POINTS
from tests.cli_support import ROOT, start_farelab
from tests.cli_support import farelab as run_farelab

pytestmark = [pytest.mark.pcsc, pytest.mark.usefixtures("pcscd")]
READER = "pcsc:Virtual PCD 00 00"
STATE = ("--db", "farelab-host.db", "--journal", "farelab-kiosk.db")  # in the test's folder


def farelab(cwd: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kill_at:
        env["FARELAB_KILL_AT"] = kill_at
    return run_farelab(*args, cwd=cwd, env=env)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kiosk_killed_at_every_step_then_card_presented_again(point: str, tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    save_image(card, personalise(serial="8181", issued=date(2026, 1, 1), balance=1000))
    serve = start_farelab(
        "card", "serve", str(card), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        time.sleep(0.8)
        killed = farelab(
            tmp_path, "topup", "load", "--reader", READER, "--amount", "50", *STATE, kill_at=point
        )
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout, killed.stderr)
        again = farelab(
            tmp_path, "topup", "load", "--reader", READER, "--amount", "1", "--json", *STATE
        )
        assert again.returncode == 0, (point, again.stdout, again.stderr)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(10)
    with sqlite3.connect(tmp_path / "farelab-host.db") as host:
        confirmed = host.execute(
            "SELECT coalesce(sum(amount), 0) FROM loads WHERE status = 'confirmed'"
        ).fetchone()[0]
        open_loads = host.execute(
            "SELECT count(*) FROM loads WHERE status = 'authorized'"
        ).fetchone()[0]
    with sqlite3.connect(tmp_path / "farelab-kiosk.db") as kiosk:
        unsettled = kiosk.execute(
            "SELECT count(*) FROM loads WHERE status IN ('authorized', 'credited')"
        ).fetchone()[0]
    balance = load_image(card).balance
    assert balance == 1000 + confirmed, point
    assert (open_loads, unsettled) == (0, 0), point
    took_it = point in ("kiosk_after_credit", "kiosk_after_credited", "kiosk_after_confirm")
    assert confirmed == (5000 if took_it else 0) + 100, point

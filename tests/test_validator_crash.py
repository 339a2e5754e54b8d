"""Kill a real validator process at every step of a tap, with the card in pcscd's virtual reader
(``farelab card serve``); after a restart and a re-tap, card and journal agree: no lost debit,
no double charge."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from farelab.card import load_image, personalise, save_image
from farelab.validator._faults import KILL_POINTS
from farelab.validator._journal import Journal
from tests.cli_support import start_farelab

pytestmark = [pytest.mark.pcsc, pytest.mark.usefixtures("pcscd")]

CONFIG = """
[[validator]]
id = "bus-9"
kind = "bus"
network = "taiyuan"
route = "9"
terminal_id = "000000000B09"
whitelist = ["1310000000000000"]
reader = "pcsc:Virtual PCD 00 00"
"""


def farelab(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return start_farelab(
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def first_line(proc: subprocess.Popen[str], timeout: float) -> str | None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else None


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def served_card(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "card.json"
    save_image(path, personalise(serial="4242", issued=date(2026, 1, 1), balance=1000))
    server = farelab("card", "serve", str(path))
    time.sleep(0.8)
    assert server.poll() is None, server.stderr.read() if server.stderr else ""
    yield path
    stop(server)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_every_step_then_restart_and_retap_agree(
    point: str, served_card: Path, tmp_path: Path
) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(CONFIG)
    journal = tmp_path / "journal.db"
    args = ("validator", "run", "--config", str(config), "--journal", str(journal))

    victim = farelab(*args, env={"FARELAB_KILL_AT": point})
    try:
        assert victim.wait(20) == -signal.SIGKILL, f"{point}: the validator did not die there"
    finally:
        stop(victim)

    survivor = farelab(*args)
    try:
        line = first_line(survivor, 20)
    finally:
        stop(survivor)
    assert line, f"{point}: no tap after the restart"
    retap = json.loads(line)
    time.sleep(0.3)  # let `card serve` finish writing its last commit

    card = load_image(served_card)
    rows = Journal(journal).transactions()
    completed = [r for r in rows if r["status"] == "completed"]
    assert not [r for r in rows if r["status"] == "pending"], point
    assert card.balance == 1000 - sum(r["amount_fen"] for r in completed), (point, retap)
    assert card.offline_counter == len(completed) == 1, (point, retap)
    if point in ("after_debit_sent", "after_debit_answered"):
        assert retap["reason"] == "recovered"
    elif point == "after_journal":
        assert retap["reason"] == "already_processed"
    else:
        assert (retap["result"], retap["fare_fen"]) == ("accepted", 50)

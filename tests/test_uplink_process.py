"""The uplink in a process of its own: it drains the journal the taps' process owns, comes back
when killed, and leaves with its parent."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from pathlib import Path

from farelab.backend._mosquitto import Mosquitto
from farelab.protocol import BrokerURL
from farelab.validator import Journal, UplinkProcess
from tests.test_uplink_backend import LAB_BUS, drained, start_backend, uplink_on_a_thread
from tests.validator_support import Lab, bus, new_card


def _uplink_children(pid: int) -> list[int]:
    """This process's children that run the uplink."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                if b"farelab.validator._uplink_process" in argv:
                    found.append(int(child))
    return found


def test_a_killed_uplink_process_comes_back_and_nothing_is_lost(
    broker: Mosquitto, tmp_path: Path
) -> None:
    config = tmp_path / "bus.toml"
    config.write_text(LAB_BUS)
    backend = start_backend(broker, f"sqlite:///{tmp_path / 'ledger.db'}", devices=config)
    lab = Lab([bus("taiyuan")], journal=Journal(tmp_path / "j.db"))
    uplink = UplinkProcess(BrokerURL.parse(broker.url), ["bus"])
    try:
        with uplink_on_a_thread(uplink, lab.journal):
            card, t = new_card(balance=100_000), 0
            for _ in range(5):
                lab.tap("bus", card, t)
                t += 400
            assert drained(lab.journal, 30), f"{lab.journal.outbox_rows} rows left"
            assert uplink.ready.is_set()
            (child,) = _uplink_children(os.getpid())
            assert os.sched_getscheduler(child) == os.SCHED_IDLE
            os.kill(child, signal.SIGKILL)
            for _ in range(5):  # taps while the uplink is down: journalled, sent once it is back
                lab.tap("bus", card, t)
                t += 400
            assert drained(lab.journal, 60), (
                f"{lab.journal.outbox_rows} rows left after the restart"
            )
            assert uplink.restarts == 1
            with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
                rows = db.execute("SELECT count(*), count(DISTINCT seq) FROM transactions")
                assert rows.fetchone() == (10, 10)  # every tap once: resent rows de-duplicated
    finally:
        backend.terminate()
        backend.wait(15)
    assert not _uplink_children(os.getpid()), "the uplink process outlived its uplink"

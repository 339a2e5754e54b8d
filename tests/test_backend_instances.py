"""Backends sharing a broker keep to their own MQTT sessions, and a backend's workers do not
outlive it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from farelab.backend._mosquitto import Mosquitto
from farelab.backend._store import Store
from tests.cli_support import start_farelab
from tests.test_uplink_backend import stop

CONNECTED = re.compile(r"New client connected from \S+ as (farelab-(?!probe)\S+) ")


def start(broker: Mosquitto, db: str, workers: int) -> subprocess.Popen[str]:
    return start_farelab(
        "backend",
        "run",
        "--broker",
        broker.url,
        "--db",
        db,
        "--workers",
        str(workers),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_connected(proc: subprocess.Popen[str], workers: int) -> None:
    """Read the backend's stderr until each of its workers says it is ingesting."""
    assert proc.stderr is not None
    ready = 0
    for line in proc.stderr:
        assert "Traceback" not in line, line
        ready += "ingesting from" in line
        if ready == workers:
            return
    raise AssertionError(f"the backend exited ({proc.wait()})")


def quarantined(db: str) -> int:
    store = Store(db)
    try:
        return int(store.execute("SELECT count(*) FROM quarantine").fetchone()[0])
    finally:
        store.close()


def backend_clients(broker: Mosquitto) -> list[str]:
    return CONNECTED.findall(broker.log.read_text())


def mosquitto_pub(broker: Mosquitto, topic: str, payload: bytes) -> None:
    subprocess.run(
        ["mosquitto_pub", "-p", str(broker.port), "-V", "5", "-q", "1", "-t", topic, "-s"],
        input=payload,
        check=True,
    )


def test_two_backends_with_one_group_never_take_each_others_sessions(
    broker: Mosquitto, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    first, second = start(broker, db, 2), start(broker, db, 2)
    try:
        wait_connected(first, 2)
        wait_connected(second, 2)
        for n in range(20):
            mosquitto_pub(broker, f"farelab/v1/dev/bus-{n}/tx", b"not a batch")
        deadline = time.monotonic() + 60  # a bound on waiting, not a measure
        while quarantined(db) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(first)
        stop(second)
    log = broker.log.read_text()
    clients = backend_clients(broker)
    assert len(clients) == 4
    assert len(set(clients)) == 4
    assert "already connected, closing old connection" not in log
    assert quarantined(db) == 20


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_workers_stop_when_their_supervisor_is_killed(broker: Mosquitto, tmp_path: Path) -> None:
    proc = start(broker, f"sqlite:///{tmp_path / 'ledger.db'}", 2)
    workers: list[int] = []
    try:
        wait_connected(proc, 2)
        workers = [
            pid
            for pid in children(proc.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30  # a bound on waiting, not a measure: they stop at once
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in workers if running(pid)] == []
    finally:
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

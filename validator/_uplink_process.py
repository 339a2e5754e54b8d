"""The uplink in a process of its own, at idle priority: taps never share an interpreter with it.

In one process the uplink's Python work — reading the outbox, framing batches, the MQTT client,
the acks — takes turns with a tap on the interpreter lock, and a tap that starts while the
uplink is in a step shares the core with it until that step ends.  Here the uplink
(:class:`farelab.validator.MqttUplink`, unchanged) runs in a child process scheduled
``SCHED_IDLE`` (``nice 19`` where that is refused): the kernel runs it only when the taps'
process has nothing to do, and a tap that wakes takes the core at once.

The child reads the outbox through a read-only connection of its own (WAL: readers never block
the taps' writer) and never writes the journal.  Everything else crosses a pipe, one JSON object
a line:

- child → parent ``{"ack": [ids]}``: the backend committed these rows; the parent deletes them
  as the in-process uplink does, stepping aside for taps.  A row acknowledged but not yet
  deleted when either process dies is sent again later and de-duplicated by the backend.
- child → parent ``{"params": device, "payload": base64}``: a parameters message, applied by the
  parent's handler; the version in force comes back in the next status snapshot.
- child → parent ``{"ready": true}``: loaded and running (what a caller may wait for).
- parent → child ``{"config": {...}}`` first (the broker, devices, passwords: not on the command
  line, where any user could read them), then ``{"status": device, "version": v, "counts":
  {...}}`` whenever a device's counters change: what the child's status reports say.

The parent restarts a child that dies, with backoff; a child whose parent is gone sees its
standard input end and exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from farelab.protocol import Backoff, BrokerURL, cancel_and_wait
from farelab.validator._journal import Journal
from farelab.validator._stats import TapCounts
from farelab.validator._uplink import MqttUplink

__all__ = ["UplinkProcess", "child_main"]

log = logging.getLogger("farelab.uplink")

_StatusSource = Callable[[str], tuple[int, TapCounts] | None]

#: How often the parent looks for changed counters to hand the child (seconds).
SNAPSHOT_EVERY = 0.5


class UplinkProcess:
    """:class:`MqttUplink`'s drop-in for ``run_loop``: the same arguments, run in a child."""

    def __init__(
        self,
        broker: BrokerURL,
        devices: Iterable[str],
        *,
        batch_size: int = 200,
        passwords: dict[str, str] | None = None,
        status_every: float = 2.0,
        log_level: int = logging.INFO,
    ) -> None:
        """As :class:`MqttUplink`'s; ``log_level``: the least the child logs (to our stderr)."""
        self.broker = broker
        self.devices = list(devices)
        self.batch_size = batch_size
        self.passwords = passwords or {}
        self.status_every = status_every
        self.log_level = log_level
        self.restarts = 0
        #: set while a child runs with its MQTT client loaded (cleared when it exits)
        self.ready = threading.Event()
        self._on_params: Callable[[str, bytes], int | None] | None = None
        self._status: _StatusSource | None = None

    @classmethod
    def like(cls, uplink: MqttUplink) -> UplinkProcess:
        """The same uplink, in a process of its own."""
        return cls(
            uplink.broker,
            uplink.devices,
            batch_size=uplink.batch_size,
            passwords=uplink.passwords,
            status_every=uplink.status_every,
        )

    def attach_params(self, handler: Callable[[str, bytes], int | None]) -> None:
        """Apply parameters the backend publishes for these devices with ``handler``."""
        self._on_params = handler

    def attach_status(self, source: _StatusSource) -> None:
        """Report each device's parameters version and tap counters, as ``source`` gives them."""
        self._status = source

    def _config(self, journal: Journal) -> dict[str, Any]:
        return {
            "broker": dataclasses.asdict(self.broker),
            "devices": self.devices,
            "passwords": self.passwords,
            "journal": str(journal.path),
            "batch_size": self.batch_size,
            "status_every": self.status_every,
            "params": self._on_params is not None,
            "status": self._status is not None,
            "log_level": self.log_level,
        }

    async def run(self, journal: Journal) -> None:
        """Run the child until cancelled, again after each time it dies."""
        if str(journal.path) == ":memory:":
            raise ValueError("an uplink process needs a journal file, not :memory:")
        backoff = Backoff(base=1.0, cap=30.0)
        while True:
            code = await self._run_child(journal)
            delay = backoff.next_delay()
            self.restarts += 1
            log.warning("the uplink process exited (%s); starting it again in %.1f s", code, delay)
            await asyncio.sleep(delay)

    async def _run_child(self, journal: Journal) -> int:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "farelab.validator._uplink_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        assert child.stdin is not None
        assert child.stdout is not None
        sent: dict[str, tuple[int, TapCounts]] = {}
        try:
            child.stdin.write(_line({"config": self._config(journal)}))
            snapshots = asyncio.create_task(self._snapshots(child.stdin, sent))
            try:
                async for raw in child.stdout:
                    await self._from_child(raw, journal, child.stdin, sent)
            finally:
                await cancel_and_wait(snapshots)
            return await child.wait()
        finally:
            self.ready.clear()
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.terminate()
                try:
                    async with asyncio.timeout(10):
                        await child.wait()
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        child.kill()
                    await child.wait()

    async def _from_child(
        self,
        raw: bytes,
        journal: Journal,
        stdin: asyncio.StreamWriter,
        sent: dict[str, tuple[int, TapCounts]],
    ) -> None:
        try:
            doc = json.loads(raw)
            await self._handle(doc, journal, stdin, sent)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("the uplink process said something unreadable: %r (%s)", raw[:200], exc)

    async def _handle(
        self,
        doc: dict[str, Any],
        journal: Journal,
        stdin: asyncio.StreamWriter,
        sent: dict[str, tuple[int, TapCounts]],
    ) -> None:
        if "ready" in doc:
            self.ready.set()
        elif "ack" in doc:
            ids = [int(i) for i in doc["ack"]]
            await asyncio.to_thread(journal.acknowledge, ids)
        elif "params" in doc and self._on_params is not None:
            device = str(doc["params"])
            self._on_params(device, base64.b64decode(doc["payload"]))
            sent.pop(device, None)  # the version in force goes to the child at once
            await self._send_snapshots(stdin, sent)

    async def _snapshots(
        self, stdin: asyncio.StreamWriter, sent: dict[str, tuple[int, TapCounts]]
    ) -> None:
        while True:
            await self._send_snapshots(stdin, sent)
            await asyncio.sleep(SNAPSHOT_EVERY)

    async def _send_snapshots(
        self, stdin: asyncio.StreamWriter, sent: dict[str, tuple[int, TapCounts]]
    ) -> None:
        if self._status is None:
            return
        for device in self.devices:
            known = self._status(device)
            if known is None or sent.get(device) == known:
                continue
            sent[device] = known
            version, counts = known
            stdin.write(
                _line({"status": device, "version": version, "counts": _counts_json(counts)})
            )
        with contextlib.suppress(ConnectionError):
            await stdin.drain()


def _counts_json(counts: TapCounts) -> dict[str, Any]:
    return {
        "taps": counts.taps,
        "accepted": counts.accepted,
        "refused": dict(counts.refused),
        "latency_bounds_ms": list(counts.latency_bounds_ms),
        "latency_counts": list(counts.latency_counts),
    }


def _counts_of(doc: dict[str, Any]) -> TapCounts:
    return TapCounts(
        taps=int(doc["taps"]),
        accepted=int(doc["accepted"]),
        refused={str(k): int(v) for k, v in doc["refused"].items()},
        latency_bounds_ms=tuple(int(b) for b in doc["latency_bounds_ms"]),
        latency_counts=tuple(int(c) for c in doc["latency_counts"]),
    )


def _line(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


# -- the child --


class _OutboxView:
    """What :class:`MqttUplink` asks of a journal, from a read-only connection: the outbox's
    rows and counts, its epoch; acknowledgements go to the parent, which owns the journal."""

    gate = None  # no taps in this process

    def __init__(self, path: Path, acked: Callable[[list[int]], None]) -> None:
        self.path = path
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._db.execute("PRAGMA query_only=1")
        self._lock = threading.Lock()
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row is None:
            raise RuntimeError(f"{path}: no journal epoch")
        self.epoch = int(row[0])
        self._acked = acked

    def outbox_wire(self, limit: int, *, device: str, after: int = 0) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, record FROM outbox WHERE id > ? AND device = ? ORDER BY id LIMIT ?",
                (after, device, limit),
            ).fetchall()
        return [(int(i), bytes(r)) for i, r in rows]

    def outbox_count(self, *, device: str | None = None) -> int:
        with self._lock:
            if device is None:
                row = self._db.execute("SELECT count(*) FROM outbox").fetchone()
            else:
                row = self._db.execute(
                    "SELECT count(*) FROM outbox WHERE device=?", (device,)
                ).fetchone()
        return int(row[0])

    def acknowledge(self, ids: list[int]) -> None:
        self._acked(ids)


def _idle_priority() -> None:
    """Run only when nothing else wants the core (``nice 19`` where ``SCHED_IDLE`` is refused)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


async def _child(stdin: asyncio.StreamReader, out: Callable[[dict[str, Any]], None]) -> None:
    first = await stdin.readline()
    if not first:
        return
    config = json.loads(first)["config"]
    logging.getLogger().setLevel(int(config.get("log_level", logging.INFO)))
    broker = BrokerURL(**config["broker"])
    uplink = MqttUplink(
        broker,
        config["devices"],
        batch_size=int(config["batch_size"]),
        passwords=dict(config["passwords"]),
        status_every=float(config["status_every"]),
    )
    journal = _OutboxView(Path(config["journal"]), lambda ids: out({"ack": ids}))
    statuses: dict[str, tuple[int, TapCounts]] = {}
    if config.get("params"):

        def on_params(device: str, payload: bytes) -> int | None:
            out({"params": device, "payload": base64.b64encode(payload).decode()})
            return None  # the parent's next snapshot says the version in force

        uplink.attach_params(on_params)
    if config.get("status"):
        uplink.attach_status(statuses.get)
    task = asyncio.create_task(uplink.run(journal))  # type: ignore[arg-type]
    out({"ready": True})
    try:
        while not task.done():
            line = await stdin.readline()
            if not line:
                break  # the parent is gone
            doc = json.loads(line)
            if "status" in doc:
                statuses[str(doc["status"])] = (int(doc["version"]), _counts_of(doc["counts"]))
        if task.done():
            task.result()
    finally:
        await cancel_and_wait(task)


def child_main() -> int:
    """``python -m farelab.validator._uplink_process``: the child, fed by its parent."""
    _idle_priority()
    logging.basicConfig(level=logging.INFO, format="farelab uplink: %(message)s")
    lock = threading.Lock()

    def out(doc: dict[str, Any]) -> None:
        with lock:  # acks come from worker threads
            sys.stdout.buffer.write(_line(doc))
            sys.stdout.buffer.flush()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await _child(reader, out)

    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        asyncio.run(main())
    return 0


if __name__ == "__main__":
    sys.exit(child_main())

"""Tap-time harness: devices on a shipped network, a rich card, alternating entry/exit taps at
increasing times, each timed from card detected to result journalled."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

from farelab.card import (
    CST,
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    Alg,
    InProcessReader,
    MemoryStore,
    Reader,
    SimulatedCard,
    personalise,
)
from farelab.protocol import BrokerURL, cancel_and_wait
from farelab.validator import (
    Device,
    DeviceConfig,
    Journal,
    Kind,
    MqttUplink,
    Parameters,
    TapGate,
    TapResult,
    UplinkProcess,
    Validator,
    shipped_networks,
)

__all__ = [
    "RunningUplink",
    "TapBench",
    "bench_card",
    "bus_devices",
    "percentile",
    "uplink_running",
]


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values (nearest rank)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


# A card's offline counter has two bytes: after 65 535 purchases it answers 9402, so long runs
# hand the validators a fresh card now and then, as a day's traffic does.
CARD_TAPS = 60_000


def bench_card(alg: Alg = Alg.TDES, serial: str = "8888") -> SimulatedCard:
    """A card rich enough for tens of thousands of taps (past the 1000-yuan cap on purpose)."""
    image = personalise(serial=serial, issued=date(2026, 1, 1), alg=alg)
    image = image.replace(balance=10**9, max_balance=10**9)
    return SimulatedCard(image, store=MemoryStore(), entropy=bytes)


def bus_devices() -> tuple[Device, Device]:
    """The bus bench's two validators, ``in`` and ``out`` (the ones that upload)."""
    return _devices("bus")


def _devices(kind: str) -> tuple[Device, Device]:
    net = shipped_networks()["taiyuan"]
    if kind == "bus":
        return (
            Device(id="in", kind=Kind.BUS, network=net, terminal_id=bytes.fromhex("000000000B01")),
            Device(id="out", kind=Kind.BUS, network=net, terminal_id=bytes.fromhex("000000000B02")),
        )
    line = net.line("L2")
    return (
        Device(
            id="in",
            kind=Kind.METRO_GATE,
            network=net,
            line=line,
            station=net.station("尖草坪"),
            terminal_id=bytes.fromhex("000000020001"),
        ),
        Device(
            id="out",
            kind=Kind.METRO_GATE,
            network=net,
            line=line,
            station=net.station("西桥"),
            terminal_id=bytes.fromhex("000000021601"),
        ),
    )


@dataclass
class TapBench:
    """Two devices sharing a journal; ``tap()`` alternates them with the same card."""

    validators: tuple[Validator, Validator]
    reader: Reader
    journal: Journal
    gate: TapGate  # the journal's: taps in progress
    insert: Callable[[int], None]
    when: datetime

    @classmethod
    def make(
        cls, kind: str, journal_path: Path | str, reader: Reader | None = None, alg: Alg = Alg.TDES
    ) -> TapBench:
        """``kind``: bus or metro (entry at one end of Taiyuan L2, exit at the other).  The
        journal counts taps in progress, as ``farelab validator run``'s does: its uplink and
        background work yield to them, and a tap defers garbage collection."""
        gate = TapGate()
        journal = Journal(journal_path, max_outbox=10**9, gate=gate)
        params = Parameters(1, frozenset(), frozenset({DEMO_ISSUER_ID}))
        keys = {DEMO_ISSUER_ID: DEMO_KEYS}
        a, b = _devices(kind)
        validators = (
            Validator(config=DeviceConfig(a, params, keys), journal=journal),
            Validator(config=DeviceConfig(b, params, keys), journal=journal),
        )
        if reader is None:
            memory = InProcessReader()
            cards = [bench_card(alg)]

            def insert(i: int) -> None:
                if i // CARD_TAPS >= len(cards):  # CARD_TAPS is even: metro trips stay whole
                    cards.append(bench_card(alg, serial=str(8888 + len(cards))))
                memory.insert(cards[-1])

            return cls(
                validators, memory, journal, gate, insert, datetime(2026, 11, 23, 6, tzinfo=CST)
            )
        return cls(
            validators,
            reader,
            journal,
            gate,
            lambda _: None,
            datetime(2026, 11, 23, 6, tzinfo=CST),
        )

    def tap(self, i: int) -> tuple[TapResult, float]:
        """Tap ``i`` (even: first device, odd: second); the result and its seconds."""
        self.when += timedelta(minutes=2)
        self.insert(i)
        start = time.perf_counter()
        result = self.validators[i % 2].tap(self.reader, self.when)
        seconds = time.perf_counter() - start
        self.gate.between_taps()  # as the run loop does once the result is shown
        return result, seconds

    def run(self, n: int, *, skip_entries: bool = False) -> list[float]:
        """``n`` timed taps (only the exits when ``skip_entries``), sorted."""
        times = []
        for i in range(n * (2 if skip_entries else 1)):
            if i % 200 == 199:
                self.journal.checkpoint()  # as the run loop does, off the taps' path
            result, seconds = self.tap(i)
            if result.result != "accepted":
                raise RuntimeError(f"benchmark tap refused: {result}")
            if not skip_entries or i % 2:
                times.append(seconds)
        return sorted(times)


@dataclass
class RunningUplink:
    """An uplink on an event loop of its own thread; :meth:`stop` ends it."""

    uplink: MqttUplink | UplinkProcess
    thread: threading.Thread
    stopping: threading.Event
    loop: list[asyncio.AbstractEventLoop]  # the thread's loop, once it runs

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the uplink and wait for its thread; :class:`TimeoutError` naming where its
        tasks were if it does not end within ``timeout``."""
        self.stopping.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(
                f"the uplink thread did not stop within {timeout:g} s; its tasks:\n" + self.where()
            )

    def where(self) -> str:
        """Each of the loop's tasks and where it is (for a report, not thread-safe)."""
        lines = []
        for loop in self.loop:
            for task in list(asyncio.all_tasks(loop)):
                frames = task.get_stack()
                at = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames[-4:]))
                lines.append(f"  {task.get_name()}: {at or task!r}")
        return "\n".join(lines)


def uplink_running(
    url: BrokerURL, bench: TapBench, *, process: bool = True, log_level: int = logging.INFO
) -> RunningUplink:
    """An uplink for the bench's devices on an event loop of its own thread, as in
    ``farelab validator run``: in a process of its own at idle priority (its default there), or
    in this process when ``process`` is false (``--uplink thread``)."""
    stop = threading.Event()
    uplink: MqttUplink | UplinkProcess = (
        UplinkProcess(url, ["in", "out"], batch_size=500, log_level=log_level)
        if process
        else MqttUplink(url, ["in", "out"], batch_size=500)
    )
    loops: list[asyncio.AbstractEventLoop] = []

    def main() -> None:
        async def run() -> None:
            loops.append(asyncio.get_running_loop())
            task = asyncio.create_task(uplink.run(bench.journal))
            # Waited for on a thread of the loop's pool, not polled: a loop waking twenty times
            # a second in the taps' process would take the interpreter from a tap now and then.
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)
            await cancel_and_wait(task)

        asyncio.run(run())

    thread = threading.Thread(target=main, name="bench-uplink", daemon=True)
    thread.start()
    running = RunningUplink(uplink, thread, stop, loops)
    # A process uplink starts once, with the device; its start-up is not the taps' business.
    if isinstance(uplink, UplinkProcess) and not uplink.ready.wait(60):
        running.stop()
        raise TimeoutError("the uplink process did not start within 60 s")
    return running

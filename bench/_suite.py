"""``farelab bench``: every figure of issue 6 that is measured so far, checked against its budget.

Each measure is a function returning named figures; the budgets are checked here, by the
benchmark run, never by the unit tests.  ``quick`` shrinks the counts so that CI can run the
whole thing to catch breakage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend._broker import BrokerURL
from backend._clearing import clear
from backend._mosquitto import Mosquitto
from bench._taps import TapBench, bench_card, percentile
from bench.ingest import measure as measure_ingest
from bench.topup_latency import measure as measure_topup
from card import Alg, Reader

__all__ = ["BUDGETS", "Budget", "run_suite"]


@dataclass(frozen=True)
class Budget:
    """``key`` must be ``<=`` (or ``>=``) ``limit``."""

    key: str
    limit: float
    label: str
    at_least: bool = False

    def holds(self, value: float | None) -> bool | None:
        """True/False, or None when the figure was not measured."""
        if value is None or math.isnan(value):
            return None
        return value >= self.limit if self.at_least else value <= self.limit


BUDGETS = (
    Budget("tap_inproc_bus_p99_ms", 3.0, "in-process tap p99, bus (ms)"),
    Budget("tap_inproc_metro_exit_p99_ms", 5.0, "in-process tap p99, metro exit (ms)"),
    Budget("tap_pcsc_p99_ms", 15.0, "tap through pcscd p99 (ms)"),
    Budget("tap_pcsc_floor_ratio", 1.5, "tap / SCardTransmit floor"),
    Budget("tap_air106_p99_ms", 300.0, "modelled full tap at 106 kbit/s p99 (ms)"),
    Budget("tap_backlog_ratio", 1.2, "tap p99 under uplink backlog / idle"),
    Budget("ingest_tx_per_s", 20_000.0, "backend ingest, every TAC verified (tx/s)", at_least=True),
    Budget("clearing_10m_s", 2.0, "clearing of 10 M transactions (s)"),
    Budget("topup_p99_ms", 1000.0, "top-up card → host → card p99 (ms)"),
    Budget("validator_rss_growth_mb", 10.0, "validator RSS growth over 1 M taps (MB)"),
)

# SPEC B6: ISO 14443 at 106 kbit/s, 9 etu of 9.44 µs per byte, 4 bytes of framing per I-block;
# card processing per command (EEPROM writes dominate the DEBIT); activation 5–10 ms.
BYTE_106_S = 9 * 9.44e-6
FRAMING = 4
ACTIVATION_S = 0.0075
PROCESSING_S = {
    0xA4: 0.002,
    0xB0: 0.001,
    0xB2: 0.001,
    0x5C: 0.001,
    0x50: 0.003,
    0xDC: 0.002,
    0x54: 0.025,
    0x52: 0.025,
    0x5A: 0.002,
}


class _Recording:
    """A reader that records the size of every exchange (for the air model)."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.exchanges: list[tuple[int, int, int]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.reader, name)

    def transmit(self, apdu: bytes) -> bytes:
        answer = self.reader.transmit(apdu)
        self.exchanges.append((apdu[1], len(apdu), len(answer)))
        return answer


def air_seconds(exchanges: list[tuple[int, int, int]], rate_factor: float) -> float:
    """SPEC B6's radio and card time of one tap; ``rate_factor`` 1 for 106k, 4 for 424k."""
    total = ACTIVATION_S
    for ins, sent, received in exchanges:
        total += (sent + received + 2 * FRAMING) * BYTE_106_S / rate_factor
        total += PROCESSING_S.get(ins, 0.002)
    return total


def _taps_inproc(n: int, folder: Path, out: dict[str, float]) -> None:
    for kind, key in (("bus", "bus"), ("metro", "metro_exit")):
        worst = 0.0
        for alg in (Alg.TDES, Alg.SM4):
            tb = TapBench.make(kind, folder / f"j-{kind}-{alg.label}.db", alg=alg)
            times = tb.run(n, skip_entries=kind == "metro")
            p50, p99 = percentile(times, 0.5) * 1000, percentile(times, 0.99) * 1000
            out[f"tap_inproc_{key}_{alg.label}_p50_ms"] = p50
            out[f"tap_inproc_{key}_{alg.label}_p99_ms"] = p99
            out[f"tap_inproc_{key}_{alg.label}_max_ms"] = times[-1] * 1000
            worst = max(worst, p99)
        out[f"tap_inproc_{key}_p99_ms"] = worst
    # the air model, on the metro exit's exchanges (the longest tap)
    tb = TapBench.make("metro", ":memory:")
    recording = _Recording(tb.reader)
    tb.reader = recording  # type: ignore[assignment]
    tb.tap(0)
    recording.exchanges.clear()
    tb.tap(1)
    software = out["tap_inproc_metro_exit_p99_ms"]
    out["tap_apdus"] = len(recording.exchanges)
    out["tap_air_bytes"] = sum(s + r for _, s, r in recording.exchanges)
    out["tap_air106_p99_ms"] = software + air_seconds(recording.exchanges, 1) * 1000
    out["tap_air424_p99_ms"] = software + air_seconds(recording.exchanges, 4) * 1000


def _taps_pcsc(n: int, folder: Path, out: dict[str, float]) -> None:
    from card._pcsc import PcscReader  # noqa: PLC0415
    from card._pcscd import VIRTUAL_READER, running_pcscd  # noqa: PLC0415
    from card._vicc import ViccClient  # noqa: PLC0415

    with running_pcscd(folder / "pcscd.log"):
        client = ViccClient(bench_card())
        client.connect(timeout=5)
        stop = threading.Event()
        thread = threading.Thread(target=client.serve, kwargs={"stop": stop})
        thread.start()
        detected = time.perf_counter()
        reader = PcscReader(VIRTUAL_READER)
        try:
            if not reader.wait_for_card(5):
                raise RuntimeError("the virtual card never appeared")
            out["pcsc_presence_detect_ms"] = (time.perf_counter() - detected) * 1000
            reader.connect()
            floor = []
            for _ in range(n * 3):
                start = time.perf_counter()
                reader.transmit(bytes.fromhex("805C000204"))
                floor.append(time.perf_counter() - start)
            floor.sort()
            tb = TapBench.make("metro", folder / "j-pcsc.db", reader=reader)
            times = tb.run(n, skip_entries=True)
            out["tap_pcsc_p50_ms"] = percentile(times, 0.5) * 1000
            out["tap_pcsc_p99_ms"] = percentile(times, 0.99) * 1000
            out["pcsc_apdu_p50_ms"] = percentile(floor, 0.5) * 1000
            apdus = out.get("tap_apdus", 7)
            out["tap_pcsc_floor_ms"] = out["pcsc_apdu_p50_ms"] * apdus
            out["tap_pcsc_floor_ratio"] = out["tap_pcsc_p50_ms"] / out["tap_pcsc_floor_ms"]
        finally:
            reader.close()
            stop.set()
            thread.join()


def _clearing(n: int, out: dict[str, float]) -> None:
    rng = np.random.default_rng(6)
    issuers, operators = rng.integers(0, 20, n), rng.integers(0, 30, n)
    days, loads, amounts = rng.integers(0, 7, n), rng.random(n) < 0.05, rng.integers(0, 800, n)
    start = time.perf_counter()
    result = clear(
        issuers=issuers,
        operators=operators,
        days=days,
        loads=loads,
        amounts=amounts,
        issuer_names=[f"I{i}" for i in range(20)],
        operator_names=[f"O{i}" for i in range(30)],
        day_names=[f"D{i}" for i in range(7)],
    )
    out["clearing_10m_s" if n >= 10_000_000 else "clearing_s"] = time.perf_counter() - start
    if int(result.positions.sum()) != 0:
        raise RuntimeError("clearing positions do not net to zero")


def _tap_p99(bench: TapBench, n: int, offset: int) -> float:
    times = []
    for i in range(offset, offset + n):
        result, seconds = bench.tap(i)
        if result.result != "accepted":
            raise RuntimeError(f"benchmark tap refused: {result}")
        times.append(seconds)
    return percentile(sorted(times), 0.99) * 1000


def _uplink_running(url: BrokerURL, bench: TapBench) -> tuple[threading.Event, threading.Thread]:
    """An uplink for the bench's devices on an event loop of its own thread."""
    from validator._uplink import MqttUplink  # noqa: PLC0415

    stop = threading.Event()

    def main() -> None:
        async def run() -> None:
            uplink = MqttUplink(url, ["in", "out"], batch_size=500)
            task = asyncio.create_task(uplink.run(bench.journal))
            while not stop.is_set():
                await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(run())

    thread = threading.Thread(target=main, name="bench-uplink")
    thread.start()
    return stop, thread


def _backlog(url: BrokerURL, n: int, backlog: int, folder: Path, out: dict[str, float]) -> None:
    """Tap p99 while the uplink drains a backlog, and while the broker is unreachable."""
    bench = TapBench.make("bus", folder / "j-backlog.db")
    idle = _tap_p99(bench, n, 0)
    base = bench.journal.outbox(1)[0][2]
    rows = [
        ("in", json.dumps({**base, "seq": 10_000_000 + i, "card_serial": f"{i:020d}"}))
        for i in range(backlog)
    ]
    with sqlite3.connect(folder / "j-backlog.db") as db:
        db.executemany("INSERT INTO outbox (device, payload) VALUES (?, ?)", rows)
    stop, thread = _uplink_running(url, bench)
    try:
        loaded = _tap_p99(bench, n, n)
    finally:
        stop.set()
        thread.join()
    out["tap_backlog_rows"] = backlog
    out["tap_backlog_left"] = len(bench.journal.outbox(10**9))
    dead = BrokerURL("127.0.0.1", 1)
    stop, thread = _uplink_running(dead, bench)
    try:
        outage = _tap_p99(bench, n, 2 * n)
    finally:
        stop.set()
        thread.join()
    out["tap_idle_p99_ms"] = idle
    out["tap_backlog_p99_ms"] = loaded
    out["tap_outage_p99_ms"] = outage
    out["tap_backlog_ratio"] = max(loaded, outage) / idle


def _backend(n_ingest: int, n_topup: int, folder: Path, out: dict[str, float]) -> None:
    broker = Mosquitto(folder)
    broker.start()
    backend = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "farelab",
            "backend",
            "run",
            "--broker",
            broker.url,
            "--db",
            f"sqlite:///{folder / 'ledger.db'}",
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2.0)
        url = BrokerURL.parse(broker.url)
        ingest = asyncio.run(measure_ingest(url, n_ingest, 10, 200))
        out["ingest_tx_per_s"] = ingest["tx_per_s"]
        out["ingest_ack_p50_ms"] = ingest["ack_p50_ms"]
        out["ingest_ack_p99_ms"] = ingest["ack_p99_ms"]
        topup = asyncio.run(measure_topup(url, n_topup))
        out["topup_p50_ms"] = topup["p50_ms"]
        out["topup_p99_ms"] = topup["p99_ms"]
        _backlog(url, n_topup * 10, 100_000 if n_topup >= 200 else 10_000, folder, out)
    finally:
        backend.terminate()
        backend.wait(15)
        broker.stop()


def run_suite(*, quick: bool, progress: Callable[[str], None]) -> dict[str, object]:
    """Run what is measured so far; returns every figure plus the machine and the budgets."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="farelab-bench-") as tmp:
        folder = Path(tmp)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("in-process taps", lambda: _taps_inproc(300 if quick else 2000, folder, figures)),
            ("taps through pcscd", lambda: _taps_pcsc(200 if quick else 2000, folder, figures)),
            ("clearing", lambda: _clearing(1_000_000 if quick else 10_000_000, figures)),
            (
                "backend ingest and top-up over Mosquitto",
                lambda: _backend(4000 if quick else 20_000, 20 if quick else 200, folder, figures),
            ),
        ]
        errors: dict[str, str] = {}
        for name, step in steps:
            progress(f"measuring {name}…")
            started = time.perf_counter()
            try:
                step()
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                progress(f"  {name} failed: {errors[name]}")
            else:
                progress(f"  done in {time.perf_counter() - started:.1f} s")
    checks = {b.key: b.holds(figures.get(b.key)) for b in BUDGETS}
    return {
        **figures,
        "quick": quick,
        "budgets": {
            b.key: {
                "limit": b.limit,
                "at_least": b.at_least,
                "label": b.label,
                "holds": checks[b.key],
            }
            for b in BUDGETS
        },
        "errors": errors,
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": __import__("os").cpu_count(),
        },
    }


def budget_table(doc: dict[str, object]) -> str:
    """The budget table, measured vs budget with ✓/✗ (— where not measured yet)."""
    lines = [f"{'budget':<46} {'measured':>12} {'limit':>10}  ", "-" * 74]
    for b in BUDGETS:
        value = doc.get(b.key)
        holds = b.holds(value if isinstance(value, int | float) else None)
        mark = "—" if holds is None else ("✓" if holds else "✗")
        shown = f"{value:,.2f}" if isinstance(value, int | float) else "not measured"
        limit = f"{'≥' if b.at_least else '≤'} {b.limit:,g}"
        lines.append(f"{b.label:<46} {shown:>12} {limit:>10}  {mark}")
    return "\n".join(lines)


def dump(doc: dict[str, object], path: Path) -> None:
    """Write every figure as JSON."""
    path.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")

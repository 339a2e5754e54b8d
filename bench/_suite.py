"""``farelab bench``: every figure of the benchmark, checked against its budget.

Each measure is a function returning named figures; the budgets are checked here, by the
benchmark run, never by the unit tests.  ``quick`` shrinks the counts so that CI can run the
whole thing to catch breakage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psycopg

from farelab._devices import entry_of
from farelab.backend import Mosquitto, Store, clear, register
from farelab.bench._backend import process_tree, running_backend
from farelab.bench._taps import TapBench, bus_devices, percentile, uplink_running
from farelab.bench._watchdog import StepTimeout, time_limit
from farelab.bench.city import figures as city_figures
from farelab.bench.ingest import POSTGRES, make_batches, measure_postgres, postgres_schema
from farelab.bench.ingest import measure as measure_ingest
from farelab.bench.pcsc import Exchanges
from farelab.bench.startup import figures as startup_figures
from farelab.bench.testbed_time import measure as measure_testbed
from farelab.bench.topup_latency import TOPUP_KIOSK
from farelab.bench.topup_latency import measure as measure_topup
from farelab.card import Alg
from farelab.protocol import BATCH_MAX, BrokerURL, encode_record
from farelab.validator import UplinkProcess, favour_taps

__all__ = [
    "BUDGETS",
    "Budget",
    "budget_table",
    "checked",
    "dump",
    "limit_text",
    "mark",
    "measured_text",
    "run_suite",
]

Figures = dict[str, float]
Samples = dict[str, list[float]]  # latency samples in ms, for the report's charts
Series = dict[str, list[list[float]]]  # (x, y) points, e.g. (taps done, RSS MB)


def _ms(seconds: list[float]) -> list[float]:
    return [round(t * 1000, 4) for t in seconds]


@dataclass(frozen=True)
class Budget:
    """``key`` must be ``<=`` (or ``>=``) ``limit``; ``group`` is the part of the system it
    measures (the report's table and charts are grouped by it)."""

    key: str
    limit: float
    label: str
    group: str
    at_least: bool = False

    def holds(self, value: float | None) -> bool | None:
        """True/False, or None when the figure was not measured."""
        if value is None or math.isnan(value):
            return None
        return value >= self.limit if self.at_least else value <= self.limit


TAPS, LOAD, BACKEND, HOST, SYSTEM = (
    "taps",
    "taps under load",
    "backend",
    "host and memory",
    "the city and the testbed",
)

BUDGETS = (
    Budget("tap_inproc_bus_p99_ms", 1.0, "in-process tap p99, bus (ms)", TAPS),
    Budget("tap_inproc_metro_exit_p99_ms", 1.5, "in-process tap p99, metro exit (ms)", TAPS),
    Budget("tap_pcsc_overhead_p50_ms", 0.5, "our time in a tap through pcscd, p50 (ms)", TAPS),
    Budget("tap_backlog_ratio", 1.3, "tap p99 draining a 100 000 backlog / idle", LOAD),
    Budget("tap_outage_ratio", 1.1, "tap p99 with the broker down / idle", LOAD),
    Budget(
        "ingest_tx_per_s", 50_000.0, "ingest, TACs verified, SQLite (tx/s)", BACKEND, at_least=True
    ),
    Budget(
        "ingest_pg_tx_per_s",
        50_000.0,
        "ingest, TACs verified, PostgreSQL (tx/s)",
        BACKEND,
        at_least=True,
    ),
    Budget("clearing_10m_s", 0.5, "clearing of 10 M transactions (s)", BACKEND),
    Budget("topup_p99_ms", 50.0, "top-up card → host → card p99 (ms)", BACKEND),
    Budget("validator_rss_growth_mb", 5.0, "validator RSS growth over 1 M taps (MB)", HOST),
    Budget("cli_startup_ratio", 4.0, "CLI start-up / bare interpreter", HOST),
    Budget(
        "city_taps_per_s", 1000.0, "city, end to end, reconciled (taps/s)", SYSTEM, at_least=True
    ),
    Budget("testbed_ms_per_card", 50.0, "testbed per card beyond presence (ms)", SYSTEM),
)

# docs/card-protocol.md B6: ISO 14443 at 106 kbit/s, 9 etu of 9.44 µs per byte, 4 bytes of framing
# per I-block; card processing per command (EEPROM writes dominate the DEBIT); activation 5–10 ms.
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


def air_seconds(exchanges: list[tuple[bytes, bytes]], rate_factor: float) -> float:
    """docs/card-protocol.md B6's radio and card time of one tap's (command, answer) exchanges;
    ``rate_factor`` 1 for 106k, 4 for 424k."""
    total = ACTIVATION_S
    for command, answer in exchanges:
        total += (len(command) + len(answer) + 2 * FRAMING) * BYTE_106_S / rate_factor
        total += PROCESSING_S.get(command[1], 0.002)
    return total


def _taps_inproc(n: int, folder: Path, out: Figures, samples: Samples) -> None:
    for kind, key in (("bus", "bus"), ("metro", "metro_exit")):
        worst = 0.0
        for alg in (Alg.TDES, Alg.SM4):
            tb = TapBench.make(kind, folder / f"j-{kind}-{alg.label}.db", alg=alg)
            times = tb.run(n, skip_entries=kind == "metro")
            samples[f"tap_inproc_{key}_{alg.label}"] = _ms(times)
            p50, p99 = percentile(times, 0.5) * 1000, percentile(times, 0.99) * 1000
            out[f"tap_inproc_{key}_{alg.label}_p50_ms"] = p50
            out[f"tap_inproc_{key}_{alg.label}_p99_ms"] = p99
            out[f"tap_inproc_{key}_{alg.label}_max_ms"] = times[-1] * 1000
            worst = max(worst, p99)
        out[f"tap_inproc_{key}_p99_ms"] = worst
    # the air model, on the metro exit's exchanges (the longest tap)
    tb = TapBench.make("metro", ":memory:")
    recording = Exchanges(tb.reader)
    tb.reader = recording  # type: ignore[assignment]
    tb.tap(0)
    recording.exchanges.clear()
    tb.tap(1)
    software = out["tap_inproc_metro_exit_p99_ms"]
    out["tap_apdus"] = len(recording.exchanges)
    out["tap_air_bytes"] = sum(len(c) + len(a) for c, a in recording.exchanges)
    out["tap_air106_p99_ms"] = software + air_seconds(recording.exchanges, 1) * 1000
    out["tap_air424_p99_ms"] = software + air_seconds(recording.exchanges, 4) * 1000
    # of a whole tap at the card's own pace, the part that is our software (host and card)
    out["tap_software_share"] = software / out["tap_air106_p99_ms"]


def _taps_pcsc(n: int, folder: Path, out: Figures, samples: Samples) -> None:
    from farelab.bench.pcsc import measure as measure_pcsc  # noqa: PLC0415 - pyscard

    measure_pcsc(n, folder, out, samples, int(out.get("tap_apdus", 8)))


def _clearing(n: int, out: Figures) -> None:
    """Clearing of ``n`` coded transactions, cold (fresh arrays, as after a ledger query), and
    numpy's own ``bincount`` over as many weighted values at its best (warm, best of three):
    the floor of any such sum."""
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
    took = time.perf_counter() - start
    if int(result.positions.sum()) != 0:
        raise RuntimeError("clearing positions do not net to zero")
    floor = math.inf
    for _ in range(3):  # its best of three: the floor, warm, with nothing else to do
        start = time.perf_counter()
        np.bincount(issuers, weights=amounts, minlength=20)
        floor = min(floor, time.perf_counter() - start)
    scale = "10m" if n == 10_000_000 else f"{n}"
    out[f"clearing_{scale}_s"] = took
    out[f"clearing_bincount_{scale}_s"] = floor
    out["clearing_bincount_ratio"] = took / floor


# Taps under load arrive at this pace: 100 a second, fifty times a busy metro gate (one rider
# every two seconds).  Back-to-back taps would measure only how a saturated core is shared.
TAP_PACE_S = 0.01

# Each block of taps under load starts with this many taps made at the same pace but not timed.
# Between blocks the bench does what a validator never does between two taps — writes a
# 100 000-row backlog into the journal from another connection, starts and stops an uplink
# process on the taps' core — and its after-effect fell on the first tap of every block, of all
# three kinds alike (measured: the first tap the slowest of most blocks, 1.1-2.5 ms against a
# p50 of 0.5): with 10 rounds, a tenth of each p99's worst taps, whatever the uplink did.
SETTLE_TAPS = 1


def _tap_times(
    bench: TapBench,
    n: int,
    offset: int,
    until: Callable[[], bool] | None = None,
    *,
    limit_s: float = 600.0,
    settle: int = 0,
) -> list[float]:
    """At least ``n`` taps at :data:`TAP_PACE_S`, and on until ``until()`` is true; sorted
    seconds of each tap.  The first ``settle`` taps (tap indices from ``offset`` on, before the
    timed ones) are made at the same pace but not timed.  :class:`TimeoutError` if ``until()``
    is still false after ``limit_s``."""
    times: list[float] = []
    i = offset
    settling = settle
    due = time.perf_counter()
    give_up = due + limit_s
    while True:
        done = until is None or until()  # evaluated every tap: ``until`` may note the moment
        if done and len(times) >= n:
            break
        if due > give_up:
            raise TimeoutError(f"still waiting after {limit_s:g} s of taps")
        due += TAP_PACE_S
        if i % 200 == 199:
            bench.journal.checkpoint()  # as the run loop does, off the taps' path
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        result, seconds = bench.tap(i)
        if result.result != "accepted":
            raise RuntimeError(f"benchmark tap refused: {result}")
        i += 1
        if settling:
            settling -= 1
            continue
        times.append(seconds)
    return sorted(times)


def _backlog_rows(n: int, run: int) -> list[tuple[str, bytes]]:
    """``n`` genuine transactions (real TACs) of device ``in``, as the journal keeps them;
    ``run`` keeps each backlog's cards apart from every other's (no false clones)."""
    # Genuine records of the bench's device "in" (its terminal, its operator).
    device = bus_devices()[0]
    batches = make_batches(
        n,
        1,
        BATCH_MAX,
        run=run % 10_000,
        terminal=device.terminal_id,
        operator=device.operator_id.rstrip(b"\x00").decode(),
    )
    return [
        ("in", encode_record(replace(r, seq=10_000_000 * (run % 100 + 1) + r.seq)))
        for bs in batches.values()
        for b in bs
        for r in b.records
    ]


def _backlog(
    services: _Services, n: int, backlog: int, folder: Path, *, out: Figures, samples: Samples
) -> None:
    """Tap times idle, while the uplink drains a backlog of genuine transactions, and while the
    broker is unreachable, in interleaved rounds (idle block, a fresh backlog drained under
    taps, broker-down block) until each has ``n`` taps: a shared machine's drift then touches
    all three alike.  The validator (taps and uplink) runs on one core; the broker and the
    backend, which in the field are other machines, on the other."""
    path = folder / "j-backlog.db"
    bench = TapBench.make("bus", path)
    probe = sqlite3.connect(path)
    favour_taps()
    idle: list[float] = []
    loaded: list[float] = []
    outage: list[float] = []
    drains: list[float] = []
    block = max(n // 10, 1)
    drain_limit = max(60.0, backlog / 1000)  # it drains at about 30 000 rows/s
    first_run = int(time.time())
    i = 0
    with _pinned_apart(far=services.far()), contextlib.closing(probe):
        while min(len(idle), len(loaded), len(outage)) < n:
            idle += _tap_times(bench, block, i, settle=SETTLE_TAPS)
            i += block + SETTLE_TAPS
            rows = _backlog_rows(backlog, first_run + len(drains))
            with probe:
                probe.executemany("INSERT INTO outbox (device, record) VALUES (?, ?)", rows)
            del rows  # a validator process holds no such heap: its collections stay short
            last = probe.execute("SELECT max(id) FROM outbox").fetchone()[0]
            running = uplink_running(services.url(), bench, log_level=logging.WARNING)
            started = time.perf_counter()
            done_at: list[float] = []

            def drained(
                last: int = last, started: float = started, at: list[float] = done_at
            ) -> bool:
                if (
                    not at
                    and not probe.execute(
                        "SELECT 1 FROM outbox WHERE id <= ? LIMIT 1", (last,)
                    ).fetchone()
                ):
                    at.append(time.perf_counter() - started)
                return bool(at)

            try:
                taps = _tap_times(
                    bench, 1, i, until=drained, limit_s=drain_limit, settle=SETTLE_TAPS
                )
            except TimeoutError:
                left = probe.execute("SELECT count(*) FROM outbox WHERE id <= ?", (last,))
                uplink = running.uplink
                said = (
                    f"uplink process restarts {uplink.restarts}"
                    if isinstance(uplink, UplinkProcess)
                    else "uplink "
                    + str({d: vars(s) | {"ack_latency_s": None} for d, s in uplink.stats.items()})
                )
                raise TimeoutError(
                    f"a {backlog:,}-row backlog did not drain in {drain_limit:g} s "
                    f"({left.fetchone()[0]:,} rows left; {said}; backend log: "
                    f"{services.backend_log_tail()})"
                ) from None
            finally:
                running.stop()
            drains.append(done_at[0])
            loaded += taps
            i += len(taps) + SETTLE_TAPS
            # The broker-down block: the uplink's connection failures are expected here.
            with _quiet("farelab.uplink"):
                down = BrokerURL("127.0.0.1", 1)
                running = uplink_running(down, bench, log_level=logging.ERROR)
                try:
                    outage += _tap_times(bench, block, i, settle=SETTLE_TAPS)
                finally:
                    running.stop()
            i += block + SETTLE_TAPS
    idle.sort()
    loaded.sort()
    outage.sort()
    samples.update(tap_idle=_ms(idle), tap_backlog=_ms(loaded), tap_outage=_ms(outage))
    out["tap_backlog_rows"] = backlog
    out["tap_backlog_rounds"] = len(drains)
    out["tap_backlog_drain_s"] = statistics.median(drains)
    out["tap_backlog_taps"] = len(loaded)
    out["tap_idle_p99_ms"] = percentile(idle, 0.99) * 1000
    out["tap_backlog_p99_ms"] = percentile(loaded, 0.99) * 1000
    out["tap_outage_p99_ms"] = percentile(outage, 0.99) * 1000
    out["tap_backlog_ratio"] = out["tap_backlog_p99_ms"] / out["tap_idle_p99_ms"]
    out["tap_outage_ratio"] = out["tap_outage_p99_ms"] / out["tap_idle_p99_ms"]


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` meanwhile."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _set_affinity(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), cpus)


@contextlib.contextmanager
def _pinned_apart(*, far: list[int]) -> Iterator[None]:
    """This process on the first CPU, the processes ``far`` (broker, backend and their
    children) on the others — as a validator and its backend run on different machines.
    Does nothing on a one-CPU machine."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        yield
        return
    near, rest = {min(cpus)}, cpus - {min(cpus)}
    far_tree = [p for pid in far for p in process_tree(pid)]
    _set_affinity([os.getpid()], near)
    _set_affinity(far_tree, rest)
    try:
        yield
    finally:
        _set_affinity([os.getpid()], cpus)
        _set_affinity(far_tree, cpus)


class _Services:
    """Mosquitto and ``farelab backend run`` (two workers, SQLite ledger), started on first
    use and shared by the steps that need them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ledger = f"sqlite:///{folder / 'ledger.db'}"
        self.broker: Mosquitto | None = None
        self.backend: subprocess.Popen[bytes] | None = None
        self._stack = contextlib.ExitStack()

    def url(self) -> BrokerURL:
        """The broker, with the backend's workers subscribed to it."""
        if self.broker is None:
            self.broker = Mosquitto(self.folder)
            self.broker.start()
            self._stack.callback(self.broker.stop)
            self.backend = self._stack.enter_context(
                running_backend(
                    self.broker.url,
                    self.ledger,
                    workers=2,
                    log=self.folder / "backend.log",
                )
            )
            store = Store(self.ledger)
            try:
                for device in bus_devices():  # the taps' devices, whose uplinks drain here
                    register(store, entry_of(device))
                register(store, TOPUP_KIOSK)
            finally:
                store.close()
        return BrokerURL.parse(self.broker.url)

    def far(self) -> list[int]:
        """The broker's and the backend's process ids."""
        self.url()
        procs = (self.backend, self.broker.proc if self.broker else None)
        return [p.pid for p in procs if p is not None]

    def backend_log_tail(self, chars: int = 1500) -> str:
        """The end of the backend's output, for error messages."""
        try:
            return (self.folder / "backend.log").read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(unreadable: {exc.strerror})"

    def stop(self) -> None:
        """Stop the backend, then the broker."""
        self._stack.close()


def _ingest(services: _Services, n: int, out: Figures) -> None:
    ingest = asyncio.run(measure_ingest(services.url(), n, 10, 200, ledger=services.ledger))
    out["ingest_tx_per_s"] = ingest["tx_per_s"]
    out["ingest_ack_p50_ms"] = ingest["ack_p50_ms"]
    out["ingest_ack_p99_ms"] = ingest["ack_p99_ms"]


def _ingest_postgres(n: int, folder: Path, out: Figures) -> None:
    """The same ingest into PostgreSQL (``FARELAB_BENCH_POSTGRES``, default the local ``test``
    database), through a broker of its own so that the SQLite backend takes none of it."""
    (folder / "pg").mkdir(exist_ok=True)
    broker = Mosquitto(folder / "pg")
    broker.start()
    try:
        postgres = os.environ.get("FARELAB_BENCH_POSTGRES", POSTGRES)
        out.update(measure_postgres(broker.url, n, folder, postgres=postgres))
    finally:
        broker.stop()


class _BackendMemoryRun:
    """``farelab.bench.backend_memory`` in a process of its own: ``n`` transactions into a
    PostgreSQL ledger — the scale path (a fresh schema of ``FARELAB_BENCH_POSTGRES``, dropped
    afterwards) — through a broker and backend of its own.

    It starts beside the validator's memory run, confined with its PostgreSQL connections to
    the CPUs the validator does not use, and has every CPU once that run is over: the two
    memory runs take about two thirds of the time they take one after the other, and the
    validator's core stays its own (measured at a fifth of the size: 2 085 taps/s beside it,
    2 057 alone; 120 s for both, against 172 s one after the other).  Its RSS figures do not
    depend on the CPUs it had; its ingest rates do, and are reported as such."""

    def __init__(self, n: int, progress: Callable[[str], None]) -> None:
        self.n = n
        self.progress = progress
        self.proc: subprocess.Popen[str] | None = None
        self._schema = contextlib.ExitStack()
        self._app = f"farelab-bench-rss-{os.getpid()}"
        self._errors: list[str] = []
        self._reader: threading.Thread | None = None
        self._failed = ""

    def start(self) -> None:
        """Create the schema and start the run (its progress lines go to ``progress``)."""
        postgres = os.environ.get("FARELAB_BENCH_POSTGRES", POSTGRES)
        ledger = self._schema.enter_context(postgres_schema(postgres))
        ledger += f"&application_name={self._app}"
        command = [sys.executable, "-m", "farelab.bench.backend_memory", "--n", str(self.n)]
        self.proc = subprocess.Popen(
            [*command, "--db", ledger],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self._reader = threading.Thread(target=self._relay, daemon=True, name="rss-progress")
        self._reader.start()

    def _relay(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.rstrip()
            if line.startswith("backend:"):
                continue  # its own URLs: not news to the reader of the bench's progress
            if "tx/s  backend RSS" in line:
                self.progress(line)
            else:
                self._errors.append(line)

    def try_start(self) -> bool:
        """:meth:`start`; False (the error kept for :meth:`finish`) if it cannot start, so that
        the validator's run goes on without it."""
        try:
            self.start()
        except Exception as exc:  # reported by finish(), as that step's error
            named = not isinstance(exc, RuntimeError)
            self._failed = f"{type(exc).__name__}: {exc}" if named else str(exc)
            self.stop()
            return False
        return True

    def pids(self) -> list[int]:
        """Its processes (broker, backend, workers) and its PostgreSQL connections."""
        if self.proc is None:
            return []
        mine = process_tree(self.proc.pid)
        try:
            with psycopg.connect(
                os.environ.get("FARELAB_BENCH_POSTGRES", POSTGRES), autocommit=True
            ) as db:
                rows = db.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self._app,)
                ).fetchall()
        except psycopg.Error:
            rows = []
        return mine + [int(pid) for (pid,) in rows]

    def finish(self, out: Figures, series: Series) -> None:
        """Wait for the run's end; its figures into ``out`` and ``series``."""
        if self._failed:
            raise RuntimeError(self._failed)
        if self.proc is None:  # one CPU: it did not run beside the validator
            self.start()
        assert self.proc is not None
        try:
            stdout = self.proc.stdout.read() if self.proc.stdout is not None else ""
            code = self.proc.wait()
            if self._reader is not None:
                self._reader.join(10)
            if code != 0:
                tail = "\n".join(self._errors[-15:])
                raise RuntimeError(f"farelab.bench.backend_memory exited with {code}: {tail}")
            doc = json.loads(stdout)
        finally:
            self.stop()
        for key, value in doc.items():
            if isinstance(value, list):
                series[key] = value
            elif isinstance(value, int | float):
                out[key] = float(value)

    def stop(self) -> None:
        """Interrupt it if it still runs (it then stops its broker and backend), and drop the
        schema."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                for pid in reversed(process_tree(proc.pid)):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
        self._schema.close()


@contextlib.contextmanager
def _kept_off(cpus: set[int], pids: Callable[[], list[int]]) -> Iterator[None]:
    """The processes ``pids()`` names — asked again every second, as they start and connect —
    on ``cpus`` only, until the block ends; then on every CPU again."""
    stop = threading.Event()
    everywhere = os.sched_getaffinity(0)

    def keep() -> None:
        while True:
            _set_affinity(pids(), cpus)
            if stop.wait(1.0):
                return

    thread = threading.Thread(target=keep, daemon=True, name="kept-off")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        _set_affinity(pids(), everywhere)


def _topup(services: _Services, n: int, out: Figures) -> None:
    topup = asyncio.run(measure_topup(services.url(), n))
    out["topup_p50_ms"] = topup["p50_ms"]
    out["topup_p99_ms"] = topup["p99_ms"]


def _startup(runs: int, out: Figures, samples: Samples) -> None:
    figures, times = startup_figures(runs)
    out.update(figures)
    samples.update(times)


def _city(quick: bool, folder: Path, out: Figures) -> None:
    out.update(city_figures(quick, folder / "city"))


def _testbed(cards: int, folder: Path, out: Figures, samples: Samples) -> None:
    (folder / "testbed").mkdir(exist_ok=True)
    figures, times = measure_testbed(cards, folder / "testbed")
    out.update(figures)
    samples.update(times)


def _validator_memory(
    services: _Services,
    taps: int,
    out: Figures,
    series: Series,
    beside: _BackendMemoryRun | None = None,
) -> None:
    """``farelab.bench.validator_memory`` in a process of its own on one core, its uplink
    draining to the backend on the other core; ``beside`` (the backend's memory run) is started
    first and kept off the validator's core while it runs."""
    url = services.url()
    cpus = os.sched_getaffinity(0)
    command = [sys.executable, "-m", "farelab.bench.validator_memory", "--taps", str(taps)]
    command += ["--broker", str(url)]
    if len(cpus) > 1:
        command += ["--cpu", str(min(cpus))]
    with contextlib.ExitStack() as stack:
        if beside is not None and len(cpus) > 1 and beside.try_start():
            stack.enter_context(_kept_off(cpus - {min(cpus)}, beside.pids))
        stack.enter_context(_pinned_apart(far=services.far()))
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"farelab.bench.validator_memory failed: {done.stderr.strip()[-500:]}")
    doc = json.loads(done.stdout)
    series.update(doc.pop("series"))
    out.update({k: float(v) for k, v in doc.items()})


def run_suite(
    *, quick: bool, progress: Callable[[str], None], step_limit: float | None = None
) -> dict[str, object]:
    """Run every measure; returns every figure, the latency samples (ms) and memory series for
    the report, the machine and the budgets.  A step still running after ``step_limit``
    seconds (default 240 quick, 1800 full) is stopped and reported as not measured."""
    figures: Figures = {}
    samples: Samples = {}
    series: Series = {}
    with tempfile.TemporaryDirectory(prefix="farelab-bench-") as tmp:
        folder = Path(tmp)
        services = _Services(folder)
        taps = 20_000 if quick else 1_000_000
        ingested = 200_000 if quick else 10_000_000
        backend_memory = _BackendMemoryRun(ingested, progress)
        steps: list[tuple[str, Callable[[], None]]] = [
            (
                "in-process taps",
                lambda: _taps_inproc(300 if quick else 2000, folder, figures, samples),
            ),
            (
                "taps through pcscd",
                lambda: _taps_pcsc(200 if quick else 2000, folder, figures, samples),
            ),
            (
                "the testbed: farelab testbed run through pcscd",
                lambda: _testbed(5 if quick else 50, folder, figures, samples),
            ),
            ("clearing", lambda: _clearing(10_000_000, figures)),
            (
                "backend ingest over Mosquitto",
                lambda: _ingest(services, 20_000 if quick else 200_000, figures),
            ),
            (
                "backend ingest into PostgreSQL",
                lambda: _ingest_postgres(20_000 if quick else 200_000, folder, figures),
            ),
            ("top-up over Mosquitto", lambda: _topup(services, 20 if quick else 200, figures)),
            (
                "start-up of the CLI against a bare interpreter",
                lambda: _startup(10 if quick else 30, figures, samples),
            ),
            (
                "taps while the uplink drains a backlog, and with the broker down",
                lambda: _backlog(
                    services,
                    200 if quick else 2000,
                    10_000 if quick else 100_000,
                    folder,
                    out=figures,
                    samples=samples,
                ),
            ),
            (
                f"validator memory and throughput over {taps:,} taps"
                f" (the backend's memory run starts beside it, on the other core)",
                lambda: _validator_memory(services, taps, figures, series, beside=backend_memory),
            ),
            (
                f"backend memory over {ingested:,} transactions, to its end",
                lambda: backend_memory.finish(figures, series),
            ),
            (
                "the city end to end: farelab city, every device a process's",
                lambda: _city(quick, folder, figures),
            ),
        ]
        errors: dict[str, str] = {}
        try:
            for name, step in steps:
                progress(f"measuring {name}…")
                started = time.perf_counter()
                limit = step_limit if step_limit is not None else (240 if quick else 1800)
                try:
                    with time_limit(limit):
                        step()
                except StepTimeout as exc:
                    errors[name] = f"{exc}"
                    progress(f"  {name} {exc}; where each thread was:\n{exc.where}")
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    progress(f"  {name} failed: {errors[name]}")
                else:
                    progress(f"  done in {time.perf_counter() - started:.1f} s")
        finally:
            backend_memory.stop()
            services.stop()
    checks = {b.key: b.holds(figures.get(b.key)) for b in BUDGETS}
    return {
        **figures,
        "quick": quick,
        "samples": samples,
        "series": series,
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
        "commands": [f"farelab bench{' --quick' if quick else ''}"],
        "machine": _machine(),
    }


def _machine() -> dict[str, object]:
    memory = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": cpu,
        "cpus": os.cpu_count(),
        "memory": memory,
        "sqlite": sqlite3.sqlite_version,
    }


def checked(doc: Mapping[str, object]) -> list[tuple[Budget, float | None, bool | None]]:
    """Every budget with its figure in ``doc`` (None where not measured) and whether it holds."""
    rows: list[tuple[Budget, float | None, bool | None]] = []
    for b in BUDGETS:
        value = doc.get(b.key)
        measured = value if isinstance(value, int | float) else None
        rows.append((b, measured, b.holds(measured)))
    return rows


def mark(holds: bool | None) -> str:
    """✓ for a budget that holds, ✗ for a missed one, — where not measured yet."""
    return "—" if holds is None else ("✓" if holds else "✗")


def measured_text(value: float | None) -> str:
    """A budget's figure as the tables show it: three decimals under 10 (so that 1.104 against
    ≤ 1.1 does not read 1.10), two above; "not measured" for None."""
    if value is None:
        return "not measured"
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.2f}"


def limit_text(budget: Budget) -> str:
    """The limit as the table shows it: ``≤ 3`` or ``≥ 20,000``."""
    return f"{'≥' if budget.at_least else '≤'} {budget.limit:,g}"


def budget_table(doc: Mapping[str, object]) -> str:
    """The budget table by group, measured vs budget with ✓/✗ (— where not measured yet)."""
    lines = [f"{'budget':<46} {'measured':>12} {'limit':>10}  ", "-" * 74]
    group = ""
    for b, value, holds in checked(doc):
        if b.group != group:
            group = b.group
            lines.append(f"{group}:")
        shown = measured_text(value)
        lines.append(f"  {b.label:<44} {shown:>12} {limit_text(b):>10}  {mark(holds)}")
    return "\n".join(lines)


def dump(doc: dict[str, object], path: Path) -> None:
    """Write every figure as JSON."""
    path.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")

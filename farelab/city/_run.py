"""The city's shell: write the plan out, start every process, play the riders at the chosen
speed, inject the faults, drain, stop, and reconcile.

Every device is a process of its own — ``farelab validator run`` with its own journal, talking
to the broker with its own account — and the kiosk's loads are ``farelab topup load`` runs
against the backend's load authorization, as a field deployment has them.  The riders are
asyncio tasks: each waits for the simulated time of its next trip, taps the gate (sends a tap
request to that device's process and waits for its answer), rides, taps out.  A rider whose tap
was torn (the card pulled, the device killed) taps again at the same device, as a gate asks its
rider to, so that the device settles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from farelab.card import DEMO_KEYS, load_image, personalise, save_image
from farelab.city._chaos import Fault, plan_faults
from farelab.city._plan import (
    CAP_FEN,
    RIDERS_PER_KIOSK,
    CityPlan,
    Rider,
    Trip,
    day_trips,
    kiosk_ids,
    kiosk_terminal,
)
from farelab.city._procs import Child, children_of
from farelab.city._proxy import FaultProxy
from farelab.city._reconcile import (
    CardBalance,
    JournalTx,
    LedgerTx,
    LoadRow,
    Reconciliation,
    reconcile,
)
from farelab.city._topology import CENTRAL, BridgedTopology, line_broker
from farelab.validator import Network

__all__ = ["CityError", "CityInterruptedError", "CityOptions", "run_city"]

log = logging.getLogger("farelab.city")

BACKEND_USER = "farelab-backend"
DASHBOARD_LINE = "dashboard on http://"
"""What ``farelab backend run --http`` says once its dashboard listens (the backend is up)."""
EMBEDDED = "embedded"
"""``--broker embedded``: the in-process amqtt broker instead of a Mosquitto of the city's own."""
CHAOS_PER_MIN = 12.0
"""Faults a minute under --chaos, on average."""
TAP_TIMEOUT = 120.0
"""How long a rider waits for a device that is running but does not answer."""
RETRIES = 6
"""How many times a rider taps again at a device that did not settle the tap."""
DEVICES_PER_PROCESS = 1
"""Devices a ``farelab validator run`` process hosts by default: each its own, as in the field."""


# The card images are spread over this many folders, by their name.  Every commit of a card
# creates a file and renames it over the image; in one folder of 12 000 images, every device
# process and kiosk took the same directory's lock for both (py-spy: a fifth of a validator
# process's samples waiting to create the temporary file; 594-603 taps/s against 638-655 spread).
CARD_FOLDERS = 256


def card_folder(card: str) -> str:
    """The folder under ``cards/`` that holds the image named ``card``: two hex digits."""
    return f"{zlib.crc32(card.encode()) % CARD_FOLDERS:02x}"


_encode_request = json.JSONEncoder(ensure_ascii=False).encode


def _settle(waiter: asyncio.Future[dict[str, Any] | None], answer: dict[str, Any] | None) -> None:
    if not waiter.done():
        waiter.set_result(answer)


class CityError(RuntimeError):
    """The city could not be set up or run (a message for the command line)."""


class CityInterruptedError(CityError):
    """SIGINT or SIGTERM stopped the city before its end (every process was stopped)."""


@dataclass(frozen=True, slots=True)
class CityOptions:
    """What ``farelab city`` was asked for."""

    network: Network
    riders: int
    seed: int
    folder: Path
    duration_s: float | None = 60.0
    days: float | None = None
    speed: float = 900.0
    broker: str | None = None
    db: str | None = None
    http: str | None = None
    chaos: bool = False
    stations: int | None = None
    workers: int = 2
    start_hour: float = 6.0
    topology: str = "direct"
    devices_per_process: int = DEVICES_PER_PROCESS
    kiosks: int | None = None  # None: one for every RIDERS_PER_KIOSK riders


def _password(seed: int, who: str) -> str:
    return hashlib.sha256(f"farelab-city/{seed}/{who}".encode()).hexdigest()[:24]


class Clock:
    """Simulated time: ``speed`` simulated seconds for each wall second since ``start``."""

    def __init__(self, sim_start: datetime, speed: float) -> None:
        self.sim_start = sim_start
        self.speed = speed
        self.wall_start = time.monotonic()

    def now(self) -> datetime:
        """The simulated time now."""
        return self.sim_start + timedelta(seconds=(time.monotonic() - self.wall_start) * self.speed)

    def wall(self) -> float:
        """Wall seconds since the start."""
        return time.monotonic() - self.wall_start

    async def until(self, at: datetime) -> None:
        """Sleep until the simulated time ``at``."""
        ahead = (at - self.now()).total_seconds() / self.speed
        if ahead > 0:
            await asyncio.sleep(ahead)


# --- the processes -----------------------------------------------------------------------------


class Process:
    """A child process (:class:`Child`) with one JSON request a line in and one JSON answer a
    line out, in order; killed, its unanswered requests get None; restarted, it takes requests
    again.  It is up once its stderr says ``ready``."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        ready: str,
        log_file: Path,
        env: Mapping[str, str] | None = None,
        on_exit: Callable[[Process], None] | None = None,
    ) -> None:
        """``on_exit``: told when the process ends without having been killed or stopped."""
        self.name = name
        self.ready_text = ready
        self.on_exit = on_exit
        self.expected = False  # a kill or stop is under way: its end is no news
        self.log_file = log_file
        self.child = Child(
            name,
            argv,
            env=env,
            on_json=self._answer,
            on_stderr=self._error_line,
            log_file=log_file,
        )
        self.pending: deque[asyncio.Future[dict[str, Any] | None]] = deque()
        self.up = asyncio.Event()
        self.restarts = 0
        self._ready = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self.up_once = False

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self.child.pid if self.child.running else None

    def _answer(self, _: Child, doc: dict[str, Any]) -> None:
        if self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_result(doc)

    def _error_line(self, _: Child, line: str) -> None:
        if self.ready_text in line:
            self._ready.set()

    def _fail_pending(self) -> None:
        self.up.clear()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_result(None)

    async def _watch_exit(self) -> None:
        await self.child.wait()
        self._fail_pending()  # whatever it did not answer, it never will
        self._ready.set()  # whoever waits for it to be ready finds it gone
        if not self.expected and self.up_once and self.on_exit is not None:
            self.on_exit(self)

    async def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until it says it is running."""
        self._ready.clear()
        self.expected = False
        self.up_once = False
        await self.child.start()
        self._watch = asyncio.create_task(self._watch_exit(), name=f"{self.name} exit")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            self.child.kill()
            raise CityError(f"{self.name} did not start within {timeout:g} s") from None
        if not self.child.running:
            last = " / ".join(list(self.child.stderr)[-3:])
            raise CityError(f"{self.name} exited at start (status {self.child.returncode}): {last}")
        self.up_once = True
        self.up.set()

    async def request(
        self, doc: Mapping[str, Any], timeout: float | None = None
    ) -> dict[str, Any] | None:
        """Send one request and wait for its answer (for at most ``timeout`` seconds, if given);
        None if the process died first."""
        if not self.up.is_set():
            await self.up.wait()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any] | None] = loop.create_future()
        self.pending.append(future)
        if not self.child.send_line(_encode_request(doc)):
            self.pending.remove(future)
            return None
        # The future stays in ``pending`` after a timeout: the process's late answer is its.
        # (A timer on a waiter of our own: wait_for and shield cost a task and two futures a
        # request, a tenth of the city's own CPU at a thousand taps a second.)
        waiter: asyncio.Future[dict[str, Any] | None] = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _settle, waiter, None)
        future.add_done_callback(
            lambda done: _settle(waiter, None if done.cancelled() else done.result())
        )
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut."""
        self.expected = True
        self.up.clear()
        self.child.kill()

    async def restart(self) -> None:
        """Start it again after a kill (once the old one is gone)."""
        if self._watch is not None:
            await self._watch
        self.restarts += 1
        await self.start()

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a validator finishes its tap and stops), then SIGKILL if it does not; its
        exit status."""
        self.expected = True
        self.up.clear()
        code = await self.child.stop(grace=timeout)
        if self._watch is not None:
            await self._watch
        return code


def rss_mb(pid: int | None) -> float | None:
    """A process's resident set in MB (Linux), or None."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --- the counts ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the riders saw, as they go."""

    taps: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    loads: int = 0
    loads_fen: int = 0
    fares_fen: int = 0
    grey: int = 0
    retries: int = 0
    unanswered: int = 0
    load_refused: Counter[str] = field(default_factory=Counter)

    def tap(self, doc: Mapping[str, Any]) -> None:
        """Count one tap's answer."""
        self.taps += 1
        if doc.get("grey"):
            self.grey += 1
        if doc.get("result") == "accepted":
            self.accepted += 1
            self.fares_fen += int(doc.get("fare_fen") or 0)
        else:
            self.refused[str(doc.get("reason") or "unknown")] += 1


# --- the city -----------------------------------------------------------------------------------


class City:
    """One run of ``farelab city``."""

    def __init__(self, options: CityOptions, plan: CityPlan, say: Callable[[str], None]) -> None:
        self.o = options
        self.plan = plan
        self.say = say
        self.folder = options.folder
        self.cards_dir = self.folder / "cards"
        self._card_files: dict[str, str] = {}
        self.devices_dir = self.folder / "devices"
        self.logs = self.folder / "logs"
        self.db = options.db or f"sqlite:///{self.folder / 'ledger.db'}"
        self.tally = Tally()
        self.processes: dict[str, Process] = {}
        self.balances: dict[str, int | None] = {}
        self.start_fen: dict[str, int] = {}
        count = options.kiosks or max(1, options.riders // RIDERS_PER_KIOSK)
        self.kiosk_ids = kiosk_ids(count)
        # One card at a kiosk at a time: a rider tops up at the kiosk of their home
        # (``kiosk_of``) and queues behind the riders already there.
        self.kiosk_locks = {kiosk: asyncio.Lock() for kiosk in self.kiosk_ids}
        self.kiosks: dict[str, Process] = {}
        self.faults: list[dict[str, Any]] = []
        self.broker_host = "127.0.0.1"
        self.broker_port = 0
        self.external = options.broker not in (None, EMBEDDED)  # a broker the city did not start
        self.embedded = False  # the in-process amqtt broker (MQTT 3.1.1) serves the city
        self.stack = contextlib.AsyncExitStack()
        self.http = ""  # where the backend's dashboard listens, once it does
        self.fatal: str | None = None  # why the city must stop before its end
        self.failed = asyncio.Event()
        self.interrupted = False
        self.mosquitto: Any = None
        self.backend: Process | None = None
        self.stop_riders = asyncio.Event()
        self.proxies: dict[int, FaultProxy] = {}  # by the broker port they forward to
        self.proxy_of: dict[str, FaultProxy] = {}  # by validator process
        self.topology: BridgedTopology | None = None
        self.line_brokers: list[Any] = []
        self.pulls: dict[str, str] = {}  # device → the step its next tap is torn after
        self.tap_wall = 0.0
        self.drain_wall = 0.0
        self.uplink_memory: dict[str, float] = {}
        self.params_pushed = 0
        self.memory: dict[str, float] = {}
        self.device_ids = {d.id for d in plan.devices}
        self.groups = group_devices(plan, options.devices_per_process, options.topology)
        self.process_of = {d: name for name, ds in self.groups.items() for d in ds}

    # -- set-up --

    def write_plan(self) -> None:
        """Card images, device configurations, the registry."""
        for d in (self.cards_dir, self.devices_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        for folder in range(CARD_FOLDERS):
            (self.cards_dir / f"{folder:02x}").mkdir(exist_ok=True)
        issued = self.plan.day - timedelta(days=200)
        originals: dict[str, Path] = {}
        for rider in self.plan.riders:
            path = self.card_path(rider)
            if rider.role == "cloned" and rider.serial in originals:
                shutil.copyfile(originals[rider.serial], path)  # the clone: a byte-for-byte copy
            else:
                image = personalise(
                    serial=rider.serial,
                    issued=issued,
                    alg=rider.alg,
                    card_type=rider.card_type,
                    balance=rider.balance_fen,
                    issuer_id=rider.issuer,
                    keys=DEMO_KEYS,
                )
                save_image(path, image)
                originals[rider.serial] = path
            self.balances[rider.id] = rider.balance_fen
            self.start_fen[rider.id] = rider.balance_fen
        by_id = {d.id: d for d in self.plan.devices}
        for name, devices in self.groups.items():
            tables = [
                by_id[d].toml(self.plan.network, self.plan.whitelist, self.plan.hotlist)
                + f'mqtt_password = "{_password(self.o.seed, d)}"\n'
                for d in devices
            ]
            (self.devices_dir / f"{name}.toml").write_text(
                f'[journal]\npath = "{name}.db"\n\n' + "\n".join(tables), encoding="utf-8"
            )
        self._register()

    def _register(self) -> None:
        """The device registry, as an operator fills it: ``farelab backend devices add``."""
        configs: list[str] = []
        for path in sorted(self.devices_dir.glob("*.toml")):
            configs += ["--config", str(path)]
        kiosks = [
            [
                kiosk,
                "--role",
                "kiosk",
                "--operator",
                "KIOSK",
                "--kinds",
                "load",
                "--terminal",
                kiosk_terminal(kiosk),
                "--password",
                _password(self.o.seed, kiosk),
            ]
            for kiosk in self.kiosk_ids
        ]
        for args in (configs, *kiosks):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "farelab",
                    "backend",
                    "devices",
                    "add",
                    *args,
                    "--db",
                    self.db,
                ],
                capture_output=True,
                text=True,
                env=self._env(),
                check=False,
            )
            if done.returncode != 0:
                raise CityError(f"registering the devices failed: {done.stderr.strip()}")

    def card_path(self, rider: Rider) -> Path:
        """The rider's card image."""
        return self.cards_dir / card_folder(rider.card) / f"{rider.card}.json"

    def card_file(self, rider: Rider) -> str:
        """:meth:`card_path` as the text a request names it by (made once per card)."""
        text = self._card_files.get(rider.card)
        if text is None:
            text = self._card_files[rider.card] = str(self.card_path(rider))
        return text

    async def start_broker(self) -> None:
        """Mosquitto on a free port with the registry's accounts (or the given broker)."""
        if self.external:
            self.say(f"broker: {self.o.broker} (given)")
            return
        from farelab.backend import (  # noqa: PLC0415
            BrokerError,
            Mosquitto,
            Store,
            embedded_broker,
            find_dynsec_plugin,
            free_port,
            write_broker_config,
        )

        installed = shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()
        if self.o.broker == EMBEDDED or not installed:
            if self.o.topology == "bridged":
                raise CityError("--topology bridged needs Mosquitto (the README's install has it)")
            url = await self.stack.enter_async_context(embedded_broker())
            self.embedded = True
            self.broker_port = url.port
            self.say(
                f"broker: the embedded broker (amqtt, MQTT 3.1.1, no accounts, one backend "
                f"worker) on 127.0.0.1:{url.port}"
                + ("" if installed else ": Mosquitto is not installed")
            )
            return
        if self.o.topology == "bridged":
            self._start_bridged()
            return
        port = free_port()
        folder = self.folder / "broker"
        store = Store(self.db)
        try:
            plugin = find_dynsec_plugin()
            conf, _, _ = write_broker_config(
                store,
                folder,
                backend_password=_password(self.o.seed, BACKEND_USER),
                listener=("127.0.0.1", port),
                fmt="dynsec" if plugin else "acl",
                plugin=plugin,
            )
        finally:
            store.close()
        self.mosquitto = Mosquitto(folder, config=conf.read_text(), port=port, with_parent=True)
        try:
            self.mosquitto.start()
        except BrokerError as exc:
            raise CityError(str(exc)) from None
        self.broker_port = port
        self.say(f"broker: Mosquitto on 127.0.0.1:{port} (accounts from the device registry)")

    def _start_bridged(self) -> None:
        """A central Mosquitto and one per metro line (the station computers), bridged; buses
        and the kiosk talk to the central one."""
        from farelab.backend import BrokerError, Mosquitto, Store, accounts, free_port  # noqa: PLC0415

        store = Store(self.db)
        try:
            logins, _ = accounts(store, _password(self.o.seed, BACKEND_USER))
        finally:
            store.close()
        lines = {
            line: (free_port(), devices)
            for line, devices in self.plan.lines().items()
            if line != "bus"
        }
        folder = self.folder / "brokers"
        topology = BridgedTopology(
            central_port=free_port(),
            lines=lines,
            folder=folder,
            logins=logins,
            bridge_passwords={line: _password(self.o.seed, f"bridge-{line}") for line in lines},
        )
        files = topology.configs()
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
        try:
            central = Mosquitto(
                folder / CENTRAL,
                config=files[f"{CENTRAL}/mosquitto.conf"],
                port=topology.central_port,
                with_parent=True,
            )
            central.start()
            self.mosquitto = central
            for line, (port, _) in lines.items():
                name = line_broker(line)
                broker = Mosquitto(
                    folder / name,
                    config=files[f"{name}/mosquitto.conf"],
                    port=port,
                    with_parent=True,
                )
                broker.start()
                self.line_brokers.append(broker)
        except BrokerError as exc:
            raise CityError(str(exc)) from None
        self.topology = topology
        self.broker_port = topology.central_port
        self.say(
            f"brokers: a central Mosquitto on 127.0.0.1:{topology.central_port} and a station "
            f"computer per line ({', '.join(f'{k} :{p}' for k, (p, _) in lines.items())}), bridged"
        )

    def device_url(self, who: str, link: str | None = None) -> str:
        """The broker URL a device (or the kiosk, or the backend) connects with; ``link``: the
        validator process it is in (its link to the broker), if not named after it."""
        if self.external:
            return str(self.o.broker)
        port = self.broker_port
        if self.topology is not None:
            port = self.topology.device_broker(who)  # its station computer, or the central one
        link = link or who
        if link in self.proxy_of:
            port = self.proxy_of[link].port(link)  # a validator's link goes through the proxy
        url = f"mqtt://{who}:{_password(self.o.seed, who)}@{self.broker_host}:{port}"
        return url + "?protocol=3.1.1" if self.embedded else url

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
        return env

    async def start_backend(self) -> None:
        """``farelab backend run`` with its workers (and the dashboard)."""
        issuers: list[str] = []
        for issuer in self.plan.whitelist:
            issuers += ["--issuer", issuer.hex().upper()]
        argv = [
            sys.executable,
            "-m",
            "farelab",
            "backend",
            "run",
            "--broker",
            self.device_url(BACKEND_USER),
            "--db",
            self.db,
            "--workers",
            "1" if self.embedded else str(self.o.workers),  # 3.1.1: no shared subscriptions
            *issuers,
            "--http",
            self.o.http or "127.0.0.1:0",  # a free port: the backend says which
        ]
        self.backend = Process(
            "backend",
            argv,
            ready=DASHBOARD_LINE,
            log_file=self.logs / "backend.log",
            env=self._env(),
            on_exit=self._died,
        )
        await self.backend.start()
        line = next(x for x in reversed(self.backend.child.stderr) if DASHBOARD_LINE in x)
        self.http = line.split(DASHBOARD_LINE, 1)[1].strip().rstrip("/")
        workers = 1 if self.embedded else self.o.workers
        self.say(f"backend: {workers} worker(s), ledger {self.db}")
        self.say(f"dashboard: http://{self.http}/")

    async def start_proxy(self) -> None:
        """With chaos: the fault proxy, a port per device, between the devices and the broker."""
        if not self.o.chaos or self.external:
            return
        for name, devices in self.groups.items():
            port = (
                self.broker_port
                if self.topology is None
                else self.topology.device_broker(devices[0])  # a process's devices share a line
            )
            proxy = self.proxies.get(port)
            if proxy is None:
                proxy = self.proxies[port] = FaultProxy(upstream=(self.broker_host, port))
            await proxy.add(name)
            self.proxy_of[name] = proxy
        self.say(f"fault proxy: {len(self.groups)} validator process links to the broker")

    async def start_kiosks(self) -> None:
        """The kiosks: a ``farelab topup serve`` each against the backend's load
        authorization, each with its journal (``kiosk.db`` for the first, as a one-kiosk city
        has always had it, ``kiosk-N.db`` for the others)."""
        for kiosk in self.kiosk_ids:
            journal = "kiosk.db" if kiosk == self.kiosk_ids[0] else f"{kiosk}.db"
            self.kiosks[kiosk] = Process(
                kiosk,
                [
                    sys.executable,
                    "-m",
                    "farelab",
                    "topup",
                    "serve",
                    "--broker",
                    self.device_url(kiosk),
                    "--kiosk",
                    kiosk,
                    "--terminal",
                    kiosk_terminal(kiosk),
                    "--journal",
                    str(self.folder / journal),
                ],
                ready="farelab topup: serving",
                log_file=self.logs / f"{kiosk}.log",
                env=self._env(),
                on_exit=self._died,
            )
        await asyncio.gather(*(proc.start() for proc in self.kiosks.values()))
        if len(self.kiosks) > 1:
            self.say(f"kiosks: {len(self.kiosks)} running (a rider tops up at their home's)")

    def kiosk_of(self, rider: Rider) -> str:
        """The kiosk where ``rider`` tops up: the one near their home, as riders do."""
        return self.kiosk_ids[zlib.crc32(rider.id.encode()) % len(self.kiosk_ids)]

    async def start_devices(self) -> None:
        """A ``farelab validator run`` process per group of devices (a device of its own by
        default), a few at a time.  A process's devices log in with their own accounts; its
        broker URL's is its first device's (or, under chaos, its port on the fault proxy)."""
        env = self._env()
        for name, devices in self.groups.items():
            url = self.device_url(devices[0], name)
            self.processes[name] = Process(
                name,
                [
                    sys.executable,
                    "-m",
                    "farelab",
                    "validator",
                    "run",
                    "--config",
                    str(self.devices_dir / f"{name}.toml"),
                    "--broker",
                    url,
                ],
                ready="farelab validator: running",
                log_file=self.logs / f"{name}.log",
                env=env,
                on_exit=self._died,
            )
        started = 0
        limit = asyncio.Semaphore(max(2, (os.cpu_count() or 2) * 2))

        async def one(proc: Process) -> None:
            nonlocal started
            async with limit:
                await proc.start()
            started += 1
            if started % 10 == 0 or started == len(self.processes):
                self.say(
                    f"validators: {started}/{len(self.processes)} processes running "
                    f"({len(self.plan.devices)} devices)"
                )

        await asyncio.gather(*(one(p) for p in self.processes.values()))

    def _died(self, proc: Process) -> None:
        """A process of the city ended that nobody killed or stopped: the city cannot go on
        as planned; say why, with its last words."""
        last = " / ".join(list(proc.child.stderr)[-3:])
        self.fail(f"{proc.name} exited by itself (status {proc.child.returncode}): {last}")

    def interrupt(self, signal_name: str) -> None:
        """SIGINT or SIGTERM: stop riding, stop every process, reconcile nothing."""
        self.interrupted = True
        self.fail(f"interrupted ({signal_name}): every process of the city was stopped")

    def fail(self, why: str) -> None:
        """Stop the riders: the city ends early, for ``why``."""
        if self.fatal is None:
            self.fatal = why
        self.stop_riders.set()
        self.failed.set()

    # -- the riders --

    async def tap(
        self, rider: Rider, device: str, clock: Clock, pull: str | None = None
    ) -> dict[str, Any] | None:
        """One tap of the rider's card at ``device``, tapped again while torn; the final answer
        (None if the device never answered)."""
        proc = self.processes[self.process_of[device]]
        answer: dict[str, Any] | None = None
        for attempt in range(RETRIES):
            request: dict[str, Any] = {
                "device": device,
                "card": self.card_file(rider),
                "at": clock.now().isoformat(timespec="seconds"),
            }
            if attempt == 0:
                pull = pull or self.pulls.pop(device, None)
                if pull is not None:
                    request["pull_after"] = pull
            answer = await proc.request(request, timeout=TAP_TIMEOUT)
            if answer is None:
                self.tally.unanswered += 1
                if proc.up.is_set():
                    # Running but silent for minutes: the rider gives up on this gate rather
                    # than tap again while the first tap may still be going on.
                    return None
                self.tally.retries += 1  # the device died: tap again once it is back
                await asyncio.sleep(0.5)
                continue
            self.tally.tap(answer)
            if answer.get("balance_fen") is not None:
                self.balances[rider.id] = int(answer["balance_fen"])
            if answer.get("reason") != "card_removed":
                return answer
            self.tally.retries += 1  # torn: the gate asks the rider to tap again
            await asyncio.sleep(0.05)
        return answer

    async def load(self, rider: Rider, clock: Clock) -> None:
        """Top the rider's card up at their kiosk (one rider at a time there)."""
        balance = self.balances.get(rider.id) or 0
        room = CAP_FEN - balance
        amount = min(10_000 if balance < 2_000 else 5_000, room) // 100 * 100
        if amount <= 0:
            return
        where = self.kiosk_of(rider)
        kiosk = self.kiosks[where]
        async with self.kiosk_locks[where]:  # one card at a kiosk at a time: the others queue
            for _ in range(3):
                doc = await kiosk.request(
                    {"card": self.card_file(rider), "amount_fen": amount}, timeout=None
                )
                if doc is None:  # the kiosk was killed: the rider waits and tries again
                    self.tally.load_refused["kiosk_down"] += 1
                    continue
                if doc.get("balance_fen") is not None:
                    self.balances[rider.id] = int(doc["balance_fen"])
                if doc.get("result") == "loaded":
                    self.tally.loads += 1
                    self.tally.loads_fen += int(doc.get("amount_fen") or 0)
                    return
                reason = str(doc.get("reason") or "unknown")
                self.tally.load_refused[reason] += 1
                if reason not in ("card_removed", "host_unreachable"):
                    return

    async def ride(self, rider: Rider, trip: Trip, clock: Clock) -> None:
        """One trip: top up first if the balance is short, tap in, ride, tap out."""
        network = self.o.network
        known = self.balances.get(rider.id)
        if rider.role == "regular" and known is not None and known < network.max_fare_fen + 300:
            await self.load(rider, clock)
        answer = await self.tap(rider, trip.entry, clock)
        if not trip.exit or answer is None or answer.get("result") != "accepted":
            return
        await clock.until(clock.now() + timedelta(seconds=trip.ride_s))
        await self.tap(rider, trip.exit, clock)

    async def rider_life(self, rider: Rider, clock: Clock, end: datetime) -> None:
        """The rider's days, trip by trip, until the city's end."""
        day = 0
        while not self.stop_riders.is_set():
            for trip in day_trips(self.plan, self.o.network, rider, day):
                if trip.at >= end or self.stop_riders.is_set():
                    return
                await clock.until(trip.at)
                if self.stop_riders.is_set():
                    return
                await self.ride(rider, trip, clock)
            day += 1
            if self.plan.day + timedelta(days=day) > end.date():
                return

    # -- the backend's answers --

    def _hotlisted(self) -> int:
        from farelab.backend import Store  # noqa: PLC0415

        store = Store(self.db, create=False)
        try:
            return int(store.execute("SELECT count(*) FROM hotlist").fetchone()[0])
        finally:
            store.close()

    async def hotlists(self, every: float = 5.0) -> None:
        """Whenever the backend hotlists a card (a clone it found), publish a new parameters
        version to every device, as an operator's job would (``farelab backend params``)."""
        known = 0
        while True:
            await asyncio.sleep(every)
            try:
                count = await asyncio.to_thread(self._hotlisted)
            except Exception as exc:
                log.info("hotlist check: %s", exc)
                continue
            if count <= known:
                continue
            extra: list[str] = []
            for serial in self.plan.hotlist:
                extra += ["--hotlist", serial]
            done = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "farelab",
                "backend",
                "params",
                "--broker",
                self.device_url(BACKEND_USER),
                "--db",
                self.db,
                *extra,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self._env(),
            )
            _, err = await done.communicate()
            if done.returncode == 0:
                known = count
                self.params_pushed += 1
                self.say(f"hotlist: {count} cards hotlisted by the backend, sent to every device")
            else:
                log.info("backend params failed: %s", err.decode(errors="replace").strip())

    # -- chaos --

    async def chaos(self, clock: Clock, faults: list[Fault], start_iso: str) -> None:
        """Apply each fault at its time (wall seconds from the start of the riding); every
        process killed is started again after the fault's duration."""
        restarts: list[asyncio.Task[None]] = []
        for fault in faults:
            await asyncio.sleep(max(0.0, fault.at - clock.wall()))
            applied = await self._apply(fault, restarts)
            doc = fault.as_json(start_iso)
            if applied is not None:
                doc["applied"] = applied
            self.faults.append(doc)
            log.info("fault %s on %s", fault.kind, fault.target)
        if restarts:
            await asyncio.gather(*restarts)

    async def _apply(self, fault: Fault, restarts: list[asyncio.Task[None]]) -> str | None:
        """Strike; what was done when it differs from the plan (else None)."""
        kind, target = fault.kind, fault.target

        async def later(action: Callable[[], Any]) -> None:
            await asyncio.sleep(fault.duration)
            result = action()
            if asyncio.iscoroutine(result):
                await result

        if kind == "kill_broker":
            if self.mosquitto is None:
                return "skipped: the broker is not the city's"
            self.mosquitto.kill()
            restarts.append(asyncio.create_task(later(self.mosquitto.start)))
        elif kind == "kill_backend_worker":
            pid = self._worker_pid(target)
            if pid is None:
                return "skipped: no such worker running"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return f"pid {pid}"
        elif kind == "kill_device":
            proc = self.processes[self.process_of[target]]
            if not proc.up.is_set():
                return f"skipped: its process {proc.name} is down already"
            proc.kill()
            restarts.append(asyncio.create_task(later(proc.restart)))
            if proc.name != target:
                return f"killed its process {proc.name} ({', '.join(self.groups[proc.name])})"
        elif kind == "kill_kiosk":
            kiosk = self.kiosks[target]
            busy = bool(kiosk.pending)
            kiosk.kill()
            restarts.append(asyncio.create_task(later(kiosk.restart)))
            return "killed a load in progress" if busy else "killed between loads"
        elif kind == "pull_card":
            assert fault.step is not None
            self.pulls[target] = fault.step
        elif self.process_of.get(target) not in self.proxy_of:
            return "skipped: no fault proxy (the broker is not the city's)"
        else:
            link = self.process_of[target]  # the link of the device's process
            if kind == "cut":
                self.proxy_of[link].cut(link, fault.duration)
            elif kind == "delay":
                self.proxy_of[link].delay(link, float(fault.delay_ms or 0), fault.duration)
            elif kind == "reset":
                self.proxy_of[link].reset(link)
            if link != target:
                return f"on the link of its process {link}"
        return None

    def _worker_pid(self, target: str) -> int | None:
        """A backend worker's process id (``backend-worker-N``: the N-th child, by pid)."""
        if self.backend is None:
            return None
        workers = self.backend.child.worker_pids()
        index = int(target.rsplit("-", 1)[-1]) - 1
        return workers[index] if 0 <= index < len(workers) else None

    # -- the end --

    def outbox_depths(self) -> dict[str, int]:
        """Each device's records waiting for the uplink (its journal, read-only)."""
        out: dict[str, int] = {}
        for name in self.groups:
            path = self.devices_dir / f"{name}.db"
            if not path.exists():
                continue
            try:
                with contextlib.closing(
                    sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
                ) as db:
                    for device, n in db.execute(
                        "SELECT device, count(*) FROM outbox GROUP BY device"
                    ):
                        out[str(device)] = int(n)
            except sqlite3.Error:
                continue
        return out

    async def drain(self, timeout: float = 120.0) -> int:
        """Wait until every device's outbox is empty; what is left when the time is up."""
        deadline = time.monotonic() + timeout
        while True:
            left = sum(self.outbox_depths().values())
            if left == 0 or time.monotonic() >= deadline or self.fatal is not None:
                return left
            await asyncio.sleep(0.5)

    def read_journals(self) -> list[JournalTx]:
        """Every validator journal's transactions."""
        rows: list[JournalTx] = []
        for name in self.groups:
            path = self.devices_dir / f"{name}.db"
            if not path.exists():
                continue
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                for dev, seq, status, serial, amount, tx_type in db.execute(
                    "SELECT device, seq, status, card_serial, amount_fen, tx_type FROM transactions"
                ):
                    rows.append(JournalTx(dev, int(seq), status, serial, int(amount), int(tx_type)))
        return rows

    def read_ledger(self) -> tuple[list[LedgerTx], list[LoadRow], dict[str, int], dict[str, Any]]:
        """The ledger's transactions, the host's loads, the verdict counts, and the report."""
        from farelab.backend import Store, clear_ledger, ensure_schema, report  # noqa: PLC0415

        store = Store(self.db, create=False)
        try:
            ensure_schema(store)  # a backend that never served a kiosk has no loads table
            ledger = [
                LedgerTx(d, int(s), v, st, c, int(a), int(t), k)
                for d, s, v, st, c, a, t, k in store.execute(
                    "SELECT device, seq, verdict, status, card_serial, amount, tx_type, kind "
                    "FROM transactions"
                ).fetchall()
            ]
            loads = [
                LoadRow(str(i), c, int(a), st)
                for i, c, a, st in store.execute(
                    "SELECT id, card_serial, amount, status FROM loads"
                ).fetchall()
            ]
            verdicts = {
                v: int(n)
                for v, n in store.execute(
                    "SELECT verdict, count(*) FROM transactions GROUP BY verdict"
                ).fetchall()
            }
            doc = report(store)
            cleared = clear_ledger(store)
            doc["_clearing_fen"] = int(cleared.flows.sum())
            doc["_clearing_net"] = [int(v) for v in cleared.positions.sum(axis=0)]
        finally:
            store.close()
        return ledger, loads, verdicts, doc

    def card_balances(self) -> list[CardBalance]:
        """Every card at start and at the end."""
        return [
            CardBalance(
                file=self.card_path(r).name,
                serial=r.serial.zfill(20),
                start_fen=self.start_fen[r.id],
                end_fen=load_image(self.card_path(r)).balance,
            )
            for r in self.plan.riders
        ]

    async def stop_all(self) -> None:
        """Devices, backend, broker."""
        for proc in self.processes.values():
            self.memory[proc.name] = rss_mb(proc.pid) or 0.0
            if proc.pid is not None:  # its uplink, where it runs in a process of its own
                helpers = [rss_mb(pid) or 0.0 for pid in children_of(proc.pid)]
                self.uplink_memory[proc.name] = sum(helpers)
        await asyncio.gather(*(p.stop() for p in self.processes.values()))
        await asyncio.gather(*(kiosk.stop() for kiosk in self.kiosks.values()))
        for proxy in self.proxies.values():
            await proxy.close()
        if self.backend is not None:
            await self.backend.stop(timeout=20)
        if self.mosquitto is not None:
            self.mosquitto.stop()
        for broker in self.line_brokers:
            broker.stop()
        await self.stack.aclose()


class View:
    """The live view: a rich panel on a terminal, a progress line every few seconds elsewhere.
    Besides the riders' own counts it shows what the backend's dashboard says (``/api/state``):
    each device's outbox, the ingest lag and the alerts."""

    def __init__(self, city: City, clock: Clock, end: datetime, out: TextIO) -> None:
        self.city = city
        self.clock = clock
        self.end = end
        self.out = out
        self.tty = out.isatty()
        self.state: dict[str, Any] = {}

    def _fraction(self) -> float:
        span = (self.end - self.clock.sim_start).total_seconds()
        done = (self.clock.now() - self.clock.sim_start).total_seconds()
        return max(0.0, min(1.0, done / span)) if span > 0 else 1.0

    def _fetch(self) -> dict[str, Any]:
        import urllib.request  # noqa: PLC0415

        if not self.city.http:
            return {}
        url = f"http://{self.city.http}/api/state"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                doc = json.loads(answer.read())
        except (OSError, ValueError):
            return self.state  # the backend restarting, or busy: keep the last picture
        return doc if isinstance(doc, dict) else {}

    def _backend(self) -> tuple[str, str, str]:
        """(deepest outboxes, ingest lag, alerts) as the dashboard has them."""
        devices = self.state.get("devices") or []
        depths = sorted(
            ((d.get("device", "?"), d.get("outbox") or 0) for d in devices if isinstance(d, dict)),
            key=lambda kv: -kv[1],
        )
        deepest = ", ".join(f"{d} {n}" for d, n in depths[:4] if n) or "all empty"
        lag = self.state.get("lag_s")
        lag_text = "-" if lag is None else f"{lag:.1f} s"
        kinds = Counter(a.get("kind", "?") for a in self.state.get("alerts") or [])
        alerts = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"
        return deepest, lag_text, alerts

    def line(self) -> str:
        """One progress line."""
        t = self.city.tally
        wall = max(self.clock.wall(), 1e-9)
        refused = ", ".join(f"{k} {v}" for k, v in t.refused.most_common(4)) or "none"
        deepest, lag, alerts = self._backend()
        return (
            f"{self._fraction() * 100:5.1f}% {self.clock.now():%a %H:%M} | taps {t.taps} "
            f"({t.taps / wall:.1f}/s) accepted {t.accepted} refused {sum(t.refused.values())} "
            f"({refused}) | loads {t.loads} | outboxes: {deepest} | lag {lag} | alerts: "
            f"{alerts} | faults {len(self.city.faults)}"
        )

    def render(self) -> Any:
        """The panel: progress, counts, outboxes, lag, alerts, faults."""
        from rich.console import Group  # noqa: PLC0415
        from rich.progress_bar import ProgressBar  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        t = self.city.tally
        wall = max(self.clock.wall(), 1e-9)
        deepest, lag, alerts = self._backend()
        table = Table.grid(padding=(0, 2))
        table.add_row("simulated time", f"{self.clock.now():%Y-%m-%d %H:%M}")
        table.add_row("taps", f"{t.taps}  ({t.taps / wall:.1f}/s)")
        table.add_row("accepted", str(t.accepted))
        for reason, n in t.refused.most_common(6):
            table.add_row(f"refused: {reason}", str(n))
        table.add_row("loads", f"{t.loads}  ({t.loads_fen / 100:.2f} yuan)")
        table.add_row("deepest outboxes", deepest)
        table.add_row("backend lag", lag)
        table.add_row("alerts", alerts)
        faults = self.city.faults[-3:]
        table.add_row(
            "faults",
            f"{len(self.city.faults)}: " + ", ".join(f"{f['kind']} {f['target']}" for f in faults)
            if faults
            else "0",
        )
        return Group(ProgressBar(total=1.0, completed=self._fraction(), width=60), table)

    async def run(self) -> None:
        """Until cancelled."""
        if self.tty:
            from rich.live import Live  # noqa: PLC0415

            with Live(self.render(), refresh_per_second=2, transient=False) as live:
                while True:
                    await asyncio.sleep(1.0)
                    self.state = await asyncio.to_thread(self._fetch)
                    live.update(self.render())
        else:
            while True:
                await asyncio.sleep(5)
                self.state = await asyncio.to_thread(self._fetch)
                print(f"farelab city: {self.line()}", file=sys.stderr, flush=True)


async def _run(options: CityOptions, plan: CityPlan, say: Callable[[str], None]) -> dict[str, Any]:
    city = City(options, plan, say)
    started = time.monotonic()
    city.write_plan()
    say(
        f"city: {options.network.name}, {len(plan.devices)} devices, {len(plan.riders)} riders, "
        f"work folder {options.folder}"
    )
    loop = asyncio.get_running_loop()
    for sig, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
        loop.add_signal_handler(sig, city.interrupt, name)
    try:
        await city.start_broker()
        await city.start_backend()
        await city.start_proxy()
        await city.start_devices()
        await city.start_kiosks()
        if city.fatal is not None:
            raise (CityInterruptedError if city.interrupted else CityError)(city.fatal)
        sim_start = datetime(
            plan.day.year, plan.day.month, plan.day.day, tzinfo=_cst()
        ) + timedelta(hours=options.start_hour)
        if options.days is not None:
            span = timedelta(days=options.days)
        else:
            span = timedelta(seconds=(options.duration_s or 60.0) * options.speed)
        end = sim_start + span
        clock = Clock(sim_start, options.speed)
        say(
            f"riding: {sim_start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} simulated, "
            f"{options.speed:g}x ({span.total_seconds() / options.speed:.0f} s)"
        )
        view = asyncio.create_task(View(city, clock, end, sys.stdout).run())
        chaos: asyncio.Task[None] | None = None
        if options.chaos:
            wall = span.total_seconds() / options.speed
            faults = plan_faults(
                options.seed,
                wall,
                [d.id for d in plan.devices],
                kiosks=city.kiosk_ids,
                workers=1 if city.embedded else options.workers,
                rate_per_min=CHAOS_PER_MIN,
            )
            if city.external or city.embedded:
                faults = [f for f in faults if f.kind != "kill_broker"]
            say(f"chaos: {len(faults)} faults over {wall:.0f} s (seed {options.seed})")
            start_iso = datetime.now(_cst()).isoformat(timespec="milliseconds")
            chaos = asyncio.create_task(city.chaos(clock, faults, start_iso))
        hotlists = asyncio.create_task(city.hotlists())
        riders: asyncio.Future[list[None]] = asyncio.gather(
            *(city.rider_life(r, clock, end) for r in plan.riders)
        )
        failing: asyncio.Future[Any] = asyncio.ensure_future(city.failed.wait())
        await asyncio.wait([riders, failing], return_when=asyncio.FIRST_COMPLETED)
        failing.cancel()
        if city.fatal is not None:
            for task in (riders, hotlists, view, *([chaos] if chaos else [])):
                task.cancel()
            await asyncio.gather(
                riders, hotlists, view, *([chaos] if chaos else []), return_exceptions=True
            )
            raise (CityInterruptedError if city.interrupted else CityError)(city.fatal)
        hotlists.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hotlists
        city.tap_wall = clock.wall()
        if chaos is not None:
            await chaos  # every fault applied and every process back before the drain
        view.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await view
        say(f"riding done: {city.tally.taps} taps in {city.tap_wall:.1f} s; draining the outboxes")
        drain_started = time.monotonic()
        left = await city.drain()
        city.drain_wall = time.monotonic() - drain_started
        if city.fatal is not None:
            raise (CityInterruptedError if city.interrupted else CityError)(city.fatal)
        if left:
            say(f"{left} records still in the outboxes after 120 s")
    finally:
        await city.stop_all()
    cards = city.card_balances()
    journals = city.read_journals()
    ledger, loads, verdicts, doc = city.read_ledger()
    result: Reconciliation = reconcile(
        cards,
        journals,
        ledger,
        loads,
        clearing_fen=doc["_clearing_fen"],
        clearing_net=doc["_clearing_net"],
        verdicts=verdicts,
    )
    t = city.tally
    memory = [m for m in city.memory.values() if m]
    return {
        "network": plan.network,
        "seed": options.seed,
        "riders": len(plan.riders),
        "devices": len(plan.devices) + len(city.kiosk_ids),
        "taps": t.taps,
        "accepted": t.accepted,
        "refused": dict(t.refused),
        "loads": t.loads,
        "fares_fen": t.fares_fen,
        "loads_fen": t.loads_fen,
        "reconciled": result.reconciled,
        "differences": result.differences,
        "explained": result.explained,
        "faults": city.faults,
        "taps_per_s": round(t.taps / city.tap_wall, 2) if city.tap_wall else 0.0,
        "duration_s": round(time.monotonic() - started, 1),
        "riding_s": round(city.tap_wall, 1),
        "drain_s": round(city.drain_wall, 1),
        "grey": t.grey,
        "retries": t.retries,
        "unanswered": t.unanswered,
        "load_refused": dict(t.load_refused),
        "hotlist_pushes": city.params_pushed,
        "ledger": {
            "transactions": doc["transactions"],
            "purchase_fen": doc["purchase_fen"],
            "load_fen": doc.get("load_fen"),
            "duplicates": doc["duplicates"],
            "forged": doc["forged"],
            "verdicts": verdicts,
        },
        "journalled": len(journals),
        "validator_processes": len(city.groups),
        "devices_per_process": options.devices_per_process,
        "memory_per_device_mb": round(sum(memory) / len(memory), 1) if memory else None,
        "uplink_memory_per_process_mb": (
            round(sum(city.uplink_memory.values()) / len(city.uplink_memory), 1)
            if city.uplink_memory
            else None
        ),
        "folder": str(options.folder),
    }


def group_devices(plan: CityPlan, per_process: int, topology: str) -> dict[str, list[str]]:
    """The validator processes and the devices each hosts, in the plan's order (a station's
    entry and exit gates side by side): ``per_process`` devices a process, never two lines'
    devices in one under ``bridged`` (each line's gates log in at its own station computer);
    a process of one device is named after it, a larger one ``validators-NN``."""
    if per_process < 1:
        raise ValueError("a validator process hosts at least one device")
    links: dict[str, list[str]] = {}
    for device in plan.devices:
        link = (device.line or "bus") if topology == "bridged" else ""
        links.setdefault(link, []).append(device.id)
    chunks = [
        devices[i : i + per_process]
        for devices in links.values()
        for i in range(0, len(devices), per_process)
    ]
    return {
        chunk[0] if len(chunk) == 1 else f"validators-{n:02d}": chunk
        for n, chunk in enumerate(chunks, start=1)
    }


def _cst() -> Any:
    from farelab.card import CST  # noqa: PLC0415

    return CST


def run_city(options: CityOptions, plan: CityPlan, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the city to its end and reconcile; the summary (``reconciled`` says how it went)."""
    return asyncio.run(_run(options, plan, say))

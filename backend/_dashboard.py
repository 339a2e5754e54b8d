"""The backend's live dashboard (``farelab backend run --http HOST:PORT``).

It runs in the supervisor's process, beside the ingest workers: an MQTT subscriber to every
device's retained status report (``farelab/v1/dev/+/status``, a plain subscription with its own
client id: every report reaches it) and an HTTP server, each on a daemon thread.

- ``/``: one page that polls ``/api/state`` every second and draws it (no script, style or font
  from elsewhere; data reaches the page only as text).
- ``/api/state``: the state as JSON (:meth:`Dashboard.state`).
- ``/metrics``: the same in Prometheus' text format, every name ``farelab_…``.
- ``/healthz``: 200 and ``{"ledger": "ok"}`` while the ledger answers a query, else 503.

What the devices report (:class:`Board`, no I/O: taps, refusals, outbox, tap durations) and
what the ledger holds (read at most once a second, whatever the number of viewers) make the
state.  ``lag_s``, how far ingest is behind: 0 while every reporting device's outbox is empty,
else the seconds since the ledger received its newest batch (devices do not report the age of
their oldest outbox row); null before the ledger has received a batch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.server
import importlib.resources
import json
import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt

from farelab.backend._cards import cards_by_state
from farelab.backend._clearing import clear_ledger
from farelab.backend._registry import DeviceEntry, entries
from farelab.backend._store import Store
from farelab.protocol import (
    LATENCY_BOUNDS_MS,
    STATUS_TOPIC,
    Backoff,
    BrokerURL,
    DeviceStatus,
    ParamsError,
    decode_status,
)

__all__ = ["Board", "Dashboard", "parse_http_address"]

log = logging.getLogger("farelab.backend.dashboard")

#: Seconds without a report after which a device is shown offline: devices report every 2 s
#: when something changed and at least every 30 s.
OFFLINE_AFTER = 40.0
# The window of the taps-per-second rates.
_RATE_WINDOW = 10.0
# Reports kept from devices the registry does not know: a bound on what strangers may fill.
_MAX_DEVICES = 10_000
# How long the ledger's part of the state is reused.
_LEDGER_EVERY = 1.0
_ALERTS_MAX = 50


_CARDS_MAX = 10_000
"""Above this many card records the page leaves their states out (each is computed from its
events: ``farelab backend report`` counts them all)."""


def _cards_by_state(store: Store) -> dict[str, int] | None:
    """The card records by state now, or None for a ledger with too many to count each second."""
    (count,) = store.execute("SELECT count(*) FROM cards").fetchone()
    if int(count) > _CARDS_MAX:
        return None
    return cards_by_state(store, datetime.now(UTC))


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6; port 0: a free one) as (host, port); ValueError
    says what is wrong."""
    host, sep, port = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(
            f"--http {text!r}: expected HOST:PORT, a port from 1 to 65535 (or 0: a free one)"
        )
    if ":" in host and not bracketed:
        raise ValueError(f"--http {text!r}: an IPv6 address goes in brackets, [::1]:8080")
    return host, int(port)


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


@dataclass
class _Device:
    """What one device last reported, and when (the backend's clock)."""

    status: DeviceStatus
    seen: float | None
    samples: deque[tuple[float, int]] = field(default_factory=deque)


class Board:
    """The devices' status reports, and what follows from them at a given time.  No I/O: the
    subscriber hands it reports with the time they arrived; the state asks it at a time."""

    def __init__(self, *, max_devices: int = _MAX_DEVICES) -> None:
        """
        Args:
            max_devices: the most devices kept (later strangers' reports are dropped).
        """
        self.max_devices = max_devices
        self._devices: dict[str, _Device] = {}
        self._lock = threading.Lock()

    def report(self, status: DeviceStatus, *, now: float, retained: bool = False) -> None:
        """A report received at ``now`` (seconds since the epoch).  A retained one was sent
        before the subscription: it was seen when the device made it, if it says when."""
        seen = (status.at.timestamp() if status.at else None) if retained else now
        if seen is not None:
            seen = min(seen, now)
        with self._lock:
            device = self._devices.get(status.device)
            if device is None:
                if len(self._devices) >= self.max_devices:
                    return
                device = self._devices[status.device] = _Device(status, seen)
            device.status, device.seen = status, seen
            if status.taps is None or seen is None:
                return
            if device.samples and status.taps < device.samples[-1][1]:
                device.samples.clear()  # the device started again: its counters too
            device.samples.append((seen, status.taps))
            self._prune(device, now)

    @staticmethod
    def _prune(device: _Device, now: float) -> None:
        while len(device.samples) > 1 and device.samples[1][0] <= now - _RATE_WINDOW:
            device.samples.popleft()

    def devices(self) -> dict[str, tuple[DeviceStatus, float | None]]:
        """Each device's last report and when it was seen."""
        with self._lock:
            return {k: (d.status, d.seen) for k, d in self._devices.items()}

    def rate(self, device: str, now: float) -> float:
        """The device's taps per second over the last few seconds."""
        with self._lock:
            entry = self._devices.get(device)
            if entry is None:
                return 0.0
            self._prune(entry, now)
            if len(entry.samples) < 2:
                return 0.0
            first_at, first = entry.samples[0]
            taps = entry.samples[-1][1] - first
        # Over the time since the window's first report, up to now: a device that stopped
        # tapping sends no more reports, and its rate falls to 0 as the window passes it.
        return taps / max(now - first_at, 1.0)


def _line_of(entry: DeviceEntry | None) -> str:
    """A device's line as the page groups taps: a gate's line, or its operator's buses."""
    if entry is None:
        return "unregistered"
    if "bus" in entry.kinds:
        return f"{entry.operator} bus"
    if entry.line:
        return f"{entry.operator} L{entry.line}"
    return entry.operator


class _Ledger:
    """The ledger as the dashboard reads it: one connection of its own, opened again after a
    failure; the ledger's part of the state, at most once a second."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    @contextlib.contextmanager
    def _open(self) -> Iterator[Store]:
        with self._lock:
            if self._store is None:
                self._store = Store(self.db_url, create=False)
            try:
                yield self._store
            except Exception:
                store, self._store = self._store, None
                with contextlib.suppress(Exception):
                    store.close()
                raise

    def ping(self) -> bool:
        """Whether the ledger answers a query."""
        try:
            with self._open() as store:
                store.execute("SELECT 1").fetchone()
        except Exception as exc:  # any failure of the database is "not healthy"
            log.debug("ledger does not answer: %s", exc)
            return False
        return True

    def read(self, now: float) -> dict[str, Any]:
        """Registry, totals, clearing, alerts and the newest batch's time (cached 1 s)."""
        cached = self._cached
        if cached is not None and now - cached[0] < _LEDGER_EVERY:
            return cached[1]
        with self._open() as store:
            part = {
                "registry": {e.id: e for e in entries(store)},
                "ledger": store.dashboard_totals(),
                "clearing": _positions(store),
                "alerts": store.dashboard_alerts(_ALERTS_MAX),
                "cards": _cards_by_state(store),
                "last_batch_ms": store.last_batch_ms(),
            }
        self._cached = (now, part)
        return part

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def _positions(store: Store) -> list[dict[str, Any]]:
    """Each party's position over every day: receivable, payable and net, fen."""
    result = clear_ledger(store)
    if not result.parties:
        return []
    receivable = result.flows.sum(axis=(0, 1))
    payable = result.flows.sum(axis=(0, 2))
    return [
        {
            "party": party,
            "receivable_fen": int(receivable[k]),
            "payable_fen": int(payable[k]),
            "net_fen": int(receivable[k] - payable[k]),
        }
        for k, party in enumerate(result.parties)
    ]


class Dashboard:
    """The page, the state and the metrics of one backend, served until :meth:`close`."""

    def __init__(
        self, broker: BrokerURL, db_url: str, *, host: str, port: int, client_id: str
    ) -> None:
        """
        Args:
            broker: where the devices' status reports are read (the backend's account).
            db_url: the ledger.
            host, port: where the HTTP server listens (OSError if it cannot).
            client_id: the subscriber's MQTT client id, unique on the broker.
        """
        self.broker = broker
        self.board = Board()
        self.ledger = _Ledger(db_url)
        self.client_id = client_id
        self._page, self._csp = _page()
        self._metrics = _Metrics(self)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        server = _Server6 if ":" in host else _Server
        self.server = server((host, port), _handler(self))
        self._threads = [
            threading.Thread(target=self.server.serve_forever, name="dashboard-http", daemon=True),
            threading.Thread(target=self._subscribe, name="dashboard-mqtt", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """Where the server listens (the port the system chose for port 0)."""
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving and subscribing."""
        self._stop.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None)
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(5)
        self.ledger.close()

    # The subscriber -----------------------------------------------------------------------

    def _subscribe(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run(self._subscriber())

    async def _subscriber(self) -> None:
        self._loop = asyncio.get_running_loop()
        backoff = Backoff()
        topic = STATUS_TOPIC.format(device="+")
        while not self._stop.is_set():
            try:
                async with self.broker.client(
                    identifier=self.client_id, keepalive=15, timeout=5
                ) as client:
                    await client.subscribe(topic, qos=1)
                    backoff.reset()
                    reader = asyncio.create_task(self._read(client))
                    while not reader.done() and not self._stop.is_set():
                        await asyncio.wait({reader}, timeout=0.5)
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
            except aiomqtt.MqttError as exc:
                delay = backoff.next_delay()
                level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
                log.log(level, "dashboard: broker %s unavailable (%s)", self.broker, exc)
                deadline = time.monotonic() + delay
                while not self._stop.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            parts = str(message.topic).split("/")
            try:
                status = decode_status(bytes(payload))
            except ParamsError:
                continue  # not a report: nothing a device said
            if len(parts) != 5 or parts[3] != status.device:
                continue  # a report about another device than the topic's
            self.board.report(status, now=time.time(), retained=bool(message.retain))

    # The state ----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The dashboard's state now, as ``/api/state`` gives it (see docs/backend.md)."""
        now = time.time()
        ledger = self.ledger.read(now)
        registry: Mapping[str, DeviceEntry] = ledger["registry"]
        reports = self.board.devices()
        devices = []
        refused: dict[str, int] = {}
        by_line: dict[str, float] = {}
        by_device: dict[str, float] = {}
        latency = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        waiting = False
        for device in sorted({*registry, *reports}):
            entry = registry.get(device)
            status, seen = reports.get(device, (None, None))
            online = seen is not None and now - seen < OFFLINE_AFTER
            doc: dict[str, Any] = {
                "device": device,
                "role": entry.role if entry is not None else "unregistered",
                "online": online,
                "last_seen": _iso(seen),
                "outbox": None if status is None else status.outbox,
                "params_version": None if status is None else status.params_version,
                "taps": 0,
                "accepted": 0,
                "refused": {},
            }
            if status is not None and status.taps is not None:
                doc["taps"], doc["accepted"] = status.taps, status.accepted or 0
                doc["refused"] = dict(sorted(status.refused.items()))
                for reason, n in status.refused.items():
                    refused[reason] = refused.get(reason, 0) + n
                rate = self.board.rate(device, now)
                by_device[device] = rate
                line = _line_of(entry)
                by_line[line] = by_line.get(line, 0.0) + rate
                counts = status.latency_counts
                if counts is not None and status.latency_bounds_ms == LATENCY_BOUNDS_MS:
                    latency = [a + b for a, b in zip(latency, counts, strict=True)]
            waiting = waiting or bool(status is not None and status.outbox)
            devices.append(doc)
        last_batch = ledger["last_batch_ms"]
        lag = None if last_batch is None else max(0.0, now - last_batch / 1000)
        if lag is not None and not waiting:
            lag = 0.0
        return {
            "time": _iso(now),
            "devices": devices,
            "taps_per_s": {
                "total": round(sum(by_device.values()), 3),
                "by_line": {k: round(v, 3) for k, v in sorted(by_line.items())},
                "by_device": {k: round(v, 3) for k, v in sorted(by_device.items())},
            },
            "refused": dict(sorted(refused.items())),
            "ledger": ledger["ledger"],
            "clearing": ledger["clearing"],
            "latency_ms": {"bounds": list(LATENCY_BOUNDS_MS), "counts": latency},
            "lag_s": None if lag is None else round(lag, 3),
            "alerts": [{**a, "at": _iso(a["at"] / 1000)} for a in ledger["alerts"]],
            "cards_by_state": ledger["cards"],
        }

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/healthz``: the status code and its JSON."""
        if self.ledger.ping():
            return 200, {"ledger": "ok"}
        return 503, {"ledger": "unavailable"}

    def metrics(self) -> bytes:
        """``/metrics``: Prometheus' text format."""
        return self._metrics.render()


class _Metrics:
    """The state as Prometheus metric families, read at each scrape."""

    def __init__(self, dashboard: Dashboard) -> None:
        from prometheus_client import CollectorRegistry  # noqa: PLC0415 - only with --http

        self.dashboard = dashboard
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        from prometheus_client import generate_latest  # noqa: PLC0415 - only with --http

        return generate_latest(self.registry)

    def collect(self) -> Iterator[Any]:
        """The metric families (prometheus_client's collector interface)."""
        from prometheus_client.core import (  # noqa: PLC0415 - only with --http
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        state = self.dashboard.state()
        taps = CounterMetricFamily(
            "farelab_device_taps", "Taps a device counted", labels=["device"]
        )
        accepted = CounterMetricFamily(
            "farelab_device_accepted", "Taps a device accepted", labels=["device"]
        )
        refused = CounterMetricFamily(
            "farelab_device_refused", "Taps a device refused", labels=["device", "reason"]
        )
        online = GaugeMetricFamily("farelab_device_online", "1 while reporting", labels=["device"])
        outbox = GaugeMetricFamily(
            "farelab_device_outbox_rows", "Outbox rows not yet acknowledged", labels=["device"]
        )
        version = GaugeMetricFamily(
            "farelab_device_params_version", "Parameters version running", labels=["device"]
        )
        for d in state["devices"]:
            name = [d["device"]]
            taps.add_metric(name, d["taps"])
            accepted.add_metric(name, d["accepted"])
            for reason, n in d["refused"].items():
                refused.add_metric([d["device"], reason], n)
            online.add_metric(name, 1 if d["online"] else 0)
            if d["outbox"] is not None:
                outbox.add_metric(name, d["outbox"])
            if d["params_version"] is not None:
                version.add_metric(name, d["params_version"])
        yield from (taps, accepted, refused, online, outbox, version)
        rates = GaugeMetricFamily(
            "farelab_taps_per_second", "Taps per second by line", labels=["line"]
        )
        for line, rate in state["taps_per_s"]["by_line"].items():
            rates.add_metric([line], rate)
        yield rates
        latency = state["latency_ms"]
        cumulative, buckets = 0, []
        for bound, count in zip([*latency["bounds"], None], latency["counts"], strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound is None else str(bound / 1000), float(cumulative)))
        histogram = HistogramMetricFamily(
            "farelab_tap_duration_seconds", "How long devices' taps took"
        )
        histogram.add_metric([], buckets, None)
        yield histogram
        ledger = state["ledger"]
        yield CounterMetricFamily(
            "farelab_ledger_transactions", "Counted transactions", value=ledger["transactions"]
        )
        yield CounterMetricFamily(
            "farelab_ledger_fares_fen", "Fares counted, fen", value=ledger["fares_fen"]
        )
        yield CounterMetricFamily(
            "farelab_ledger_loads_fen", "Loads counted, fen", value=ledger["loads_fen"]
        )
        for key, label in (("by_operator", "operator"), ("by_issuer", "issuer")):
            n = CounterMetricFamily(
                f"farelab_ledger_{label}_transactions",
                f"Counted transactions by {label}",
                labels=[label],
            )
            fen = CounterMetricFamily(
                f"farelab_ledger_{label}_fen", f"Counted amounts by {label}, fen", labels=[label]
            )
            for name, row in ledger[key].items():
                n.add_metric([name], row["transactions"])
                fen.add_metric([name], row["fen"])
            yield from (n, fen)
        net = GaugeMetricFamily(
            "farelab_clearing_net_position_fen", "Receivable less payable, fen", labels=["party"]
        )
        for row in state["clearing"]:
            net.add_metric([row["party"]], row["net_fen"])
        yield net
        alerts = GaugeMetricFamily("farelab_alerts", "Alerts shown, by kind", labels=["kind"])
        kinds: dict[str, int] = {}
        for alert in state["alerts"]:
            kinds[alert["kind"]] = kinds.get(alert["kind"], 0) + 1
        for kind in ("clone", "forged", "gap"):
            alerts.add_metric([kind], kinds.get(kind, 0))
        yield alerts
        if state["lag_s"] is not None:
            yield GaugeMetricFamily(
                "farelab_ingest_lag_seconds", "How far ingest is behind", value=state["lag_s"]
            )


def _page() -> tuple[bytes, str]:
    """The page, and the Content-Security-Policy that lets only its own inline script run."""
    text = (importlib.resources.files("farelab.backend") / "_dashboard.html").read_text("utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", text, flags=re.DOTALL)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in scripts
    )
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return text.encode(), csp


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


class _Server6(_Server):
    address_family = socket.AF_INET6


def _handler(dashboard: Dashboard) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "farelab"
        sys_version = ""
        timeout = 10  # a client that sends nothing is let go

        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            if self.command not in {"GET", "HEAD"}:
                self._send(405, b"only GET and HEAD\n", "text/plain", {"Allow": "GET, HEAD"})
                return False
            return True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/":
                    self._send(200, dashboard._page, "text/html; charset=utf-8")
                elif path == "/api/state":
                    body = json.dumps(dashboard.state(), ensure_ascii=False).encode()
                    self._send(200, body, "application/json")
                elif path == "/metrics":
                    self._send(200, dashboard.metrics(), "text/plain; version=0.0.4")
                elif path == "/healthz":
                    status, doc = dashboard.health()
                    self._send(status, json.dumps(doc).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")
            except Exception as exc:  # the ledger failed: say so, keep serving
                log.warning("dashboard: %s failed: %s", path, exc)
                self._send(503, b"the ledger is unavailable\n", "text/plain")

        do_HEAD = do_GET  # noqa: N815 - http.server's name

        def _send(
            self, status: int, body: bytes, kind: str, headers: Mapping[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", dashboard._csp)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard: %s", format % args)

    return Handler

"""The uplink: the journal's outbox to the backend over MQTT, in batches, until acknowledged.

One MQTT client per device (its own credentials and a stable client id, ``farelab-dev-<id>``,
with a persistent MQTT 5 session), QoS 1.  A batch leaves the outbox only when the backend's
*application* ack for it arrives — the backend publishes that after its own database commit — so
the journal stays the durable store whatever the broker or the network do.  The rules (batches,
the window, which ack takes which batch, resends, refusals) are :class:`UplinkSession`'s; this
is its asyncio shell: connect, subscribe, read the outbox and delete acknowledged rows (on a
worker thread), publish, and sleep until the session's next deadline or the next ack.
The connection is an explicit state (:class:`farelab.protocol.LinkState`) with capped jittered
backoff; the first failure is logged loudly, repeats quietly.

Each device's status report (:class:`farelab.protocol.DeviceStatus`: the parameters version it
runs, its tap counters, its outbox rows) goes retained on its ``status`` topic at connection,
after a new parameters version, and every ``status_every`` seconds when it changed — and at
least every :data:`STATUS_HEARTBEAT` seconds, so that a device's silence means it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable
from datetime import datetime

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from farelab.card import CST
from farelab.protocol import (
    ACK_TOPIC,
    BATCH_MAX,
    DEVICE_CLIENT_ID,
    PARAMS_TOPIC,
    STATUS_TOPIC,
    TX_TOPIC,
    BrokerURL,
    DeviceStatus,
    cancel_and_wait,
    encode_status,
    honour_cancellation,
    subscribe_or_raise,
)
from farelab.validator._journal import Journal
from farelab.validator._priority import TapGate
from farelab.validator._stats import TapCounts
from farelab.validator._uplink_session import (
    AckIgnored,
    Acknowledge,
    BatchRefused,
    ReadOutbox,
    Send,
    UplinkSession,
    UplinkStats,
)

__all__ = ["STATUS_HEARTBEAT", "MqttUplink", "UplinkStats"]

log = logging.getLogger("farelab.uplink")

#: Seconds after which a device's status report goes again even when nothing changed.
STATUS_HEARTBEAT = 30.0

_StatusSource = Callable[[str], tuple[int, TapCounts] | None]


class MqttUplink:
    """Sends the outbox of the given devices; ``run()`` is the loop's uplink task."""

    def __init__(
        self,
        broker: BrokerURL,
        devices: Iterable[str],
        *,
        batch_size: int = 200,
        window: int = 4,
        ack_timeout: float = 10.0,
        passwords: dict[str, str] | None = None,
        rng: random.Random | None = None,
        status_every: float = 2.0,
    ) -> None:
        """
        Args:
            broker: where the broker is; its user/password serve devices without their own.
            devices: the device ids whose outbox rows this uplink sends.
            batch_size: records per message (1 to 500).
            window: batches in flight per device before waiting for acks.
            ack_timeout: seconds before an unacknowledged batch is sent again.
            passwords: per-device MQTT passwords (the username is the device id).
            rng: the jitter of the reconnect and refusal backoffs.
            status_every: seconds between status reports, sent only when something changed
                (their counters come from :meth:`attach_status`).
        """
        if not 1 <= batch_size <= BATCH_MAX:
            raise ValueError(f"batch_size must be 1 to {BATCH_MAX}")
        self.broker = broker
        self.devices = list(devices)
        self.batch_size = batch_size
        self.window = window
        self.ack_timeout = ack_timeout
        self.passwords = passwords or {}
        self.stats: dict[str, UplinkStats] = {d: UplinkStats() for d in self.devices}
        self._rng = rng or random.Random()
        self.status_every = status_every
        self._on_params: Callable[[str, bytes], int | None] | None = None
        self._status: _StatusSource | None = None

    def attach_params(self, handler: Callable[[str, bytes], int | None]) -> None:
        """Apply parameters the backend publishes for these devices with ``handler``."""
        self._on_params = handler

    def attach_status(self, source: _StatusSource) -> None:
        """Report each device's parameters version and tap counters, as ``source`` gives them,
        on its status topic."""
        self._status = source

    async def run(self, journal: Journal) -> None:
        """One task per device until cancelled."""
        async with asyncio.TaskGroup() as group:
            for device in self.devices:
                group.create_task(self._device_loop(journal, device), name=f"uplink-{device}")

    def pending(self, journal: Journal) -> int:
        """Outbox rows of these devices not yet acknowledged."""
        return sum(journal.outbox_count(device=d) for d in self.devices)

    def _client(self, device: str) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        password = self.passwords.get(device, self.broker.password)
        username = device if device in self.passwords else self.broker.username
        session: dict[str, object] = (
            {"clean_start": False, "properties": properties}
            if self.broker.mqtt5
            else {"clean_session": False}
        )
        return self.broker.client(
            identifier=DEVICE_CLIENT_ID.format(device=device),
            username=username,
            password=password,
            keepalive=15,
            timeout=5,
            **session,
        )

    async def _device_loop(self, journal: Journal, device: str) -> None:
        session = UplinkSession(
            device=device,
            epoch=journal.epoch,
            batch_size=self.batch_size,
            window=self.window,
            ack_timeout=self.ack_timeout,
            rng=self._rng,
            stats=self.stats[device],
        )
        while True:
            honour_cancellation()
            session.connecting()
            try:
                async with self._client(device) as client:
                    if session.connected():
                        log.info("device %s: uplink to %s is back", device, self.broker)
                    # Without its acks the device would send the same batches for ever: a
                    # refusal is a link failure, logged and retried with backoff.
                    await subscribe_or_raise(client, ACK_TOPIC.format(device=device))
                    if self._on_params is not None:
                        await subscribe_or_raise(client, PARAMS_TOPIC.format(device=device))
                    reporter = _Reporter(client, journal, device, self._status, self.status_every)
                    await _Connection(client, journal, session, self._on_params, reporter).run()
            except aiomqtt.MqttError as exc:
                delay = session.connection_lost()
                level = logging.WARNING if session.link.failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "device %s: uplink to %s failed (%s); retrying in %.1f s",
                    device,
                    self.broker,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)


class _Connection:
    """One connection of one device: a sender that does what the session says, and a reader of
    the acks (and parameters) the broker delivers."""

    def __init__(
        self,
        client: aiomqtt.Client,
        journal: Journal,
        session: UplinkSession,
        on_params: Callable[[str, bytes], int | None] | None,
        reporter: _Reporter,
    ) -> None:
        self.client = client
        self.journal = journal
        self.session = session
        self.device = session.device
        self.on_params = on_params
        self.reporter = reporter
        self.topic = TX_TOPIC.format(device=self.device)
        self.gate = journal.gate  # the uplink steps aside while a tap is in progress
        self.woken = asyncio.Event()  # an ack made room in the window

    async def run(self) -> None:
        receiver = asyncio.create_task(self._receive(), name=f"uplink-acks-{self.device}")
        reports = asyncio.create_task(self.reporter.run(), name=f"uplink-status-{self.device}")
        try:
            while True:
                honour_cancellation()
                if reports.done():
                    reports.result()
                if receiver.done():
                    receiver.result()
                    raise aiomqtt.MqttError("the ack stream ended")
                self.woken.clear()
                until = await self._send_what_is_due()
                # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, until - time.monotonic())):
                        await self.woken.wait()
        finally:
            await cancel_and_wait(reports)
            await cancel_and_wait(receiver)

    async def _send_what_is_due(self) -> float:
        """Send and read until the session says to wait; when the wait ends (monotonic)."""
        session = self.session
        while True:
            command = session.next_command(time.monotonic())
            if isinstance(command, ReadOutbox):
                rows = await asyncio.to_thread(
                    self.journal.outbox_wire,
                    command.limit,
                    device=self.device,
                    after=command.after,
                )
                sent = session.rows_read(rows, time.monotonic())
                if sent is not None:
                    await self._publish(sent)
            elif isinstance(command, Send):
                await self._publish(command)
            else:
                return command.until

    async def _publish(self, send: Send) -> None:
        await _yield_to_taps(self.gate)
        await self.client.publish(self.topic, send.payload, qos=1)
        log.debug(
            "device %s: batch %d %s (%d records)",
            self.device,
            send.batch_id,
            "sent again" if send.again else "sent",
            send.records,
        )

    async def _receive(self) -> None:
        async for message in self.client.messages:
            honour_cancellation()
            await _yield_to_taps(self.gate)
            if str(message.topic).endswith("/params"):
                await self._apply_params(bytes(message.payload))
                continue
            outcome = self.session.receive_ack(bytes(message.payload), time.monotonic())
            if isinstance(outcome, Acknowledge):
                await asyncio.to_thread(self.journal.acknowledge, list(outcome.ids))
                self.woken.set()
            elif isinstance(outcome, BatchRefused):
                level = logging.WARNING if outcome.failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "device %s: the backend refused batch %d (is the device registered?); "
                    "sending it again in %.1f s",
                    self.device,
                    outcome.batch_id,
                    outcome.retry_in,
                )
            else:
                _log_ignored(self.device, outcome)

    async def _apply_params(self, payload: bytes) -> None:
        if self.on_params is None:
            return
        version = self.on_params(self.device, payload)
        if version is not None:
            await self.reporter.publish(version)


class _Reporter:
    """One connection's status reports of one device."""

    def __init__(
        self,
        client: aiomqtt.Client,
        journal: Journal,
        device: str,
        source: _StatusSource | None,
        every: float,
    ) -> None:
        self.client = client
        self.journal = journal
        self.device = device
        self.source = source
        self.every = every
        self.topic = STATUS_TOPIC.format(device=device)
        self.last: DeviceStatus | None = None  # the last report sent, without its time
        self.sent_at = 0.0  # monotonic

    async def run(self) -> None:
        """Report at once, then every ``every`` seconds when something changed."""
        if self.source is None:
            return
        while True:
            await self.publish(None)
            await asyncio.sleep(self.every)

    async def publish(self, version: int | None) -> None:
        """Send the report if it changed (or the heartbeat is due, or ``version``, a new
        parameters version, is given)."""
        known = None if self.source is None else self.source(self.device)
        if known is None:
            if version is not None:
                await self._send(DeviceStatus(self.device, version))
            return
        running, counts = known
        await _yield_to_taps(self.journal.gate)
        outbox = await asyncio.to_thread(self.journal.outbox_count, device=self.device)
        status = DeviceStatus(
            self.device,
            running if version is None else version,
            taps=counts.taps,
            accepted=counts.accepted,
            refused=dict(counts.refused),
            outbox=outbox,
            latency_bounds_ms=counts.latency_bounds_ms,
            latency_counts=counts.latency_counts,
        )
        due = time.monotonic() - self.sent_at >= STATUS_HEARTBEAT
        if status != self.last or due or version is not None:
            self.last = status
            await self._send(dataclasses.replace(status, at=datetime.now(CST)))

    async def _send(self, status: DeviceStatus) -> None:
        self.sent_at = time.monotonic()
        await self.client.publish(self.topic, encode_status(status), qos=1, retain=True)


async def _yield_to_taps(gate: TapGate | None) -> None:
    if gate is not None:
        await gate.yield_to_taps()


def _log_ignored(device: str, ignored: AckIgnored) -> None:
    if ignored.reason == "malformed":
        log.warning("device %s: ignored a malformed ack", device)
    elif ignored.reason == "wrong_count":
        # A stale ack from the persistent session: a batch that started at the same row before
        # a reconnect or a restart, when the outbox held fewer rows.  Expected after either and
        # harmless (those rows are in the batch in flight, which the backend de-duplicates), so
        # not a warning: a restart under a backlog had logged one per device each time.
        log.info(
            "device %s: ignored a stale ack for batch %d of %d records (%d in flight under that "
            "id: resent with the rows since)",
            device,
            ignored.batch_id,
            ignored.count,
            ignored.in_flight,
        )
    else:
        log.debug("device %s: ack for batch %d, not in flight", device, ignored.batch_id)

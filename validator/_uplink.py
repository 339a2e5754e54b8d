"""The uplink: the journal's outbox to the backend over MQTT, in batches, until acknowledged.

One MQTT client per device (its own credentials and a stable client id, ``farelab-dev-<id>``,
with a persistent MQTT 5 session), QoS 1.  A batch leaves the outbox only when the backend's
*application* ack for it arrives — the backend publishes that after its own database commit — so
the journal stays the durable store whatever the broker or the network do.  Unacknowledged
batches are sent again after ``ack_timeout``; the backend's de-duplication makes that harmless.
A batch the backend *rejects* (a device its registry does not admit) stays in the outbox and is
sent again with capped backoff, so nothing is lost once the device is registered.
The connection is an explicit state (:class:`backend.LinkState`) with capped jittered backoff;
the first failure is logged loudly, repeats quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from farelab.protocol import (
    ACK_TOPIC,
    BATCH_MAX,
    DEVICE_CLIENT_ID,
    PARAMS_TOPIC,
    STATUS_TOPIC,
    TX_TOPIC,
    Backoff,
    BrokerURL,
    LinkState,
    WireError,
    cancel_and_wait,
    decode_ack,
    encode_batch_records,
    honour_cancellation,
    subscribe_or_raise,
)
from farelab.validator._journal import Journal

__all__ = ["MqttUplink", "UplinkStats"]

log = logging.getLogger("farelab.uplink")


@dataclass
class UplinkStats:
    """Counters a caller (or a test) can watch."""

    state: LinkState = LinkState.DISCONNECTED
    batches_sent: int = 0
    records_acked: int = 0
    resends: int = 0
    rejected: int = 0
    connects: int = 0
    ack_latency_s: list[float] = field(default_factory=list)


@dataclass
class _InFlight:
    ids: list[int]
    payload: bytes
    sent_at: float
    resend_at: float  # when to send it again if no ack has taken it by then


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
    ) -> None:
        """
        Args:
            broker: where the broker is; its user/password serve devices without their own.
            devices: the device ids whose outbox rows this uplink sends.
            batch_size: records per message (1 to 500).
            window: batches in flight per device before waiting for acks.
            ack_timeout: seconds before an unacknowledged batch is sent again.
            passwords: per-device MQTT passwords (the username is the device id).
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
        self._wake = asyncio.Event()
        self._on_params: Callable[[str, bytes], int | None] | None = None

    def attach_params(self, handler: Callable[[str, bytes], int | None]) -> None:
        """Apply parameters the backend publishes for these devices with ``handler``."""
        self._on_params = handler

    def poke(self) -> None:
        """New outbox rows: send without waiting for the next poll."""
        self._wake.set()

    async def run(self, journal: Journal) -> None:
        """One task per device until cancelled."""
        async with asyncio.TaskGroup() as group:
            for device in self.devices:
                group.create_task(self._device_loop(journal, device), name=f"uplink-{device}")

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
        stats = self.stats[device]
        backoff = Backoff()
        rejections = Backoff(base=1.0, cap=60.0)  # the backend refusing this device's batches
        while True:
            honour_cancellation()
            stats.state = LinkState.CONNECTING
            try:
                async with self._client(device) as client:
                    stats.state = LinkState.CONNECTED
                    stats.connects += 1
                    if backoff.failures:
                        log.info("device %s: uplink to %s is back", device, self.broker)
                    backoff.reset()
                    # Without its acks the device would send the same batches for ever: a
                    # refusal is a link failure, logged and retried with backoff.
                    await subscribe_or_raise(client, ACK_TOPIC.format(device=device))
                    if self._on_params is not None:
                        await subscribe_or_raise(client, PARAMS_TOPIC.format(device=device))
                    await self._session(client, journal, device, stats, rejections)
            except aiomqtt.MqttError as exc:
                stats.state = LinkState.BACKOFF
                delay = backoff.next_delay()
                level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "device %s: uplink to %s failed (%s); retrying in %.1f s",
                    device,
                    self.broker,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _session(
        self,
        client: aiomqtt.Client,
        journal: Journal,
        device: str,
        stats: UplinkStats,
        rejections: Backoff,
    ) -> None:
        in_flight: dict[int, _InFlight] = {}
        last_id = 0
        topic = TX_TOPIC.format(device=device)
        taps = journal.tap_gate  # the uplink steps aside while a tap is in progress

        async def fill() -> None:
            nonlocal last_id
            now = time.monotonic()
            for batch_id, flight in list(in_flight.items()):  # acks() pops while we await
                if now >= flight.resend_at:
                    flight.sent_at = now
                    flight.resend_at = now + self.ack_timeout
                    stats.resends += 1
                    await taps.yield_to_taps()
                    await client.publish(topic, flight.payload, qos=1)
                    log.debug("device %s: batch %d sent again", device, batch_id)
            while len(in_flight) < self.window:
                rows = await asyncio.to_thread(
                    journal.outbox_wire, self.batch_size, device=device, after=last_id
                )
                if not rows:
                    return
                batch_id = journal.epoch << 40 | rows[0][0]  # this file's, and its first row
                payload = encode_batch_records(batch_id, device, [raw for _, raw in rows])
                sent = time.monotonic()
                in_flight[batch_id] = _InFlight(
                    [r[0] for r in rows], payload, sent, sent + self.ack_timeout
                )
                last_id = rows[-1][0]
                await taps.yield_to_taps()
                await client.publish(topic, payload, qos=1)
                stats.batches_sent += 1
                log.debug("device %s: batch %d sent (%d records)", device, batch_id, len(rows))

        async def acks() -> None:
            async for message in client.messages:
                honour_cancellation()
                await taps.yield_to_taps()
                if str(message.topic).endswith("/params"):
                    await on_params(bytes(message.payload))
                    continue
                try:
                    ack = decode_ack(bytes(message.payload))
                except (WireError, TypeError):
                    log.warning("device %s: ignored a malformed ack", device)
                    continue
                flight = in_flight.get(ack.batch_id)
                if flight is None:
                    log.debug("device %s: ack for batch %d, not in flight", device, ack.batch_id)
                    continue
                if ack.count != len(flight.ids):
                    # A stale ack from the persistent session: a batch that started at the same
                    # row before a reconnect, when the outbox held fewer rows.  Taking it would
                    # delete rows the backend never saw.
                    log.warning(
                        "device %s: ignored an ack for batch %d of %d records (%d in flight)",
                        device,
                        ack.batch_id,
                        ack.count,
                        len(flight.ids),
                    )
                    continue
                if not ack.committed:
                    # The rows stay in the outbox and this batch in flight, sent again later.
                    stats.rejected += 1
                    delay = rejections.next_delay()
                    flight.resend_at = time.monotonic() + delay
                    level = logging.WARNING if rejections.failures == 1 else logging.DEBUG
                    log.log(
                        level,
                        "device %s: the backend refused batch %d (is the device registered?); "
                        "sending it again in %.1f s",
                        device,
                        ack.batch_id,
                        delay,
                    )
                    continue
                rejections.reset()
                del in_flight[ack.batch_id]
                stats.ack_latency_s.append(time.monotonic() - flight.sent_at)
                if len(stats.ack_latency_s) > 10_000:
                    del stats.ack_latency_s[:5_000]
                await asyncio.to_thread(journal.acknowledge, flight.ids)
                stats.records_acked += len(flight.ids)
                self._wake.set()

        async def on_params(payload: bytes) -> None:
            if self._on_params is None:
                return
            version = self._on_params(device, payload)
            if version is not None:
                status = json.dumps({"device": device, "params_version": version})
                await client.publish(STATUS_TOPIC.format(device=device), status, qos=1, retain=True)

        ack_task = asyncio.create_task(acks(), name=f"uplink-acks-{device}")
        try:
            while True:
                honour_cancellation()
                if ack_task.done():
                    ack_task.result()
                    raise aiomqtt.MqttError("the ack stream ended")
                await fill()
                self._wake.clear()
                # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._wake.wait()
        finally:
            await cancel_and_wait(ack_task)

    def pending(self, journal: Journal) -> int:
        """Outbox rows of these devices not yet acknowledged."""
        return sum(journal.outbox_count(device=d) for d in self.devices)

"""The uplink's rules for one device, without I/O: which outbox rows leave in which batch, how
many batches wait for their acks at once, which ack takes which batch, when a batch goes again.

The shell (:class:`validator.MqttUplink`) owns the broker connection, the journal and the clock.
It asks :meth:`UplinkSession.next_command` what to do now — read outbox rows
(:class:`ReadOutbox`), :class:`Send` a batch, or :class:`Wait` until a given time — and hands
back what happened: :meth:`~UplinkSession.rows_read`, :meth:`~UplinkSession.receive_ack` (which
may answer :class:`Acknowledge`: delete these rows), :meth:`~UplinkSession.connected`,
:meth:`~UplinkSession.connection_lost`.  Time is a number passed in (``time.monotonic()`` in
the shell), so a test runs a session through hours of resends at once, with no broker, database
or thread.

The rules:

- A batch holds up to ``batch_size`` of the device's outbox rows, in id order, after the last
  row sent on this connection.  Its id is the journal's epoch and its first row's id
  (``epoch << 40 | first id``): unique within a journal file, and never the id of a batch of an
  earlier file of the same device.
- At most ``window`` batches wait for their acks; the next one leaves when an ack takes one.
- An ack takes a batch in flight only if it names its id *and* its number of records.  Anything
  else is stale (from the persistent MQTT session: a batch of an earlier connection that began
  at the same row with fewer rows, or of an earlier journal file) and ignored — taking it would
  delete rows the backend never saw.
- A committed ack: the batch is done, its rows may be deleted from the journal, and its records
  count as acknowledged at once (before the journal deletes them: whoever sees the rows gone
  finds them counted).
- A refused ack (the backend does not admit the device): the batch stays in flight and goes
  again after a capped backoff (1 s doubling up to 60 s, jittered), so nothing is lost once the
  device is registered.
- A batch without an ack after ``ack_timeout`` goes again, as it was; the backend de-duplicates.
- A new connection forgets what was in flight and starts again from the outbox's first row: the
  rows still there leave again in new batches.
- An empty outbox is read again after ``poll_interval``, or at once after an ack.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from farelab.protocol import (
    BATCH_MAX,
    Backoff,
    LinkState,
    WireError,
    decode_ack,
    encode_batch_records,
)

__all__ = [
    "AckIgnored",
    "Acknowledge",
    "BatchRefused",
    "ReadOutbox",
    "Send",
    "UplinkSession",
    "UplinkStats",
    "Wait",
]

# Acknowledgement latencies kept for a caller to read: the newest half survives a trim.
_LATENCIES_KEPT = 10_000


@dataclass
class UplinkStats:
    """Counters a caller (or a test) can watch."""

    state: LinkState = LinkState.DISCONNECTED
    batches_sent: int = 0
    records_acked: int = 0
    resends: int = 0
    rejected: int = 0
    connects: int = 0
    #: acks naming no batch in flight, or one with another number of records: ignored
    stale_acks: int = 0
    #: messages on the ack topic that are no ack at all: ignored
    malformed_acks: int = 0
    ack_latency_s: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ReadOutbox:
    """Read up to ``limit`` of the device's outbox rows with ids above ``after``, oldest first,
    and hand them to :meth:`UplinkSession.rows_read` (none: the outbox is drained)."""

    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class Send:
    """Publish ``payload`` (batch ``batch_id`` of ``records`` records); ``again``: a resend."""

    batch_id: int
    payload: bytes
    records: int
    again: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do before ``until`` (the caller's clock), unless an ack arrives first."""

    until: float


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """The backend committed batch ``batch_id``: delete these outbox rows."""

    batch_id: int
    ids: tuple[int, ...]
    latency_s: float


@dataclass(frozen=True, slots=True)
class BatchRefused:
    """The backend refused batch ``batch_id``; it goes again in ``retry_in`` seconds.
    ``failures``: refusals in a row (1 for the first, which deserves a loud log line)."""

    batch_id: int
    retry_in: float
    failures: int


@dataclass(frozen=True, slots=True)
class AckIgnored:
    """An ack that takes nothing: ``malformed`` (no ack at all), ``not_in_flight`` (no batch of
    that id waits), ``wrong_count`` (the batch waiting under that id has ``in_flight`` records,
    the ack names ``count``)."""

    reason: str
    batch_id: int | None = None
    count: int = 0
    in_flight: int = 0


@dataclass(slots=True)
class _Flight:
    ids: tuple[int, ...]
    payload: bytes
    sent_at: float
    resend_at: float  # when to send it again if no ack has taken it by then


class UplinkSession:
    """One device's uplink as a state machine: the caller does the I/O and passes the time."""

    def __init__(
        self,
        *,
        device: str,
        epoch: int,
        batch_size: int = 200,
        window: int = 4,
        ack_timeout: float = 10.0,
        poll_interval: float = 0.5,
        rng: random.Random | None = None,
        stats: UplinkStats | None = None,
    ) -> None:
        """
        Args:
            device: the device id the batches carry.
            epoch: the journal file's epoch (:attr:`validator.Journal.epoch`), in batch ids.
            batch_size: records per batch (1 to ``BATCH_MAX``).
            window: batches waiting for acks at once (at least 1).
            ack_timeout: seconds before a batch without an ack goes again.
            poll_interval: seconds before a drained outbox is read again.
            rng: the jitter of the backoffs (a seeded one makes a test repeatable).
            stats: counters to keep (a fresh :class:`UplinkStats` if none).
        """
        if not 1 <= batch_size <= BATCH_MAX:
            raise ValueError(f"batch_size must be 1 to {BATCH_MAX}")
        if window < 1:
            raise ValueError("window must be at least 1")
        if ack_timeout <= 0 or poll_interval <= 0:
            raise ValueError("ack_timeout and poll_interval must be positive")
        self.device = device
        self.epoch = epoch
        self.batch_size = batch_size
        self.window = window
        self.ack_timeout = ack_timeout
        self.poll_interval = poll_interval
        self.stats = stats if stats is not None else UplinkStats()
        rng = rng or random.Random()
        #: reconnecting to the broker
        self.link = Backoff(rng=rng)
        #: the backend refusing this device's batches (kept across connections)
        self.rejections = Backoff(base=1.0, cap=60.0, rng=rng)
        self._in_flight: dict[int, _Flight] = {}
        self._cursor = 0  # the last row id sent on this connection
        self._read_at: float | None = None  # None: read the outbox at once

    # --- the connection ---------------------------------------------------------------------

    def connecting(self) -> None:
        """The shell is opening a connection."""
        self.stats.state = LinkState.CONNECTING

    def connected(self) -> bool:
        """A connection is up (acks subscribed): start again from the outbox's first row.
        True if it follows failed attempts (the link is back)."""
        self.stats.state = LinkState.CONNECTED
        self.stats.connects += 1
        back = self.link.failures > 0
        self.link.reset()
        self._in_flight.clear()
        self._cursor = 0
        self._read_at = None
        return back

    def connection_lost(self) -> float:
        """The connection failed or ended: seconds to wait before the next attempt.  After it,
        ``self.link.failures`` is 1 for the first failure in a row (log it loudly)."""
        self.stats.state = LinkState.BACKOFF
        return self.link.next_delay()

    # --- sending -----------------------------------------------------------------------------

    @property
    def in_flight(self) -> dict[int, tuple[int, ...]]:
        """The batches waiting for their acks: batch id → its row ids."""
        return {batch_id: flight.ids for batch_id, flight in self._in_flight.items()}

    def next_command(self, now: float) -> Send | ReadOutbox | Wait:
        """What to do at ``now``: a batch due to go again, outbox rows to read, or a wait."""
        for batch_id, flight in self._in_flight.items():
            if now >= flight.resend_at:
                flight.sent_at = now
                flight.resend_at = now + self.ack_timeout
                self.stats.resends += 1
                return Send(batch_id, flight.payload, len(flight.ids), again=True)
        room = len(self._in_flight) < self.window
        if room and (self._read_at is None or now >= self._read_at):
            return ReadOutbox(self._cursor, self.batch_size)
        deadlines = [flight.resend_at for flight in self._in_flight.values()]
        if room and self._read_at is not None:
            deadlines.append(self._read_at)
        return Wait(min(deadlines))

    def rows_read(self, rows: Sequence[tuple[int, bytes]], now: float) -> Send | None:
        """The outbox rows a :class:`ReadOutbox` found, as (id, encoded record): the batch to
        send, or None if there were none (the outbox is read again after ``poll_interval``)."""
        if not rows:
            self._read_at = now + self.poll_interval
            return None
        rows = rows[: self.batch_size]
        ids = tuple(row_id for row_id, _ in rows)
        if ids[0] <= self._cursor:
            raise ValueError(f"rows must follow row {self._cursor}, not start at {ids[0]}")
        batch_id = self.epoch << 40 | ids[0]
        payload = encode_batch_records(batch_id, self.device, [raw for _, raw in rows])
        self._in_flight[batch_id] = _Flight(ids, payload, now, now + self.ack_timeout)
        self._cursor = ids[-1]
        self._read_at = None
        self.stats.batches_sent += 1
        return Send(batch_id, payload, len(ids))

    # --- acks --------------------------------------------------------------------------------

    def receive_ack(self, payload: bytes, now: float) -> Acknowledge | BatchRefused | AckIgnored:
        """An ack message from the backend: what it means for the outbox."""
        try:
            ack = decode_ack(payload)
        except (WireError, TypeError):
            self.stats.malformed_acks += 1
            return AckIgnored("malformed")
        flight = self._in_flight.get(ack.batch_id)
        if flight is None:
            self.stats.stale_acks += 1
            return AckIgnored("not_in_flight", ack.batch_id, ack.count)
        if ack.count != len(flight.ids):
            self.stats.stale_acks += 1
            return AckIgnored("wrong_count", ack.batch_id, ack.count, len(flight.ids))
        if not ack.committed:
            self.stats.rejected += 1
            delay = self.rejections.next_delay()
            flight.resend_at = now + delay
            return BatchRefused(ack.batch_id, delay, self.rejections.failures)
        self.rejections.reset()
        del self._in_flight[ack.batch_id]
        self._read_at = None
        latency = now - flight.sent_at
        self.stats.records_acked += len(flight.ids)
        latencies = self.stats.ack_latency_s
        latencies.append(latency)
        if len(latencies) > _LATENCIES_KEPT:
            del latencies[: _LATENCIES_KEPT // 2]
        return Acknowledge(ack.batch_id, flight.ids, latency)

"""A worker's store sees one batch at a time, in the order the batches came, and each ack
follows its batch's commit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import aiomqtt

from farelab.backend._ingest import Classified
from farelab.backend._service import WorkerStats, _consume
from farelab.backend._store import IngestResult, Store
from farelab.bench.ingest import make_batches
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, LoadAuthority, TacVerifier
from farelab.protocol import ACK_TOPIC, TX_TOPIC, decode_ack, encode_batch

ISSUERS = {DEMO_ISSUER_ID: DEMO_KEYS}


class _Message:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload


class _Client:
    """What ``_consume`` uses of an aiomqtt client: its messages, and publish (recorded)."""

    def __init__(self, messages: list[_Message], events: list[str]) -> None:
        self._messages = messages
        self._events = events

    @property
    def messages(self) -> AsyncIterator[_Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[_Message]:
        for message in self._messages:
            yield message
        await asyncio.Event().wait()  # a subscription stays open

    async def publish(self, topic: str, payload: bytes, **_: Any) -> None:
        device = topic.split("/")[3]
        assert topic == ACK_TOPIC.format(device=device)
        self._events.append(f"ack {device} {decode_ack(payload).batch_id}")


class _Store:
    """A store that takes a while per batch, records what it is asked, and notices overlap."""

    def __init__(self, events: list[str]) -> None:
        self._events = events
        self._busy = threading.Lock()
        self.overlapped = False

    def ingest(
        self, device: str, batch_id: int, rows: Sequence[Classified], *, worker: str = ""
    ) -> IngestResult:
        if not self._busy.acquire(blocking=False):
            self.overlapped = True
            self._busy.acquire()
        try:
            assert all(c.verdict == "ok" for c in rows)
            self._events.append(f"begin {device} {batch_id}")
            time.sleep(0.01)
            self._events.append(f"commit {device} {batch_id}")
        finally:
            self._busy.release()
        return IngestResult(inserted=len(rows))


async def test_batches_are_stored_one_at_a_time_in_order_and_acked_after_their_commit() -> None:
    work = make_batches(1200, 2, 200, run=3)
    # The devices' batches interleaved, as a shared subscription delivers them.
    order = [b for pair in zip(*work.values(), strict=True) for b in pair]
    messages = [_Message(TX_TOPIC.format(device=b.device), encode_batch(b)) for b in order]
    events: list[str] = []
    store = _Store(events)
    client = _Client(messages, events)
    verifier = TacVerifier.of(ISSUERS)
    stats = WorkerStats()
    consumer = asyncio.create_task(
        _consume(
            cast(aiomqtt.Client, client),
            cast(Store, store),
            verifier,
            LoadAuthority(issuers=ISSUERS),
            stats=stats,
            name="w",
        )
    )
    async with asyncio.timeout(30):
        while sum(e.startswith("ack") for e in events) < len(order):
            await asyncio.sleep(0.01)
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)

    assert not store.overlapped
    stored = [e.split(" ", 1)[1] for e in events if e.startswith("begin")]
    assert stored == [f"{b.device} {b.batch_id}" for b in order]
    for b in order:
        key = f"{b.device} {b.batch_id}"
        assert events.index(f"commit {key}") < events.index(f"ack {key}")
    assert stats.batches == len(order)
    assert stats.records == 1200

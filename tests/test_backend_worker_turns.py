"""Under a backlog, a worker's event loop must get its turn between batches, or the MQTT socket
is never read or written — acks stay unsent, keepalives go unanswered and the broker drops the
worker (as it did when batches were ingested on the loop itself, queued messages arriving with
no suspension)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farelab.backend._registry import register
from farelab.backend._service import WorkerStats, _consume
from farelab.backend._store import Store
from farelab.bench.ingest import bench_entry, make_batches
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, LoadAuthority, TacVerifier
from farelab.protocol import TX_TOPIC, decode_ack, encode_batch


@dataclass
class Message:
    topic: str
    payload: bytes


class Backlog:
    """What aiomqtt's message iterator does with messages queued: each comes at once, with no
    suspension; then it waits."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        if self.messages:
            return self.messages.pop(0)
        await asyncio.Event().wait()
        raise StopAsyncIteration


class Client:
    def __init__(self, messages: list[Message]) -> None:
        self.messages = Backlog(messages)
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: Any, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, payload))


def test_the_loop_gets_a_turn_between_batches_of_a_backlog(tmp_path: Path) -> None:
    device = "bench-5-0"
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    register(store, bench_entry(device, 0))
    batches = make_batches(200, 1, 20, run=5)[device]
    messages = [Message(TX_TOPIC.format(device=device), encode_batch(b)) for b in batches]
    client = Client(messages)
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
    authority = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS})
    stats = WorkerStats()
    turns_at_batch: list[int] = []
    ingest = store.ingest

    def counted(*args: Any, **kwargs: Any) -> Any:
        turns_at_batch.append(turns)
        return ingest(*args, **kwargs)

    store.ingest = counted  # type: ignore[method-assign]
    turns = 0

    async def main() -> None:
        nonlocal turns

        async def ticker() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        tick = asyncio.create_task(ticker())
        consume = asyncio.create_task(
            _consume(client, store, verifier, authority, stats=stats, name="w")  # type: ignore[arg-type]
        )
        while stats.batches < len(batches):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the last acks' tasks
        for task in (tick, consume):
            task.cancel()
        await asyncio.gather(tick, consume, return_exceptions=True)

    asyncio.run(main())
    store.close()
    assert len(turns_at_batch) == len(batches) == 10
    # Other tasks ran between every two batches: the socket's reader and writer among them.
    assert all(b > a for a, b in itertools.pairwise(turns_at_batch))
    acks = [decode_ack(payload) for _, payload in client.published]
    assert sorted(a.batch_id for a in acks) == [b.batch_id for b in batches]
    assert all(a.committed for a in acks)

"""The backend's asyncio shell: ingest workers on an MQTT 5 shared subscription.

Each worker decodes a batch, verifies every TAC, stores the batch in one database transaction
(de-duplicated there), *then* publishes the application ack the device is waiting for.  A worker
killed between commit and ack costs only a resend, which the ledger absorbs as duplicates.  Bad
payloads go to the quarantine table with their reason; nothing here raises on input.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiomqtt

from backend._broker import (
    ACK_TOPIC,
    PARAMS_TOPIC,
    SHARED_TX,
    Backoff,
    BrokerURL,
    honour_cancellation,
)
from backend._ingest import classify
from backend._loads import LOAD_RESP, SHARED_LOAD_REQ, ensure_schema, handle_load_message
from backend._params import devices_in, next_params
from backend._store import Store
from backend._wire import Ack, WireError, decode_batch, encode_ack
from card import IssuerKeys, LoadAuthority, TacVerifier

__all__ = ["WorkerStats", "run_worker", "run_workers"]

log = logging.getLogger("farelab.backend")


@dataclass
class WorkerStats:
    """What one worker has done."""

    batches: int = 0
    records: int = 0
    quarantined: int = 0


async def _handle(
    client: aiomqtt.Client,
    store: Store,
    verifier: TacVerifier,
    *,
    topic: str,
    payload: bytes,
    stats: WorkerStats,
    name: str,
    acks: set[asyncio.Task[None]],
) -> None:
    parts = topic.split("/")
    device = parts[3] if len(parts) == 5 else ""
    try:
        batch = decode_batch(payload)
    except WireError as exc:
        await asyncio.to_thread(store.quarantine, topic, exc.reason, str(exc), payload)
        stats.quarantined += 1
        return
    if batch.device != device:
        detail = f"batch of {batch.device!r} published on {device!r}'s topic"
        await asyncio.to_thread(store.quarantine, topic, "device_mismatch", detail, payload)
        stats.quarantined += 1
        return
    rows = classify(batch, verifier)
    result = await asyncio.to_thread(store.ingest, device, batch.batch_id, rows, worker=name)
    ack = encode_ack(Ack(batch.batch_id, len(rows), committed=True))
    # The ack goes out after the commit, but the next batch need not wait for the broker's
    # PUBACK of it: that round trip per batch left the worker idle half the time.
    task = asyncio.create_task(
        client.publish(ACK_TOPIC.format(device=device), ack, qos=1),
        name=f"{name}-ack-{device}-{batch.batch_id}",
    )
    acks.add(task)
    task.add_done_callback(_ack_sent(acks, name))
    if result.clones:
        # A cloned card rides until every device refuses it: hotlist it everywhere at once.
        params = await asyncio.to_thread(next_params, store)
        message = json.dumps(params)
        for target in await asyncio.to_thread(devices_in, store):
            await client.publish(PARAMS_TOPIC.format(device=target), message, qos=1, retain=True)
        log.warning(
            "%s: cloned card(s) %s hotlisted (parameters version %s)",
            name,
            ", ".join(result.clones),
            params["version"],
        )
    stats.batches += 1
    stats.records += len(rows)


def _ack_sent(acks: set[asyncio.Task[None]], name: str) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        acks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The batch is committed: the device sends it again and the ledger absorbs it.
            log.debug("%s: ack not delivered: %s", name, task.exception())

    return done


async def run_worker(
    broker: BrokerURL,
    db_url: str,
    *,
    issuers: Mapping[bytes, IssuerKeys],
    group: str = "farelab-backend",
    name: str = "backend-1",
    stop: asyncio.Event | None = None,
    stats: WorkerStats | None = None,
) -> None:
    """One ingest worker until ``stop`` is set."""
    stop = stop or asyncio.Event()
    stats = stats or WorkerStats()
    store = Store(db_url)
    verifier = TacVerifier.of(issuers)
    authority = LoadAuthority(issuers=issuers)
    ensure_schema(store)
    backoff = Backoff()
    try:
        while not stop.is_set():
            try:
                async with broker.client(
                    identifier=f"farelab-{name}", keepalive=15, timeout=5
                ) as client:
                    if broker.mqtt5:
                        await client.subscribe(SHARED_TX.format(group=group), qos=1)
                        await client.subscribe(SHARED_LOAD_REQ.format(group=group), qos=1)
                    else:  # no shared subscriptions before MQTT 5: one worker takes all
                        await client.subscribe(SHARED_TX.split("/", 2)[2], qos=1)
                        await client.subscribe(SHARED_LOAD_REQ.split("/", 2)[2], qos=1)
                    backoff.reset()
                    log.info("%s: ingesting from %s", name, broker)
                    reader = asyncio.create_task(
                        _consume(client, store, verifier, authority, stats=stats, name=name)
                    )
                    stopper = asyncio.create_task(stop.wait())
                    done, _ = await asyncio.wait(
                        {reader, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in (reader, stopper):
                        task.cancel()
                    if reader in done:
                        reader.result()
            except aiomqtt.MqttError as exc:
                delay = backoff.next_delay()
                level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "%s: broker %s unavailable (%s); retrying in %.1f s",
                    name,
                    broker,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
    finally:
        store.close()


async def _consume(
    client: aiomqtt.Client,
    store: Store,
    verifier: TacVerifier,
    authority: LoadAuthority,
    *,
    stats: WorkerStats,
    name: str,
) -> None:
    acks: set[asyncio.Task[None]] = set()
    async for message in client.messages:
        honour_cancellation()
        payload = message.payload
        raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
        topic = str(message.topic)
        if topic.endswith("/load/req"):
            kiosk = topic.split("/")[3]
            answer = await asyncio.to_thread(
                handle_load_message, store, authority, verifier, kiosk, bytes(raw)
            )
            await client.publish(LOAD_RESP.format(kiosk=kiosk), json.dumps(answer), qos=1)
            continue
        await _handle(
            client,
            store,
            verifier,
            topic=str(message.topic),
            payload=bytes(raw),
            stats=stats,
            name=name,
            acks=acks,
        )


def _worker_main(
    broker: str, db_url: str, issuers: dict[bytes, IssuerKeys], group: str, name: str
) -> None:
    logging.basicConfig(level=logging.INFO, format=f"farelab backend {name}: %(message)s")
    stop = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(
            BrokerURL.parse(broker), db_url, issuers=issuers, group=group, name=name, stop=stop
        )

    asyncio.run(main())


def run_workers(
    broker: str,
    db_url: str,
    *,
    issuers: dict[bytes, IssuerKeys],
    workers: int,
    group: str = "farelab-backend",
) -> int:
    """``workers`` processes on one shared subscription until SIGINT/SIGTERM; exit status."""
    Store(db_url).close()  # create the schema once, and fail early on a bad URL
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(broker, db_url, issuers, group, f"worker-{i}"),
            name=f"farelab-backend-{i}",
        )
        for i in range(1, workers + 1)
    ]
    for proc in procs:
        proc.start()
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        for i, proc in enumerate(procs):
            if not proc.is_alive() and not stopping:
                log.warning("worker %d exited (%s); starting it again", i + 1, proc.exitcode)
                procs[i] = ctx.Process(
                    target=_worker_main, args=(broker, db_url, issuers, group, f"worker-{i + 1}")
                )
                procs[i].start()
        time.sleep(0.5)
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            log.warning("a worker did not stop within 10 s of SIGTERM; killing it")
            proc.kill()
            proc.join()
    return 0

"""The backend's asyncio shell: ingest workers on an MQTT 5 shared subscription.

Each worker decodes a batch, verifies every TAC, stores the batch in one database transaction
(de-duplicated there), *then* publishes the application ack the device is waiting for.  A worker
killed between commit and ack costs only a resend, which the ledger absorbs as duplicates.  Bad
payloads go to the quarantine table with their reason; nothing here raises on input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from farelab.backend._ingest import classify
from farelab.backend._loads import ensure_schema, handle_load_message
from farelab.backend._params import devices_in, next_params
from farelab.backend._store import Store
from farelab.card import IssuerKeys, LoadAuthority, TacVerifier
from farelab.protocol import (
    ACK_TOPIC,
    LOAD_RESP,
    PARAMS_TOPIC,
    SHARED_LOAD_REQ,
    SHARED_TX,
    Ack,
    Backoff,
    BrokerURL,
    SubscriptionRefusedError,
    WireError,
    check_client_id,
    decode_batch,
    encode_ack,
    encode_params,
    honour_cancellation,
    subscribe_or_raise,
)

__all__ = [
    "LOAD_REQUEST_MAX",
    "ConfigurationError",
    "WorkerStats",
    "instance_id",
    "run_worker",
    "run_workers",
]

log = logging.getLogger("farelab.backend")

# A kiosk's request is a few hundred bytes of JSON; anything much larger is refused before it
# is parsed (a batch's own limit is decode_batch's).
LOAD_REQUEST_MAX = 16 * 1024
# A worker that exits with this status met a configuration error: starting it again would only
# meet it again, so the supervisor stops.
CONFIG_ERROR = 2
# How long a worker whose supervisor died may take to stop cleanly before it exits anyway.
_ORPHAN_GRACE = 10.0


class ConfigurationError(ValueError):
    """A worker cannot run as it is configured (its broker URL or CA file, its group, an account
    the broker refuses its subscriptions): starting it again would only meet this again.  Only
    this stops the backend; what a message does while it is handled never is one."""


# CONNACK codes that say who logs in, not whether the broker is up: bad user name or password,
# not authorized (MQTT 3.1.1's 4 and 5, MQTT 5's 0x86 and 0x87) — retrying cannot change them.
_LOGIN_REFUSED = frozenset({4, 5, 0x86, 0x87})


def _login_refused(exc: aiomqtt.MqttError) -> bool:
    if not isinstance(exc, MqttConnectError):
        return False
    code = exc.rc if isinstance(exc.rc, int) else getattr(exc.rc, "value", None)
    return code in _LOGIN_REFUSED


def instance_id() -> str:
    """``<host>-<6 random hex digits>``: one backend instance on one host, so that the MQTT
    client ids of backends sharing a broker never collide (a second client with the same id
    takes the session over, and the two throw each other off for ever)."""
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname().split(".")[0])[:24].strip("-.")
    return f"{host or 'host'}-{secrets.token_hex(3)}"


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
    if result.rejected:
        # Refused, not lost: the rejected ack tells the device to keep the rows and send them
        # again later, when the registry may know it.
        detail = f"batch {batch.batch_id} of {len(rows)} record(s) from {device!r}"
        await asyncio.to_thread(store.quarantine, topic, result.rejected, detail, payload)
        stats.quarantined += 1
    ack = encode_ack(Ack(batch.batch_id, len(rows), committed=not result.rejected))
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
        message = encode_params(params)
        for target in await asyncio.to_thread(devices_in, store):
            await client.publish(PARAMS_TOPIC.format(device=target), message, qos=1, retain=True)
        log.warning(
            "%s: cloned card(s) %s hotlisted (parameters version %s)",
            name,
            ", ".join(result.clones),
            params.version,
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
    client_id: str | None = None,
    stop: asyncio.Event | None = None,
    stats: WorkerStats | None = None,
) -> None:
    """One ingest worker until ``stop`` is set.  ``client_id``: its MQTT client id, unique on
    the broker (default ``farelab-backend-<host>-<random>-<name>``)."""
    try:
        check_client_id(group, "shared-subscription group")
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    client_id = client_id or f"farelab-backend-{instance_id()}-{name}"
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
                async with broker.client(identifier=client_id, keepalive=15, timeout=5) as client:
                    for shared in (SHARED_TX, SHARED_LOAD_REQ):
                        # no shared subscriptions before MQTT 5: one worker takes all
                        topic = (
                            shared.format(group=group) if broker.mqtt5 else shared.split("/", 2)[2]
                        )
                        try:
                            await subscribe_or_raise(client, topic)
                        except SubscriptionRefusedError as exc:
                            raise ConfigurationError(
                                f"{exc}; log in as the backend's account, with a --group the "
                                "broker's configuration allows"
                            ) from None
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
                if _login_refused(exc):
                    raise ConfigurationError(
                        f"the broker refused the login ({exc}); log in as the backend's account"
                    ) from None
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
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
            if len(raw) > LOAD_REQUEST_MAX:
                detail = f"{len(raw)} bytes, at most {LOAD_REQUEST_MAX}"
                await asyncio.to_thread(store.quarantine, topic, "oversize", detail, bytes(raw))
                stats.quarantined += 1
                refusal = {"id": None, "result": "error", "reason": "oversize", "detail": detail}
                await client.publish(LOAD_RESP.format(kiosk=kiosk), json.dumps(refusal), qos=1)
                continue
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
    broker: str,
    db_url: str,
    *,
    issuers: dict[bytes, IssuerKeys],
    group: str,
    name: str,
    client_id: str,
) -> None:
    logging.basicConfig(level=logging.INFO, format=f"farelab backend {name}: %(message)s")
    stop = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        parent = multiprocessing.parent_process()
        if parent is not None:
            # The supervisor's end of a pipe: readable once it has died, even by SIGKILL.  An
            # orphan would keep its session and fight the restarted supervisor's worker for it.
            def orphaned() -> None:
                loop.remove_reader(parent.sentinel)
                log.warning("%s: the supervisor is gone; stopping", name)
                stop.set()
                loop.call_later(_ORPHAN_GRACE, os._exit, 1)

            loop.add_reader(parent.sentinel, orphaned)
        try:
            url = BrokerURL.parse(broker)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        await run_worker(
            url,
            db_url,
            issuers=issuers,
            group=group,
            name=name,
            client_id=client_id,
            stop=stop,
        )

    try:
        asyncio.run(main())
    except ConfigurationError as exc:
        # A ValueError from handling a message is not one: that worker fails as any crash
        # does and is started again, and the others go on.
        problem = str(exc)
    else:
        return
    log.error("%s: %s", name, problem)
    sys.exit(CONFIG_ERROR)


def run_workers(
    broker: str,
    db_url: str,
    *,
    issuers: dict[bytes, IssuerKeys],
    workers: int,
    group: str = "farelab-backend",
    http: tuple[str, int] | None = None,
    on_dashboard: Callable[[tuple[str, int]], None] | None = None,
) -> int:
    """``workers`` processes on one shared subscription until SIGINT/SIGTERM; exit status
    (2 if a worker met a configuration error).  Client ids are
    ``farelab-backend-<host>-<random>-w<N>``, one instance id per call; a worker stops by
    itself when this process dies.  ``http``: where this process serves the live dashboard
    (host, port), its subscriber's client id ``farelab-backend-<host>-<random>-dash``;
    ConfigurationError if it cannot listen there; ``on_dashboard`` is told the address it
    listens on (the port chosen for port 0) once it does."""
    check_client_id(group, "shared-subscription group")
    Store(db_url).close()  # create the schema once, and fail early on a bad URL
    ctx = multiprocessing.get_context("spawn")
    instance = instance_id()
    dashboard = None
    if http is not None:
        from farelab.backend._dashboard import Dashboard  # noqa: PLC0415 - only with --http

        try:
            dashboard = Dashboard(
                BrokerURL.parse(broker),
                db_url,
                host=http[0],
                port=http[1],
                client_id=f"farelab-backend-{instance}-dash",
            )
        except OSError as exc:
            raise ConfigurationError(
                f"--http {http[0]}:{http[1]}: cannot listen there: {exc.strerror or exc}"
            ) from None
        log.info("dashboard on http://%s:%d/", *dashboard.address)
        if on_dashboard is not None:
            on_dashboard(dashboard.address)

    def start(i: int) -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(
            target=_worker_main,
            args=(broker, db_url),
            kwargs={
                "issuers": issuers,
                "group": group,
                "name": f"worker-{i}",
                "client_id": f"farelab-backend-{instance}-w{i}",
            },
            name=f"farelab-backend-{i}",
        )
        proc.start()
        return proc

    procs = [start(i) for i in range(1, workers + 1)]
    stopping = False
    status = 0

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
            if proc.is_alive() or stopping:
                continue
            if proc.exitcode == CONFIG_ERROR:
                log.error("worker %d met a configuration error; stopping the backend", i + 1)
                status = CONFIG_ERROR
                stop(signal.SIGTERM, None)
                break
            log.warning("worker %d exited (%s); starting it again", i + 1, proc.exitcode)
            procs[i] = start(i + 1)
        time.sleep(0.5)
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            log.warning("a worker did not stop within 10 s of SIGTERM; killing it")
            proc.kill()
            proc.join()
    if dashboard is not None:
        dashboard.close()
    return status

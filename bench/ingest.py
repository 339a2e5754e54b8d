"""End-to-end ingest throughput and ack latency: batches of genuine transactions (real TACs)
published by simulated devices to a broker, ingested by ``farelab backend run`` workers, timed
until every batch's application ack is back.

    python -m farelab.bench.ingest --broker mqtt://127.0.0.1:PORT --db URL --n 20000 [--devices 10]
    python -m farelab.bench.ingest --postgres postgresql://postgres@127.0.0.1/test --n 20000
    python -m farelab.bench.ingest --db sqlite:///ledger.db --n 20000

With ``--broker`` the backend must already run against that broker (``farelab backend run
--broker … --db …``), and ``--db`` names its ledger, where the bench registers its devices.
With ``--postgres`` the bench starts its own backend (and, without ``--broker``, its own
Mosquitto) on a fresh schema of that database, and drops it afterwards.  With ``--db`` alone it
starts its own Mosquitto and backend on that ledger (``farelab bench``'s SQLite ingest, on a
ledger of your choosing: a new file measures an empty ledger, an existing one a grown one).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

import aiomqtt
import psycopg
from psycopg import sql

from farelab.backend import DeviceEntry, Mosquitto, Store, register
from farelab.bench._backend import running_backend
from farelab.card import CST, DEMO_ISSUER_ID, DEMO_KEYS, Alg, TacVerifier
from farelab.protocol import (
    ACK_TOPIC,
    TX_TOPIC,
    Ack,
    Batch,
    BrokerURL,
    Record,
    decode_ack,
    encode_batch,
)

__all__ = [
    "acks_of",
    "bench_entry",
    "main",
    "make_batches",
    "measure",
    "measure_own",
    "measure_postgres",
    "postgres_schema",
    "register_bench_devices",
]

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


# No ack for this long while batches are out: the backend lost them (the bench does not send
# again, as a device would), so the measure fails instead of waiting for ever.
ACK_SILENCE_S = 60.0


async def acks_of(client: aiomqtt.Client, unacked: Callable[[], int]) -> AsyncIterator[Ack]:
    """The application acks arriving on ``client``; :class:`TimeoutError` naming ``unacked()``
    batches when none comes for :data:`ACK_SILENCE_S`."""
    messages = aiter(client.messages)
    while True:
        try:
            async with asyncio.timeout(ACK_SILENCE_S):  # not wait_for: see honour_cancellation
                message = await anext(messages)
        except TimeoutError:
            raise TimeoutError(
                f"no ack for {ACK_SILENCE_S:g} s with {unacked()} batch(es) unacknowledged"
            ) from None
        yield decode_ack(bytes(message.payload))


def bench_entry(device: str, index: int) -> DeviceEntry:
    """The registry's entry for the bench's ``index``-th synthetic bus validator ``device``
    (:func:`make_batches` makes its records so)."""
    terminal = (0xB000_0000 + index).to_bytes(6, "big").hex().upper()
    return DeviceEntry(
        id=device, role="validator", operator="BENCH", kinds=frozenset({"bus"}), terminal=terminal
    )


def register_bench_devices(db_url: str, devices: Sequence[str]) -> None:
    """Register :func:`make_batches`' devices (``bench-RUN-INDEX``) in the ledger at ``db_url``."""
    store = Store(db_url)
    try:
        for device in devices:
            register(store, bench_entry(device, int(device.rsplit("-", 1)[1])))
    finally:
        store.close()


def make_batches(
    n: int,
    devices: int,
    batch: int,
    run: int,
    cards_per_device: int = 200,
    *,
    terminal: bytes | None = None,
    operator: str = "BENCH",
) -> dict[str, list[Batch]]:
    """``n`` genuine purchases spread over ``devices`` (each serving ``cards_per_device``
    cards), cut into batches; each device's records carry its :func:`bench_entry` terminal
    and operator, or ``terminal`` and ``operator`` when given (another device's records)."""
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
    day, clock = bytes.fromhex("20261123"), bytes.fromhex("083000")
    at_ms = int(datetime(2026, 11, 23, 8, 30, tzinfo=CST).timestamp() * 1000)  # the TAC's
    out: dict[str, list[Batch]] = {}
    for d in range(devices):
        device = f"bench-{run}-{d}"
        own = terminal or bytes.fromhex(bench_entry(device, d).terminal)
        records = []
        for i in range(n // devices):
            # A day's traffic: each card rides several times (its counter goes up), so the
            # backend's per-card key cache works as it does in production.
            card, counter = i % cards_per_device, i // cards_per_device
            serial = bytes.fromhex(f"{run:04d}{d:06d}{card:010d}")
            tac = verifier.purchase_tac(
                alg=Alg.TDES,
                issuer_id=DEMO_ISSUER_ID,
                serial8=serial[2:],
                amount=200,
                tx_type=9,
                terminal=own,
                ttc=i + 1,
                day=day,
                time=clock,
            )
            assert tac is not None
            records.append(
                Record(
                    i + 1,
                    "completed",
                    9,
                    "bus",
                    "3des",
                    serial,
                    DEMO_ISSUER_ID,
                    counter,
                    i + 1,
                    200,
                    1_000_000 - 200 * counter,
                    own,
                    day,
                    clock,
                    at_ms,
                    bytes(8),
                    0,
                    operator,
                    tac,
                )
            )
        out[device] = [
            Batch(k + 1, device, tuple(records[k * batch : (k + 1) * batch]))
            for k in range((len(records) + batch - 1) // batch)
        ]
    return out


async def _device(
    broker: BrokerURL,
    device: str,
    batches: list[tuple[int, bytes]],
    window: int,
    latencies: list[float],
) -> None:
    """Publish a device's ``batches`` (batch id, payload), at most ``window`` unacknowledged,
    until every one is acknowledged."""
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"farelab-{device}", protocol=broker.version
    ) as client:
        await client.subscribe(ACK_TOPIC.format(device=device), qos=1)
        topic = TX_TOPIC.format(device=device)
        sent: dict[int, float] = {}
        pending = list(batches)
        pending.reverse()  # popped from the end: the first batch first
        acked = 0
        while len(sent) < window and pending:
            batch_id, payload = pending.pop()
            sent[batch_id] = time.perf_counter()
            await client.publish(topic, payload, qos=1)
        async for ack in acks_of(client, lambda: len(sent)):
            start = sent.pop(ack.batch_id, None)
            if start is None:
                continue
            latencies.append(time.perf_counter() - start)
            acked += 1
            if pending:
                batch_id, payload = pending.pop()
                sent[batch_id] = time.perf_counter()
                await client.publish(topic, payload, qos=1)
            if acked == len(batches):
                return


async def measure(
    broker: BrokerURL, n: int, devices: int, batch: int, window: int = 2, *, ledger: str
) -> dict[str, float]:
    """Register the devices in the backend's ``ledger``, publish (every batch encoded before
    the clock starts), and wait for every ack; tx/s and ack latency percentiles (ms)."""
    run = int(time.time()) % 10_000
    work = make_batches(n, devices, batch, run)
    register_bench_devices(ledger, list(work))
    # Encoded before the clock starts: the devices' encoding is not the backend's work, and
    # the publishers share the backend's CPUs.
    payloads = {d: [(b.batch_id, encode_batch(b)) for b in bs] for d, bs in work.items()}
    latencies: list[float] = []
    start = time.perf_counter()
    await asyncio.gather(*(_device(broker, d, p, window, latencies) for d, p in payloads.items()))
    elapsed = time.perf_counter() - start
    total = sum(len(b.records) for bs in work.values() for b in bs)
    latencies.sort()
    return {
        "transactions": total,
        "seconds": elapsed,
        "tx_per_s": total / elapsed,
        "ack_p50_ms": statistics.median(latencies) * 1000,
        "ack_p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


@contextmanager
def postgres_schema(postgres: str = POSTGRES) -> Iterator[str]:
    """A fresh schema of the ``postgres`` database, dropped on exit; yields the ledger URL
    that puts a backend's tables in it."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    ledger = f"{postgres}{'&' if '?' in postgres else '?'}options=-csearch_path%3D{schema}"
    try:
        admin = psycopg.connect(postgres, autocommit=True)
    except psycopg.Error as exc:
        raise RuntimeError(f"PostgreSQL at {postgres}: {exc}".strip()) from None
    with admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            yield ledger
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def measure_postgres(
    broker_url: str,
    n: int,
    folder: Path,
    *,
    postgres: str = POSTGRES,
    workers: int = 2,
    devices: int = 10,
    batch: int = 200,
) -> dict[str, float]:
    """End-to-end ingest into a PostgreSQL ledger: a backend of ``workers`` workers started on
    ``broker_url`` with a fresh schema of the ``postgres`` database (dropped afterwards), then
    :func:`measure`.  Figures ``ingest_pg_tx_per_s``, ``ingest_pg_ack_p50_ms`` and
    ``ingest_pg_ack_p99_ms``; the backend's output goes to ``folder``."""
    with (
        postgres_schema(postgres) as ledger,
        running_backend(broker_url, ledger, workers=workers, log=folder / "backend-postgres.log"),
    ):
        result = asyncio.run(measure(BrokerURL.parse(broker_url), n, devices, batch, ledger=ledger))
    return {
        "ingest_pg_tx_per_s": result["tx_per_s"],
        "ingest_pg_ack_p50_ms": result["ack_p50_ms"],
        "ingest_pg_ack_p99_ms": result["ack_p99_ms"],
    }


def measure_own(
    ledger: str, n: int, folder: Path, *, workers: int = 2, devices: int = 10, batch: int = 200
) -> dict[str, float]:
    """End-to-end ingest through a Mosquitto and a backend of ``workers`` workers that the bench
    starts on ``ledger`` (their output goes to ``folder``), then :func:`measure`."""
    broker = Mosquitto(folder)
    broker.start()
    try:
        with running_backend(broker.url, ledger, workers=workers, log=folder / "backend.log"):
            return asyncio.run(
                measure(BrokerURL.parse(broker.url), n, devices, batch, ledger=ledger)
            )
    finally:
        broker.stop()


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--broker", help="the broker (default with --postgres or --db alone: a Mosquitto)"
    )
    parser.add_argument("--postgres", metavar="URL", help="start a backend on this database")
    parser.add_argument(
        "--db",
        metavar="URL",
        help="with --broker: the running backend's ledger; alone: start a backend on it",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    if args.postgres is None and args.db is not None and args.broker is None:
        with tempfile.TemporaryDirectory(prefix="farelab-ingest-") as tmp:
            result = measure_own(
                args.db,
                args.n,
                Path(tmp),
                workers=args.workers,
                devices=args.devices,
                batch=args.batch,
            )
    elif args.postgres is None:
        if args.broker is None or args.db is None:
            parser.error(
                "--db (the ledger), with --broker when a backend runs on it (or --postgres)"
            )
        result = asyncio.run(
            measure(BrokerURL.parse(args.broker), args.n, args.devices, args.batch, ledger=args.db)
        )
    else:
        with ExitStack() as stack:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="farelab-pg-")))
            broker_url = args.broker
            if broker_url is None:
                broker = Mosquitto(folder)
                broker.start()
                stack.callback(broker.stop)
                broker_url = broker.url
            result = measure_postgres(
                broker_url,
                args.n,
                folder,
                postgres=args.postgres,
                workers=args.workers,
                devices=args.devices,
                batch=args.batch,
            )
    for key, value in result.items():
        print(f"{key:>14}: {value:,.2f}")


if __name__ == "__main__":
    main()

"""End-to-end ingest throughput and ack latency: batches of genuine transactions (real TACs)
published by simulated devices to a broker, ingested by ``farelab backend run`` workers, timed
until every batch's application ack is back.

    python -m bench.ingest --broker mqtt://127.0.0.1:PORT --n 20000 [--devices 10] [--batch 200]

The backend must already run against that broker (``farelab backend run --broker … --db …``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime

import aiomqtt

from backend._broker import ACK_TOPIC, TX_TOPIC, BrokerURL
from backend._wire import Batch, Record, decode_ack, encode_batch
from card import DEMO_ISSUER_ID, DEMO_KEYS, Alg, TacVerifier

__all__ = ["main", "make_batches"]


def make_batches(
    n: int, devices: int, batch: int, run: int, cards_per_device: int = 200
) -> dict[str, list[Batch]]:
    """``n`` genuine purchases spread over ``devices`` (each serving ``cards_per_device``
    cards), cut into batches."""
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
    day, clock = bytes.fromhex("20261123"), bytes.fromhex("083000")
    at_ms = int(datetime(2026, 11, 23, tzinfo=UTC).timestamp() * 1000)
    out: dict[str, list[Batch]] = {}
    for d in range(devices):
        device = f"bench-{run}-{d}"
        terminal = (0xB000_0000 + d).to_bytes(6, "big")
        records = []
        for i in range(n // devices):
            # A day's traffic: each card rides several times (its counter goes up), so the
            # backend's per-card key cache works as it does in production.
            card, counter = i % cards_per_device, i // cards_per_device
            serial = f"{run:04d}{d:06d}{card:010d}"
            serial8 = bytes.fromhex(serial)[2:]
            tac = verifier.purchase_tac(
                alg=Alg.TDES,
                issuer_id=DEMO_ISSUER_ID,
                serial8=serial8,
                amount=200,
                tx_type=9,
                terminal=terminal,
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
                    DEMO_ISSUER_ID.hex(),
                    counter,
                    i + 1,
                    200,
                    1_000_000 - 200 * counter,
                    terminal.hex(),
                    day.hex(),
                    clock.hex(),
                    at_ms,
                    "00" * 8,
                    0,
                    "BENCH",
                    tac.hex(),
                )
            )
        out[device] = [
            Batch(k + 1, device, tuple(records[k * batch : (k + 1) * batch]))
            for k in range((len(records) + batch - 1) // batch)
        ]
    return out


async def _device(
    broker: BrokerURL, device: str, batches: list[Batch], window: int, latencies: list[float]
) -> None:
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"farelab-{device}", protocol=broker.version
    ) as client:
        await client.subscribe(ACK_TOPIC.format(device=device), qos=1)
        sent: dict[int, float] = {}
        pending = list(batches)
        acked = 0
        while len(sent) < window and pending:
            b = pending.pop(0)
            sent[b.batch_id] = time.perf_counter()
            await client.publish(TX_TOPIC.format(device=device), encode_batch(b), qos=1)
        async for message in client.messages:
            ack = decode_ack(bytes(message.payload))
            start = sent.pop(ack.batch_id, None)
            if start is None:
                continue
            latencies.append(time.perf_counter() - start)
            acked += 1
            if pending:
                b = pending.pop(0)
                sent[b.batch_id] = time.perf_counter()
                await client.publish(TX_TOPIC.format(device=device), encode_batch(b), qos=1)
            if acked == len(batches):
                return


async def measure(
    broker: BrokerURL, n: int, devices: int, batch: int, window: int = 2
) -> dict[str, float]:
    """Publish and wait for every ack; tx/s and ack latency percentiles (ms)."""
    run = int(time.time()) % 10_000
    work = make_batches(n, devices, batch, run)
    latencies: list[float] = []
    start = time.perf_counter()
    await asyncio.gather(*(_device(broker, d, b, window, latencies) for d, b in work.items()))
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


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    result = asyncio.run(measure(BrokerURL.parse(args.broker), args.n, args.devices, args.batch))
    for key, value in result.items():
        print(f"{key:>14}: {value:,.2f}")


if __name__ == "__main__":
    main()

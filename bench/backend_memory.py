"""The backend's memory across a long ingest: ``n`` genuine transactions (real TACs) streamed
through the broker into a running backend while the resident set of its processes (the
supervisor and every worker) is sampled.

    python -m farelab.bench.backend_memory --n 10000000 [--cards 200000] [--devices 8] [--workers 2]

The command line starts its own Mosquitto and backend (SQLite ledger in a temporary folder),
prints the figures as JSON on stdout and its progress on stderr.

The traffic is a city's day: ``cards`` cards each riding again and again (its counter and TTC
go up), in an order that jumps across the card range, on several devices.  Nothing is
prepared in advance: each device's batches are generated when the previous ones are
acknowledged, so the producer's memory does not grow with ``n``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt

from farelab.backend import DeviceEntry, Mosquitto, Store, classify, register
from farelab.bench._backend import process_tree, rss_mb, running_backend
from farelab.bench.ingest import acks_of
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, Alg, TacVerifier
from farelab.protocol import ACK_TOPIC, TX_TOPIC, BrokerURL, decode_batch, encode_batch_records

__all__ = ["Traffic", "main", "measure_backend_rss"]

# The wire's record v1 (the bench packs records directly: a Record object and encode_record
# per transaction would cost the producer more CPU than the backend spends).
_RECORD = struct.Struct(">IBBBB10s8sHIII6s4s3sq8sB8s4s")
_COMPLETED, _BUS, _TDES = 0, 0, 0
_PURCHASE = 9
_FARE = 200
_DAY, _TIME = bytes.fromhex("20261123"), bytes.fromhex("083000")
_AT_MS = int(datetime(2026, 11, 23, 0, 30, tzinfo=UTC).timestamp() * 1000)
_STRIDE = 1_000_003  # a prime: consecutive rides jump across the card range


@dataclass(frozen=True)
class Traffic:
    """``n`` purchases by ``cards`` cards on ``devices`` devices, ``batch`` records a batch.

    Transaction ``t`` goes to device ``t mod devices``; in round ``t div cards`` every card
    rides once, in a scrambled order, so each card's counter is its round: unique without any
    state.  ``run`` keeps card serials and device ids apart from other runs on the same ledger.
    """

    n: int
    cards: int = 200_000
    devices: int = 8
    batch: int = 200
    run: int = 0
    verifier: TacVerifier = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n < 1 or self.cards < 1 or self.devices < 1 or not 1 <= self.batch <= 500:
            raise ValueError(f"bad traffic shape {self}")
        if math.gcd(_STRIDE, self.cards) != 1:
            raise ValueError(f"cards must not be a multiple of {_STRIDE}")
        if self.n // self.cards >= 0xFFFF:
            raise ValueError("more than 65 535 rides per card: use more cards")
        # Every card's MAC key is set up once, as the backend's cache does.
        verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS}, cache_size=self.cards)
        object.__setattr__(self, "verifier", verifier)

    def device_id(self, d: int) -> str:
        """The id of device ``d``."""
        return f"rss-{self.run}-{d}"

    def entries(self) -> list[DeviceEntry]:
        """The registry's entries for this run's devices (bus validators, as records say)."""
        return [
            DeviceEntry(
                id=self.device_id(d),
                role="validator",
                operator="BENCH",
                kinds=frozenset({"bus"}),
                terminal=(0xC000_0000 + d).to_bytes(6, "big").hex().upper(),
                line=1,
            )
            for d in range(self.devices)
        ]

    def share(self, d: int) -> int:
        """How many transactions device ``d`` sends."""
        return len(range(d, self.n, self.devices))

    def payloads(self, d: int) -> Iterator[tuple[int, int, bytes]]:
        """Device ``d``'s batches as ``(batch id, records, payload)``, generated lazily."""
        device = self.device_id(d)
        terminal = (0xC000_0000 + d).to_bytes(6, "big")
        station, operator, issuer = bytes(8), b"BENCH\x00\x00\x00", DEMO_ISSUER_ID
        tac = self.verifier.purchase_tac
        pack = _RECORD.pack
        seq = 0
        for batch_id, first in enumerate(range(d, self.n, self.devices * self.batch), start=1):
            records = []
            for t in range(first, min(first + self.devices * self.batch, self.n), self.devices):
                ride, slot = divmod(t, self.cards)
                card = (slot * _STRIDE + self.run) % self.cards
                serial = bytes.fromhex(f"{self.run % 10_000:04d}{card:016d}")
                seq += 1
                mac = tac(
                    alg=Alg.TDES,
                    issuer_id=issuer,
                    serial8=serial[2:],
                    amount=_FARE,
                    tx_type=_PURCHASE,
                    terminal=terminal,
                    ttc=ride + 1,
                    day=_DAY,
                    time=_TIME,
                )
                assert mac is not None
                records.append(
                    pack(
                        seq,
                        _COMPLETED,
                        _PURCHASE,
                        _BUS,
                        _TDES,
                        serial,
                        issuer,
                        ride,
                        ride + 1,
                        _FARE,
                        1_000_000 - _FARE * ride,
                        terminal,
                        _DAY,
                        _TIME,
                        _AT_MS + t % 1000,  # within the second the TAC covers
                        station,
                        1,
                        operator,
                        mac,
                    )
                )
            yield batch_id, len(records), encode_batch_records(batch_id, device, records)

    def check(self) -> None:
        """The first batch of device 0 decodes and every TAC in it verifies (a self-check of
        the packing above against the backend's own decoder)."""
        _, count, payload = next(self.payloads(0))
        batch = decode_batch(payload)
        verdicts = {c.verdict for c in classify(batch, TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS}))}
        if len(batch.records) != count or verdicts != {"ok"}:
            raise RuntimeError(f"the bench's batches do not verify: {verdicts}")


@dataclass
class _Progress:
    """Acknowledged transactions, with RSS samples at regular marks."""

    n: int
    pids: Callable[[], list[int]]
    every: int
    report: Callable[[str], None]
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    next_mark: int = 0
    series: list[list[float]] = field(default_factory=list)
    rates: list[list[float]] = field(default_factory=list)
    processes: int = 0
    _last: tuple[int, float] = (0, 0.0)

    def __post_init__(self) -> None:
        self._last = (0, self.started)
        self.sample()

    def add(self, k: int) -> None:
        self.done += k
        if self.done >= self.next_mark:
            self.sample()

    def sample(self) -> None:
        pids = self.pids()
        self.processes = max(self.processes, len(pids))
        mb = rss_mb(pids)
        now = time.perf_counter()
        self.series.append([self.done, round(mb, 1)])
        if self.done:
            done0, t0 = self._last
            rate = (self.done - done0) / max(now - t0, 1e-9)
            self.rates.append([self.done, round(rate)])
            self.report(
                f"{self.done:>11,} / {self.n:,} tx  {now - self.started:7.1f} s  "
                f"{rate:8,.0f} tx/s  backend RSS {mb:7.1f} MB ({len(pids)} processes)"
            )
        self._last = (self.done, now)
        self.next_mark = self.done + self.every


async def _device(
    broker: BrokerURL, traffic: Traffic, d: int, window: int, progress: _Progress
) -> None:
    device = traffic.device_id(d)
    batches = traffic.payloads(d)
    async with broker.client(identifier=f"farelab-{device}", timeout=30) as client:
        await client.subscribe(ACK_TOPIC.format(device=device), qos=1)
        topic = TX_TOPIC.format(device=device)
        sent: dict[int, int] = {}
        for batch_id, count, payload in batches:
            sent[batch_id] = count
            await client.publish(topic, payload, qos=1)
            if len(sent) >= window:
                break
        exhausted = len(sent) < window
        async for ack in acks_of(client, lambda: len(sent)):
            count = sent.pop(ack.batch_id, 0)
            if not count:
                continue  # an ack repeated by the broker
            progress.add(count)
            if not exhausted:
                nxt = next(batches, None)
                if nxt is None:
                    exhausted = True
                else:
                    sent[nxt[0]] = nxt[1]
                    await client.publish(topic, nxt[2], qos=1)
            if exhausted and not sent:
                return


async def measure_backend_rss(
    broker: BrokerURL,
    backend_pids: Callable[[], list[int]],
    n: int,
    *,
    ledger: str,
    progress: Callable[[str], None],
    cards: int = 200_000,
    devices: int = 8,
    batch: int = 200,
    window: int = 4,
    samples: int = 50,
    warmup: float = 0.1,
) -> dict[str, object]:
    """Stream ``n`` genuine purchases into the backend already running on ``broker`` (its
    ledger ``ledger``, where the devices are registered first) and sample the RSS of
    ``backend_pids()`` (the supervisor and its workers) ``samples`` times.

    ``backend_rss_start_mb`` is taken once ``warmup`` of the transactions are acknowledged and
    every card has ridden twice (the caches are full; at most half-way), ``backend_rss_end_mb``
    at the end; ``backend_rss_mb`` is the series of ``[transactions acknowledged, MB]`` and
    ``backend_rate_tx_per_s`` the ingest rate between samples, to show whether it falls as the
    ledger grows.
    """
    traffic = Traffic(n, cards=cards, devices=devices, batch=batch, run=int(time.time()) % 10_000)
    traffic.check()
    store = Store(ledger)
    try:
        for entry in traffic.entries():
            register(store, entry)
    finally:
        store.close()
    state = _Progress(n, backend_pids, max(n // samples, 1), progress)
    await asyncio.gather(
        *(_device(broker, traffic, d, window, state) for d in range(devices) if traffic.share(d))
    )
    elapsed = time.perf_counter() - state.started
    if state.series[-1][0] != state.done:
        state.sample()
    # Warm once every card has been seen twice (the workers' key caches are full), and not
    # before ``warmup`` of the run.
    warm_at = min(max(warmup * n, 2 * cards), n / 2)
    warm = next(mb for done, mb in state.series if done >= warm_at)
    end = state.series[-1][1]
    rates = [rate for _, rate in state.rates]
    tenth = max(len(rates) // 10, 1)
    return {
        "backend_rss_tx": state.done,
        "backend_rss_start_mb": warm,
        "backend_rss_end_mb": end,
        "backend_rss_growth_mb": round(end - warm, 1),
        "backend_rss_processes": state.processes,
        "backend_ingest_long_tx_per_s": state.done / elapsed,
        "backend_ingest_long_s": elapsed,
        "backend_ingest_first_tenth_tx_per_s": sum(rates[:tenth]) / tenth,
        "backend_ingest_last_tenth_tx_per_s": sum(rates[-tenth:]) / tenth,
        "backend_rss_mb": state.series,
        "backend_rate_tx_per_s": state.rates,
    }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--cards", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--db", help="the ledger (default: SQLite in the temporary folder)")
    args = parser.parse_args()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="farelab-rss-") as tmp:
        folder = Path(tmp)
        broker = Mosquitto(folder)
        broker.start()
        try:
            db = args.db or f"sqlite:///{folder / 'ledger.db'}"
            progress(f"backend: {args.workers} worker(s), ledger {db}, broker {broker.url}")
            with running_backend(
                broker.url, db, workers=args.workers, log=folder / "backend.log"
            ) as proc:
                result = asyncio.run(
                    measure_backend_rss(
                        BrokerURL.parse(broker.url),
                        lambda: process_tree(proc.pid),
                        args.n,
                        ledger=db,
                        progress=progress,
                        cards=args.cards,
                        devices=args.devices,
                        batch=args.batch,
                        samples=args.samples,
                    )
                )
            ledger = folder / "ledger.db"
            if ledger.exists():
                result["ledger_mb"] = round(ledger.stat().st_size / 2**20, 1)
        except aiomqtt.MqttError as exc:
            raise SystemExit(f"broker {broker.url}: {exc}") from None
        finally:
            broker.stop()
    print("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items()))
    print("}")


if __name__ == "__main__":
    main()

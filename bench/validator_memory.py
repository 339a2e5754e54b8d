"""Validator memory and throughput over many taps: one process, two bus validators sharing an
on-disk journal, an in-process card, and (with ``--broker``) the uplink draining the outbox to
a backend as in ``farelab validator run``.  RSS is sampled from ``/proc/self/status``.

    python -m farelab.bench.validator_memory --taps 1000000 \
        [--broker mqtt://127.0.0.1:PORT] [--cpu 0]

Prints one JSON document: ``validator_rss_growth_mb`` (RSS at the end minus RSS after the
warm-up, the first 2 %), ``validator_taps_per_s``, ``journal_bytes_per_tx`` (the journal's
file size per journalled transaction, outbox drained) and the series ``validator_rss_mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from farelab.bench._backend import rss_mb
from farelab.bench._taps import TapBench, uplink_running
from farelab.protocol import BrokerURL
from farelab.validator import favour_taps

__all__ = ["measure"]


def _rss() -> float:
    return rss_mb([os.getpid()])


def measure(
    taps: int, folder: Path, broker: BrokerURL | None, *, points: int = 50
) -> dict[str, object]:
    """Run ``taps`` taps; figures and the RSS series (taps done, MB)."""
    if taps < points:
        raise ValueError(f"at least {points} taps")
    path = folder / "validator-memory.db"
    bench = TapBench.make("bus", path)
    favour_taps()
    running = None
    if broker is not None:
        running = uplink_running(broker, bench)
    warmup = max(taps // 50, 1)
    every = taps // points
    series: list[list[float]] = []
    base = 0.0
    try:
        started = time.perf_counter()
        for i in range(taps):
            if i % 200 == 199:
                bench.journal.checkpoint()  # as the run loop does
            result, _ = bench.tap(i)
            if result.result != "accepted":
                raise RuntimeError(f"tap {i} refused: {result}")
            if i + 1 == warmup:
                base = _rss()
            if (i + 1) % every == 0:
                series.append([i + 1, _rss()])
        elapsed = time.perf_counter() - started
        if broker is not None:
            deadline = time.monotonic() + 120
            while bench.journal.outbox_rows and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        if running is not None:
            running.stop()
    left = bench.journal.outbox_rows
    bench.journal.close()  # folds the WAL in
    size = sum(p.stat().st_size for p in folder.glob("validator-memory.db*"))
    transactions = taps  # every bus tap here is one completed purchase
    end = series[-1][1]
    return {
        "validator_taps": taps,
        "validator_taps_per_s": taps / elapsed,
        "validator_rss_warm_mb": base,
        "validator_rss_end_mb": end,
        "validator_rss_max_mb": max(mb for _, mb in series),
        "validator_rss_growth_mb": end - base,
        "validator_outbox_left": left,
        "journal_bytes_per_tx": size / transactions,
        "series": {"validator_rss_mb": series},
    }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taps", type=int, default=1_000_000, help="taps to run (default 1 M)")
    parser.add_argument("--broker", help="upload to this broker while tapping (a backend runs)")
    parser.add_argument("--cpu", type=int, help="run on this one CPU (taps/s on one core)")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    broker = BrokerURL.parse(args.broker) if args.broker else None
    with tempfile.TemporaryDirectory(prefix="farelab-vmem-") as tmp:
        try:
            doc = measure(args.taps, Path(tmp), broker)
        except (ValueError, RuntimeError) as exc:
            print(f"farelab.bench.validator_memory: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    print(json.dumps(doc))


if __name__ == "__main__":
    main()

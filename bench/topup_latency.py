"""Top-up latency card → host → card over a real broker: ``farelab topup`` loads through the
backend's load authorization, timed from presentation to receipt.

    python -m farelab.bench.topup_latency --broker mqtt://127.0.0.1:PORT [--n 200]

The backend must run against that broker (``farelab backend run --broker … --db …``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TypeVar

from farelab.backend import DeviceEntry
from farelab.card import InProcessReader, MemoryStore, Reader, SimulatedCard, personalise
from farelab.protocol import BrokerURL
from farelab.topup import Kiosk, KioskJournal, MqttHost

__all__ = ["TOPUP_KIOSK", "measure"]

#: The bench's kiosk as the backend's registry must know it.
TOPUP_KIOSK = DeviceEntry(
    id="kiosk-bench",
    role="kiosk",
    operator="BENCH",
    kinds=frozenset({"load"}),
    terminal="0000F000BEEF",
)

T = TypeVar("T")


async def measure(broker: BrokerURL, n: int) -> dict[str, float]:
    """``n`` loads of 1 yuan; latency percentiles in ms."""
    folder = Path(tempfile.mkdtemp(prefix="farelab-topup-bench-"))
    host = MqttHost(broker, "kiosk-bench")
    kiosk = Kiosk(
        kiosk_id=TOPUP_KIOSK.id,
        terminal_id=bytes.fromhex(TOPUP_KIOSK.terminal),
        host=host,
        journal=KioskJournal(folder / "k.db"),
    )
    reader = InProcessReader()
    run_id = int(time.time()) % 100_000

    async def run(fn: Callable[[Reader], T]) -> T:
        return fn(reader)

    times = []
    for i in range(n):
        image = personalise(serial=f"{run_id:05d}{i:06d}", issued=date(2026, 1, 1))
        reader.insert(SimulatedCard(image, store=MemoryStore()))
        start = time.perf_counter()
        result = await kiosk.load(run, 100)
        times.append(time.perf_counter() - start)
        if result.result != "loaded":
            raise RuntimeError(f"a bench load was refused: {result}")
    await host.aclose()
    times.sort()
    return {
        "loads": n,
        "p50_ms": statistics.median(times) * 1000,
        "p99_ms": times[max(int(n * 0.99) - 1, 0)] * 1000,
        "max_ms": times[-1] * 1000,
    }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    for key, value in asyncio.run(measure(BrokerURL.parse(args.broker), args.n)).items():
        print(f"{key:>8}: {value:,.2f}")


if __name__ == "__main__":
    main()

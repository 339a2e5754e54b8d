"""Parameters back to devices: hotlist and issuer whitelist, versioned, as retained messages.

Each device reads only its own topic (``farelab/v1/dev/<id>/params``), applies a newer version
atomically and reports the version it runs on ``…/status`` (retained).  The hotlist is the
ledger's (cloned cards, found at ingest) plus any serials an operator adds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from farelab.backend._broker import PARAMS_TOPIC, STATUS_TOPIC, BrokerURL
from farelab.backend._brokerconfig import MAX_PACKET_SIZE
from farelab.backend._store import Store

__all__ = ["PARAMS_MAX", "devices_in", "next_params", "publish_params", "read_status"]

# The broker disconnects a client that sends a packet over its limit; leave room for the
# topic and the packet's header.
PARAMS_MAX = MAX_PACKET_SIZE - 4096


def next_params(
    store: Store, *, hotlist: Iterable[str] = (), whitelist: Iterable[str] | None = None
) -> dict[str, object]:
    """The next parameters version, recorded in the ledger."""
    with store.transaction():
        store.execute(
            "INSERT INTO counters (name, value) VALUES ('params_version', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = counters.value + 1"
        )
        version = store.execute(
            "SELECT value FROM counters WHERE name = 'params_version'"
        ).fetchone()[0]
    doc: dict[str, object] = {
        "version": int(version),
        "hotlist": sorted({*store.hotlist(), *(s.rjust(20, "0") for s in hotlist)}),
    }
    if whitelist is not None:
        doc["whitelist"] = sorted(w.upper() for w in whitelist)
    return doc


def devices_in(store: Store) -> list[str]:
    """Every device the ledger has heard from."""
    return [r[0] for r in store.execute("SELECT DISTINCT device FROM transactions").fetchall()]


async def publish_params(
    broker: BrokerURL, params: dict[str, object], devices: Iterable[str]
) -> int:
    """Publish ``params`` retained to every device; returns how many.  ValueError if the
    message would pass the broker's packet limit (``PARAMS_MAX`` bytes)."""
    payload = json.dumps(params)
    if len(payload.encode()) > PARAMS_MAX:
        raise ValueError(
            f"the parameters are {len(payload.encode())} bytes, more than the broker takes "
            f"({PARAMS_MAX}): shorten the hotlist or the fare tables"
        )
    n = 0
    async with broker.client() as client:
        for device in devices:
            await client.publish(PARAMS_TOPIC.format(device=device), payload, qos=1, retain=True)
            n += 1
    return n


async def read_status(
    broker: BrokerURL, devices: Iterable[str], *, wait: float = 2.0
) -> dict[str, int]:
    """The parameters version each device reported (retained status messages)."""
    out: dict[str, int] = {}
    wanted = set(devices)
    async with broker.client() as client:
        for device in wanted:
            await client.subscribe(STATUS_TOPIC.format(device=device), qos=1)
        try:
            async with asyncio.timeout(wait):
                async for message in client.messages:
                    doc = json.loads(bytes(message.payload))
                    out[doc["device"]] = int(doc["params_version"])
                    if set(out) >= wanted:
                        break
        except TimeoutError:
            pass
    return out

"""Parameters back to devices: hotlist and issuer whitelist, versioned, as retained messages.

Each device reads only its own topic (``farelab/v1/dev/<id>/params``), applies a newer version
atomically and reports the version it runs on ``…/status`` (retained).  The hotlist is the
ledger's (cloned cards, found at ingest) plus any serials an operator adds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime

from farelab.backend._cards import lapse_hotlist
from farelab.backend._store import Store
from farelab.card import full_serial
from farelab.protocol import (
    PARAMS_MAX,
    PARAMS_TOPIC,
    STATUS_TOPIC,
    BrokerURL,
    ParamsError,
    ParamsMessage,
    decode_status,
    encode_params,
)

__all__ = ["devices_in", "next_params", "publish_params", "read_status"]


def next_params(
    store: Store,
    *,
    hotlist: Iterable[str] = (),
    whitelist: Iterable[str] | None = None,
    networks: str | None = None,
) -> ParamsMessage:
    """The next parameters version, recorded in the ledger; card records whose hotlist entry
    has lapsed by now are taken off it first."""
    lapse_hotlist(store, datetime.now(UTC))
    with store.transaction():
        store.execute(
            "INSERT INTO counters (name, value) VALUES ('params_version', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = counters.value + 1"
        )
        version = store.execute(
            "SELECT value FROM counters WHERE name = 'params_version'"
        ).fetchone()[0]
    return ParamsMessage(
        int(version),
        frozenset({*store.hotlist(), *(full_serial(s) for s in hotlist)}),
        None if whitelist is None else frozenset(bytes.fromhex(w) for w in whitelist),
        networks,
    )


def devices_in(store: Store) -> list[str]:
    """Every device the ledger has heard from."""
    return [r[0] for r in store.execute("SELECT DISTINCT device FROM transactions").fetchall()]


async def publish_params(broker: BrokerURL, params: ParamsMessage, devices: Iterable[str]) -> int:
    """Publish ``params`` retained to every device; returns how many.  ValueError if the
    message would pass the broker's packet limit (``PARAMS_MAX`` bytes)."""
    payload = encode_params(params)
    if len(payload) > PARAMS_MAX:
        raise ValueError(
            f"the parameters are {len(payload)} bytes, more than the broker takes "
            f"({PARAMS_MAX}): shorten the hotlist or the fare tables"
        )
    n = 0
    async with broker.client() as client:
        for device in devices:
            await client.publish(PARAMS_TOPIC.format(device=device), payload, qos=1, retain=True)
            n += 1
    return n


async def read_status(
    broker: BrokerURL, devices: Iterable[str], *, wait: float = 2.0, version: int | None = None
) -> dict[str, int]:
    """The parameters version each device reported (retained status messages), its latest
    within ``wait`` seconds.  ``version``: wait, as long as that, until every device runs at
    least that version (a device reports the version it ran before, too, as it connects)."""
    out: dict[str, int] = {}
    wanted = set(devices)
    async with broker.client() as client:
        for device in wanted:
            await client.subscribe(STATUS_TOPIC.format(device=device), qos=1)
        try:
            async with asyncio.timeout(wait):
                async for message in client.messages:
                    try:
                        status = decode_status(bytes(message.payload))
                    except ParamsError:
                        continue  # not a status message: nothing a device said
                    out[status.device] = status.params_version
                    if set(out) >= wanted and all(
                        version is None or out[d] >= version for d in wanted
                    ):
                        break
        except TimeoutError:
            pass
    return out

"""Whether a broker lets in clients it should not: the backend asks at start, and says so loudly.

A broker without farelab's configuration (``farelab backend broker-config``) lets anyone who
reaches it act as any device, kiosk or backend.  Nothing in the messages can make up for that:
the roles live in the broker's accounts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets

import aiomqtt

from farelab.protocol import BrokerURL

__all__ = ["OPEN_BROKER_RISKS", "open_broker_warning", "open_logins"]

OPEN_BROKER_RISKS = (
    "ask for load authorizations and load cards (up to 1000 yuan each) as any kiosk",
    "upload batches as any validator, which the backend counts and clears",
    "publish parameters (hotlists, whitelists, fare tables) to every validator",
    "read every device's uploads, and stall them by joining the backend's shared group",
)


async def open_logins(broker: BrokerURL, *, timeout: float = 3.0) -> list[str]:
    """The logins the broker accepts that it should refuse: ``anonymous`` (no username) and
    ``any password`` (a made-up device account).  Empty if it refuses both, or cannot be
    reached (the workers report that)."""
    nobody = dataclasses.replace(broker, username=None, password=None)
    probes = {
        "anonymous": {},
        "any password": {
            "username": f"farelab-probe-{secrets.token_hex(4)}",
            "password": secrets.token_urlsafe(12),
        },
    }
    found = []
    for label, login in probes.items():
        client = nobody.client(
            identifier=f"farelab-probe-{secrets.token_hex(6)}", timeout=timeout, **login
        )
        try:
            async with asyncio.timeout(timeout + 1):
                async with client:
                    found.append(label)
        except (aiomqtt.MqttError, TimeoutError, OSError):
            continue
    return found


def open_broker_warning(broker: BrokerURL, logins: list[str]) -> str:
    """The multi-line warning ``backend run`` prints when :func:`open_logins` found any."""
    lines = [
        "",
        "*" * 78,
        f"WARNING: the broker {broker} lets in clients without valid credentials "
        f"({', '.join(logins)}).",
        "Anyone who can reach it can:",
        *(f"  - {risk}" for risk in OPEN_BROKER_RISKS),
        "Run Mosquitto with the configuration `farelab backend broker-config` writes from the",
        'device registry (README: "Securing the broker").',
        "*" * 78,
        "",
    ]
    return "\n".join(lines)

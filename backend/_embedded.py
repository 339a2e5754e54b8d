"""An in-process MQTT broker (amqtt) for the one-command demo.

amqtt speaks MQTT 3.1.1 only and has no shared subscriptions, so it serves one backend worker;
tests and deployments use Mosquitto (or EMQX) with MQTT 5.  It binds a free loopback port, never
assuming 1883 is free.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from amqtt.broker import Broker

from farelab.backend._mosquitto import free_port
from farelab.protocol import BrokerURL

__all__ = ["embedded_broker"]


@asynccontextmanager
async def embedded_broker() -> AsyncIterator[BrokerURL]:
    """A running amqtt broker on a free loopback port, for the duration of the block."""
    port = free_port()
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        yield BrokerURL("127.0.0.1", port, protocol="3.1.1")
    finally:
        await broker.shutdown()

"""The kiosk's line to the host over MQTT: one connection for every call, made again when the
broker restarted between two calls (the call after it succeeds), closed by ``aclose``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from farelab.backend._mosquitto import BrokerError, Mosquitto
from farelab.protocol import KIOSK_CLIENT_ID, LOAD_REQ, LOAD_RESP, BrokerURL
from farelab.topup import HostUnreachableError, MqttHost

KIOSK = "kiosk-host-test"


def own_broker(folder: Path) -> Mosquitto:
    try:
        broker = Mosquitto(folder)
        broker.start()
    except BrokerError as exc:
        pytest.fail(f"a Mosquitto broker is needed and could not be started: {exc}")
    return broker


async def answering(port: int, ready: asyncio.Event) -> None:
    """A stand-in host: answers every request with its id and its op."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(LOAD_REQ.format(kiosk=KIOSK), qos=1)
        ready.set()
        async for message in client.messages:
            doc = json.loads(bytes(message.payload))
            answer = {"id": doc["id"], "echo": doc["op"]}
            await client.publish(LOAD_RESP.format(kiosk=KIOSK), json.dumps(answer), qos=1)


async def host_answering(broker: Mosquitto) -> asyncio.Task[None]:
    """The stand-in host on ``broker``, once it is subscribed (the broker started first if it
    is not running)."""
    if broker.proc is None or broker.proc.poll() is not None:
        broker.start()
    ready = asyncio.Event()
    task = asyncio.create_task(answering(broker.port, ready))
    await asyncio.wait_for(ready.wait(), 10)
    return task


def connects(broker: Mosquitto) -> int:
    """How many times the kiosk's client connected, as the broker's log tells."""
    client_id = KIOSK_CLIENT_ID.format(kiosk=KIOSK)
    return sum(f" as {client_id} " in line for line in broker.log.read_text().splitlines())


async def test_one_connection_serves_every_call_and_comes_back_after_the_broker(
    tmp_path: Path,
) -> None:
    broker = own_broker(tmp_path)
    url = BrokerURL.parse(broker.url)
    host = MqttHost(url, KIOSK, timeout=5)
    task = await host_answering(broker)
    try:
        for i in range(5):
            assert await host.call({"id": f"a{i}", "op": "authorize"}) == {
                "id": f"a{i}",
                "echo": "authorize",
            }
        assert connects(broker) == 1  # one connection for five calls

        broker.stop()  # the broker restarts between two calls: the next one connects again
        task.cancel()
        task = await host_answering(broker)
        assert await host.call({"id": "b", "op": "confirm"}) == {"id": "b", "echo": "confirm"}
        assert connects(broker) == 2

        broker.stop()  # no broker: the host is unreachable
        task.cancel()
        with pytest.raises(HostUnreachableError):
            await host.call({"id": "lost", "op": "confirm"})
        task = await host_answering(broker)
        assert await host.call({"id": "c", "op": "void"}) == {"id": "c", "echo": "void"}
        assert connects(broker) == 3

        await host.aclose()
        left = f"Client {KIOSK_CLIENT_ID.format(kiosk=KIOSK)} disconnected"
        async with asyncio.timeout(5):  # the broker sees the kiosk leave
            while left not in broker.log.read_text():
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        broker.stop()

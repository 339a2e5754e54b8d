"""The city's fault proxy: bytes flow through it to a real Mosquitto; a cut drops a device and
keeps it out for its time, a delay holds every chunk (in order), a reset sends an RST; closing
it leaves no task behind; and a validator whose link is cut and reset mid-upload still gets every
transaction into the backend's ledger, once."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import aiomqtt
import pytest

from farelab.backend._mosquitto import Mosquitto, free_port
from farelab.card import personalise, save_image
from farelab.city import FaultProxy, LinkRules

ROOT = Path(__file__).resolve().parent.parent


# The rules, without sockets


def test_a_cut_holds_for_its_seconds_and_a_later_cut_extends_it() -> None:
    rules = LinkRules()
    assert not rules.is_cut("bus-1", 0.0)
    rules.cut("bus-1", 10.0, 2.0)
    assert rules.is_cut("bus-1", 10.0)
    assert rules.is_cut("bus-1", 11.9)
    assert not rules.is_cut("bus-1", 12.0)
    assert not rules.is_cut("bus-2", 11.0)
    rules.cut("bus-1", 11.0, 5.0)
    rules.cut("bus-1", 12.0, 0.5)  # a shorter cut inside a longer one does not shorten it
    assert rules.is_cut("bus-1", 15.9)
    assert not rules.is_cut("bus-1", 16.0)


def test_a_delay_applies_to_chunks_arriving_in_its_period() -> None:
    rules = LinkRules()
    assert rules.latency("bus-1", 0.0) == 0.0
    rules.delay("bus-1", 100.0, 250, 3.0)
    assert rules.latency("bus-1", 100.0) == 0.25
    assert rules.latency("bus-1", 102.9) == 0.25
    assert rules.latency("bus-1", 103.0) == 0.0
    assert rules.latency("gate-a", 101.0) == 0.0


def test_negative_cuts_and_delays_are_refused() -> None:
    rules = LinkRules()
    with pytest.raises(ValueError, match="cut"):
        rules.cut("bus-1", 0.0, -1.0)
    with pytest.raises(ValueError, match="delay"):
        rules.delay("bus-1", 0.0, -5, 1.0)


# The proxy against a plain echo server


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_a_delayed_link_keeps_the_order_of_its_bytes() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    proxy = FaultProxy(upstream=("127.0.0.1", server.sockets[0].getsockname()[1]))
    try:
        port = await proxy.add("bus-1")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        proxy.delay("bus-1", 100, 10)
        sent = b"".join(b"%05d," % i for i in range(200))
        started = time.monotonic()
        for i in range(0, len(sent), 60):
            writer.write(sent[i : i + 60])
            await writer.drain()
            await asyncio.sleep(0.001)
        received = await asyncio.wait_for(reader.readexactly(len(sent)), 20)
        assert time.monotonic() - started >= 0.2
        assert received == sent
        writer.close()
        stats = proxy.stats["bus-1"]
        assert (stats.connections, stats.bytes_up, stats.delays) == (1, len(sent), 1)
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


async def test_a_dead_upstream_closes_the_device_side() -> None:
    proxy = FaultProxy(upstream=("127.0.0.1", free_port()))
    try:
        port = await proxy.add("bus-1")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(10), 5) == b""
        writer.close()
        assert proxy.stats["bus-1"].refused == 1
        assert proxy.stats["bus-1"].connections == 0
    finally:
        await proxy.close()


async def test_close_ends_live_links_and_leaves_no_task() -> None:
    before = asyncio.all_tasks()
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    proxy = FaultProxy(upstream=("127.0.0.1", server.sockets[0].getsockname()[1]))
    port = await proxy.add("bus-1")
    await proxy.add("bus-2")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    assert proxy.live("bus-1") == 1
    await proxy.close()
    assert await asyncio.wait_for(reader.read(10), 5) == b""
    writer.close()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


# The proxy against a real Mosquitto


@pytest.fixture
async def proxy(broker: Mosquitto) -> AsyncIterator[FaultProxy]:
    fault_proxy = FaultProxy(upstream=("127.0.0.1", broker.port))
    yield fault_proxy
    await fault_proxy.close()


async def _round_trip(client: aiomqtt.Client, topic: str) -> float:
    """Seconds from publishing on ``topic`` to receiving it back (the client subscribes)."""
    started = time.monotonic()
    await client.publish(topic, b"x", qos=1)
    async with asyncio.timeout(20):
        async for message in client.messages:
            if message.topic.matches(topic):
                break
    return time.monotonic() - started


async def test_messages_flow_through_the_proxy(proxy: FaultProxy) -> None:
    port = await proxy.add("bus-1")
    async with aiomqtt.Client("127.0.0.1", port, identifier="bus-1") as client:
        await client.subscribe("city/echo", qos=1)
        await _round_trip(client, "city/echo")
    stats = proxy.summary()["bus-1"]
    assert stats["connections"] == 1
    assert stats["bytes_up"] > 0
    assert stats["bytes_down"] > 0


async def test_a_cut_drops_the_client_and_keeps_it_out_until_it_is_over(
    proxy: FaultProxy,
) -> None:
    port = await proxy.add("bus-1")
    async with aiomqtt.Client("127.0.0.1", port, identifier="bus-1") as client:
        await client.subscribe("city/echo", qos=1)
        proxy.cut("bus-1", 3.0)
        cut_at = time.monotonic()
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(10):
                await anext(client.messages)
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", port, identifier="bus-1b", timeout=2):
            pass
    assert time.monotonic() - cut_at < 3.0, "the refused reconnect must fall inside the cut"
    await asyncio.sleep(3.0 - (time.monotonic() - cut_at) + 0.1)
    async with aiomqtt.Client("127.0.0.1", port, identifier="bus-1c") as client:
        await client.subscribe("city/echo", qos=1)
        await _round_trip(client, "city/echo")
    stats = proxy.stats["bus-1"]
    assert (stats.cuts, stats.closed_by_fault) == (1, 1)
    assert stats.refused >= 1


async def test_a_delay_holds_each_round_trip_at_least_as_long(proxy: FaultProxy) -> None:
    port = await proxy.add("bus-1")
    async with aiomqtt.Client("127.0.0.1", port, identifier="bus-1") as client:
        await client.subscribe("city/echo", qos=1)
        await _round_trip(client, "city/echo")
        proxy.delay("bus-1", 300, 30)
        # the publish waits 300 ms on its way up, the message 300 ms on its way down
        assert await _round_trip(client, "city/echo") >= 0.6 * 0.95


async def test_a_reset_gives_the_client_a_connection_reset(proxy: FaultProxy) -> None:
    port = await proxy.add("bus-1")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # an MQTT 3.1.1 CONNECT, client id "r", clean session; the broker answers CONNACK
    writer.write(bytes.fromhex("100d00044d5154540402003c000172"))
    assert await asyncio.wait_for(reader.readexactly(4), 5) == bytes.fromhex("20020000")
    proxy.reset("bus-1")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(16), 5)
    writer.close()
    async with aiomqtt.Client("127.0.0.1", port, identifier="bus-1") as client:
        await client.subscribe("city/echo", qos=1)
        proxy.reset("bus-1")
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(10):
                await anext(client.messages)
    assert proxy.stats["bus-1"].resets == 2


# A validator through the proxy, its link cut and reset while it uploads

DEVICES = """
[[validator]]
id = "bus-1"
kind = "bus"
network = "taiyuan"
terminal_id = "000000000B01"
whitelist = ["1310000000000000"]
"""


async def _farelab(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "farelab",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def connected(proxy: FaultProxy, name: str) -> None:
    """Wait until ``name`` has a live link through ``proxy`` (a device reconnects with
    backoff)."""
    async with asyncio.timeout(30):
        while proxy.live(name) == 0:
            await asyncio.sleep(0.05)


async def _ledger_count(db: str) -> int:
    report = await _farelab("backend", "report", "--db", db, "--json")
    out, err = await report.communicate()
    assert report.returncode == 0, err.decode()
    return int(json.loads(out)["transactions"])


async def test_a_validator_cut_and_reset_mid_upload_loses_no_transaction(
    broker: Mosquitto, proxy: FaultProxy, tmp_path: Path
) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    port = await proxy.add("bus-1")
    backend = await _farelab(
        "backend",
        "run",
        "--broker",
        broker.url,
        "--db",
        db,
        "--workers",
        "1",
        "--devices",
        str(config),
    )
    validator = await _farelab(
        "validator",
        "run",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "j.db"),
        "--broker",
        f"mqtt://127.0.0.1:{port}",
    )
    assert validator.stdin is not None
    assert validator.stdout is not None
    cards = []
    for i in range(30):
        path = tmp_path / f"card{i}.json"
        save_image(path, personalise(serial=str(500 + i), issued=date(2026, 1, 1), balance=5000))
        cards.append(path)

    async def tap(paths: list[Path]) -> list[dict[str, object]]:
        assert validator.stdin is not None
        assert validator.stdout is not None
        results = []
        for path in paths:
            validator.stdin.write(
                (json.dumps({"device": "bus-1", "card": str(path)}) + "\n").encode()
            )
            await validator.stdin.drain()
            line = await asyncio.wait_for(validator.stdout.readline(), 20)
            results.append(json.loads(line))
        return results

    try:
        await asyncio.sleep(2.0)
        assert backend.returncode is None
        await connected(proxy, "bus-1")
        results = await tap(cards[:10])
        proxy.cut("bus-1", 2.0)
        results += await tap(cards[10:20])
        await asyncio.sleep(2.0)
        await connected(proxy, "bus-1")
        results += await tap(cards[20:25])
        proxy.reset("bus-1")
        results += await tap(cards[25:])
        assert [r["result"] for r in results] == ["accepted"] * 30
        deadline = time.monotonic() + 60
        count = await _ledger_count(db)
        while count < 30 and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            count = await _ledger_count(db)
        assert count == 30
    finally:
        await _stop(validator)
        await _stop(backend)
    assert await _ledger_count(db) == 30
    stats = proxy.stats["bus-1"]
    assert stats.closed_by_fault == 2
    assert stats.connections >= 3

"""A fault proxy between the city's devices and the broker: one listening port per target, whose
connections it can cut, delay or reset on command.

:class:`LinkRules` decides, for a target and a time, whether its link is cut and what latency
applies; it takes ``now`` as an argument and holds no socket.  :class:`FaultProxy` is the asyncio
shell that forwards bytes and asks the rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["FaultProxy", "LinkRules", "LinkStats"]

_CHUNK: Final = 65536
_CONNECT_TIMEOUT: Final = 5.0  # seconds for the broker to accept; a stopped one never does
_QUEUED_CHUNKS: Final = 256  # per direction; a delayed link stops reading when this many wait


class LinkRules:
    """The cuts and delays in force on each target, as deadlines on one clock (seconds, the
    caller's choice of clock)."""

    def __init__(self) -> None:
        """No target cut or delayed."""
        self._cut_until: dict[str, float] = {}
        self._delay: dict[str, tuple[float, float]] = {}  # target -> (seconds, until)

    def cut(self, target: str, now: float, seconds: float) -> None:
        """Cut ``target`` from ``now`` for ``seconds`` (a later cut may extend it)."""
        if seconds < 0:
            raise ValueError("a cut lasts zero seconds or more")
        until = now + seconds
        self._cut_until[target] = max(until, self._cut_until.get(target, until))

    def delay(self, target: str, now: float, ms: float, seconds: float) -> None:
        """Add ``ms`` milliseconds to every chunk on ``target`` from ``now`` for ``seconds``
        (replacing a delay in force)."""
        if ms < 0 or seconds < 0:
            raise ValueError("a delay and its period are zero or more")
        self._delay[target] = (ms / 1000, now + seconds)

    def is_cut(self, target: str, now: float) -> bool:
        """Whether ``target``'s link is cut at ``now``."""
        return now < self._cut_until.get(target, now)

    def latency(self, target: str, now: float) -> float:
        """Seconds to hold a chunk that arrives on ``target`` at ``now``."""
        seconds, until = self._delay.get(target, (0.0, now))
        return seconds if now < until else 0.0


@dataclass(slots=True)
class LinkStats:
    """What passed through one target's port."""

    connections: int = 0
    """Connections accepted and forwarded to the broker."""
    refused: int = 0
    """Connections closed at once: the target was cut, or the broker did not answer."""
    bytes_up: int = 0
    """Bytes from the device to the broker."""
    bytes_down: int = 0
    """Bytes from the broker to the device."""
    cuts: int = 0
    """Cuts ordered."""
    delays: int = 0
    """Delays ordered."""
    resets: int = 0
    """Resets ordered."""
    closed_by_fault: int = 0
    """Live connections a cut or a reset ended."""

    def as_json(self) -> dict[str, int]:
        """The counters by name, for the city's summary."""
        return {
            "connections": self.connections,
            "refused": self.refused,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "cuts": self.cuts,
            "delays": self.delays,
            "resets": self.resets,
            "closed_by_fault": self.closed_by_fault,
        }


@dataclass(eq=False, slots=True)
class _Link:
    """One device connection and its broker connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def close(self, *, reset: bool) -> None:
        for writer in (self.client, self.upstream):
            sock = writer.get_extra_info("socket")
            if reset and sock is not None:
                # linger 0: close() sends RST instead of FIN
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards ``127.0.0.1:<port of a target>`` to the broker at ``upstream``, and cuts, delays
    or resets a target's connections on command."""

    def __init__(self, *, upstream: tuple[str, int]) -> None:
        """``upstream``: the broker's (host, port); set :attr:`upstream` when it moves (a broker
        restarted on the same port needs nothing)."""
        self.upstream = upstream
        self.rules = LinkRules()
        self.stats: dict[str, LinkStats] = {}
        self._servers: dict[str, asyncio.Server] = {}
        self._links: dict[str, set[_Link]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def add(self, name: str, *, port: int = 0) -> int:
        """Listen for ``name``'s connections on ``port`` of 127.0.0.1 (0: a free one); returns
        the port."""
        if self._closed:
            raise RuntimeError("the proxy is closed")
        if name in self._servers:
            raise ValueError(f"target {name!r} already has a port")

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(name, reader, writer)

        server = await asyncio.start_server(accept, "127.0.0.1", port)
        self._servers[name] = server
        self._links[name] = set()
        self.stats[name] = LinkStats()
        return int(server.sockets[0].getsockname()[1])

    def port(self, name: str) -> int:
        """The port ``name``'s connections go to."""
        return int(self._servers[name].sockets[0].getsockname()[1])

    def cut(self, name: str, seconds: float) -> None:
        """Close ``name``'s live connections now and close new ones at once for ``seconds``."""
        self._known(name)
        self.rules.cut(name, self._now(), seconds)
        self.stats[name].cuts += 1
        self._end_links(name, reset=False)

    def delay(self, name: str, ms: float, seconds: float) -> None:
        """Hold every chunk on ``name``, both ways, ``ms`` milliseconds longer for ``seconds``;
        the order of the bytes is kept."""
        self._known(name)
        self.rules.delay(name, self._now(), ms, seconds)
        self.stats[name].delays += 1

    def reset(self, name: str) -> None:
        """Abort ``name``'s live connections with a TCP RST; new ones are accepted."""
        self._known(name)
        self.stats[name].resets += 1
        self._end_links(name, reset=True)

    def summary(self) -> dict[str, dict[str, int]]:
        """Each target's counters, for the city's summary."""
        return {name: stats.as_json() for name, stats in self.stats.items()}

    def live(self, name: str) -> int:
        """How many connections of ``name`` are being forwarded now."""
        return len(self._links[name])

    async def close(self) -> None:
        """Stop listening, end every connection and wait for every task of the proxy."""
        self._closed = True
        for server in self._servers.values():
            server.close()
        for name in self._links:
            self._end_links(name, reset=False, count=False)
        # Not cancelled: asyncio's server logs a cancelled connection task as an error.  Ended
        # links end their tasks, and a handler still connecting gives up once it sees _closed.
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        for server in self._servers.values():
            await server.wait_closed()

    def _known(self, name: str) -> None:
        if name not in self._servers:
            raise ValueError(f"no target {name!r}")

    def _end_links(self, name: str, *, reset: bool, count: bool = True) -> None:
        links = self._links[name]
        if count:
            self.stats[name].closed_by_fault += len(links)
        for link in list(links):
            link.close(reset=reset)
        links.clear()

    async def _serve(
        self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("asyncio's server runs each connection in a task")
        self._tasks.add(task)
        try:
            await self._forward(name, reader, writer)
        finally:
            self._tasks.discard(task)

    async def _forward(
        self, name: str, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        stats = self.stats[name]
        if self._closed or self.rules.is_cut(name, self._now()):
            stats.refused += 1
            client.close()
            return
        try:
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), _CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            stats.refused += 1
            client.close()
            return
        if self._closed or self.rules.is_cut(name, self._now()):
            stats.refused += 1
            client.close()
            upstream.close()
            return
        for w in (client, upstream):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stats.connections += 1
        link = _Link(client, upstream)
        self._links[name].add(link)
        pumps = {
            asyncio.create_task(
                self._pump(name, client_reader, upstream, up=True), name=f"proxy {name} up"
            ),
            asyncio.create_task(
                self._pump(name, up_reader, client, up=False), name=f"proxy {name} down"
            ),
        }
        link.tasks |= pumps
        self._tasks |= pumps
        for pump in pumps:
            pump.add_done_callback(self._tasks.discard)
        try:
            # either side ending ends the link: MQTT never half-closes
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.wait(pumps)
            for pump in pumps:
                if not pump.cancelled():
                    pump.exception()  # a peer's reset ends the link; nothing to report
            self._links[name].discard(link)
            client.close()
            upstream.close()

    async def _pump(
        self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        """Bytes from ``reader`` to ``writer``, each chunk held for the latency in force when
        it arrived; a queue keeps their order while a writer sleeps."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUED_CHUNKS)
        stats = self.stats[name]

        async def write() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
                if up:
                    stats.bytes_up += len(chunk)
                else:
                    stats.bytes_down += len(chunk)

        async def read() -> None:
            while True:
                chunk = await reader.read(_CHUNK)
                now = loop.time()
                await queue.put((now + self.rules.latency(name, now), chunk))
                if not chunk:
                    return

        async with asyncio.TaskGroup() as group:
            group.create_task(read())
            group.create_task(write())

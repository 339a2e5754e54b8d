"""The kiosk's line to the host that holds the load key.

A :class:`Host` takes one load message (``farelab.protocol``'s load authorization: authorize,
confirm, void, …) and returns the answer.  :class:`MqttHost` is the backend over MQTT; an
in-process host with a ledger of its own (``farelab.backend.LocalHost``) fits the same shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from farelab.protocol import KIOSK_CLIENT_ID, LOAD_REQ, LOAD_RESP, check_client_id

if TYPE_CHECKING:
    import aiomqtt

    from farelab.protocol import BrokerURL

__all__ = ["Host", "HostUnreachableError", "MqttHost", "host_closed_after"]


T = TypeVar("T")


class HostUnreachableError(Exception):
    """No answer from the host: the kiosk must refuse instead of guessing."""


class Host(Protocol):
    """Where load messages go."""

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one message, return the host's answer; HostUnreachableError on silence."""
        ...


class MqttHost:
    """The backend, over MQTT request/response on the kiosk's own topics.

    One connection serves every call: made (and the answers' topic subscribed) at the first call,
    on that call's event loop, and made again after a failure or on another event loop; a call
    that finds the kept connection gone (the broker restarted since) tries once more on a new
    one.  A connection per call had been a connect, a subscribe and a disconnect twice a load: a
    fifth of a busy kiosk's interpreter time.  :meth:`aclose` ends it."""

    def __init__(self, broker: BrokerURL, kiosk: str, *, timeout: float = 5.0) -> None:
        """``kiosk``: this kiosk's id, a level of its topics (ValueError unless it can be one);
        ``timeout``: seconds to wait for an answer before declaring the host unreachable."""
        check_client_id(kiosk, "kiosk id")
        self._broker = broker
        self._kiosk = kiosk
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._connection: contextlib.AsyncExitStack | None = None
        self._client: aiomqtt.Client | None = None

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Publish the request, wait for the answer with the same id."""
        # The MQTT client is loaded by the first call: a kiosk with an in-process host, and the
        # kiosk's session alone, never load it.
        import aiomqtt  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A connection lives on the loop that made it (a one-shot command's asyncio.run
            # ends with its loop, and with it every task of that connection): start afresh.
            self._loop, self._lock = loop, asyncio.Lock()
            self._connection = self._client = None
        async with self._lock:  # a kiosk serves one card at a time: calls never overlap
            kept = self._client is not None
            try:
                async with asyncio.timeout(self._timeout):
                    while True:
                        try:
                            return await self._exchange(message)
                        except aiomqtt.MqttError:
                            if not kept:
                                raise
                            # The connection kept from an earlier call had gone (a broker
                            # restarted meanwhile): once more on a new one.  Load messages are
                            # idempotent, so a request that did reach the host may go again.
                            kept = False
                            await self._drop()
            except (TimeoutError, aiomqtt.MqttError) as exc:
                await self._drop()
                raise HostUnreachableError(
                    f"no answer from the host at {self._broker}: {exc}"
                ) from None
            except BaseException:  # cancelled mid-call: the connection's state is unknown
                await self._drop()
                raise

    async def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        """Publish the request on the connection (made now if there is none) and wait for the
        answer with its id (an answer to an earlier call that gave up waiting is skipped)."""
        client = await self._connected()
        await client.publish(LOAD_REQ.format(kiosk=self._kiosk), json.dumps(message), qos=1)
        async for reply in client.messages:
            try:
                answer = json.loads(bytes(reply.payload))
            except (ValueError, TypeError):
                continue
            if isinstance(answer, dict) and answer.get("id") == message.get("id"):
                return answer
        raise RuntimeError("unreachable: the messages of a connection end only with an error")

    async def _connected(self) -> aiomqtt.Client:
        """The open connection, made now if there is none."""
        if self._client is not None:
            return self._client
        from farelab.protocol import subscribe_or_raise  # noqa: PLC0415

        connection = contextlib.AsyncExitStack()
        try:
            client = await connection.enter_async_context(
                self._broker.client(
                    # the one client id the broker lets this kiosk's account use
                    identifier=KIOSK_CLIENT_ID.format(kiosk=self._kiosk),
                    timeout=self._timeout,
                )
            )
            await subscribe_or_raise(client, LOAD_RESP.format(kiosk=self._kiosk))
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.aclose()
            raise
        self._connection, self._client = connection, client
        return client

    async def _drop(self) -> None:
        """Close the connection, if any (a broker that does not answer is left behind)."""
        connection, self._connection, self._client = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await connection.aclose()

    async def aclose(self) -> None:
        """End the connection (on the event loop that made it; elsewhere it is only
        forgotten: its loop has ended, and its socket with it)."""
        if self._loop is asyncio.get_running_loop():
            async with self._lock:
                await self._drop()
        self._connection = self._client = None


async def host_closed_after(host: Host, work: Coroutine[Any, Any, T]) -> T:
    """``work``, then ``host``'s line closed on the same event loop, if it keeps one
    (:meth:`MqttHost.aclose`): what runs a kiosk on an ``asyncio.run`` of its own ends so."""
    try:
        return await work
    finally:
        close = getattr(host, "aclose", None)
        if close is not None:
            await close()

"""The kiosk's line to the host that holds the load key.

A :class:`Host` takes one load message (``farelab.protocol``'s load authorization: authorize,
confirm, void, …) and returns the answer.  :class:`MqttHost` is the backend over MQTT; an
in-process host with a ledger of its own (``farelab.backend.LocalHost``) fits the same shape.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Protocol

from farelab.protocol import KIOSK_CLIENT_ID, LOAD_REQ, LOAD_RESP, check_client_id

if TYPE_CHECKING:
    from farelab.protocol import BrokerURL

__all__ = ["Host", "HostUnreachableError", "MqttHost"]


class HostUnreachableError(Exception):
    """No answer from the host: the kiosk must refuse instead of guessing."""


class Host(Protocol):
    """Where load messages go."""

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one message, return the host's answer; HostUnreachableError on silence."""
        ...


class MqttHost:
    """The backend, over MQTT request/response on the kiosk's own topics."""

    def __init__(self, broker: BrokerURL, kiosk: str, *, timeout: float = 5.0) -> None:
        """``kiosk``: this kiosk's id, a level of its topics (ValueError unless it can be one);
        ``timeout``: seconds to wait for an answer before declaring the host unreachable."""
        check_client_id(kiosk, "kiosk id")
        self._broker = broker
        self._kiosk = kiosk
        self._timeout = timeout

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Publish the request, wait for the answer with the same id."""
        # The MQTT client is loaded by the first call: a kiosk with an in-process host, and the
        # kiosk's session alone, never load it.
        import aiomqtt  # noqa: PLC0415

        from farelab.protocol import subscribe_or_raise  # noqa: PLC0415

        broker = self._broker
        try:
            async with asyncio.timeout(self._timeout):
                async with broker.client(
                    # the one client id the broker lets this kiosk's account use: a kiosk
                    # serves one card at a time, so its requests never overlap
                    identifier=KIOSK_CLIENT_ID.format(kiosk=self._kiosk),
                    timeout=self._timeout,
                ) as client:
                    await subscribe_or_raise(client, LOAD_RESP.format(kiosk=self._kiosk))
                    await client.publish(
                        LOAD_REQ.format(kiosk=self._kiosk), json.dumps(message), qos=1
                    )
                    async for reply in client.messages:
                        try:
                            answer = json.loads(bytes(reply.payload))
                        except (ValueError, TypeError):
                            continue
                        if isinstance(answer, dict) and answer.get("id") == message.get("id"):
                            return answer
        except (TimeoutError, aiomqtt.MqttError) as exc:
            raise HostUnreachableError(f"no answer from the host at {broker}: {exc}") from None
        raise HostUnreachableError(f"the host at {broker} hung up")

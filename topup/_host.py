"""The kiosk's line to the host that holds the load key: the backend over MQTT, or — with no
broker given — an in-process host with the demo keys and a local ledger.

Both speak the backend's load messages (``backend._loads``): authorize, confirm, void.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any, Protocol

import aiomqtt

from farelab.backend._broker import KIOSK_CLIENT_ID, BrokerURL, check_client_id, subscribe_or_raise
from farelab.backend._loads import LOAD_REQ, LOAD_RESP, ensure_schema, handle_load_message
from farelab.backend._registry import DeviceEntry, lookup, register
from farelab.backend._store import Store
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, LoadAuthority, TacVerifier

__all__ = ["Host", "HostUnreachableError", "LocalHost", "MqttHost", "new_request_id"]


class HostUnreachableError(Exception):
    """No answer from the host: the kiosk must refuse instead of guessing."""


def new_request_id() -> str:
    """A unique id for one load's messages."""
    return uuid.uuid4().hex


class Host(Protocol):
    """Where load messages go."""

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one message, return the host's answer; HostUnreachableError on silence."""
        ...


class LocalHost:
    """An in-process host with the demo issuer's keys and a SQLite ledger of its own.

    The host runs in the kiosk's own process, so it registers that kiosk in its ledger's device
    registry the first time (a kiosk revoked there stays revoked).
    """

    def __init__(self, ledger: Path, kiosk: str, *, terminal: bytes) -> None:
        """
        Args:
            ledger: the host's database file.
            kiosk: this kiosk's id (ValueError unless it can be a topic level).
            terminal: the kiosk's 6-byte terminal id, as its load requests carry it.
        """
        check_client_id(kiosk, "kiosk id")
        self._store = Store(f"sqlite:///{ledger}")
        ensure_schema(self._store)
        if lookup(self._store, kiosk) is None:
            register(
                self._store,
                DeviceEntry(
                    id=kiosk,
                    role="kiosk",
                    operator=kiosk[:8],
                    kinds=frozenset({"load", "refund"}),
                    terminal=terminal.hex().upper(),
                ),
            )
        self._authority = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS})
        self._verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
        self._kiosk = kiosk

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Handled at once, in this process."""
        payload = json.dumps(message).encode()
        return await asyncio.to_thread(
            handle_load_message,
            self._store,
            self._authority,
            self._verifier,
            self._kiosk,
            payload,
        )

    def close(self) -> None:
        """Close the ledger."""
        self._store.close()


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
                            answer: dict[str, Any] = json.loads(bytes(reply.payload))
                        except (ValueError, TypeError):
                            continue
                        if answer.get("id") == message.get("id"):
                            return answer
        except (TimeoutError, aiomqtt.MqttError) as exc:
            raise HostUnreachableError(f"no answer from the host at {broker}: {exc}") from None
        raise HostUnreachableError(f"the host at {broker} hung up")

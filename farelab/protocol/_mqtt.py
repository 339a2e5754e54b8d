"""The MQTT link both ends share: broker addresses, subscriptions that fail loudly, the
connection's state, and cancellation that
survives aiomqtt's timeouts."""

from __future__ import annotations

import asyncio
import enum
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "BrokerURL",
    "LinkState",
    "SubscriptionRefusedError",
    "cancel_and_wait",
    "honour_cancellation",
    "subscribe_or_raise",
]


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://…`` (TLS, default port 8883).
    Options: ``?ca=/path/ca.pem`` (a CA bundle for a private broker certificate),
    ``?protocol=3.1.1`` (for brokers without MQTT 5; no shared subscriptions, one worker)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    protocol: str = "5"

    @property
    def mqtt5(self) -> bool:
        """False for ``?protocol=3.1.1`` (brokers without MQTT 5, such as amqtt)."""
        return self.protocol == "5"

    @property
    def version(self) -> aiomqtt.ProtocolVersion:
        """The MQTT protocol version to speak."""
        return aiomqtt.ProtocolVersion.V5 if self.mqtt5 else aiomqtt.ProtocolVersion.V311

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """ValueError naming what is wrong with the URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ValueError(f"broker URL {url!r} has a bad port") from None
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        query = parse_qs(parts.query)
        unknown = set(query) - {"ca", "protocol"}
        if unknown:
            raise ValueError(f"broker URL {url!r}: unknown option(s) {sorted(unknown)}")
        ca = query.get("ca", [None])[0]
        if ca is not None and not tls:
            raise ValueError(f"broker URL {url!r}: 'ca' needs mqtts://")
        protocol = query.get("protocol", ["5"])[0]
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"broker URL {url!r}: protocol must be 5 or 3.1.1")
        parsed = cls(parts.hostname, port, user, password, tls, ca, protocol)
        parsed.tls_context()  # a CA file that cannot be read is an error now, not at connect
        return parsed

    def tls_context(self) -> ssl.SSLContext | None:
        """The system's default TLS context for ``mqtts://``; ValueError naming the CA file if
        it cannot be read or holds no certificate."""
        if not self.tls:
            return None
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            raise ValueError(
                f"broker CA file {self.ca_file}: not a PEM CA bundle ({reason})"
            ) from None
        except OSError as exc:
            raise ValueError(f"broker CA file {self.ca_file}: {exc.strerror}") from None

    def client(
        self,
        *,
        identifier: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10,
        **options: Any,
    ) -> aiomqtt.Client:
        """An aiomqtt client for this broker (the URL's credentials unless others are given);
        ``options`` go to :class:`aiomqtt.Client` as they are.  The socket has TCP_NODELAY
        (paho does not set it): small messages answered at once — acks, load authorizations —
        would otherwise wait ~40 ms for a delayed ACK behind Nagle's algorithm."""
        options.setdefault("socket_options", ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),))
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=identifier,
            username=username if username is not None else self.username,
            password=password if password is not None else self.password,
            protocol=self.version,
            tls_context=self.tls_context(),
            timeout=timeout,
            **options,
        )

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


class SubscriptionRefusedError(aiomqtt.MqttError):
    """The broker answered a SUBSCRIBE with a failure reason code (0x80 and up): the client
    would wait for ever for messages the broker will never send it."""

    def __init__(self, topic: str, code: int) -> None:
        super().__init__(
            f"the broker refused the subscription {topic} (reason {code:#04x}): this account "
            "may not read it (see farelab backend broker-config)"
        )
        self.topic = topic
        self.code = code


async def subscribe_or_raise(client: aiomqtt.Client, topic: str, *, qos: int = 1) -> None:
    """Subscribe, and raise :class:`SubscriptionRefusedError` unless the broker granted it.
    (MQTT 3.1.1 answers 0x80 for a refusal; MQTT 5 a reason code of 0x80 or more.)"""
    granted = await client.subscribe(topic, qos=qos)
    codes: list[int | ReasonCode] = list(granted) if isinstance(granted, Sequence) else []
    code = codes[0] if codes else 0x80
    value = code.value if isinstance(code, ReasonCode) else int(code)
    if value >= 0x80:
        raise SubscriptionRefusedError(topic, value)


class LinkState(enum.Enum):
    """The uplink's connection, as an explicit state."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"


def honour_cancellation() -> None:
    """Raise :class:`asyncio.CancelledError` if this task was asked to stop but is running on.

    Python 3.11's ``asyncio.wait_for`` — which aiomqtt 2 wraps around every publish, subscribe
    and connect — loses a cancellation that lands just as the awaited thing completes (fixed
    in 3.12).  The request is still counted on the task, so a loop around such calls that
    checks here once a turn stops as it was told to, instead of hanging its owner's shutdown.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], *, again_every: float = 0.5) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``again_every``
    seconds in case a library swallowed the request (see :func:`honour_cancellation`)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=again_every)
    if not task.cancelled() and task.exception() is not None:
        task.exception()  # retrieved: the caller is stopping it, not interested in why it ended

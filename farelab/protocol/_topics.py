"""The MQTT topics of the contract, version 1, and the client ids devices connect with.

Every device has its own subtree ``farelab/v1/dev/<device>/…``: ``tx`` (batches, device →
backend), ``ack`` (acknowledgements, backend → device), ``params`` (retained parameters,
backend → device) and ``status`` (retained, the parameters version a device runs).  A kiosk has
``farelab/v1/kiosk/<kiosk>/load/req`` and ``…/load/resp``.  Backend workers share the device
topics through ``$share`` groups.
"""

from __future__ import annotations

import re

__all__ = [
    "ACK_TOPIC",
    "DEVICE_CLIENT_ID",
    "KIOSK_CLIENT_ID",
    "LOAD_REQ",
    "LOAD_RESP",
    "PARAMS_TOPIC",
    "SHARED_LOAD_REQ",
    "SHARED_TX",
    "STATUS_TOPIC",
    "TX_TOPIC",
    "check_client_id",
]

TX_TOPIC = "farelab/v1/dev/{device}/tx"
ACK_TOPIC = "farelab/v1/dev/{device}/ack"
PARAMS_TOPIC = "farelab/v1/dev/{device}/params"
STATUS_TOPIC = "farelab/v1/dev/{device}/status"
SHARED_TX = "$share/{group}/farelab/v1/dev/+/tx"
#: A validator's MQTT client id: stable (its session persists), and the only one the broker lets
#: that device's account use, so no account can take another device's session over.
DEVICE_CLIENT_ID = "farelab-dev-{device}"
KIOSK_CLIENT_ID = "farelab-kiosk-{kiosk}"

_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_client_id(value: str, what: str = "device id") -> str:
    """``value`` if it can be one level of a topic and a broker username: 1-64 characters of
    letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit (no ``/``, ``#``,
    ``+`` or ``$``, which would change what a topic means); otherwise ValueError naming it."""
    if not isinstance(value, str) or not _CLIENT_ID.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(
            f"{what} {shown} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


LOAD_REQ = "farelab/v1/kiosk/{kiosk}/load/req"
LOAD_RESP = "farelab/v1/kiosk/{kiosk}/load/resp"
SHARED_LOAD_REQ = "$share/{group}/farelab/v1/kiosk/+/load/req"

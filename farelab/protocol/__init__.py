"""The contract between farelab's devices and its backend, version 1: what goes on the wire and
on disk, shared by both ends so that neither imports the other.

- Transactions: :class:`Record` (one journalled transaction, as it travels), :class:`Batch`,
  :class:`Ack`, and their binary codecs (:func:`encode_batch`, :func:`decode_batch`, …);
  malformed input is a :class:`WireError` with a reason.
- Topics and client ids: ``TX_TOPIC``, ``ACK_TOPIC``, ``PARAMS_TOPIC``, ``STATUS_TOPIC``,
  ``LOAD_REQ``, ``LOAD_RESP``, the shared-subscription forms, :func:`check_client_id`.
- Parameters and status messages: :class:`ParamsMessage`, :func:`encode_params`,
  :func:`decode_params`; a device's report :class:`DeviceStatus` (``LATENCY_BOUNDS_MS``),
  :func:`encode_status`, :func:`decode_status`.
- Load authorization: :func:`authorize_message`, :func:`load_request_of`,
  :func:`card_serial_of`; the kiosk's other load messages (:func:`confirm_message`,
  :func:`void_message`, :func:`quote_message`, :func:`transfer_message`,
  :func:`refund_check_message`, :func:`refund_message` of a :func:`refund_record`).
- :class:`Backoff`: capped, jittered exponential backoff for every reconnecting loop;
  :func:`lines_of`: a blocking stream's lines (stdin) for an asyncio loop that must stop at once;
  :func:`ending_with_parent`: a command line whose process ends with its parent.
- Files: :func:`claim` marks and checks farelab's SQLite files (journal, ledger, kiosk journal).
- The MQTT link both ends use (:class:`BrokerURL`, :func:`subscribe_or_raise`, …) is loaded
  on first use, so that importing the contract does not import an MQTT client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from farelab.protocol._backoff import Backoff
from farelab.protocol._children import ending_with_parent
from farelab.protocol._files import FileKind, ForeignFileError, claim
from farelab.protocol._lines import lines_of
from farelab.protocol._loads import (
    LOAD_OPS,
    authorize_message,
    card_serial_of,
    confirm_message,
    load_request_of,
    quote_message,
    refund_check_message,
    refund_message,
    refund_record,
    transfer_message,
    void_message,
)
from farelab.protocol._params import (
    LATENCY_BOUNDS_MS,
    MAX_PACKET_SIZE,
    PARAMS_MAX,
    DeviceStatus,
    ParamsError,
    ParamsMessage,
    decode_params,
    decode_status,
    encode_params,
    encode_status,
)
from farelab.protocol._topics import (
    ACK_TOPIC,
    DEVICE_CLIENT_ID,
    KIOSK_CLIENT_ID,
    LOAD_REQ,
    LOAD_RESP,
    PARAMS_TOPIC,
    SHARED_LOAD_REQ,
    SHARED_TX,
    STATUS_TOPIC,
    TX_TOPIC,
    check_client_id,
)
from farelab.protocol._wire import (
    BATCH_MAX,
    KINDS,
    RECORD_SIZE,
    STATUSES,
    Ack,
    Batch,
    Record,
    WireError,
    decode_ack,
    decode_batch,
    decode_record,
    encode_ack,
    encode_batch,
    encode_batch_records,
    encode_record,
)

if TYPE_CHECKING:
    from farelab.protocol._mqtt import (
        BrokerURL,
        LinkState,
        SubscriptionRefusedError,
        cancel_and_wait,
        honour_cancellation,
        subscribe_or_raise,
    )

__all__ = [
    "ACK_TOPIC",
    "BATCH_MAX",
    "DEVICE_CLIENT_ID",
    "KINDS",
    "KIOSK_CLIENT_ID",
    "LATENCY_BOUNDS_MS",
    "LOAD_OPS",
    "LOAD_REQ",
    "LOAD_RESP",
    "MAX_PACKET_SIZE",
    "PARAMS_MAX",
    "PARAMS_TOPIC",
    "RECORD_SIZE",
    "SHARED_LOAD_REQ",
    "SHARED_TX",
    "STATUSES",
    "STATUS_TOPIC",
    "TX_TOPIC",
    "Ack",
    "Backoff",
    "Batch",
    "BrokerURL",
    "DeviceStatus",
    "FileKind",
    "ForeignFileError",
    "LinkState",
    "ParamsError",
    "ParamsMessage",
    "Record",
    "SubscriptionRefusedError",
    "WireError",
    "authorize_message",
    "cancel_and_wait",
    "card_serial_of",
    "check_client_id",
    "claim",
    "confirm_message",
    "decode_ack",
    "decode_batch",
    "decode_params",
    "decode_record",
    "decode_status",
    "encode_ack",
    "encode_batch",
    "encode_batch_records",
    "encode_params",
    "encode_record",
    "encode_status",
    "ending_with_parent",
    "honour_cancellation",
    "lines_of",
    "load_request_of",
    "quote_message",
    "refund_check_message",
    "refund_message",
    "refund_record",
    "subscribe_or_raise",
    "transfer_message",
    "void_message",
]

# The names of __all__ not imported above: the MQTT link's, loaded with aiomqtt on first use.
_MQTT = frozenset(__all__) - frozenset(globals())


def __getattr__(name: str) -> Any:
    """The MQTT link's names, imported when first asked for."""
    if name in _MQTT:
        value = getattr(importlib.import_module("farelab.protocol._mqtt"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The bus and metro validator: it decides a tap, debits the card through its PSAM, journals
the result before the rider sees it, and uploads the journal to the backend.

- The decision: :class:`Tap` is a sans-IO flow over a card — it emits the next APDU, an
  :class:`Intent` before the DEBIT leaves, and ends in a :class:`TapResult`
  (:class:`Accepted` or :class:`Rejected`); the fare rules are plain functions
  (:func:`bus_fare`, :func:`metro_trip_fare`, …) over a :class:`Network`'s tables
  (:func:`shipped_networks`, :func:`load_networks`, :func:`parse_networks`).
- A device: :class:`Device` (its :class:`Kind`, network, line, station, :class:`Direction`),
  its :class:`Parameters` (hotlist, whitelist, fare tables), a :class:`Config` of
  :class:`DeviceConfig` read by :func:`load_config`; :class:`Validator` runs one device's taps on
  a reader.
- The journal: :class:`Journal` (SQLite, with an intent log) keeps every tap and transaction and
  the outbox the uplink sends; :class:`JournalError` when it cannot.
- The uplink: :class:`UplinkSession` holds the rules (batches, window, ack matching, resends) as
  a state machine without I/O — it answers :class:`ReadOutbox`, :class:`Send`, :class:`Wait`,
  and an ack with :class:`Acknowledge`, :class:`BatchRefused` or :class:`AckIgnored`;
  :class:`MqttUplink` is its asyncio shell (these load the MQTT client on first use).
- The application: :func:`run` is ``farelab validator run``'s loop (readers, display,
  parameters, uplink); it tunes the process for its taps (:class:`TapGate`,
  :func:`favour_taps`), which nothing else here does.  :func:`replay` runs a taps file
  deterministically (:func:`parse_taps`, :func:`result_json`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from farelab.validator._config import Config, ConfigError, DeviceConfig, load_config
from farelab.validator._decision import (
    Accepted,
    Intent,
    Pending,
    Rejected,
    Resolution,
    Tap,
    TapResult,
)
from farelab.validator._device import Device, Direction, Kind, Parameters
from farelab.validator._fares import (
    PreviousRide,
    Quote,
    Rider,
    bus_fare,
    metro_entry_minimum,
    metro_share,
    metro_trip_fare,
)
from farelab.validator._journal import Journal, JournalError
from farelab.validator._loop import ParamsHandler, Uplink, load_params, parse_params, run
from farelab.validator._network import (
    Line,
    Network,
    NetworkError,
    Station,
    load_networks,
    parse_networks,
    shipped_networks,
)
from farelab.validator._priority import TapGate
from farelab.validator._replay import (
    PULL_STEPS,
    ReplayError,
    TapLine,
    parse_taps,
    replay,
    result_json,
)
from farelab.validator._runtime import (
    FEED_SWITCH_INTERVAL_S,
    TAP_SWITCH_INTERVAL_S,
    Validator,
    favour_taps,
)
from farelab.validator._values import positive_seconds

if TYPE_CHECKING:
    from farelab.validator._uplink import MqttUplink
    from farelab.validator._uplink_process import UplinkProcess
    from farelab.validator._uplink_session import (
        AckIgnored,
        Acknowledge,
        BatchRefused,
        ReadOutbox,
        Send,
        UplinkSession,
        UplinkStats,
        Wait,
    )

__all__ = [
    "FEED_SWITCH_INTERVAL_S",
    "PULL_STEPS",
    "TAP_SWITCH_INTERVAL_S",
    "Accepted",
    "AckIgnored",
    "Acknowledge",
    "BatchRefused",
    "Config",
    "ConfigError",
    "Device",
    "DeviceConfig",
    "Direction",
    "Intent",
    "Journal",
    "JournalError",
    "Kind",
    "Line",
    "MqttUplink",
    "Network",
    "NetworkError",
    "Parameters",
    "ParamsHandler",
    "Pending",
    "PreviousRide",
    "Quote",
    "ReadOutbox",
    "Rejected",
    "ReplayError",
    "Resolution",
    "Rider",
    "Send",
    "Station",
    "Tap",
    "TapGate",
    "TapLine",
    "TapResult",
    "Uplink",
    "UplinkProcess",
    "UplinkSession",
    "UplinkStats",
    "Validator",
    "Wait",
    "bus_fare",
    "favour_taps",
    "load_config",
    "load_networks",
    "load_params",
    "metro_entry_minimum",
    "metro_share",
    "metro_trip_fare",
    "parse_networks",
    "parse_params",
    "parse_taps",
    "positive_seconds",
    "replay",
    "result_json",
    "run",
    "shipped_networks",
]

# The uplink's names, loaded on first use: its link state comes with the MQTT client.
_WHERE = {
    "MqttUplink": "farelab.validator._uplink",
    "UplinkProcess": "farelab.validator._uplink_process",
}
_LAZY = frozenset(__all__) - frozenset(globals())


def __getattr__(name: str) -> Any:
    """The uplink's names, imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _WHERE.get(name, "farelab.validator._uplink_session")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

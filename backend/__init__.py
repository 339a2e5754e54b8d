"""The clearing backend: it takes the validators' batches and the kiosks' load requests over
MQTT, keeps the ledger (SQLite or PostgreSQL), and clears and reports on it.

- The ledger: :class:`Store` (``sqlite:///…`` or ``postgresql://…``), :class:`StoreError`,
  :class:`IngestResult` (what one batch did).
- The ingest rules, pure: :func:`classify` verifies a batch's TACs, :func:`decide` says what a
  batch does to the ledger given what the ledger knows (:class:`LedgerView`,
  :class:`Decision`).
- The device registry: :class:`DeviceEntry`, :func:`register`, :func:`lookup`,
  :func:`entries`, :func:`revoke`, :func:`hash_secret`, ``ROLES``.
- Issuer profiles, data shipped in ``profiles.toml`` (:func:`load_profiles` →
  :class:`IssuerProfile`, :class:`Duration`, :class:`ProfileError`,
  :func:`working_days_after`), and the card-life core, pure (:class:`Card`, its events,
  :func:`card_status` → :class:`CardStatus`, :func:`check_action` → :class:`Refusal`,
  :func:`balance_moves_on`); docs/card-life.md.
- Card records, the shell around that core (``farelab cards``): :func:`issue_card`,
  :func:`card_action` (``CARD_ACTIONS``; a replacement's :class:`NewCard`), :func:`show_card`,
  :func:`cards_by_state`; each action journalled once, its effect on the hotlist.
- Kiosks' loads: :func:`handle_load_message` (and :func:`ensure_schema` of its tables);
  :class:`LocalHost`, an in-process host with a ledger of its own.
- The service: :func:`run_workers` (the ``farelab backend run`` supervisor), :func:`run_worker`,
  :func:`instance_id`, :class:`ConfigurationError`; the live dashboard it serves with
  ``--http`` (:class:`Dashboard`, :class:`Board` of the devices' reports,
  :func:`parse_http_address`).
- Reports and clearing: :func:`report` (``ANOMALY_KEYS``), :func:`clear_ledger`, :func:`clear`,
  :class:`Clearing`.
- Parameters to devices: :func:`next_params`, :func:`publish_params`, :func:`read_status`,
  :func:`devices_in`.
- The broker: :func:`write_broker_config` (accounts and roles from the registry;
  ``BACKEND_ACCOUNT``, ``DEFAULT_GROUP``, ``FORMATS``, :func:`find_dynsec_plugin`; the
  registry's broker accounts, :func:`accounts` → :class:`Account`, and what a role may
  publish and receive, :func:`grants`), the open
  broker check (:func:`open_logins`, :func:`open_broker_warning`, ``OPEN_BROKER_RISKS``),
  :class:`Mosquitto` (a private Mosquitto for tests, benchmarks and the city; :class:`BrokerError`;
  :func:`free_port`) and
  :func:`embedded_broker` (an in-process amqtt broker for the demo).

The service, the parameters and the broker check (the MQTT client), clearing (numpy) and the
embedded broker (amqtt) are loaded on first use, so that importing the backend does not import
them; the ledger loads the PostgreSQL driver only for a PostgreSQL URL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from farelab.backend._brokerconfig import (
    BACKEND_ACCOUNT,
    DEFAULT_GROUP,
    FORMATS,
    Account,
    accounts,
    find_dynsec_plugin,
    grants,
    write_broker_config,
)
from farelab.backend._cards import (
    CARD_ACTIONS,
    NewCard,
    card_action,
    cards_by_state,
    issue_card,
    show_card,
)
from farelab.backend._ingest import Classified, Decision, LedgerView, classify, decide
from farelab.backend._lifecycle import (
    ACTIONS,
    STATES,
    Cancel,
    Card,
    CardStatus,
    EcardIssue,
    Event,
    Exchange,
    Found,
    LifecycleError,
    MakeFormal,
    PinOk,
    PinReset,
    PinWrong,
    Refund,
    Refusal,
    Renew,
    Replace,
    ReportLoss,
    Unfreeze,
    balance_moves_on,
    card_status,
    check_action,
)
from farelab.backend._loads import ensure_schema, handle_load_message
from farelab.backend._localhost import LocalHost
from farelab.backend._mosquitto import BrokerError, Mosquitto, free_port
from farelab.backend._profiles import (
    Duration,
    IssuerProfile,
    ProfileError,
    load_profiles,
    working_days_after,
)
from farelab.backend._registry import (
    ROLES,
    DeviceEntry,
    entries,
    hash_secret,
    lookup,
    register,
    revoke,
)
from farelab.backend._report import ANOMALY_KEYS, report
from farelab.backend._store import IngestResult, Store, StoreError

if TYPE_CHECKING:
    from farelab.backend._brokercheck import OPEN_BROKER_RISKS, open_broker_warning, open_logins
    from farelab.backend._clearing import Clearing, clear, clear_ledger
    from farelab.backend._dashboard import Board, Dashboard, parse_http_address
    from farelab.backend._embedded import embedded_broker
    from farelab.backend._params import devices_in, next_params, publish_params, read_status
    from farelab.backend._service import ConfigurationError, instance_id, run_worker, run_workers

__all__ = [
    "ACTIONS",
    "ANOMALY_KEYS",
    "BACKEND_ACCOUNT",
    "CARD_ACTIONS",
    "DEFAULT_GROUP",
    "FORMATS",
    "OPEN_BROKER_RISKS",
    "ROLES",
    "STATES",
    "Account",
    "Board",
    "BrokerError",
    "Cancel",
    "Card",
    "CardStatus",
    "Classified",
    "Clearing",
    "ConfigurationError",
    "Dashboard",
    "Decision",
    "DeviceEntry",
    "Duration",
    "EcardIssue",
    "Event",
    "Exchange",
    "Found",
    "IngestResult",
    "IssuerProfile",
    "LedgerView",
    "LifecycleError",
    "LocalHost",
    "MakeFormal",
    "Mosquitto",
    "NewCard",
    "PinOk",
    "PinReset",
    "PinWrong",
    "ProfileError",
    "Refund",
    "Refusal",
    "Renew",
    "Replace",
    "ReportLoss",
    "Store",
    "StoreError",
    "Unfreeze",
    "accounts",
    "balance_moves_on",
    "card_action",
    "card_status",
    "cards_by_state",
    "check_action",
    "classify",
    "clear",
    "clear_ledger",
    "decide",
    "devices_in",
    "embedded_broker",
    "ensure_schema",
    "entries",
    "find_dynsec_plugin",
    "free_port",
    "grants",
    "handle_load_message",
    "hash_secret",
    "instance_id",
    "issue_card",
    "load_profiles",
    "lookup",
    "next_params",
    "open_broker_warning",
    "open_logins",
    "parse_http_address",
    "publish_params",
    "read_status",
    "register",
    "report",
    "revoke",
    "run_worker",
    "run_workers",
    "show_card",
    "working_days_after",
    "write_broker_config",
]

# The names loaded on first use, by module.
_LAZY = {
    "OPEN_BROKER_RISKS": "_brokercheck",
    "open_broker_warning": "_brokercheck",
    "open_logins": "_brokercheck",
    "Clearing": "_clearing",
    "clear": "_clearing",
    "clear_ledger": "_clearing",
    "Board": "_dashboard",
    "Dashboard": "_dashboard",
    "parse_http_address": "_dashboard",
    "embedded_broker": "_embedded",
    "devices_in": "_params",
    "next_params": "_params",
    "publish_params": "_params",
    "read_status": "_params",
    "ConfigurationError": "_service",
    "instance_id": "_service",
    "run_worker": "_service",
    "run_workers": "_service",
}


def __getattr__(name: str) -> Any:
    """The names of the parts that need the MQTT client, numpy or amqtt, imported when first
    asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value

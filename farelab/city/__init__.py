"""A city in one command (``farelab city``): every device a process, riders with habits, chaos
that cannot lose a fen, and the reconciliation that proves it.

Public names are added as the parts land; nothing here is imported by the packages below it.
"""

from __future__ import annotations

from farelab.city._chaos import FAULT_KINDS, PULL_STEPS, Fault, FaultKind, plan_faults
from farelab.city._plan import (
    FOREIGN_LISTED,
    FOREIGN_UNLISTED,
    RIDERS_PER_KIOSK,
    CityDevice,
    CityPlan,
    Rider,
    Trip,
    day_trips,
    kiosk_ids,
    kiosk_terminal,
    plan_city,
)
from farelab.city._procs import Child, children_of
from farelab.city._proxy import FaultProxy, LinkRules, LinkStats
from farelab.city._reconcile import (
    CardBalance,
    JournalTx,
    LedgerTx,
    LoadRow,
    Reconciliation,
    reconcile,
)
from farelab.city._run import (
    CARD_FOLDERS,
    CityError,
    CityInterruptedError,
    CityOptions,
    card_folder,
    run_city,
)
from farelab.city._topology import (
    CENTRAL,
    BridgedTopology,
    BrokerLogin,
    CentralTLS,
    bridge_account,
    line_broker,
)

__all__: list[str] = [
    "CARD_FOLDERS",
    "CENTRAL",
    "FAULT_KINDS",
    "FOREIGN_LISTED",
    "FOREIGN_UNLISTED",
    "PULL_STEPS",
    "RIDERS_PER_KIOSK",
    "BridgedTopology",
    "BrokerLogin",
    "CardBalance",
    "CentralTLS",
    "Child",
    "CityDevice",
    "CityError",
    "CityInterruptedError",
    "CityOptions",
    "CityPlan",
    "Fault",
    "FaultKind",
    "FaultProxy",
    "JournalTx",
    "LedgerTx",
    "LinkRules",
    "LinkStats",
    "LoadRow",
    "Reconciliation",
    "Rider",
    "Trip",
    "bridge_account",
    "card_folder",
    "children_of",
    "day_trips",
    "kiosk_ids",
    "kiosk_terminal",
    "line_broker",
    "plan_city",
    "plan_faults",
    "reconcile",
    "run_city",
]

"""A city in one command (``farelab city``): every device a process, riders with habits, chaos
that cannot lose a fen, and the reconciliation that proves it.

Public names are added as the parts land; nothing here is imported by the packages below it.
"""

from __future__ import annotations

from farelab.city._chaos import FAULT_KINDS, PULL_STEPS, Fault, FaultKind, plan_faults
from farelab.city._proxy import FaultProxy, LinkRules, LinkStats
from farelab.city._topology import (
    CENTRAL,
    BridgedTopology,
    BrokerLogin,
    CentralTLS,
    bridge_account,
    line_broker,
)

__all__: list[str] = [
    "CENTRAL",
    "FAULT_KINDS",
    "PULL_STEPS",
    "BridgedTopology",
    "BrokerLogin",
    "CentralTLS",
    "Fault",
    "FaultKind",
    "FaultProxy",
    "LinkRules",
    "LinkStats",
    "bridge_account",
    "line_broker",
    "plan_faults",
]

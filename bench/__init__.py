"""farelab's benchmarks: tap latency (in process, through pcscd, and modelled on the air), the
validator's throughput and memory, ingest and clearing, top-up latency, the backend's memory and
the commands' start-up time, each checked against its budget.

``farelab bench`` runs the suite (:func:`run_suite`) and prints the budget table
(:func:`budget_table`); ``--json`` writes every figure (:func:`dump`), ``--report`` an HTML page
with charts (:func:`write_report`).  Single measures run alone as ``python -m farelab.bench.<name>``
(``ingest``, ``topup_latency``, ``validator_memory``, ``backend_memory``, ``startup``); how each
figure is taken is in bench/README.md.  Everything here is loaded on first use: the suite needs
numpy, the MQTT client and the database drivers, the report matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farelab.bench._report import write_report
    from farelab.bench._suite import BUDGETS, Budget, budget_table, checked, dump, run_suite
    from farelab.bench._watchdog import StepTimeout, time_limit, where_threads_are

__all__ = [
    "BUDGETS",
    "Budget",
    "StepTimeout",
    "budget_table",
    "checked",
    "dump",
    "run_suite",
    "time_limit",
    "where_threads_are",
    "write_report",
]

_WHERE = {
    "write_report": "farelab.bench._report",
    "StepTimeout": "farelab.bench._watchdog",
    "time_limit": "farelab.bench._watchdog",
    "where_threads_are": "farelab.bench._watchdog",
}


def __getattr__(name: str) -> Any:
    """The bench's names, loaded when first asked for."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE.get(name, "farelab.bench._suite")), name)
    globals()[name] = value
    return value

"""Validator processes hosting several devices of the city (``--devices-per-process``): how the
devices are grouped, and a chaos city of grouped processes that still reconciles to the fen."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from farelab.city import plan_city
from farelab.city._run import group_devices
from farelab.validator import shipped_networks
from tests.cli_support import farelab

DAY = date(2026, 11, 23)


def test_one_device_a_process_names_each_process_after_its_device() -> None:
    plan = plan_city(shipped_networks()["taiyuan"], riders=20, seed=1, day=DAY)
    groups = group_devices(plan, 1, "direct")
    assert list(groups) == [d.id for d in plan.devices]
    assert all(groups[name] == [name] for name in groups)


@pytest.mark.parametrize("per_process", [2, 7, 25, 1000])
def test_devices_are_grouped_in_plan_order_each_once(per_process: int) -> None:
    plan = plan_city(shipped_networks()["taiyuan"], riders=20, seed=1, day=DAY)
    groups = group_devices(plan, per_process, "direct")
    assert [d for ds in groups.values() for d in ds] == [d.id for d in plan.devices]
    assert all(1 <= len(ds) <= per_process for ds in groups.values())
    assert len(groups) == -(-len(plan.devices) // per_process)
    assert all(name.startswith("validators-") for name, ds in groups.items() if len(ds) > 1)
    # a station's entry and exit gates side by side: in one process when it hosts two or more
    if per_process % 2 == 0:
        for ds in groups.values():
            for gate in (d for d in ds if d.endswith("-in")):
                assert gate.replace("-in", "-out") in ds


def test_bridged_processes_never_mix_two_lines_devices() -> None:
    plan = plan_city(shipped_networks()["changzhou"], riders=20, seed=1, day=DAY, stations=6)
    line_of = {d.id: d.line or "bus" for d in plan.devices}
    groups = group_devices(plan, 100, "bridged")
    assert all(len({line_of[d] for d in ds}) == 1 for ds in groups.values())
    assert len(groups) == len(set(line_of.values()))


def test_a_process_hosts_at_least_one_device() -> None:
    plan = plan_city(shipped_networks()["taiyuan"], riders=20, seed=1, day=DAY)
    with pytest.raises(ValueError, match="at least one"):
        group_devices(plan, 0, "direct")


def test_a_chaos_city_of_grouped_validator_processes_reconciles(tmp_path: Path) -> None:
    """Four devices a process, one journal each: a killed process takes its devices down
    together, a cut link cuts theirs; taps torn by either are settled, not a fen astray."""
    summary_file = tmp_path / "summary.json"
    result = farelab(
        "city",
        "--chaos",
        "--riders",
        "60",
        "--stations",
        "4",
        "--duration",
        "30",
        "--seed",
        "4",
        "--devices-per-process",
        "4",
        "--dir",
        str(tmp_path / "city"),
        "--json",
        str(summary_file),
        timeout=300,
    )
    summary = json.loads(summary_file.read_text())
    assert result.returncode == 0, json.dumps(summary["differences"])[:3000] + result.stderr
    assert summary["reconciled"] is True
    assert summary["validator_processes"] == 3  # 8 gates and 3 buses, four a process
    assert summary["devices_per_process"] == 4
    journals = sorted(p.name for p in (tmp_path / "city" / "devices").glob("*.db"))
    assert journals == ["validators-01.db", "validators-02.db", "validators-03.db"]
    kinds = {f["kind"] for f in summary["faults"]}
    assert kinds & {"kill_device", "cut", "reset", "delay", "pull_card"}
    assert summary["drain_s"] >= 0

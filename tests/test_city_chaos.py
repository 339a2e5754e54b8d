"""The city's fault schedule: the same seed gives the same faults, every kind strikes in a
minute's run, durations stay in their bounds, nothing strikes while the city settles, and no
two faults share a target at once."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import pytest

from farelab.city import FAULT_KINDS, PULL_STEPS, Fault, plan_faults

DEVICES = ("bus-1", "bus-2", "gate-a", "gate-b")


def test_the_same_seed_gives_the_same_schedule() -> None:
    assert plan_faults(7, 300, DEVICES) == plan_faults(7, 300, DEVICES)


def test_different_seeds_give_different_schedules() -> None:
    schedules = {tuple(plan_faults(seed, 300, DEVICES)) for seed in range(20)}
    assert len(schedules) == 20


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("duration", [60, 61.5, 180, 900])
def test_every_kind_strikes_in_a_run_of_a_minute_or_more(seed: int, duration: float) -> None:
    kinds = {f.kind for f in plan_faults(seed, duration, DEVICES)}
    assert kinds == set(FAULT_KINDS)


def test_every_kind_strikes_even_with_one_device_in_a_minute() -> None:
    for seed in range(50):
        kinds = {f.kind for f in plan_faults(seed, 60, ["bus-1"], workers=1)}
        assert kinds == set(FAULT_KINDS), seed


def test_a_kind_without_a_target_is_left_out() -> None:
    faults = plan_faults(3, 120, DEVICES, kiosks=(), workers=0)
    assert {f.kind for f in faults} == set(FAULT_KINDS) - {"kill_kiosk", "kill_backend_worker"}


@pytest.mark.parametrize("seed", range(30))
def test_faults_are_sorted_and_none_in_the_warm_up_or_the_last_15_percent(seed: int) -> None:
    duration = 200.0
    faults = plan_faults(seed, duration, DEVICES, rate_per_min=20)
    assert [f.at for f in faults] == sorted(f.at for f in faults)
    assert all(f.at >= 0.05 * duration for f in faults)
    assert all(f.ends <= 0.85 * duration for f in faults)


@pytest.mark.parametrize("seed", range(30))
def test_durations_stay_in_their_bounds(seed: int) -> None:
    faults = plan_faults(seed, 600, DEVICES, rate_per_min=12)
    for f in faults:
        if f.kind == "kill_broker":
            assert 0 < f.duration <= 10
        elif f.kind == "cut":
            assert 0 < f.duration <= 8
        elif f.kind == "delay":
            assert 0 < f.duration <= 10
            assert f.delay_ms is not None
            assert 50 <= f.delay_ms <= 800
        elif f.kind in ("kill_device", "kill_kiosk"):
            assert 0 < f.duration <= 5
        else:
            assert f.duration == 0
        assert (f.step in PULL_STEPS) if f.kind == "pull_card" else f.step is None


@pytest.mark.parametrize("seed", range(30))
def test_no_two_faults_on_one_target_overlap(seed: int) -> None:
    faults = plan_faults(seed, 300, DEVICES[:2], rate_per_min=30)
    by_target: dict[str, list[Fault]] = {}
    for f in faults:
        by_target.setdefault(f.target, []).append(f)
    for on_target in by_target.values():
        for first, second in itertools.pairwise(on_target):
            assert second.at >= first.at + max(first.duration, 1.0)


def test_targets_are_the_named_parts() -> None:
    faults = plan_faults(11, 600, DEVICES, kiosks=("kiosk-1", "kiosk-2"), workers=3)
    allowed = {
        "kill_broker": {"broker"},
        "kill_backend_worker": {"backend-worker-1", "backend-worker-2", "backend-worker-3"},
        "kill_kiosk": {"kiosk-1", "kiosk-2"},
    }
    for f in faults:
        assert f.target in allowed.get(f.kind, set(DEVICES))


def test_the_rate_sets_how_many_faults_there_are() -> None:
    assert len(plan_faults(5, 600, DEVICES, rate_per_min=6)) == 60
    assert plan_faults(5, 30, DEVICES, rate_per_min=0) == []


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="duration"):
        plan_faults(1, 0, DEVICES)
    with pytest.raises(ValueError, match="distinct"):
        plan_faults(1, 60, ["kiosk-1"])
    with pytest.raises(ValueError, match="step"):
        Fault(1.0, "pull_card", "bus-1")
    with pytest.raises(ValueError, match="delay_ms"):
        Fault(1.0, "cut", "bus-1", 2.0, delay_ms=100)


def test_a_fault_as_json_says_when_in_seconds_and_on_the_wall_clock() -> None:
    fault = Fault(12.34567, "pull_card", "bus-1", step="DEBIT")
    assert fault.as_json() == {
        "at": 12.346,
        "kind": "pull_card",
        "target": "bus-1",
        "duration": 0.0,
        "step": "DEBIT",
    }
    start = datetime(2026, 11, 23, 8, 0, tzinfo=timezone(timedelta(hours=8)))
    delay = Fault(1.5, "delay", "gate-a", 3.25, delay_ms=120)
    assert delay.as_json(start) == {
        "at": 1.5,
        "kind": "delay",
        "target": "gate-a",
        "duration": 3.25,
        "delay_ms": 120,
        "wallclock": "2026-11-23T08:00:01.500+08:00",
    }
    assert delay.as_json(start.isoformat())["wallclock"] == "2026-11-23T08:00:01.500+08:00"
    with pytest.raises(ValueError, match="UTC offset"):
        delay.as_json("2026-11-23T08:00:00")

"""Taps first: the gate the uplink waits on while a tap is in progress."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import farelab.validator._priority as priority
from farelab.card import InProcessReader
from farelab.validator._journal import Journal
from farelab.validator._priority import TapGate
from farelab.validator._runtime import TAP_SWITCH_INTERVAL_S, favour_taps
from tests.validator_support import T0, Lab, bus, new_card


async def test_an_idle_gate_never_waits() -> None:
    gate = TapGate()
    assert not gate.busy
    assert gate.wait_idle(10.0)
    assert await gate.yield_to_taps(10.0)


def test_the_uplink_waits_until_the_tap_ends() -> None:
    gate = TapGate()
    waited: list[bool] = []
    with gate.tap():
        assert gate.busy
        waiter = threading.Thread(target=lambda: waited.append(gate.wait_idle(10.0)))
        waiter.start()
        waiter.join(0.05)
        assert waiter.is_alive()  # still waiting: the tap is in progress
    waiter.join(5)
    assert waited == [True]
    assert not gate.busy


async def test_a_tap_that_never_ends_holds_the_uplink_only_for_the_limit() -> None:
    gate = TapGate()
    with gate.tap():
        start = time.monotonic()
        assert not gate.wait_idle(0.02)
        assert not await gate.yield_to_taps(0.02)
        assert time.monotonic() - start < 5  # bounded, not for ever


def test_taps_on_several_readers_count_until_the_last_ends() -> None:
    gate = TapGate()
    first, second = gate.tap(), gate.tap()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gate.busy
    assert not gate.wait_idle(0.01)
    second.__exit__(None, None, None)
    assert not gate.busy
    assert gate.wait_idle(0.0)


async def test_the_coroutine_form_lets_the_event_loop_run_meanwhile() -> None:
    gate = TapGate()
    tap = gate.tap()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    tap.__enter__()
    asyncio.get_running_loop().call_later(0.05, tap.__exit__, None, None, None)
    result = await gate.yield_to_taps(10.0)
    task.cancel()
    assert result
    assert not gate.busy
    assert ticks >= 5  # the loop kept running other tasks while the uplink waited


async def test_a_tap_ending_on_its_own_thread_wakes_the_waiting_coroutine() -> None:
    gate = TapGate()
    started = threading.Event()

    def reader_thread() -> None:
        with gate.tap():
            started.set()
            time.sleep(0.05)

    thread = threading.Thread(target=reader_thread)
    thread.start()
    await asyncio.to_thread(started.wait, 5)
    assert gate.busy
    woken = await gate.yield_to_taps(30.0)  # False only if it waited the whole limit
    thread.join()
    assert woken
    assert not gate._waiters  # nothing left registered


async def test_a_waiter_that_gives_up_is_forgotten() -> None:
    gate = TapGate()
    with gate.tap():
        assert not await gate.yield_to_taps(0.01)
        assert not gate._waiters


class _Watching(InProcessReader):
    """Notes whether the gate was busy during each command."""

    def __init__(self, gate: TapGate) -> None:
        super().__init__()
        self.gate = gate
        self.busy: list[bool] = []

    def transmit(self, apdu: bytes) -> bytes:
        self.busy.append(self.gate.busy)
        return super().transmit(apdu)


def test_a_validator_tap_holds_the_gate_from_first_command_to_journal() -> None:
    gate = TapGate()
    lab = Lab([bus("taiyuan")], journal=Journal(":memory:", gate=gate))
    reader = _Watching(gate)
    reader.insert(new_card(balance=1000))
    assert not gate.busy
    result = lab.validators["bus"].tap(reader, T0)
    assert result.result == "accepted"
    assert len(reader.busy) >= 5
    assert all(reader.busy)
    assert not gate.busy  # released once the tap is journalled


def test_a_failing_tap_releases_the_gate() -> None:
    gate = TapGate()
    lab = Lab([bus("taiyuan")], journal=Journal(":memory:", gate=gate))
    reader = InProcessReader()  # no card: the tap ends at once as card lost
    lab.validators["bus"].tap(reader, T0)
    assert not gate.busy


# --- garbage collection deferred out of taps -------------------------------------------------


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """Whatever a test does to the collector, the session gets it back as it was."""
    enabled = gc.isenabled()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
        else:
            gc.disable()


@contextlib.contextmanager
def _collections_started() -> Iterator[list[int]]:
    """The generation of each collection that starts while in the block."""
    started: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(count)
    try:
        yield started
    finally:
        gc.callbacks.remove(count)


def _gate_after_a_tap() -> TapGate:
    """A gate one tap has used, the collector on before it: collection is now deferred."""
    gc.enable()
    gate = TapGate()
    with gate.tap():
        pass
    assert not gc.isenabled()
    return gate


def test_no_collection_starts_inside_a_tap_and_it_resumes_between_taps(gc_restored: None) -> None:
    gate = TapGate()
    gc.enable()
    with _collections_started() as collections:
        with gate.tap():
            assert not gc.isenabled()
            garbage: list[list[object]] = [[] for _ in range(50_000)]
            for item in garbage:
                item.append(item)  # cycles: only the collector frees them
            del garbage  # far past the collector's thresholds
            assert collections == []
        assert not gc.isenabled()  # the tap's thread does not pay for it either
        gate.between_taps()
        assert gc.isenabled()
        assert collections  # the collection that fell due ran then, with no allocation needed
        assert gc.get_count()[0] < gc.get_threshold()[0]


def test_beginning_a_tap_starts_no_deferred_collection(gc_restored: None) -> None:
    """With a collection due at the very next allocation, beginning a tap must turn
    collection off before allocating anything."""
    gate = TapGate()
    gc.enable()
    thresholds = gc.get_threshold()
    with _collections_started() as started:
        try:
            gc.set_threshold(1)  # any new tracked object starts a collection
            gate.begin()
            gc.set_threshold(*thresholds)
            inside = len(started)
            gate.end()
            assert not gc.isenabled()
        finally:
            gc.set_threshold(*thresholds)
    assert inside == 0


async def test_the_uplink_finding_no_tap_turns_collection_back_on(gc_restored: None) -> None:
    gate = _gate_after_a_tap()
    assert gate.wait_idle(1.0)
    assert gc.isenabled()
    with gate.tap():
        pass
    assert not gc.isenabled()
    assert await gate.yield_to_taps(1.0)
    assert gc.isenabled()


def test_collection_stays_off_while_any_tap_is_in_progress(gc_restored: None) -> None:
    gc.enable()
    gate = TapGate()
    with gate.tap():
        with gate.tap():  # a second reader's tap
            pass
        gate.between_taps()  # one tap is still in progress
        assert not gc.isenabled()
    gate.between_taps()
    assert gc.isenabled()


def test_a_collector_someone_else_turned_off_stays_off(gc_restored: None) -> None:
    gc.disable()
    gate = TapGate()
    with gate.tap():
        pass
    gate.between_taps()
    assert gate.wait_idle(1.0)
    assert not gc.isenabled()


def test_taps_without_a_pause_get_collection_back_after_the_limit(
    gc_restored: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.enable()
    monkeypatch.setattr(priority, "GC_DEFER_LIMIT_S", 0.01)
    gate = TapGate()
    with gate.tap():
        pass
    assert not gc.isenabled()  # within the limit: still deferred
    time.sleep(0.02)
    with gate.tap():
        assert not gc.isenabled()
    assert gc.isenabled()  # the tap that ended past the limit turned it back on


def test_favour_taps_moves_what_is_alive_out_of_the_collectors_view(gc_restored: None) -> None:
    interval = sys.getswitchinterval()
    try:
        favour_taps()
        assert sys.getswitchinterval() == pytest.approx(TAP_SWITCH_INTERVAL_S)
        assert gc.get_freeze_count() > 0
    finally:
        sys.setswitchinterval(interval)


async def test_the_run_loop_turns_collection_back_on_once_a_result_is_shown(
    gc_restored: None,
) -> None:
    import io  # noqa: PLC0415
    from datetime import datetime  # noqa: PLC0415

    from farelab.card import CST  # noqa: PLC0415
    from farelab.validator._decision import Rejected  # noqa: PLC0415
    from farelab.validator._loop import Shown, _display, _Tapped  # noqa: PLC0415

    gate = _gate_after_a_tap()
    results: asyncio.Queue[Shown] = asyncio.Queue()
    out = io.StringIO()
    task = asyncio.create_task(_display(results, out, gate))
    results.put_nowait(_Tapped(Rejected("d1", "", "no_card"), datetime.now(CST)))
    while not out.getvalue():
        await asyncio.sleep(0.001)
    task.cancel()
    assert '"no_card"' in out.getvalue()
    assert gc.isenabled()


def test_a_replay_leaves_collection_on(gc_restored: None, tmp_path: Path) -> None:
    """``farelab validator replay`` (and the demo, which goes on to other work in the same
    process) must not leave the collector off after its last tap."""
    import json  # noqa: PLC0415
    from datetime import date  # noqa: PLC0415

    from farelab.card import personalise, save_image  # noqa: PLC0415
    from farelab.validator._config import load_config  # noqa: PLC0415
    from farelab.validator._replay import parse_taps, replay  # noqa: PLC0415

    gc.enable()
    config_path = tmp_path / "devices.toml"
    config_path.write_text(
        '[[validator]]\nid = "bus-1"\nkind = "bus"\nnetwork = "taiyuan"\n'
        'terminal_id = "000000000B01"\nwhitelist = ["1310000000000000"]\nreader = "sim"\n'
    )
    card_path = tmp_path / "card.json"
    save_image(card_path, personalise(serial="31", issued=date(2026, 1, 1), balance=2000))
    config = load_config(config_path)
    line = {"device": "bus-1", "card": str(card_path), "at": "2026-11-23T09:00:00+08:00"}
    taps = parse_taps(iter([json.dumps(line)]), config)
    journal = Journal(":memory:")
    results = list(replay(config, taps, journal))
    assert [r.result for r in results] == ["accepted"]
    assert gc.isenabled()

"""Taps first: the gate the uplink waits on while a tap is in progress."""

from __future__ import annotations

import asyncio
import threading
import time

from card import InProcessReader
from tests.validator_support import T0, Lab, bus, new_card
from validator._priority import TapGate


def test_an_idle_gate_never_waits() -> None:
    gate = TapGate()
    assert not gate.busy
    assert gate.wait_idle(10.0)
    assert asyncio.run(gate.yield_to_taps(10.0))


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


def test_a_tap_that_never_ends_holds_the_uplink_only_for_the_limit() -> None:
    gate = TapGate()
    with gate.tap():
        start = time.monotonic()
        assert not gate.wait_idle(0.02)
        assert not asyncio.run(gate.yield_to_taps(0.02))
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


def test_the_coroutine_form_lets_the_event_loop_run_meanwhile() -> None:
    gate = TapGate()
    tap = gate.tap()

    async def main() -> tuple[bool, int]:
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
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result
    assert not gate.busy
    assert ticks >= 5  # the loop kept running other tasks while the uplink waited


def test_a_tap_ending_on_its_own_thread_wakes_the_waiting_coroutine() -> None:
    gate = TapGate()
    started = threading.Event()

    def reader_thread() -> None:
        with gate.tap():
            started.set()
            time.sleep(0.05)

    async def main() -> bool:
        thread = threading.Thread(target=reader_thread)
        thread.start()
        await asyncio.to_thread(started.wait, 5)
        assert gate.busy
        woken = await gate.yield_to_taps(30.0)  # False only if it waited the whole limit
        thread.join()
        return woken

    assert asyncio.run(main())
    assert not gate._waiters  # nothing left registered


def test_a_waiter_that_gives_up_is_forgotten() -> None:
    gate = TapGate()
    with gate.tap():
        assert not asyncio.run(gate.yield_to_taps(0.01))
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
    lab = Lab([bus("taiyuan")])
    reader = _Watching(lab.journal.tap_gate)
    reader.insert(new_card(balance=1000))
    assert not lab.journal.tap_gate.busy
    result = lab.validators["bus"].tap(reader, T0)
    assert result.result == "accepted"
    assert len(reader.busy) >= 5
    assert all(reader.busy)
    assert not lab.journal.tap_gate.busy  # released once the tap is journalled


def test_a_failing_tap_releases_the_gate() -> None:
    lab = Lab([bus("taiyuan")])
    reader = InProcessReader()  # no card: the tap ends at once as card lost
    lab.validators["bus"].tap(reader, T0)
    assert not lab.journal.tap_gate.busy

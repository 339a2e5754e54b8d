"""Stopping tasks that run on through a swallowed cancellation.

Python 3.11's ``asyncio.wait_for`` (which aiomqtt 2 wraps around every publish, subscribe and
connect) returns normally when a cancellation lands in the same loop turn as the awaited thing
completing.  A loop that never looks again would then run for ever, and whoever waits for it to
stop — ``farelab validator run`` on SIGTERM, the benchmarks' uplink threads — hangs.  This hung
CI for its whole time limit once, in one uplink stop out of about a hundred.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from farelab.protocol import cancel_and_wait, honour_cancellation


async def _loop_through_wait_for(event: asyncio.Event, turns: list[int], *, honour: bool) -> None:
    while True:
        if honour:
            honour_cancellation()
        event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=0.2)
        turns.append(1)
        await asyncio.sleep(0)


async def _cancel_as_it_completes(*, honour: bool) -> tuple[asyncio.Task[None], list[int]]:
    event = asyncio.Event()
    turns: list[int] = []
    task = asyncio.create_task(_loop_through_wait_for(event, turns, honour=honour))
    await asyncio.sleep(0.01)  # the task waits inside wait_for
    event.set()  # the awaited thing completes ...
    task.cancel()  # ... in the same loop turn as the cancellation
    await asyncio.wait({task}, timeout=1.0)
    return task, turns


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12's wait_for no longer loses it")
async def test_the_premise_wait_for_loses_a_cancellation_on_3_11() -> None:
    task, turns = await _cancel_as_it_completes(honour=False)
    running_on = not task.done() and len(turns) > 1
    await cancel_and_wait(task)  # and cancel_and_wait still stops it
    assert running_on
    assert task.cancelled()


async def test_a_loop_that_honours_cancellation_stops_even_when_wait_for_swallowed_it() -> None:
    task, _ = await _cancel_as_it_completes(honour=True)
    assert task.cancelled()


async def test_cancel_and_wait_cancels_again_until_the_task_ends() -> None:
    async def stubborn(stops: list[int]) -> None:
        for _ in range(3):  # swallows two cancellations, as a buggy library might
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                stops.append(1)
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
        await asyncio.sleep(10)

    stops: list[int] = []
    task = asyncio.create_task(stubborn(stops))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(cancel_and_wait(task, again_every=0.05), timeout=5)
    assert (task.cancelled(), len(stops)) == (True, 3)


async def test_cancel_and_wait_on_a_task_that_failed_does_not_raise() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0.01)
    await cancel_and_wait(task)
    assert task.done()

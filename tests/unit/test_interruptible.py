"""interruptible(): an await in the current task that other futures can interrupt."""

from __future__ import annotations

import asyncio

import pytest

from worker.agent.tasks import Interrupted, interruptible


async def test_the_result_when_nothing_interrupts() -> None:
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert await interruptible(asyncio.sleep(0.01, result=7), 1.0, stop) == 7


async def test_an_interrupter_stops_the_await_and_cancels_what_it_awaited() -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    cancelled = []

    async def work() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    loop.call_later(0.02, stop.set_result, None)
    with pytest.raises(Interrupted):
        await interruptible(work(), 5.0, stop)
    assert cancelled == [True]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_the_timeout() -> None:
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await interruptible(asyncio.sleep(10), 0.02, stop)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    stop.set_result(None)  # after the timeout, an interrupt reaches nothing
    await asyncio.sleep(0.01)


async def test_a_cancellation_from_outside_goes_on_up_even_at_the_timeout() -> None:
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(interruptible(asyncio.sleep(10), 0.0, stop))
    await asyncio.sleep(0)  # the task has started: its timer is due, not yet run
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_timeout_that_is_not_reached_leaves_no_timer() -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    assert await interruptible(asyncio.sleep(0, result=1), 0.02, stop) == 1
    await asyncio.sleep(0.05)  # the timer would have fired by now: it was cancelled
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancellation_from_outside_goes_on_up_even_with_an_interrupt() -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    task = asyncio.create_task(interruptible(asyncio.sleep(10), 5.0, stop))
    await asyncio.sleep(0.01)

    def both() -> None:
        stop.set_result(None)
        task.cancel()

    loop.call_soon(both)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_no_interrupt_reaches_the_task_after_it_returned() -> None:
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def finishes_as_it_is_interrupted() -> int:
        stop.set_result(None)  # the interrupt is scheduled, not yet run
        return 5

    assert await interruptible(finishes_as_it_is_interrupted(), 1.0, stop) == 5
    await asyncio.sleep(0.01)  # the scheduled interrupt runs now, and must do nothing

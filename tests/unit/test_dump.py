"""worker.dump: the worker's state on SIGUSR1."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

import pytest

from worker.dump import await_chain, describe_tasks, describe_threads, state_on_signal


async def _inner(gate: asyncio.Event) -> None:
    await gate.wait()


async def _outer(gate: asyncio.Event) -> None:
    await _inner(gate)


async def test_each_task_shows_the_awaits_it_is_suspended_in() -> None:
    gate = asyncio.Event()
    task = asyncio.create_task(_outer(gate), name="parked-task")
    await asyncio.sleep(0)
    try:
        steps = await_chain(task.get_coro(), task._fut_waiter)  # type: ignore[attr-defined]
        assert [s.rsplit(" in ", 1)[1] for s in steps[:2]] == ["_outer", "_inner"]
        assert all("test_dump.py:" in s for s in steps[:2])
        assert steps[2].endswith("in Event.wait")  # asyncio's own step
        assert steps[-1].startswith("waits for <Future pending")
        text = describe_tasks()
        assert "task parked-task\n" in text and "waits for <Future pending" in text
        assert text.startswith(f"{len(asyncio.all_tasks())} task(s):")
    finally:
        gate.set()
        await task


def test_other_threads_show_where_they_are() -> None:
    stop = threading.Event()

    def parked() -> None:
        stop.wait(10)

    thread = threading.Thread(target=parked, name="parked-thread")
    thread.start()
    try:
        text = describe_threads()
    finally:
        stop.set()
        thread.join()
    section = text.split("thread parked-thread\n", 1)[1]
    assert "test_dump.py" in section and " in parked\n" in section
    assert f"thread {threading.current_thread().name}\n" not in text  # not the caller's


async def test_sigusr1_logs_the_state_and_the_handler_goes_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = asyncio.Event()
    task = asyncio.create_task(_outer(gate), name="parked-task")
    before = signal.getsignal(signal.SIGUSR1)
    try:
        with caplog.at_level(logging.WARNING, "fnq.worker"), state_on_signal():
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if caplog.records:
                    break
        [record] = caplog.records
        assert record.getMessage().startswith("state on request (SIGUSR1): ")
        assert "task parked-task\n" in record.getMessage()
        assert signal.getsignal(signal.SIGUSR1) == before
    finally:
        gate.set()
        await task

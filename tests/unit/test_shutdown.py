"""Stop signals: a signal repeated at once is the same request, a later one the second."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from worker.shutdown import SIGNAL_REPEAT_S, Shutdown, signal_handlers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_signal_repeated_at_once_is_the_same_request() -> None:
    clock = Clock()
    shutdown = Shutdown(30.0, clock=clock)
    shutdown.signalled("SIGTERM")
    assert shutdown.stopping.is_set() and not shutdown.aborting.is_set()
    clock.now += 0.001  # `timeout` and the process group: the same signal twice
    shutdown.signalled("SIGTERM")
    clock.now += SIGNAL_REPEAT_S - 0.01
    shutdown.signalled("SIGINT")
    assert not shutdown.aborting.is_set()
    clock.now += 0.02  # a second signal, meant as one
    shutdown.signalled("SIGINT")
    assert shutdown.aborting.is_set()


async def test_requests_not_by_signal_are_never_merged() -> None:
    clock = Clock()
    shutdown = Shutdown(30.0, clock=clock)
    shutdown.request("first")
    shutdown.request("second")
    assert shutdown.aborting.is_set()

    after_request = Shutdown(30.0, clock=clock)
    after_request.request("asked")
    after_request.signalled("SIGTERM")  # the first signal, but the second request
    assert after_request.aborting.is_set()


async def test_the_grace_period_counts_from_the_request() -> None:
    """The calls in containers get the grace period from the stop request, however long
    the intake takes to stop (a reserve to a silent queue runs to its time limit)."""
    shutdown = Shutdown(0.5)
    shutdown.request("SIGTERM")
    await asyncio.sleep(0.4)  # the intake stopping meanwhile
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        await shutdown.wait_grace()
    assert loop.time() - started < 0.3
    assert shutdown.aborting.is_set()


async def test_the_grace_period_is_whole_without_a_request() -> None:
    shutdown = Shutdown(0.3)
    shutdown.stopping.set()  # a burst that ran out of calls: no request
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        await shutdown.wait_grace()
    assert loop.time() - started >= 0.29


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_the_handlers_take_a_doubled_signal_once(sig: signal.Signals) -> None:
    shutdown = Shutdown(30.0)
    before = signal.getsignal(sig)
    with signal_handlers(shutdown):
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)
        async with asyncio.timeout(5):
            await shutdown.stopping.wait()
        await asyncio.sleep(0.05)  # both delivered by now
        assert not shutdown.aborting.is_set()
    assert signal.getsignal(sig) == before  # the previous handler is back

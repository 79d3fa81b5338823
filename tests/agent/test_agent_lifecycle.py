"""Idle containers over time: freezing, idle timeout, eviction, cancel and close."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from config.domain import CallStatus, FailureKind, Function, Outcome, frozen_map
from tests.agent.conftest import AgentFactory, make_call, make_fn, settle
from worker.agent.agent import Agent
from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.drivers.fake import (
    FakeBehaviour,
    FakeContainer,
    FakeDriver,
    gated,
    hang,
    reply,
)
from worker.agent.errors import FreezeFailed
from worker.agent.hot import HotContainer
from worker.agent.hot_life import MIN_BUSY_NAP_S

# ------------------------------------------------------------- idle, freeze


async def test_idle_timeout_removes_the_container_and_frees_tokens(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn(idle_timeout_s=1)
    loop = asyncio.get_running_loop()
    await agent.submit(make_call(fn), fn)
    idle_since = loop.time()
    assert agent.statistics().resources.tokens == 1
    await driver.wait_until(lambda: driver.removes == 1)
    assert loop.time() - idle_since >= 0.95
    stats = agent.statistics()
    assert (stats.resources.tokens, stats.resources.memory_used_bytes, stats.containers) == (
        0,
        0,
        0,
    )


async def test_a_removal_that_fails_unexpectedly_still_frees_the_tokens(
    agents: AgentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn(idle_timeout_s=0)
    real_remove = FakeContainer.remove

    async def remove(self: FakeContainer) -> None:
        first = self.state != "removed"
        await real_remove(self)
        if first:
            raise RecursionError("maximum recursion depth exceeded")  # a driver's fault

    monkeypatch.setattr(FakeContainer, "remove", remove)
    await agent.submit(make_call(fn), fn)
    await driver.wait_until(lambda: driver.removes == 1, timeout_s=1)
    await settle()
    stats = agent.statistics()
    assert (stats.resources.tokens, stats.resources.memory_used_bytes, stats.containers) == (
        0,
        0,
        0,
    )


async def test_idle_timeout_zero_leaves_right_after_the_call(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn(idle_timeout_s=0)
    await agent.submit(make_call(fn), fn)
    await driver.wait_until(lambda: driver.removes == 1, timeout_s=1)
    assert agent.statistics().resources.tokens == 0


@pytest.mark.parametrize(("idle_timeout_s", "freeze_msecs"), [(0, -1), (30, 0), (30, -1)])
async def test_a_busy_containers_task_sleeps_until_its_call_is_over(
    agents: AgentFactory, monkeypatch: pytest.MonkeyPatch, idle_timeout_s: int, freeze_msecs: int
) -> None:
    naps: list[float] = []
    sleep_until = HotContainer._sleep_until

    async def counted(hot: HotContainer, when: float) -> None:
        naps.append(when)
        await sleep_until(hot, when)

    monkeypatch.setattr(HotContainer, "_sleep_until", counted)
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)))
    agent = agents(driver, freeze_idle_msecs=freeze_msecs)
    fn = make_fn(idle_timeout_s=idle_timeout_s)
    call = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    loop = asyncio.get_running_loop()
    since, before = loop.time(), len(naps)
    await asyncio.sleep(0.2)
    naps_per_nap_time = (len(naps) - before) / ((loop.time() - since) / MIN_BUSY_NAP_S)
    assert naps_per_nap_time <= 1.5  # naps, not one per turn of the loop (thousands)
    gate.set()
    assert (await call).status is CallStatus.SUCCESS
    await settle(20)  # no time passes: only the end of the call can have woken it
    if idle_timeout_s == 0:  # it leaves at once
        assert driver.removes == 1
    elif freeze_msecs == 0:  # it pauses at once
        assert driver.pauses == 1


async def test_freeze_at_once_and_unfreeze_before_dispatch(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver, freeze_idle_msecs=0)
    fn = make_fn()
    await agent.submit(make_call(fn), fn)
    await driver.wait_until(lambda: driver.pauses == 1)
    stats = agent.statistics().queue(fn.ref)
    assert stats is not None and stats.containers["paused"] == 1
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.SUCCESS
    assert driver.unpauses == 1 and driver.creates == 1
    await driver.wait_until(lambda: driver.pauses == 2)


async def test_freeze_after_the_configured_idle_time(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver, freeze_idle_msecs=150)
    fn = make_fn()
    loop = asyncio.get_running_loop()
    await agent.submit(make_call(fn), fn)
    idle_since = loop.time()
    await driver.wait_until(lambda: driver.pauses == 1)
    assert loop.time() - idle_since >= 0.14


async def test_quick_calls_never_freeze(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver, freeze_idle_msecs=5000)
    fn = make_fn()
    for _ in range(20):
        await agent.submit(make_call(fn), fn)
    assert (driver.pauses, driver.unpauses) == (0, 0)


async def test_freezing_disabled(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver, freeze_idle_msecs=-1)
    fn = make_fn(idle_timeout_s=0)
    await agent.submit(make_call(fn), fn)
    await driver.wait_until(lambda: driver.removes == 1)
    assert driver.pauses == 0


async def _idle_together(agent: Agent, driver: FakeDriver, fn: Function, n: int) -> float:
    """``n`` calls at once on a fresh driver (``n`` containers), answered together; the
    loop time at which they were let go (every container goes idle after it)."""
    gate = asyncio.Event()
    driver.default.handler = gated(gate)
    calls = [asyncio.create_task(agent.submit(make_call(fn), fn)) for _ in range(n)]
    await driver.wait_until(lambda: driver.dispatches == n)
    answered_at = asyncio.get_running_loop().time()
    gate.set()
    await asyncio.gather(*calls)
    driver.default.handler = reply()
    return answered_at


async def test_containers_idle_together_pause_one_after_another(agents: AgentFactory) -> None:
    # After a burst all of a function's containers go idle at once; their pauses are
    # spread out (worker.agent.pacer), so that the engine's work does not stall calls.
    driver = FakeDriver()
    agent = agents(driver, freeze_idle_msecs=50)
    agent.pacer.spacing_s = 0.1
    fn = make_fn()
    # Timed from the answers, not from when this test runs again: on a busy host
    # that can come well after the containers went idle.
    answered_at = await _idle_together(agent, driver, fn, 4)
    await driver.wait_until(lambda: driver.pauses == 4)
    gaps = [b - a for a, b in zip(driver.paused_at, driver.paused_at[1:], strict=False)]
    assert driver.paused_at[0] - answered_at >= 0.045  # the first when its idle time is up
    assert min(gaps) >= 0.05, gaps  # 0.1 s turns; a timer may fire late on a busy host
    stats = agent.statistics().queue(fn.ref)
    assert stats is not None and stats.containers["paused"] == 4  # all of them, in turn


async def test_a_spare_container_stays_thawed_while_its_function_gets_calls(
    agents: AgentFactory,
) -> None:
    # Two containers, then calls one at a time: the most recent idle container serves
    # them all and the other one sits idle. Pausing it would only be undone by the next
    # call that finds the first one busy, so it waits until the function is quiet.
    driver = FakeDriver()
    agent = agents(driver, freeze_idle_msecs=100)
    agent.pacer.spacing_s = 0.0
    fn = make_fn()
    await _idle_together(agent, driver, fn, 2)
    loop = asyncio.get_running_loop()
    until = loop.time() + 0.4  # four times the freeze time
    last_call = loop.time()
    while last_call < until:
        last_call = loop.time()
        assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
        await asyncio.sleep(0.02)
    assert (driver.pauses, driver.unpauses) == (0, 0)
    await driver.wait_until(lambda: driver.pauses == 2)
    assert min(driver.paused_at) - last_call >= 0.09  # a freeze time after the last call
    stats = agent.statistics().queue(fn.ref)
    assert stats is not None and stats.containers["paused"] == 2


async def test_a_call_takes_a_container_waiting_for_its_turn_to_pause(
    agents: AgentFactory,
) -> None:
    driver = FakeDriver()
    agent = agents(driver, freeze_idle_msecs=10)
    agent.pacer.spacing_s = 10.0  # the second container's turn is far away
    fn = make_fn()
    await _idle_together(agent, driver, fn, 2)
    await driver.wait_until(lambda: driver.pauses == 1)
    await asyncio.sleep(0.05)
    assert driver.pauses == 1  # the other waits for its turn, idle and not paused
    assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    assert driver.unpauses == 0  # it ran on the container that had not paused


async def test_containers_start_a_few_at_a_time(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(start_gate=gate))
    agent = agents(driver, hot_start_concurrency=2)
    fns = [make_fn(f"f{i}") for i in range(4)]
    calls = [asyncio.create_task(agent.submit(make_call(fn), fn)) for fn in fns]
    await driver.wait_until(lambda: driver.starts == 2)
    await asyncio.sleep(0.05)
    assert driver.starts == 2  # the other two wait for a turn
    stats = agent.statistics()
    assert sum(q.containers["start"] for q in stats.queues) == 4
    gate.set()
    outcomes = await asyncio.gather(*calls)
    assert all(o.status is CallStatus.SUCCESS for o in outcomes)
    assert driver.starts == 4


def _starting(agent: Agent, fn: Function) -> int:
    stats = agent.statistics().queue(fn.ref)
    return 0 if stats is None else stats.containers.get("start", 0)


async def test_a_start_waiting_its_turn_is_dropped_when_no_call_needs_it(
    agents: AgentFactory,
) -> None:
    driver = FakeDriver()
    agent = agents(driver, hot_start_concurrency=1)
    busy, slow = make_fn("busy"), make_fn("slow")
    assert (await agent.submit(make_call(busy), busy)).status is CallStatus.SUCCESS
    start_gate, call_gate = asyncio.Event(), asyncio.Event()
    driver.per_image[slow.image] = FakeBehaviour(start_gate=start_gate)
    driver.default.handler = gated(call_gate)  # busy's container has the default
    other = asyncio.create_task(agent.submit(make_call(slow), slow))  # holds the one turn
    await driver.wait_until(lambda: driver.starts == 2)
    first = asyncio.create_task(agent.submit(make_call(busy), busy))
    await driver.wait_until(lambda: driver.dispatches == 2)
    second = asyncio.create_task(agent.submit(make_call(busy), busy))
    await driver.wait_until(lambda: _starting(agent, busy) == 1)
    # the second call asked for a container of its own, which waits for the turn
    call_gate.set()  # the first call ends: the second one takes its container
    assert (await first).status is CallStatus.SUCCESS
    assert (await second).status is CallStatus.SUCCESS
    start_gate.set()
    assert (await other).status is CallStatus.SUCCESS
    await driver.wait_until(lambda: _starting(agent, busy) == 0)
    assert driver.creates == 2  # busy's second start was dropped at its turn
    assert agent.tracker.statistics().tokens == 2  # and its memory and CPU given back


async def test_failed_pause_retires_the_container(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(pause_error=FreezeFailed("pause refused")))
    agent = agents(driver, freeze_idle_msecs=0)
    fn = make_fn()
    await agent.submit(make_call(fn), fn)
    await driver.wait_until(lambda: driver.removes == 1)
    assert agent.statistics().resources.tokens == 0


async def test_failed_unpause_sends_the_call_to_a_fresh_container(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(unpause_error=FreezeFailed("unpause refused")))
    agent = agents(driver, freeze_idle_msecs=0)
    fn = make_fn()
    first = await agent.submit(make_call(fn), fn)
    await driver.wait_until(lambda: driver.pauses == 1)
    second = await agent.submit(make_call(fn), fn)
    assert second.status is CallStatus.SUCCESS
    assert second.container_id != first.container_id
    assert driver.creates == 2
    await driver.wait_until(lambda: driver.removes >= 1)


# ----------------------------------------------------------------- eviction


async def test_eviction_takes_idle_containers_of_other_functions_oldest_first(
    agents: AgentFactory,
) -> None:
    driver = FakeDriver()
    agent = agents(driver, memory_mb=384)
    a, b, c, d = (make_fn(name, memory_mb=128) for name in "abcd")
    outcomes = {}
    for fn in (a, b, c):
        outcomes[fn.name] = await agent.submit(make_call(fn), fn)
    assert agent.statistics().resources.memory_used_bytes == 384 * 1024 * 1024
    out_d = await agent.submit(make_call(d), d)
    assert out_d.status is CallStatus.SUCCESS
    removed = {x.id for x in driver.containers if x.state == "removed"}
    assert removed == {outcomes["a"].container_id}
    assert agent.statistics().evictions == 1


async def test_eviction_is_all_or_nothing(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(), per_image={"img/busy": FakeBehaviour(handler=gated(gate))})
    agent = agents(driver, memory_mb=256, hot_poll_msecs=10)
    idle, busy, big = make_fn("idle"), make_fn("busy"), make_fn("big", memory_mb=256, timeout_s=1)
    await agent.submit(make_call(idle), idle)
    running = asyncio.create_task(agent.submit(make_call(busy), busy))
    await driver.wait_until(lambda: driver.dispatches == 2)
    outcome = await agent.submit(make_call(big), big)  # only half could be evicted
    assert outcome.failure is FailureKind.BUSY
    assert driver.removes == 0 and agent.statistics().evictions == 0
    gate.set()
    await running


async def test_blocking_launch_waits_for_resources_then_runs(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)))
    agent = agents(driver, memory_mb=128)
    first_fn = make_fn("first", idle_timeout_s=0)
    second_fn = make_fn("second")
    first = asyncio.create_task(agent.submit(make_call(first_fn), first_fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    second = asyncio.create_task(agent.submit(make_call(second_fn), second_fn))
    await driver.wait_until(lambda: agent.statistics().calls_waiting == 1)
    assert driver.creates == 1
    gate.set()
    assert (await first).status is CallStatus.SUCCESS
    assert (await second).status is CallStatus.SUCCESS
    assert driver.creates == 2


async def test_nb_mode_answers_busy_at_once(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)))
    agent = agents(driver, memory_mb=128, enable_nb_resource_tracker=True)
    holder, other = make_fn("holder"), make_fn("other", timeout_s=30)
    running = asyncio.create_task(agent.submit(make_call(holder), holder))
    await driver.wait_until(lambda: driver.dispatches == 1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    outcome = await agent.submit(make_call(other), other)
    assert outcome.failure is FailureKind.BUSY
    assert outcome.error is not None and "no memory or CPU" in outcome.error
    assert loop.time() - began < 1.0
    gate.set()
    await running


async def test_nb_mode_evicts_when_it_can(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver, memory_mb=128, enable_nb_resource_tracker=True)
    a, b = make_fn("a"), make_fn("b")
    await agent.submit(make_call(a), a)
    assert (await agent.submit(make_call(b), b)).status is CallStatus.SUCCESS
    assert agent.statistics().evictions == 1 and driver.removes == 1


# ------------------------------------------------------------ cancel, close


async def test_cancel_a_running_call(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(handler=hang(output=(b"partial\n",))))
    agent = agents(driver)
    fn = make_fn()
    call = make_call(fn)
    task = asyncio.create_task(agent.submit(call, fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    assert await agent.cancel(call.id)
    outcome = await asyncio.wait_for(task, 2)
    assert outcome.status is CallStatus.CANCELLED and outcome.failure is FailureKind.CANCELLED
    assert outcome.log == b"partial\n" and outcome.started
    await driver.wait_until(lambda: driver.removes == 1)
    assert not await agent.cancel(call.id)


async def test_cancel_a_waiting_call(agents: AgentFactory) -> None:
    never = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(start_gate=never))
    agent = agents(driver)
    fn = make_fn()
    call = make_call(fn)
    task = asyncio.create_task(agent.submit(call, fn))
    await driver.wait_until(lambda: driver.starts == 1)
    assert await agent.cancel(call.id)
    outcome = await asyncio.wait_for(task, 2)
    assert outcome.status is CallStatus.CANCELLED and not outcome.started


async def test_cancel_of_an_unknown_call(agents: AgentFactory) -> None:
    assert not await agents().cancel("nope")


async def test_submit_task_cancellation_retires_the_container(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(handler=hang()))
    agent = agents(driver)
    fn = make_fn()
    task = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    await driver.wait_until(lambda: driver.removes == 1)
    assert agent.statistics().calls_running == 0


async def test_graceful_close_lets_running_calls_finish(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver()
    agent = agents(driver)
    fn, other = make_fn(), make_fn("other")
    idle = await agent.submit(make_call(other), other)  # an idle container of another function
    assert idle.status is CallStatus.SUCCESS
    driver.default.handler = gated(gate)
    running = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 2)
    closing = asyncio.create_task(agent.close(grace_s=5))
    await driver.wait_until(lambda: agent.statistics().closing)
    refused = await agent.submit(make_call(fn), fn)
    assert refused.failure is FailureKind.BUSY
    assert not closing.done()
    gate.set()
    assert (await running).status is CallStatus.SUCCESS
    await asyncio.wait_for(closing, 5)
    assert driver.closed and not driver.live
    assert agent.statistics().resources.tokens == 0
    assert agent.tasks_alive == 0


async def test_close_stops_calls_after_the_grace(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(handler=hang()))
    agent = agents(driver)
    fn = make_fn()
    running = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    await asyncio.wait_for(agent.close(grace_s=0.05), 5)
    outcome = await running
    assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.BUSY
    assert outcome.started
    assert not driver.live and agent.tasks_alive == 0


async def test_close_sends_waiting_calls_back(agents: AgentFactory) -> None:
    never = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(start_gate=never))
    agent = agents(driver)
    fn = make_fn()
    waiting = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.starts == 1)
    await asyncio.wait_for(agent.close(grace_s=5), 2)
    outcome = await waiting
    assert outcome.failure is FailureKind.BUSY and not outcome.started
    assert driver.removes == 1


async def test_stop_waiting_sends_every_waiting_call_back_and_lets_running_ones_run(
    agents: AgentFactory,
) -> None:
    gate, never = asyncio.Event(), asyncio.Event()
    starting = make_fn("starting")
    driver = FakeDriver(
        FakeBehaviour(handler=gated(gate)),
        per_image={starting.image: FakeBehaviour(start_gate=never)},
    )
    agent = agents(driver, memory_mb=256)  # room for two containers of 128 MB
    fn, other = make_fn(), make_fn("other")
    running = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    waiting = [asyncio.create_task(agent.submit(make_call(starting), starting))]
    await driver.wait_until(lambda: driver.starts == 2)  # the memory is all taken now
    waiting.append(asyncio.create_task(agent.submit(make_call(fn), fn)))  # for the busy one
    waiting.append(asyncio.create_task(agent.submit(make_call(other), other)))  # for room
    await driver.wait_until(lambda: agent.statistics().calls_waiting == 3)
    agent.stop_waiting()
    assert agent.waiting_stopped
    outcomes = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    late = await asyncio.wait_for(agent.submit(make_call(fn), fn), 5)
    for outcome in [*outcomes, late]:
        assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.BUSY
        assert not outcome.started and outcome.error == "the agent is shutting down"
    assert not running.done() and agent.statistics().calls_waiting == 0
    gate.set()
    assert (await asyncio.wait_for(running, 5)).status is CallStatus.SUCCESS
    assert driver.dispatches == 1 and driver.creates == 2


async def test_no_task_is_left_after_close(agents: AgentFactory) -> None:
    before = asyncio.all_tasks()
    driver = FakeDriver(FakeBehaviour(handler=reply()))
    async with agents(driver, freeze_idle_msecs=0) as agent:
        assert driver.started
        fns = [make_fn(f"f{i}") for i in range(3)]
        await asyncio.gather(*(agent.submit(make_call(fn), fn) for fn in fns for _ in range(3)))
        assert agent.tasks_alive >= 4
    assert asyncio.all_tasks() == before
    assert agent.tasks_alive == 0 and driver.closed and not driver.live


async def test_launcher_retires_its_idle_queue(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver, hot_launcher_timeout_msecs=50)
    fn = make_fn(idle_timeout_s=0)
    await agent.submit(make_call(fn), fn)
    await driver.wait_until(lambda: not agent.statistics().queues and agent.tasks_alive == 0)
    assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    assert driver.creates == 2


async def _one_paused_one_busy(
    agents: AgentFactory, busy_gate: asyncio.Event
) -> tuple[FakeDriver, Agent, asyncio.Task[Outcome], Function]:
    """Two containers of one function: the first paused and idle, the second busy."""
    driver = FakeDriver()
    agent = agents(driver, freeze_idle_msecs=100)
    fn = make_fn()
    await _idle_together(agent, driver, fn, 2)
    await driver.wait_until(lambda: driver.pauses == 2)
    driver.default.handler = gated(busy_gate)
    busy = asyncio.create_task(agent.submit(make_call(fn), fn))  # unpauses one
    await driver.wait_until(lambda: driver.dispatches == 3)
    driver.default.handler = reply()
    return driver, agent, busy, fn


async def test_a_call_waits_a_moment_for_a_running_container_before_unpausing(
    agents: AgentFactory,
) -> None:
    busy_gate = asyncio.Event()
    driver, agent, busy, fn = await _one_paused_one_busy(agents, busy_gate)
    assert driver.unpauses == 1
    waiting = asyncio.create_task(agent.submit(make_call(fn), fn))
    await settle()  # it waits (no time passes: a slow host cannot use up the moment here)
    busy_gate.set()  # the running call ends within the moment
    ran_on = (await waiting).container_id
    assert ran_on == (await busy).container_id
    assert driver.unpauses == 1  # the paused container stayed paused


async def test_a_call_unpauses_when_no_running_container_frees_in_time(
    agents: AgentFactory,
) -> None:
    busy_gate = asyncio.Event()
    driver, agent, busy, fn = await _one_paused_one_busy(agents, busy_gate)
    out = await asyncio.wait_for(agent.submit(make_call(fn), fn), 1.0)
    assert out.status is CallStatus.SUCCESS
    assert driver.unpauses == 2 and not busy.done()
    busy_gate.set()
    await busy


# ------------------------------------------------------------- images


async def test_containers_of_a_replaced_image_are_retired(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)))
    agent = agents(driver)
    fn = make_fn(idle_timeout_s=600)
    busy = asyncio.create_task(agent.submit(make_call(fn), fn))
    gate.set()
    assert (await busy).status is CallStatus.SUCCESS
    gate.clear()
    running = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 2)
    assert await agent.retire_replaced_images() == 0  # the image is as it was
    driver.images[fn.image] = "rebuilt"
    assert await agent.retire_replaced_images() == 1
    await settle()
    assert driver.removes == 0  # its call runs on, to its end
    gate.set()
    assert (await running).status is CallStatus.SUCCESS
    await driver.wait_until(lambda: driver.removes == 1)
    out = await agent.submit(make_call(fn), fn)  # a new container, of the new image
    assert out.status is CallStatus.SUCCESS
    assert [c.image_id for c in driver.live] == ["rebuilt"]
    assert driver.creates == 2
    assert await agent.retire_replaced_images() == 0


# ------------------------------------------------------------- definitions


async def test_a_new_definition_retires_the_containers_of_the_old_one(
    agents: AgentFactory,
) -> None:
    gate = asyncio.Event()  # held by calls with the body `hold`

    async def handler(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        if request.body == b"hold":
            await gate.wait()
        return await reply()(container, request)

    driver = FakeDriver(FakeBehaviour(handler=handler))
    agent = agents(driver)
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    old = make_fn(idle_timeout_s=600, config={"MODE": "a"}, updated_at=t0)
    new = dataclasses.replace(old, config=frozen_map({"MODE": "b"}), updated_at=t0 + timedelta(1))

    def modes() -> list[str]:
        return sorted(c.spec.env["MODE"] for c in driver.live)

    running = asyncio.create_task(agent.submit(make_call(old, b"hold"), old))
    await driver.wait_until(lambda: driver.dispatches == 1)
    assert (await agent.submit(make_call(old), old)).status is CallStatus.SUCCESS
    assert modes() == ["a", "a"]  # one busy, one idle
    assert (await agent.submit(make_call(new), new)).status is CallStatus.SUCCESS
    await driver.wait_until(lambda: modes() == ["a", "b"])  # the idle `a` one left
    assert driver.removes == 1
    gate.set()
    assert (await running).status is CallStatus.SUCCESS  # ran to its end, on `a`
    await driver.wait_until(lambda: modes() == ["b"])
    # A call that looked the function up before the change runs as it was, and
    # takes nothing from the newer definition.
    assert (await agent.submit(make_call(old), old)).status is CallStatus.SUCCESS
    assert modes() == ["a", "b"]
    # Changed back: the `a` container serves, the `b` one goes.
    back = dataclasses.replace(old, updated_at=t0 + timedelta(2))
    assert (await agent.submit(make_call(back), back)).status is CallStatus.SUCCESS
    await driver.wait_until(lambda: modes() == ["a"])
    assert driver.creates == 4


async def test_definitions_without_a_time_retire_nothing(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver)
    one, two = make_fn(memory_mb=64), make_fn(memory_mb=128)
    for fn in (one, two, one):
        assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    await settle()
    assert (driver.creates, driver.removes) == (2, 0)

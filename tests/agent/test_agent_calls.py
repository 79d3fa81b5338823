"""A call's way through the agent on the fake driver: slots, launches, reuse."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import pytest

from config.domain import CallStatus, FailureKind, Function, Outcome, frozen_map, utcnow
from tests.agent.conftest import AgentFactory, FixedCpu, make_call, make_fn, settle
from worker.agent.agent import Agent
from worker.agent.cpu import CpuGauge
from worker.agent.driver import FN_LISTENER, DispatchRequest, DispatchResult
from worker.agent.drivers.fake import (
    FakeBehaviour,
    FakeContainer,
    FakeDriver,
    Handler,
    gated,
    reply,
)
from worker.agent.fleet import KEY_CACHE_SIZE


async def test_success_returns_response_log_and_times(agents: AgentFactory) -> None:
    driver = FakeDriver(
        FakeBehaviour(handler=reply(200, b"hi", {"X-A": "1"}, (b"out\n", b"err\n")))
    )
    agent = agents(driver)
    fn = make_fn(config={"GREETING": "hello", "FN_TYPE": "user-cannot-override"})
    call = make_call(fn, body=b"payload", headers={"X-Req": "v"})
    started: list[bool] = []
    before = utcnow()
    outcome = await agent.submit(call, fn, on_start=lambda: started.append(True))
    after = utcnow()
    assert outcome.status is CallStatus.SUCCESS
    assert outcome.error is None and outcome.failure is None
    assert outcome.response is not None
    assert (outcome.response.status, outcome.response.body) == (200, b"hi")
    assert outcome.response.headers["X-A"] == "1"
    assert outcome.log == b"out\nerr\n" and not outcome.log_truncated
    [container] = driver.containers
    assert outcome.container_id == container.id
    assert outcome.started_at is not None and outcome.completed_at is not None
    assert outcome.started_at <= outcome.completed_at
    assert started == [True]
    [request] = container.requests
    assert (request.call_id, request.body, dict(request.headers)) == (
        call.id,
        b"payload",
        {"X-Req": "v"},
    )
    assert request.timeout_s == fn.timeout_s
    timeout = timedelta(seconds=fn.timeout_s)
    assert before + timeout <= request.deadline <= after + timeout
    assert before <= outcome.started_at <= outcome.completed_at <= after
    env = container.spec.env
    assert env["FN_FORMAT"] == "http-stream" and env["FN_LISTENER"] == FN_LISTENER
    assert (env["FN_APP_ID"], env["FN_FN_ID"], env["FN_MEMORY"]) == ("app", "hello", "128")
    assert env["FN_TYPE"] == "async" and env["GREETING"] == "hello"
    assert (container.spec.memory_mb, container.spec.image) == (128, fn.image)


async def test_a_call_is_timed_by_the_agents_clock_and_its_deadline_by_the_hosts(
    agents: AgentFactory,
) -> None:
    """A worker's agent stamps the outcome with the datastore's clock (here a minute
    behind this host's); the function's deadline is by this host's clock, which its
    container reads."""
    behind = timedelta(seconds=60)
    driver = FakeDriver(FakeBehaviour(handler=reply(200, b"hi")))
    agent = agents(driver, clock=lambda: utcnow() - behind)
    fn = make_fn()
    before = utcnow()
    outcome = await agent.submit(make_call(fn), fn)
    after = utcnow()
    assert outcome.status is CallStatus.SUCCESS
    assert outcome.started_at is not None and outcome.completed_at is not None
    assert before - behind <= outcome.started_at <= outcome.completed_at <= after - behind
    [request] = driver.containers[0].requests
    timeout = timedelta(seconds=fn.timeout_s)
    assert before + timeout <= request.deadline <= after + timeout
    refused = await agent.submit(dataclasses.replace(make_call(fn), id="no/slash"), fn)
    assert refused.completed_at is not None
    assert before - behind <= refused.completed_at <= utcnow() - behind


async def test_hundred_sequential_calls_use_one_container(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn()
    for _ in range(100):
        outcome = await agent.submit(make_call(fn), fn)
        assert outcome.status is CallStatus.SUCCESS
    assert (driver.creates, driver.starts, driver.dispatches, driver.removes) == (1, 1, 100, 0)
    assert len({o for c in driver.containers for o in [c.id]}) == 1


async def test_parallel_calls_start_between_two_and_n_containers(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)))
    agent = agents(driver)
    fn = make_fn()
    n = 8
    calls = [asyncio.create_task(agent.submit(make_call(fn), fn)) for _ in range(n)]
    await driver.wait_until(lambda: driver.dispatches >= 2)
    gate.set()
    outcomes = await asyncio.gather(*calls)
    assert all(o.status is CallStatus.SUCCESS for o in outcomes)
    assert 2 <= driver.creates <= n
    assert len({o.container_id for o in outcomes}) == driver.creates


async def test_parallel_calls_all_blocked_get_one_container_each(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)))
    agent = agents(driver)
    fn = make_fn()
    calls = [asyncio.create_task(agent.submit(make_call(fn), fn)) for _ in range(4)]
    await driver.wait_until(lambda: driver.dispatches == 4)
    stats = agent.statistics().queue(fn.ref)
    assert stats is not None
    assert (stats.calls_running, stats.calls_waiting, stats.containers["busy"]) == (4, 0, 4)
    gate.set()
    await asyncio.gather(*calls)
    assert driver.creates == 4


async def test_idle_containers_are_reused_last_idle_first(agents: AgentFactory) -> None:
    gate_a, gate_b = asyncio.Event(), asyncio.Event()
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn()
    driver.default.handler = gated(gate_a)
    first = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    driver.default.handler = gated(gate_b)
    second = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 2)
    gate_b.set()
    out_b = await second  # container B idles first
    gate_a.set()
    out_a = await first  # then A: A is the most recently idle
    driver.default.handler = reply()
    third = await agent.submit(make_call(fn), fn)
    assert third.container_id == out_a.container_id != out_b.container_id
    gate_a.clear()
    gate_b.set()


def _in_order(gate: asyncio.Event, order: list[bytes]) -> Handler:
    """Note each call's body as it is dispatched; the call "first" waits for ``gate``."""

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        order.append(request.body)
        if request.body == b"first":
            await gate.wait()
        return DispatchResult(200, frozen_map(), b"ok", False)

    return handle


def _one_container_in_order(
    agents: AgentFactory,
) -> tuple[asyncio.Event, list[bytes], FakeDriver, Agent, Function]:
    """An agent with room for one container of ``fn``, whose calls note their order."""
    gate, order = asyncio.Event(), list[bytes]()
    driver = FakeDriver(FakeBehaviour(handler=_in_order(gate, order)))
    return gate, order, driver, agents(driver, memory_mb=200), make_fn()


async def test_waiting_calls_get_a_free_container_in_the_order_they_came(
    agents: AgentFactory,
) -> None:
    gate, order, driver, agent, fn = _one_container_in_order(agents)

    async def first_then_again() -> Outcome:
        await agent.submit(make_call(fn, b"first"), fn)
        # Submitted at the very moment the container is handed back: it must not
        # overtake the calls that have been waiting for it.
        return await agent.submit(make_call(fn, b"again"), fn)

    chain = asyncio.create_task(first_then_again())
    await driver.wait_until(lambda: driver.dispatches == 1)
    waiting = []
    for name in (b"w0", b"w1", b"w2"):
        waiting.append(asyncio.create_task(agent.submit(make_call(fn, name), fn)))
        await settle()
    gate.set()
    outcomes = await asyncio.gather(chain, *waiting)
    assert all(o.status is CallStatus.SUCCESS for o in outcomes)
    assert order == [b"first", b"w0", b"w1", b"w2", b"again"]
    assert driver.creates == 1


async def test_a_container_handed_to_a_call_that_stops_waiting_goes_to_the_next(
    agents: AgentFactory,
) -> None:
    gate, order, driver, agent, fn = _one_container_in_order(agents)
    first = asyncio.create_task(agent.submit(make_call(fn, b"first"), fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    quitter = asyncio.create_task(agent.submit(make_call(fn, b"quitter"), fn))
    await settle()
    gate.set()
    # The container is handed to the waiting call when the first one ends; that
    # call is cancelled before it has run again to take it.
    while agent.statistics().calls_waiting:
        await asyncio.sleep(0)
    assert not quitter.done()
    quitter.cancel()
    await asyncio.gather(quitter, return_exceptions=True)
    assert quitter.cancelled() and (await first).status is CallStatus.SUCCESS
    after = await asyncio.wait_for(agent.submit(make_call(fn, b"after"), fn), 1)
    assert after.status is CallStatus.SUCCESS
    assert order == [b"first", b"after"] and driver.creates == 1


async def test_a_container_handed_to_a_call_as_waiting_stops_goes_back_to_it(
    agents: AgentFactory,
) -> None:
    gate, order = asyncio.Event(), list[bytes]()
    driver = FakeDriver(FakeBehaviour(handler=_in_order(gate, order)))
    agent = agents(driver, memory_mb=200)  # room for one container
    fn = make_fn(idle_timeout_s=0)  # it leaves once idle, if it is given back
    first = asyncio.create_task(agent.submit(make_call(fn, b"first"), fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    waiting = asyncio.create_task(agent.submit(make_call(fn, b"waiting"), fn))
    await settle()
    gate.set()
    # The container is handed to the waiting call when the first one ends; waiting
    # stops before that call has run to take it: it goes back, and so does the slot.
    while agent.statistics().calls_waiting:
        await asyncio.sleep(0)
    assert not waiting.done()
    agent.stop_waiting()
    outcome = await asyncio.wait_for(waiting, 5)
    assert outcome.failure is FailureKind.BUSY and not outcome.started
    assert (await first).status is CallStatus.SUCCESS
    await driver.wait_until(lambda: driver.removes == 1)  # idle again, then gone
    assert order == [b"first"] and driver.creates == 1


async def test_statistics_snapshot_counts_states_and_resources(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)))
    agent = agents(driver)
    fn = make_fn(memory_mb=100, cpus_mcpu=250, tmpfs_mb=28)
    task = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 1)
    stats = agent.statistics()
    assert stats.resources.memory_used_bytes == 128 * 1024 * 1024
    assert stats.resources.cpu_used_mcpus == 250
    assert (stats.containers, stats.calls_running, stats.calls_waiting) == (1, 1, 0)
    gate.set()
    await task
    await driver.wait_until(lambda: agent.statistics().queues[0].containers["idle"] == 1)
    after = agent.statistics()
    assert after.queues[0].containers_started == 1 and after.calls_running == 0
    assert after.resources.memory_used_bytes == 128 * 1024 * 1024  # idle containers hold tokens
    assert not after.closing


async def test_different_configurations_get_their_own_containers(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver)
    plain, configured = make_fn(), make_fn(config={"MODE": "x"})
    await agent.submit(make_call(plain), plain)
    await agent.submit(make_call(configured), configured)
    await agent.submit(make_call(plain), plain)
    assert driver.creates == 2
    assert len(agent.statistics().queues) == 2


async def test_equal_functions_share_containers_whatever_object_holds_them(
    agents: AgentFactory,
) -> None:
    # Slot keys are remembered per Function object; equal ones made anew (more than
    # the memory holds) still find the same queue and container.
    driver = FakeDriver()
    agent = agents(driver)
    for _ in range(KEY_CACHE_SIZE + 5):
        fn = make_fn(config={"MODE": "x"})
        assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    assert driver.creates == 1
    assert len(agent.statistics().queues) == 1


async def test_with_fns_rule_idle_containers_hold_the_intake(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver, memory_mb=1000, async_count_idle=True)
    assert await agent.wait_async_resource(0.01)
    fn = make_fn(memory_mb=850, idle_timeout_s=1)
    assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    assert not await agent.wait_async_resource(0.05)  # the idle container still holds 85 %
    assert await agent.wait_async_resource(5)  # until its idle timeout
    assert driver.removes == 1


async def test_idle_containers_do_not_hold_the_intake_busy_ones_do(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)))
    agent = agents(driver, memory_mb=1000)
    fn = make_fn(memory_mb=850, idle_timeout_s=60)
    running = asyncio.create_task(agent.submit(make_call(fn), fn))
    await settle(20)
    assert driver.creates == 1
    assert not await agent.wait_async_resource(0.05)  # busy: 85 % in use
    waiting = asyncio.create_task(agent.wait_async_resource(5))
    await settle()
    assert not waiting.done()
    gate.set()  # the call ends; its container idles, and is room to take back
    assert (await running).status is CallStatus.SUCCESS
    assert await asyncio.wait_for(waiting, 1.0)
    assert await agent.wait_async_resource(0.01)
    assert driver.removes == 0  # still hot: the next call of the function uses it
    assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    assert driver.creates == 1


def sleeping(seconds: list[float]) -> Handler:
    """Answer after ``seconds[0]`` (the test may change it between calls)."""
    after = reply()

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        await asyncio.sleep(seconds[0])
        return await after(container, request)

    return handle


async def _after_calls_of(
    agents: AgentFactory, took: list[float], cpu: CpuGauge | None = None
) -> tuple[FakeDriver, Agent, Function]:
    """An agent whose function has run three calls of ``took[0]`` s each (so its
    queue knows how long a call holds a container)."""
    driver = FakeDriver(FakeBehaviour(handler=sleeping(took)))
    agent = agents(driver, cpu=cpu)
    fn = make_fn()
    for _ in range(3):
        assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    return driver, agent, fn


async def _busy_after_calls_of(
    agents: AgentFactory,
    usual_s: float,
    busy_s: float,
    then_s: float,
    cpu: CpuGauge | None = None,
) -> tuple[FakeDriver, Agent, Function, asyncio.Task[Outcome]]:
    """After three calls of ``usual_s``, one call of ``busy_s`` holds the only
    container (the task returned); the calls after it take ``then_s``."""
    took = [usual_s]
    driver, agent, fn = await _after_calls_of(agents, took, cpu)
    took[0] = busy_s
    first = asyncio.create_task(agent.submit(make_call(fn), fn))
    await settle()
    took[0] = then_s
    return driver, agent, fn, first


async def test_a_busy_container_free_again_within_a_call_time_is_waited_for(
    agents: AgentFactory,
) -> None:
    # calls of 30 ms, then the container is busy for 2 ms
    driver, agent, fn, first = await _busy_after_calls_of(agents, 0.03, 0.002, 0.002)
    second = await agent.submit(make_call(fn), fn)
    assert second.status is CallStatus.SUCCESS and (await first).status is CallStatus.SUCCESS
    assert driver.creates == 1


async def test_a_call_with_patience_of_its_own_waits_for_the_busy_container(
    agents: AgentFactory,
) -> None:
    # calls usually take 2 ms; the container is busy for 100 ms
    driver, agent, fn, first = await _busy_after_calls_of(agents, 0.002, 0.1, 0.0)
    second = await agent.submit(make_call(fn), fn, launch_patience_s=0.5)
    assert second.status is CallStatus.SUCCESS and (await first).status is CallStatus.SUCCESS
    assert driver.creates == 1  # without its patience it would have asked after ~2 ms


async def test_a_call_that_waits_longer_than_a_call_time_gets_a_new_container(
    agents: AgentFactory,
) -> None:
    # calls usually take 2 ms; the only container is busy for 2 s
    driver, agent, fn, first = await _busy_after_calls_of(agents, 0.002, 2.0, 0.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    second = await agent.submit(make_call(fn), fn)
    assert second.status is CallStatus.SUCCESS
    assert loop.time() - t0 < 1.0 and driver.creates == 2
    assert (await first).status is CallStatus.SUCCESS


@pytest.mark.parametrize(("usual_s", "starting"), [(0.002, 1), (0.05, 3)])
async def test_a_short_function_with_busy_containers_starts_one_container_at_a_time(
    agents: AgentFactory, usual_s: float, starting: int
) -> None:
    # the only container is busy for 0.3 s; three calls wait and ask for containers
    driver, agent, fn, first = await _busy_after_calls_of(agents, usual_s, 0.3, 0.0)
    gate = asyncio.Event()
    driver.default.start_gate = gate  # new containers stay starting until it is set
    waiting = [asyncio.create_task(agent.submit(make_call(fn), fn)) for _ in range(3)]
    await asyncio.sleep(0.1)
    stats = agent.statistics().queue(fn.ref)
    assert stats is not None and stats.containers.get("start", 0) == starting
    gate.set()
    outcomes = await asyncio.gather(first, *waiting)
    assert all(o.status is CallStatus.SUCCESS for o in outcomes)


async def test_a_saturated_cpu_still_starts_a_container_when_the_busy_one_is_stuck(
    agents: AgentFactory,
) -> None:
    # calls usually take 2 ms; the only container is busy for 2 s: no call frees it
    cpu = FixedCpu(saturated=True)
    driver, agent, fn, first = await _busy_after_calls_of(agents, 0.002, 2.0, 0.0, cpu)
    second = await asyncio.wait_for(agent.submit(make_call(fn), fn), 1.0)
    assert second.status is CallStatus.SUCCESS and driver.creates == 2
    assert (await first).status is CallStatus.SUCCESS

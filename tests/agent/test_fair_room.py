"""Room for a function without a container while other functions keep all of it busy."""

from __future__ import annotations

import asyncio
from collections import Counter

from config.domain import CallStatus, FailureKind, Function, Outcome
from tests.agent.conftest import AgentFactory, make_call, make_fn
from worker.agent.agent import Agent
from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.drivers.fake import FakeBehaviour, FakeContainer, FakeDriver, Handler, reply

CALL_S = 0.05  # how long a call of the busy functions holds its container


def slow(seconds: float) -> Handler:
    """Answer 200 after ``seconds``."""
    answer = reply()

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        await asyncio.sleep(seconds)
        return await answer(container, request)

    return handle


class Busy:
    """Functions whose calls always wait: two callers each, one call after another."""

    def __init__(self, agent: Agent, *fns: Function) -> None:
        self.agent = agent
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._loop(fn)) for fn in fns for _ in range(2)]

    async def _loop(self, fn: Function) -> None:
        while not self._stop.is_set() and not self.agent.waiting_stopped:
            self.outcomes.append(await self.agent.submit(make_call(fn), fn))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 10)

    async def __aenter__(self) -> Busy:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def failures(self) -> list[str | None]:
        return [o.error for o in self.outcomes if o.status is not CallStatus.SUCCESS]


def creates(driver: FakeDriver) -> Counter[str]:
    return Counter(c.spec.fn for c in driver.containers)


async def test_a_function_without_a_container_gets_the_room_of_a_busy_one(
    agents: AgentFactory,
) -> None:
    driver = FakeDriver(FakeBehaviour(handler=slow(CALL_S)))
    agent = agents(driver, memory_mb=256)  # room for two containers
    a, b, c = make_fn("a"), make_fn("b"), make_fn("c", timeout_s=2)
    async with Busy(agent, a, b) as busy:
        await driver.wait_until(lambda: driver.dispatches >= 8)  # each has served calls
        assert creates(driver) == {"a": 1, "b": 1}
        loop = asyncio.get_running_loop()
        began = loop.time()
        out = await agent.submit(make_call(c), c)
        waited = loop.time() - began
        assert out.status is CallStatus.SUCCESS, out.error
        # It waited half its timeout (FN_HOT_DISPLACE_WAIT_PERCENT), then for a call of
        # A or B to end and its container to start.
        assert 1.0 <= waited < 1.0 + 0.5, waited
        assert agent.statistics().displacements == 1
        # Its idle container goes to the function that gave up its own: it starts again.
        await driver.wait_until(lambda: sum(creates(driver).values()) == 4)
        await driver.wait_until(lambda: len(driver.live) == 2)
        served = driver.dispatches
        await driver.wait_until(lambda: driver.dispatches >= served + 8)
        counts = creates(driver)
        assert counts["c"] == 1 and counts["a"] + counts["b"] == 3, counts
        # gone: the displaced container and C's, evicted once idle (an eviction counted
        # in statistics may also have lost its race to a call: it removes nothing)
        assert driver.removes == 2 and agent.statistics().displacements == 1
    assert busy.failures() == []


async def test_no_displacement_when_there_is_room(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(handler=slow(CALL_S)))
    agent = agents(driver, memory_mb=640)  # room for five
    a, b, c = make_fn("a"), make_fn("b"), make_fn("c", timeout_s=2)
    async with Busy(agent, a, b) as busy:
        # two callers each: they grow to two containers each
        await driver.wait_until(lambda: creates(driver) == {"a": 2, "b": 2})
        await driver.wait_until(lambda: driver.dispatches >= 16)
        loop = asyncio.get_running_loop()
        began = loop.time()
        out = await agent.submit(make_call(c), c)
        assert out.status is CallStatus.SUCCESS, out.error
        assert loop.time() - began < 0.5
    assert busy.failures() == []
    assert creates(driver) == {"a": 2, "b": 2, "c": 1}
    assert driver.removes == 0 and agent.statistics().displacements == 0


async def test_functions_that_have_containers_displace_none(agents: AgentFactory) -> None:
    """All busy, each with a container, each asking for more: nobody is displaced, no
    matter how long their launches wait."""
    driver = FakeDriver(FakeBehaviour(handler=slow(CALL_S)))
    agent = agents(driver, memory_mb=256, hot_displace_wait_percent=5)
    a, b = make_fn("a", timeout_s=4), make_fn("b", timeout_s=4)  # displacing after 0.2 s
    async with Busy(agent, a, b) as busy:
        await driver.wait_until(lambda: agent.tracker.waiting == 2)  # both launches wait
        served = driver.dispatches
        await driver.wait_until(lambda: driver.dispatches >= served + 40)  # 1 s: 5 x the bound
        assert agent.tracker.waiting == 2
        # (checked before the calls stop: then one's idle container may go to the other)
        assert creates(driver) == {"a": 1, "b": 1}
        assert driver.removes == 0 and agent.statistics().displacements == 0
    assert busy.failures() == []


async def test_a_displaced_container_stays_if_the_launch_no_longer_waits(
    agents: AgentFactory,
) -> None:
    gate = asyncio.Event()
    answer = reply()

    async def held(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        if request.body == b"hold":
            await gate.wait()
        return await answer(container, request)

    driver = FakeDriver(FakeBehaviour(handler=held))
    agent = agents(driver, memory_mb=256, hot_displace_wait_percent=25)
    a, b, c = make_fn("a"), make_fn("b"), make_fn("c", timeout_s=2)  # displacing after 0.5 s
    for fn in (a, b):  # a call each first: a container displaced has served two
        assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    holding = [asyncio.create_task(agent.submit(make_call(fn, b"hold"), fn)) for fn in (a, b)]
    await driver.wait_until(lambda: driver.dispatches == 4)
    call = make_call(c)
    waiting = asyncio.create_task(agent.submit(call, c))
    await driver.wait_until(lambda: any(h.evict.displaced for h in agent._hot), timeout_s=2)
    assert await agent.cancel(call.id)
    assert (await waiting).status is CallStatus.CANCELLED
    await driver.wait_until(lambda: agent.tracker.waiting == 0)  # the launch left the line
    gate.set()
    assert [o.status for o in await asyncio.gather(*holding)] == [CallStatus.SUCCESS] * 2
    for fn in (a, b):  # the containers serve on
        assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    assert creates(driver) == {"a": 1, "b": 1}
    assert driver.removes == 0 and agent.statistics().displacements == 0
    assert not any(h.evict.displaced for h in agent._hot)


async def test_without_displacement_the_function_waits_for_room_as_before(
    agents: AgentFactory,
) -> None:
    driver = FakeDriver(FakeBehaviour(handler=slow(CALL_S)))
    agent = agents(driver, memory_mb=256, hot_displace_wait_percent=0)
    a, b, c = make_fn("a"), make_fn("b"), make_fn("c", timeout_s=1)
    async with Busy(agent, a, b) as busy:
        await driver.wait_until(lambda: driver.dispatches >= 8)
        out = await agent.submit(make_call(c), c)
        assert creates(driver) == {"a": 1, "b": 1} and agent.statistics().displacements == 0
    assert out.failure is FailureKind.BUSY and "became free" in (out.error or "")
    assert busy.failures() == []

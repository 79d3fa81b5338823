"""A host without room for another container (the worker's file descriptors, say: the
fake driver's ``host_room``): a launch evicts idle containers of other functions
first, and the call goes back as the host's shortage only when none can go."""

from __future__ import annotations

import asyncio

from config.domain import CallStatus, FailureKind
from tests.agent.conftest import AgentFactory, make_call, make_fn
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver, gated


async def test_a_new_function_evicts_the_oldest_idle_container_of_another(
    agents: AgentFactory,
) -> None:
    """Three idle containers that would stay for 5 min fill the host; a call of a fourth
    function runs at once, in the room of the oldest."""
    driver = FakeDriver(host_room=3)
    agent = agents(driver)
    a, b, c, d = (make_fn(name, idle_timeout_s=300) for name in "abcd")
    ran = {fn.name: await agent.submit(make_call(fn), fn) for fn in (a, b, c)}
    assert {o.status for o in ran.values()} == {CallStatus.SUCCESS}
    outcome = await agent.submit(make_call(d), d)
    assert outcome.status is CallStatus.SUCCESS, outcome.error
    assert {x.id for x in driver.containers if x.state == "removed"} == {ran["a"].container_id}
    assert len(driver.live) == 3 and driver.creates == 4
    assert agent.statistics().evictions == 1
    # the memory of the evicted container is free again
    assert agent.statistics().resources.memory_used_bytes == 3 * 128 * 1024 * 1024


async def test_an_idle_container_goes_and_a_busy_one_stays(agents: AgentFactory) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(
        FakeBehaviour(), per_image={"img/a": FakeBehaviour(handler=gated(gate))}, host_room=2
    )
    agent = agents(driver)
    a, b, c = (make_fn(name, idle_timeout_s=300) for name in "abc")
    running = asyncio.create_task(agent.submit(make_call(a), a))  # the oldest, busy
    await driver.wait_until(lambda: driver.dispatches == 1)
    idle = await agent.submit(make_call(b), b)
    assert (await agent.submit(make_call(c), c)).status is CallStatus.SUCCESS
    assert [x.id for x in driver.containers if x.state == "removed"] == [idle.container_id]
    gate.set()
    assert (await running).status is CallStatus.SUCCESS


async def test_the_call_goes_back_as_the_hosts_shortage_while_no_container_is_idle(
    agents: AgentFactory,
) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)), host_room=2)
    agent = agents(driver)
    a, b, c = (make_fn(name, idle_timeout_s=300) for name in "abc")
    running = [asyncio.create_task(agent.submit(make_call(fn), fn)) for fn in (a, b)]
    await driver.wait_until(lambda: driver.dispatches == 2)
    outcome = await agent.submit(make_call(c), c)
    assert not outcome.started and outcome.failure is FailureKind.BUSY
    assert outcome.error is not None and "fake host has room for 2" in outcome.error
    assert driver.removes == 0 and agent.statistics().evictions == 0
    gate.set()
    first, _ = await asyncio.gather(*running)
    assert (await agent.submit(make_call(c), c)).status is CallStatus.SUCCESS  # now idle
    assert [x.id for x in driver.containers if x.state == "removed"] == [first.container_id]

"""A host without room for another container (the worker's file descriptors, say: the
fake driver's ``host_room``): a launch evicts idle containers of other functions
first, and the call goes back as the host's shortage only when none can go."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest

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


async def test_a_lapsed_connection_takes_the_room_of_an_idle_container_of_another(
    agents: AgentFactory,
) -> None:
    """The host is full, and a container's kept-alive connection lapsed: the call's new
    connection finds no room. The oldest idle container of another function goes,
    and the call runs on its own container, not dispatched before that."""
    driver = FakeDriver(host_room=2)
    agent = agents(driver)
    a, b = (make_fn(name, idle_timeout_s=300) for name in "ab")
    other = await agent.submit(make_call(a), a)
    first = await agent.submit(make_call(b), b)
    mine = next(x for x in driver.containers if x.id == first.container_id)
    mine.lapse_connection()
    outcome = await agent.submit(make_call(b), b)
    assert outcome.status is CallStatus.SUCCESS, outcome.error
    assert outcome.container_id == first.container_id  # the same container, after room
    assert driver.connections_refused == 1
    assert [x.id for x in driver.containers if x.state == "removed"] == [other.container_id]
    assert agent.statistics().evictions == 1 and driver.creates == 2
    assert len(mine.requests) == 2  # the refused connection sent nothing


async def test_a_lapsed_connection_goes_back_as_the_hosts_shortage_while_none_is_idle(
    agents: AgentFactory,
) -> None:
    """No idle container of another function to evict: the call goes back to the queue
    after its one try, as the host's shortage, and its container stays."""
    gate = asyncio.Event()
    driver = FakeDriver(
        FakeBehaviour(), per_image={"img/a": FakeBehaviour(handler=gated(gate))}, host_room=2
    )
    agent = agents(driver)
    a, b = (make_fn(name, idle_timeout_s=300) for name in "ab")
    first = await agent.submit(make_call(b), b)
    running = asyncio.create_task(agent.submit(make_call(a), a))  # busy: it stays
    await driver.wait_until(lambda: driver.dispatches == 2)
    mine = next(x for x in driver.containers if x.id == first.container_id)
    mine.lapse_connection()
    outcome = await agent.submit(make_call(b), b)
    assert (outcome.started, outcome.failure) == (False, FailureKind.BUSY)
    assert outcome.error is not None and "no room for a connection" in outcome.error
    assert driver.connections_refused == 1 and driver.removes == 0
    assert agent.statistics().evictions == 0
    gate.set()
    assert (await running).status is CallStatus.SUCCESS
    # the other container is idle now: it goes, and the next call runs on the same one
    again = await agent.submit(make_call(b), b)
    assert again.status is CallStatus.SUCCESS, again.error
    assert again.container_id == first.container_id
    assert agent.statistics().evictions == 1 and driver.connections_refused == 2


async def test_launches_at_once_count_the_room_of_the_starts_under_way(
    agents: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Four functions' calls come at once on a host with room for two containers: the
    first two launches start, and the other two, which would have found the same
    room free, wait for those starts instead of meeting the shortage. Once the first
    containers are idle, they make way, and every call runs."""
    caplog.set_level(logging.DEBUG, logger="fnq.agent.launcher")
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(start_gate=gate), host_room=2)
    agent = agents(driver)
    fns = [make_fn(name, idle_timeout_s=300) for name in "abcd"]
    calls = [asyncio.create_task(agent.submit(make_call(fn), fn)) for fn in fns]
    await driver.wait_until(lambda: driver.starts == 2)
    # the other two launches looked at the host, and wait: no create beyond its room
    await driver.wait_until(lambda: len(waits(caplog)) == 2 or driver.creates > 2)
    assert driver.creates == 2
    assert sorted(waits(caplog)) == ["app/c", "app/d"]
    gate.set()
    outcomes = await asyncio.gather(*calls)
    assert [o.status for o in outcomes] == [CallStatus.SUCCESS] * 4, [o.error for o in outcomes]
    assert driver.creates == 4 and len(driver.live) == 2
    assert agent.statistics().evictions == 2


def waits(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The functions whose launches waited for other containers' starts."""
    return [
        str(r.args[0])
        for r in caplog.records
        if isinstance(r.args, tuple) and r.getMessage().startswith("a launch of ")
    ]


async def test_a_lapsed_connection_leaves_the_room_it_frees_to_a_function_without_a_container(
    agents: AgentFactory,
) -> None:
    """The host is full, and S, without a container, waits for more memory than idle
    containers hold. A call whose kept-alive connection lapsed evicts an idle container
    of another function for the descriptors it needs, as always; the memory that frees
    is held for S, not taken by D, a function that has a container and wants another.
    S then gets the rest from containers that come idle, and runs first."""
    gate_a, gate_d = asyncio.Event(), asyncio.Event()
    driver = FakeDriver(
        FakeBehaviour(),
        per_image={
            "img/a": FakeBehaviour(handler=gated(gate_a)),
            "img/d": FakeBehaviour(handler=gated(gate_d)),
        },
        host_room=4,
    )
    # Room for four containers of 128 MB. S's launch looks at the host only every
    # 2 s: until then a call's connection finds it short (S's launch would evict too).
    agent = agents(driver, memory_mb=512, hot_poll_msecs=2000)
    a, b, c, d = (make_fn(name, idle_timeout_s=300, timeout_s=30) for name in "abcd")
    s = make_fn("s", memory_mb=384, timeout_s=60)  # it would displace only after 30 s
    idle_c = await agent.submit(make_call(c), c)  # the oldest idle container
    busy = [asyncio.create_task(agent.submit(make_call(fn), fn)) for fn in (a, d)]
    await driver.wait_until(lambda: driver.dispatches == 3)
    starving = asyncio.create_task(agent.submit(make_call(s), s))
    await driver.wait_until(agent.tracker.starving)
    ours = await agent.submit(make_call(b), b)  # the last 128 MB, and the host's last room
    more_d = asyncio.create_task(agent.submit(make_call(d), d))
    await driver.wait_until(lambda: agent.tracker.waiting == 2)  # S's launch and D's
    mine = next(x for x in driver.containers if x.id == ours.container_id)
    mine.lapse_connection()
    outcome = await agent.submit(make_call(b), b)
    assert outcome.status is CallStatus.SUCCESS, outcome.error
    assert outcome.container_id == ours.container_id
    assert [x.id for x in driver.containers if x.state == "removed"] == [idle_c.container_id]
    assert agent.tracker.waiting == 2 and agent.statistics().resources.tokens == 3
    gate_a.set()  # A's container comes idle: with B's and C's room, S has enough
    await driver.wait_until(lambda: creates(driver)["s"] + creates(driver)["d"] > 1, 10)
    assert creates(driver) == {"a": 1, "b": 1, "c": 1, "d": 1, "s": 1}
    assert (await starving).status is CallStatus.SUCCESS
    gate_d.set()
    assert [o.status for o in await asyncio.gather(*busy, more_d)] == [CallStatus.SUCCESS] * 3


def creates(driver: FakeDriver) -> Counter[str]:
    return Counter(x.spec.fn for x in driver.containers)

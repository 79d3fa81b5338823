"""A call that waits for idle containers of another function to go, evicted to make
room on a full host (the fake driver's ``host_room``), and that is cancelled, runs
out of time or meets the worker's shutdown meanwhile: it ends as any call waiting
for a container does, and nothing it waited for is left held: no memory or CPU
token, no slot, no ticket in the line, no container."""

from __future__ import annotations

import asyncio

from config.domain import CallStatus, FailureKind, Function
from tests.agent.conftest import AgentFactory, make_call, make_fn
from worker.agent.agent import Agent
from worker.agent.drivers.fake import FakeBehaviour, FakeContainer, FakeDriver

BOUND_S = 10.0  # far below the 35 s an eviction may take (hot.EVICTION_WAIT_S)


class SlowRemoval:
    """A host with room for ``room`` containers, the oldest of them idle (of function
    X) and slow to remove: its removal waits for ``gate``."""

    def __init__(self, agents: AgentFactory, room: int) -> None:
        self.gate = asyncio.Event()
        slow = FakeBehaviour(remove_gate=self.gate)
        self.driver = FakeDriver(FakeBehaviour(), per_image={"img/x": slow}, host_room=room)
        self.agent: Agent = agents(self.driver)
        self.x = make_fn("x", idle_timeout_s=300)

    async def fill(self, *fns: Function) -> list[FakeContainer]:
        """An idle container of X, then one of each of ``fns``."""
        containers = []
        for fn in (self.x, *fns):
            outcome = await self.agent.submit(make_call(fn), fn)
            assert outcome.status is CallStatus.SUCCESS, outcome.error
            containers.append(self.container(outcome.container_id))
        return containers

    def container(self, container_id: str | None) -> FakeContainer:
        return next(c for c in self.driver.containers if c.id == container_id)

    async def evicting(self, x: FakeContainer) -> None:
        """Until X's container was evicted and waits for its removal."""
        await self.driver.wait_until(lambda: x.removing)
        assert x.state != "removed" and self.agent.statistics().evictions == 1

    async def gone(self, x: FakeContainer, live: int) -> None:
        """X's removal ends; then ``live`` containers are left, each holding one token,
        and no call or launch holds anything."""
        self.gate.set()
        await self.driver.wait_until(lambda: x.state == "removed")
        await self.driver.wait_until(
            lambda: (
                self.agent.statistics().resources.tokens == live and self.agent.tracker.waiting == 0
            )
        )
        stats = self.agent.statistics()
        assert len(self.driver.live) == live == stats.containers
        assert stats.resources.memory_used_bytes == live * 128 * 1024 * 1024
        assert (stats.calls_waiting, stats.calls_running) == (0, 0)


# ------------------------------------------------------------ a launch's evictions


async def test_a_call_cancelled_while_its_launch_waits_for_an_eviction(
    agents: AgentFactory,
) -> None:
    host = SlowRemoval(agents, room=1)
    (x,) = await host.fill()
    y = make_fn("y")
    call = make_call(y)
    waiting = asyncio.create_task(host.agent.submit(call, y))
    await host.evicting(x)
    assert await host.agent.cancel(call.id)
    async with asyncio.timeout(BOUND_S):
        outcome = await waiting
    assert (outcome.status, outcome.failure) == (CallStatus.CANCELLED, FailureKind.CANCELLED)
    assert not outcome.started
    await host.gone(x, live=0)
    assert host.driver.creates == 1  # no container started for a call gone
    again = await host.agent.submit(make_call(y), y)
    assert again.status is CallStatus.SUCCESS, again.error
    await host.gone(x, live=1)


async def test_a_call_past_its_timeout_while_its_launch_waits_for_an_eviction(
    agents: AgentFactory,
) -> None:
    host = SlowRemoval(agents, room=1)
    (x,) = await host.fill()
    y = make_fn("y", timeout_s=1)
    waiting = asyncio.create_task(host.agent.submit(make_call(y), y))
    await host.evicting(x)
    async with asyncio.timeout(BOUND_S):
        outcome = await waiting
    assert (outcome.started, outcome.failure) == (False, FailureKind.BUSY)
    assert outcome.error is not None and "became free within 1 s" in outcome.error
    await host.gone(x, live=0)
    assert host.driver.creates == 1


async def test_a_call_at_shutdown_while_its_launch_waits_for_an_eviction(
    agents: AgentFactory,
) -> None:
    host = SlowRemoval(agents, room=1)
    (x,) = await host.fill()
    y = make_fn("y")
    waiting = asyncio.create_task(host.agent.submit(make_call(y), y))
    await host.evicting(x)
    host.agent.stop_waiting()
    async with asyncio.timeout(BOUND_S):
        outcome = await waiting
    assert (outcome.started, outcome.failure) == (False, FailureKind.BUSY)
    assert outcome.error is not None and "shutting down" in outcome.error
    await host.gone(x, live=0)
    assert host.driver.creates == 1
    await host.agent.close(grace_s=0)
    assert host.agent.tasks_alive == 0


# ------------------------------------------------------- a connection's evictions


async def test_a_call_cancelled_while_its_connection_waits_for_an_eviction(
    agents: AgentFactory,
) -> None:
    """Its container stays, idle, and serves the next call (nothing reached it)."""
    host = SlowRemoval(agents, room=2)
    b = make_fn("b", idle_timeout_s=300)
    x, mine = await host.fill(b)
    mine.lapse_connection()
    call = make_call(b)
    waiting = asyncio.create_task(host.agent.submit(call, b))
    await host.evicting(x)
    assert await host.agent.cancel(call.id)
    async with asyncio.timeout(BOUND_S):
        outcome = await waiting
    assert (outcome.status, outcome.failure) == (CallStatus.CANCELLED, FailureKind.CANCELLED)
    assert not outcome.started and len(mine.requests) == 1
    await host.gone(x, live=1)
    again = await host.agent.submit(make_call(b), b)
    assert again.status is CallStatus.SUCCESS, again.error
    assert again.container_id == mine.id and len(mine.requests) == 2
    await host.gone(x, live=1)


async def test_a_call_past_its_timeout_while_its_connection_waits_for_an_eviction(
    agents: AgentFactory,
) -> None:
    """It waits for the evicted container no longer than its own timeout, then goes
    back to the queue as the host's shortage, unstarted; its container stays."""
    host = SlowRemoval(agents, room=2)
    b = make_fn("b", idle_timeout_s=300, timeout_s=1)
    x, mine = await host.fill(b)
    mine.lapse_connection()
    waiting = asyncio.create_task(host.agent.submit(make_call(b), b))
    await host.evicting(x)
    async with asyncio.timeout(BOUND_S):
        outcome = await waiting
    assert (outcome.started, outcome.failure) == (False, FailureKind.BUSY)
    assert outcome.error is not None and "no room for a connection" in outcome.error
    assert len(mine.requests) == 1
    await host.gone(x, live=1)
    again = await host.agent.submit(make_call(b), b)
    assert again.status is CallStatus.SUCCESS, again.error
    assert again.container_id == mine.id


async def test_a_call_at_shutdown_while_its_connection_waits_for_an_eviction(
    agents: AgentFactory,
) -> None:
    """It has its container, so it may run within the grace period; at its end it
    goes back unstarted, no attempt counted."""
    host = SlowRemoval(agents, room=2)
    b = make_fn("b", idle_timeout_s=300)
    x, mine = await host.fill(b)
    mine.lapse_connection()
    waiting = asyncio.create_task(host.agent.submit(make_call(b), b))
    await host.evicting(x)
    closing = asyncio.create_task(host.agent.close(grace_s=0.2))
    async with asyncio.timeout(BOUND_S):
        outcome = await waiting
    assert (outcome.started, outcome.failure) == (False, FailureKind.BUSY)
    assert len(mine.requests) == 1
    host.gate.set()
    async with asyncio.timeout(BOUND_S):
        await closing
    assert host.agent.tasks_alive == 0
    assert host.driver.live == [] and host.agent.statistics().resources.tokens == 0

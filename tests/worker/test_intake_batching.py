"""The intake under a backlog: reserves take several messages per round trip.

In-process worker on the embedded SQLite queue and datastore, with the fake
container driver (what is under test is how the intake reserves).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import load_settings
from datastore.base import CallRecord, Datastore, open_datastore
from mq.base import Message, MessageQueue, open_queue
from worker.agent.agent import Agent
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver, gated, reply
from worker.loop import MAX_EXTRA, Worker
from worker.metrics import Metrics
from worker.shutdown import Shutdown

FN = Function(app="a", name="f", image="img/f", memory_mb=64)


class CountingReserves:
    """The real queue; the size of every batch a reserve returns is kept."""

    def __init__(self, inner: MessageQueue) -> None:
        self.inner = inner
        self.batches: list[int] = []

    async def reserve_many(
        self,
        max_count: int,
        timeout_s: float,
        *,
        ack: Sequence[Message] = (),
        on_acked: Callable[[], None] | None = None,
    ) -> list[Message]:
        msgs = await self.inner.reserve_many(max_count, timeout_s, ack=ack, on_acked=on_acked)
        if msgs:
            self.batches.append(len(msgs))
        return msgs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CountingReads:
    """The real datastore; every read of call records is kept (how many ids it read)."""

    def __init__(self, inner: Datastore) -> None:
        self.inner = inner
        self.reads: list[int] = []

    async def get_call(self, call_id: str) -> CallRecord | None:
        self.reads.append(1)
        return await self.inner.get_call(call_id)

    async def get_calls(self, call_ids: Sequence[str]) -> dict[str, CallRecord]:
        self.reads.append(len(call_ids))
        return await self.inner.get_calls(call_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_backlog_is_reserved_several_at_a_time(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path))
    inner_store = await open_datastore(settings)
    await inner_store.create_fn(FN)
    store = CountingReads(inner_store)
    inner = open_queue(settings.mq_url, settings)
    calls = [Call(new_call_id(), FN.app, FN.name, b"x") for _ in range(60)]
    await inner.push_many(calls)
    queue = CountingReserves(inner)
    try:
        async with Agent(settings, FakeDriver(FakeBehaviour(handler=reply()))) as agent:
            await _run_until_done(Worker(settings, queue, store, agent, prefetch=2), len(calls))  # type: ignore[arg-type]
        assert sum(queue.batches) == len(calls)
        # Without waiting for places, nearly every reserve takes the one place a
        # dispatch has just freed; with it, most take both.
        assert len(queue.batches) <= 0.75 * len(calls), queue.batches
        assert store.reads == queue.batches  # the records of a reserve's calls: one read
        stats = await inner.stats()
        assert (stats.ready, stats.reserved) == (0, 0)
    finally:
        await inner.close()
        await inner_store.close()


OTHER = Function(app="a", name="g", image="img/g", memory_mb=64)


@pytest.mark.parametrize(
    ("fns", "each"), [([FN], 4), ([FN, OTHER], 3)], ids=["one function", "two functions"]
)
async def test_a_burst_is_reserved_beyond_the_places(
    tmp_path: Path, fns: list[Function], each: int
) -> None:
    # Warm containers of short functions, calls round-robin over them: a reserve also
    # takes a call for each container that is free, beyond the two places; those
    # calls wait for them.
    settings = load_settings(data_dir=str(tmp_path))
    store = await open_datastore(settings)
    for fn in fns:
        await store.create_fn(fn)
    inner = open_queue(settings.mq_url, settings)
    queue = CountingReserves(inner)
    driver = FakeDriver(FakeBehaviour(handler=reply()))
    try:
        async with Agent(settings, driver) as agent:
            await _warm(agent, driver, fns, each)
            calls = [_call(fns[i % len(fns)]) for i in range(200)]
            await inner.push_many(calls)
            await _run_until_done(Worker(settings, queue, store, agent, prefetch=2), len(calls))  # type: ignore[arg-type]
        assert sum(queue.batches) == len(calls)
        assert max(queue.batches) > 2, queue.batches
        assert driver.creates == len(fns) * each  # the extra calls used the warm containers
        records = await store.get_calls([c.id for c in calls])
        assert len(records) == len(calls)
        assert {r.status for r in records.values()} == {CallStatus.SUCCESS}
        stats = await inner.stats()
        assert (stats.ready, stats.reserved) == (0, 0)
    finally:
        await inner.close()
        await store.close()


async def _warm(agent: Agent, driver: FakeDriver, fns: list[Function], each: int) -> None:
    """Start ``each`` containers of every function in ``fns``: as many calls at once,
    held until all of them are in their containers."""
    gate = asyncio.Event()
    driver.default.handler = gated(gate)
    warm = [asyncio.create_task(agent.submit(_call(fn), fn)) for fn in fns for _ in range(each)]
    await driver.wait_until(lambda: driver.dispatches == len(warm))
    gate.set()
    await asyncio.gather(*warm)
    driver.default.handler = reply()


def _call(fn: Function = FN) -> Call:
    return Call(new_call_id(), fn.app, fn.name, b"x")


async def _run_until_done(worker: Worker, n: int) -> None:
    """Run ``worker`` until it has completed ``n`` calls, then stop it."""
    shutdown = Shutdown(5.0)
    run = asyncio.create_task(worker.run(shutdown))
    async with asyncio.timeout(30):
        while worker.completed < n:
            await asyncio.sleep(0.01)
    shutdown.request("test over")
    await asyncio.wait_for(run, 30)


async def test_a_reserved_call_reaches_its_container_before_the_next_reserve(
    tmp_path: Path,
) -> None:
    """The next reserve's round trip is not on a new call's way to its container."""
    settings = load_settings(data_dir=str(tmp_path))
    store = await open_datastore(settings)
    await store.create_fn(FN)
    inner = open_queue(settings.mq_url, settings)
    driver = FakeDriver(FakeBehaviour(handler=reply()))
    events: list[tuple[str, int]] = []  # (what, calls dispatched by then)

    class Logged(CountingReserves):
        async def reserve_many(self, max_count: int, timeout_s: float, **kw: Any) -> list[Message]:
            events.append(("reserve", driver.dispatches))
            msgs = await super().reserve_many(max_count, timeout_s, **kw)
            events.extend((f"got {m.call.id}", driver.dispatches) for m in msgs)
            return msgs

    queue = Logged(inner)
    try:
        async with Agent(settings, driver) as agent:
            worker = Worker(settings, queue, store, agent, prefetch=2)  # type: ignore[arg-type]
            shutdown = Shutdown(5.0)
            run = asyncio.create_task(worker.run(shutdown))
            for i in range(4):  # the first warms up: the function known, its container idle
                call = Call(new_call_id(), FN.app, FN.name, b"x")
                await inner.push(call)
                async with asyncio.timeout(10):
                    while worker.completed <= i:
                        await asyncio.sleep(0.005)
                got = [e[0] for e in events].index(f"got {call.id}")
                (_, before), (after_what, after) = events[got], events[got + 1]
                if i > 0:
                    assert (after_what, after) == ("reserve", before + 1), events[got:]
            shutdown.request("test over")
            await asyncio.wait_for(run, 30)
    finally:
        await inner.close()
        await store.close()


class GatedOutcomes:
    """The real datastore; outcomes wait at ``gate`` before they are stored."""

    def __init__(self, inner: Datastore, gate: asyncio.Event) -> None:
        self.inner = inner
        self.gate = gate
        self.waiting = 0

    async def record_outcome(self, *args: Any, **kwargs: Any) -> bool:
        self.waiting += 1
        await self.gate.wait()
        return await self.inner.record_outcome(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_calls_waiting_to_be_recorded_hold_the_intake_back(tmp_path: Path) -> None:
    # A datastore that stores nothing for a while: once `max_recording` calls that
    # have run wait for it, the worker takes no more (they stay in the queue).
    settings = load_settings(data_dir=str(tmp_path))
    inner_store = await open_datastore(settings)
    await inner_store.create_fn(FN)
    gate = asyncio.Event()
    store = GatedOutcomes(inner_store, gate)
    queue = open_queue(settings.mq_url, settings)
    calls = [_call() for _ in range(60)]
    await queue.push_many(calls)
    driver = FakeDriver(FakeBehaviour(handler=reply()))
    # at most one reserve's worth beyond the bound: the prefetch places and extra calls
    most = 5 + 2 + MAX_EXTRA
    try:
        async with Agent(settings, driver) as agent:
            metrics = Metrics()
            worker = Worker(
                settings,
                queue,
                store,  # type: ignore[arg-type]
                agent,
                prefetch=2,
                max_recording=5,
                metrics=metrics,
            )
            shutdown = Shutdown(5.0)
            run = asyncio.create_task(worker.run(shutdown))
            async with asyncio.timeout(10):
                while store.waiting < 5:
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.3)  # time enough to take the rest, if it would
            assert 5 <= store.waiting <= most
            assert driver.dispatches <= most
            stats = await queue.stats()
            assert stats.ready >= len(calls) - most
            scraped = generate_latest(metrics.registry).decode()
            assert f"fnq_calls_recording {float(store.waiting)}" in scraped, scraped
            gate.set()
            async with asyncio.timeout(30):
                while worker.completed < len(calls):
                    await asyncio.sleep(0.01)
            shutdown.request("test over")
            await asyncio.wait_for(run, 30)
        assert driver.dispatches == len(calls)
        stats = await queue.stats()
        assert (stats.ready, stats.reserved) == (0, 0)
    finally:
        await queue.close()
        await inner_store.close()

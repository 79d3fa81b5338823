"""Calls the worker stops before they end (a second stop request, or the grace period
over), or before they reach a container (the first stop request), go back to the
queue, and their records say so: `queued`, before the message is released, and
never over a record that has moved on. ``attempts`` counts the times the function
ran: a call stopped while it ran keeps that attempt, one that never reached its
function counts none. (A call that waits for a container is not marked `running`:
its record stays `queued`.)

In-process worker on the embedded SQLite queue and datastore, with the fake
container driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import Settings, load_settings
from datastore.base import CallRecord, Datastore, open_datastore
from mq.base import Message, MessageQueue, open_queue
from worker import calls as worker_calls
from worker.agent.agent import Agent
from worker.agent.cpu import NeverSaturated
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver, gated, hang, reply
from worker.agent.resources import ResourceTracker
from worker.agent.totals import MIB, ResourceTotals
from worker.loop import Worker
from worker.metrics import Metrics
from worker.shutdown import Shutdown

RUNS = Function(app="a", name="runs", image="img/runs", memory_mb=64)  # in its container
WAITS = Function(app="a", name="waits", image="img/waits", memory_mb=64)  # for a container
OTHER = Function(app="a", name="other", image="img/other", memory_mb=64)


class SeenAtRelease:
    """The real queue; what the record said when each message was released."""

    def __init__(self, inner: MessageQueue, store: Datastore) -> None:
        self.inner = inner
        self.store = store
        self.records: dict[str, CallRecord | None] = {}

    async def release(self, msg: Message, delay_s: float) -> None:
        self.records[msg.call.id] = await self.store.get_call(msg.call.id)
        await self.inner.release(msg, delay_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def stop_while_running(
    settings: Settings,
    store: Datastore,
    queue: MessageQueue,
    calls: list[Call],
    stop: Callable[[Shutdown], Awaitable[None]],
    metrics: Metrics | None = None,
    marked: Sequence[Call] | None = None,
) -> None:
    """Run ``calls`` (which never end) until the worker holds each and those of
    ``marked`` (default: all) are `running`, then ``stop``."""
    gate = asyncio.Event()  # never set: the containers of WAITS never start
    driver = FakeDriver(
        FakeBehaviour(handler=hang()), per_image={WAITS.image: FakeBehaviour(start_gate=gate)}
    )
    async with Agent(settings, driver) as agent:
        shutdown = Shutdown(30.0)
        worker = Worker(settings, [queue], store, agent, metrics=metrics)
        run = asyncio.create_task(worker.run(shutdown))
        try:
            async with asyncio.timeout(10):
                while any(c.id not in worker.running for c in calls) or False in [
                    await running(store, c) for c in (calls if marked is None else marked)
                ]:
                    await asyncio.sleep(0.02)
            await stop(shutdown)
        except BaseException:
            shutdown.abort()  # a failed test leaves no worker running
            raise
        finally:
            await asyncio.wait_for(run, 10)


async def running(store: Datastore, call: Call) -> bool:
    rec = await store.get_call(call.id)
    return rec is not None and rec.status is CallStatus.RUNNING


async def second_request(shutdown: Shutdown) -> None:
    shutdown.request("first")
    await asyncio.sleep(0.1)
    shutdown.request("second")


async def grace_over(shutdown: Shutdown) -> None:
    shutdown.grace_s = 0.2
    shutdown.request("the only one")


@pytest.fixture
async def setup(tmp_path: Path) -> Any:
    settings = load_settings(data_dir=str(tmp_path), mq_reservation_msecs=60_000)
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    for fn in (RUNS, WAITS, OTHER):
        await store.create_fn(fn)
    yield settings, store, queue
    await queue.close()
    await store.close()


async def enqueue(store: Datastore, queue: MessageQueue, calls: list[Call]) -> None:
    for call in calls:
        await store.record_queued(call)  # as `fnq call` does
    await queue.push_many(calls)


@pytest.mark.parametrize("stop", [second_request, grace_over])
async def test_a_stopped_call_is_recorded_queued_before_its_message_goes_back(
    setup: Any, stop: Callable[[Shutdown], Awaitable[None]]
) -> None:
    settings, store, queue = setup
    calls = [Call(new_call_id(), "a", "runs", b"x"), Call(new_call_id(), "a", "waits", b"y")]
    await enqueue(store, queue, calls)
    seen = SeenAtRelease(queue, store)
    metrics = Metrics()
    await stop_while_running(
        settings,
        store,
        seen,
        calls,
        stop,
        metrics,
        marked=calls[:1],  # type: ignore[arg-type]
    )
    assert (await queue.stats()).ready == 2
    assert metrics.calls.handed_back == {"stop": 2, "fault": 0}
    for call, ran in zip(calls, (1, 0), strict=True):  # the first one ran, the other not
        before = seen.records[call.id]
        assert before is not None and before.status is CallStatus.QUEUED
        rec = await store.get_call(call.id)
        assert rec is not None
        assert (rec.status, rec.attempts, rec.started_at) == (CallStatus.QUEUED, ran, None)
        assert rec.has_request and rec.request_body == call.body
    ran, waited = [await store.get_call(c.id) for c in calls]
    assert ran is not None and ran.error is not None and "went back to the queue" in ran.error
    assert waited is not None and waited.error is None  # never marked: nothing to put back
    # The next worker runs them again: the second run of the one stopped as it ran.
    async with Agent(settings, FakeDriver(FakeBehaviour(handler=reply()))) as agent:
        shutdown = Shutdown(5.0)
        run = asyncio.create_task(Worker(settings, queue, store, agent).run(shutdown))
        async with asyncio.timeout(10):
            while (await queue.stats()).ready:
                await asyncio.sleep(0.02)
        shutdown.request("done")
        await asyncio.wait_for(run, 10)
    for call, runs in zip(calls, (2, 1), strict=True):
        rec = await store.get_call(call.id)
        assert rec is not None and (rec.status, rec.attempts) == (CallStatus.SUCCESS, runs)
        assert rec.error is None


async def test_a_call_stopped_before_its_running_mark_was_due_counts_its_run(
    tmp_path: Path,
) -> None:
    """Its function ran, so the attempt counts, although the record was not `running`
    yet: the hand-back marks it, then puts it back to `queued` with that attempt."""
    settings = load_settings(
        data_dir=str(tmp_path), mq_reservation_msecs=60_000, running_mark_msecs=600_000
    )
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    call = Call(new_call_id(), "a", "runs", b"x")
    try:
        await store.create_fn(RUNS)
        await enqueue(store, queue, [call])
        seen = SeenAtRelease(queue, store)
        driver = FakeDriver(FakeBehaviour(handler=hang()))
        async with Agent(settings, driver) as agent:
            shutdown = Shutdown(30.0)
            worker = Worker(settings, [seen], store, agent)  # type: ignore[list-item]
            run = asyncio.create_task(worker.run(shutdown))
            try:
                await driver.wait_until(lambda: driver.dispatches == 1, timeout_s=10)
                rec = await store.get_call(call.id)
                assert rec is not None and (rec.status, rec.attempts) == (CallStatus.QUEUED, 0)
            finally:
                shutdown.abort()
                await asyncio.wait_for(run, 10)
        before = seen.records[call.id]
        assert before is not None and (before.status, before.attempts) == (CallStatus.QUEUED, 1)
        rec = await store.get_call(call.id)
        assert rec is not None
        assert (rec.status, rec.attempts, rec.started_at) == (CallStatus.QUEUED, 1, None)
        assert rec.error == "the worker stopped before the call finished; it went back to the queue"
        assert (await queue.stats()).ready == 1
    finally:
        await queue.close()
        await store.close()


async def test_a_record_another_worker_has_taken_is_left_alone(setup: Any) -> None:
    settings, store, queue = setup
    call = Call(new_call_id(), "a", "runs", b"x")
    await enqueue(store, queue, [call])

    async def taken_elsewhere_then_stop(shutdown: Shutdown) -> None:
        # As if this worker's reservation had lapsed and another worker had taken it.
        await store.record_running(call, 0, "another-worker")
        shutdown.abort()

    await stop_while_running(settings, store, queue, [call], taken_elsewhere_then_stop)
    rec = await store.get_call(call.id)
    assert rec is not None
    assert (rec.status, rec.worker_id, rec.attempts) == (CallStatus.RUNNING, "another-worker", 2)


class Hanging:
    """The real datastore, except that the named writes never end."""

    def __init__(self, inner: Datastore, *names: str) -> None:
        self.inner = inner
        self.names = names

    def __getattr__(self, name: str) -> Any:
        if name not in self.names:
            return getattr(self.inner, name)

        async def never(*args: Any, **kw: Any) -> Any:
            await asyncio.Event().wait()

        return never


async def test_putting_the_record_back_is_bounded(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, store, queue = setup
    monkeypatch.setattr(worker_calls, "HAND_BACK_RECORD_S", 0.2)
    call = Call(new_call_id(), "a", "runs", b"x")
    await enqueue(store, queue, [call])
    stuck = Hanging(store, "record_retry")
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def abort(shutdown: Shutdown) -> None:
        shutdown.abort()

    await stop_while_running(settings, stuck, queue, [call], abort)
    assert loop.time() - started < 5
    # The write that did not end is conditional, so the message went back anyway.
    assert (await queue.stats()).ready == 1


async def test_a_message_whose_running_mark_is_still_being_written_is_kept(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, store, queue = setup
    settings = load_settings(data_dir=str(settings.data_dir), running_mark_msecs=0)
    monkeypatch.setattr(worker_calls, "HAND_BACK_RECORD_S", 0.2)
    call = Call(new_call_id(), "a", "runs", b"x")
    await enqueue(store, queue, [call])
    stuck = Hanging(store, "record_running")
    gate = asyncio.Event()

    async def dispatched(container: Any, request: Any) -> Any:
        gate.set()
        await asyncio.Event().wait()

    async with Agent(settings, FakeDriver(FakeBehaviour(handler=dispatched))) as agent:
        shutdown = Shutdown(30.0)
        run = asyncio.create_task(Worker(settings, queue, stuck, agent).run(shutdown))
        await asyncio.wait_for(gate.wait(), 10)
        shutdown.abort()
        await asyncio.wait_for(run, 5)
    # That write may still land: releasing now could let it move back another
    # worker's record, so the message returns when its reservation lapses instead.
    assert (await queue.stats()).reserved == 1


# What the second call waits for, with the first one running in its container:
# that container (no room for another of its function), room for a container of
# its own function, or a container of its own function that is being started.
WAITING_FOR = {
    "a busy container": (RUNS, 100),
    "room": (OTHER, 100),
    "a container starting": (WAITS, 1000),
}


@pytest.mark.parametrize("waiting_for", list(WAITING_FOR))
async def test_the_first_stop_request_hands_back_a_call_waiting_for_a_container_at_once(
    setup: Any, waiting_for: str
) -> None:
    settings, store, queue = setup
    fn, memory_mb = WAITING_FOR[waiting_for]
    runs, waits = Call(new_call_id(), "a", "runs", b"x"), Call(new_call_id(), "a", fn.name, b"y")
    gate, never = asyncio.Event(), asyncio.Event()
    driver = FakeDriver(
        FakeBehaviour(handler=gated(gate)), per_image={WAITS.image: FakeBehaviour(start_gate=never)}
    )
    room = ResourceTracker(ResourceTotals(memory_bytes=memory_mb * MIB, cpu_mcpus=4000))
    seen = SeenAtRelease(queue, store)
    async with Agent(settings, driver, room, NeverSaturated()) as agent:
        shutdown = Shutdown(30.0)
        worker = Worker(settings, [seen], store, agent)  # type: ignore[list-item]
        run = asyncio.create_task(worker.run(shutdown))
        try:
            await enqueue(store, queue, [runs])
            await driver.wait_until(lambda: driver.dispatches == 1, timeout_s=10)
            await enqueue(store, queue, [waits])
            async with asyncio.timeout(10):  # until it waits
                while agent.statistics().calls_waiting != 1:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # well past the running mark's 50 ms: still `queued`
            assert (rec := await store.get_call(waits.id)) and rec.status is CallStatus.QUEUED
            shutdown.request("first")
            async with asyncio.timeout(10):  # well within the 30 s of grace
                while (await queue.stats()).ready == 0:
                    await asyncio.sleep(0.02)
            # Handed back at once, not after a delay, while the other call runs on.
            assert not run.done() and await running(store, runs)
        except BaseException:
            shutdown.abort()  # a failed test leaves no worker running
            raise
        finally:
            gate.set()
            await asyncio.wait_for(run, 10)
    stats = await queue.stats()
    assert (stats.ready, stats.reserved, stats.delayed) == (1, 0, 0)
    before = seen.records[waits.id]
    assert before is not None and before.status is CallStatus.QUEUED
    rec = await store.get_call(waits.id)
    assert rec is not None
    assert (rec.status, rec.attempts, rec.started_at, rec.error) == (
        CallStatus.QUEUED, 0, None, None
    )  # fmt: skip
    done = await store.get_call(runs.id)
    assert done is not None and (done.status, done.attempts) == (CallStatus.SUCCESS, 1)
    assert driver.dispatches == 1


class LateOutcomes:
    """The real datastore, whose outcome writes commit only once ``gate`` opens, even
    when their caller has given up (as the datastore's queued writes do)."""

    def __init__(self, inner: Datastore) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.writes: list[asyncio.Future[bool]] = []

    async def record_outcome(self, *args: Any, **kw: Any) -> bool:
        async def late() -> bool:
            self.waiting.set()
            await self.gate.wait()
            return await self.inner.record_outcome(*args, **kw)

        self.writes.append(asyncio.ensure_future(late()))
        return await asyncio.shield(self.writes[-1])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_call_stopped_while_its_final_record_is_written_is_settled_not_handed_back(
    tmp_path: Path,
) -> None:
    settings = load_settings(data_dir=str(tmp_path))
    inner = await open_datastore(settings)
    await inner.create_fn(RUNS)
    store = LateOutcomes(inner)
    queue = open_queue(settings.mq_url, settings)
    call = Call(new_call_id(), RUNS.app, RUNS.name, b"x")
    try:
        await queue.push(call)
        async with Agent(settings, FakeDriver(FakeBehaviour(handler=reply()))) as agent:
            shutdown = Shutdown(30.0)
            worker = Worker(settings, [queue], store, agent)  # type: ignore[arg-type]
            run = asyncio.create_task(worker.run(shutdown))
            await asyncio.wait_for(store.waiting.wait(), 10)  # it ran; its record waits
            shutdown.request("test")
            shutdown.request("test")  # its handling is cancelled
            await asyncio.sleep(0.1)
            store.gate.set()  # the final record lands after all
            await asyncio.wait_for(run, 10)
            assert await asyncio.gather(*store.writes) == [True]
        record = await inner.get_call(call.id)
        assert record is not None and record.status is CallStatus.SUCCESS
        # The message is settled by it, not handed back to run a second time.
        stats = await queue.stats()
        assert (stats.ready, stats.reserved, stats.delayed) == (0, 0, 0)
    finally:
        await queue.close()
        await inner.close()

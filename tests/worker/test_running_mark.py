"""The `running` mark: written only for calls that last (worker.running).

In-process worker on the embedded SQLite queue and datastore, with the fake
container driver: what is under test is the worker's writes, not containers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import load_settings
from datastore.base import Datastore, open_datastore
from mq.base import open_queue
from worker.agent.agent import Agent
from worker.agent.driver import ExitInfo
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver, gated, reply
from worker.loop import Worker
from worker.shutdown import Shutdown

FN = Function(app="a", name="f", image="img/f", memory_mb=64)


class Counted:
    """Counts the `running` writes of a datastore."""

    def __init__(self, store: Datastore) -> None:
        self.running = 0
        original = store.record_running

        async def record_running(*args: Any) -> Any:
            self.running += 1
            return await original(*args)

        store.record_running = record_running  # type: ignore[method-assign]


async def run_worker(
    tmp_path: Path,
    behaviour: FakeBehaviour,
    calls: list[Call],
    mark_ms: int,
    during: Any = None,
    fn: Function = FN,
) -> tuple[Datastore, Counted]:
    settings = load_settings(data_dir=str(tmp_path), running_mark_msecs=mark_ms)
    store = await open_datastore(settings)
    counted = Counted(store)
    await store.create_fn(fn)
    queue = open_queue(settings.mq_url, settings)
    for call in calls:
        await queue.push(call)
    async with Agent(settings, FakeDriver(behaviour)) as agent:
        worker = Worker(settings, queue, store, agent)
        shutdown = Shutdown(5.0)
        run = asyncio.create_task(worker.run(shutdown))
        if during is not None:
            await during(store)
        await asyncio.wait_for(all_final(store, calls), 30)
        shutdown.request("test over")
        await asyncio.wait_for(run, 30)
    await queue.close()
    return store, counted


async def all_final(store: Datastore, calls: list[Call]) -> None:
    for call in calls:
        while (rec := await store.get_call(call.id)) is None or not rec.status.is_final:
            await asyncio.sleep(0.01)


async def test_short_calls_go_from_queued_to_final_in_one_write(tmp_path: Path) -> None:
    calls = [Call(new_call_id(), FN.app, FN.name, f"{i}".encode()) for i in range(5)]
    store, counted = await run_worker(tmp_path, FakeBehaviour(handler=reply()), calls, 50)
    try:
        for call in calls:
            rec = await store.get_call(call.id)
            assert rec is not None and rec.status is CallStatus.SUCCESS
            assert rec.attempts == 1 and rec.started_at is not None
            assert rec.has_request and rec.request_body == call.body  # `fnq calls retry` works
        assert counted.running == 0
    finally:
        await store.close()


async def test_a_call_that_lasts_is_marked_running_while_it_runs(tmp_path: Path) -> None:
    gate = asyncio.Event()
    call = Call(new_call_id(), FN.app, FN.name, b"slow")
    seen: list[CallStatus] = []

    async def watch(store: Datastore) -> None:
        for _ in range(200):
            rec = await store.get_call(call.id)
            if rec is not None and rec.status is CallStatus.RUNNING:
                seen.append(rec.status)
                break
            await asyncio.sleep(0.01)
        gate.set()

    behaviour = FakeBehaviour(handler=gated(gate))
    store, counted = await run_worker(tmp_path, behaviour, [call], 50, during=watch)
    try:
        rec = await store.get_call(call.id)
        assert seen == [CallStatus.RUNNING]
        assert rec is not None and rec.status is CallStatus.SUCCESS and rec.attempts == 1
        assert counted.running == 1
    finally:
        await store.close()


async def test_mark_zero_writes_running_for_every_call(tmp_path: Path) -> None:
    calls = [Call(new_call_id(), FN.app, FN.name, b"x") for _ in range(3)]
    store, counted = await run_worker(tmp_path, FakeBehaviour(handler=reply()), calls, 0)
    try:
        assert counted.running == 3
        for call in calls:
            rec = await store.get_call(call.id)
            assert rec is not None and rec.status is CallStatus.SUCCESS and rec.attempts == 1
    finally:
        await store.close()


async def test_attempts_are_counted_across_retries_without_marks(tmp_path: Path) -> None:
    fn = Function(app="a", name="f", image="img/f", memory_mb=64, retry_backoff_s=0.05)
    call = Call(new_call_id(), fn.app, fn.name, b"x")
    behaviour = FakeBehaviour(handler=reply(502, b"no"))
    store, counted = await run_worker(tmp_path, behaviour, [call], 50, fn=fn)
    try:
        rec = await store.get_call(call.id)
        assert rec is not None and rec.status is CallStatus.ERROR
        assert rec.attempts == fn.max_attempts == 3
        assert counted.running == 0
    finally:
        await store.close()


async def test_a_call_whose_container_died_unseen_is_not_marked_while_it_waits(
    tmp_path: Path,
) -> None:
    """The call's container died and the engine has not said so yet: its socket takes no
    connection. The call has not reached a function, so it is not marked `running`
    (even with a mark at once) while it waits for another container; it is once that
    container takes it."""
    settings = load_settings(data_dir=str(tmp_path), running_mark_msecs=0)
    store = await open_datastore(settings)
    counted = Counted(store)
    await store.create_fn(FN)
    queue = open_queue(settings.mq_url, settings)
    first, second = (Call(new_call_id(), FN.app, FN.name, body) for body in (b"1", b"2"))
    driver = FakeDriver()
    try:
        async with Agent(settings, driver) as agent:
            shutdown = Shutdown(5.0)
            run = asyncio.create_task(Worker(settings, queue, store, agent).run(shutdown))
            try:
                await queue.push(first)
                await asyncio.wait_for(all_final(store, [first]), 10)
                gate = asyncio.Event()
                driver.default = FakeBehaviour(start_gate=gate)  # the next container waits
                driver.containers[0].die_unseen(ExitInfo(exit_code=1))
                await queue.push(second)
                await driver.wait_until(lambda: driver.starts == 2, timeout_s=10)
                assert counted.running == 1  # the first call's mark only
                assert await store.get_call(second.id) is None  # pushed without a record
                gate.set()
                await asyncio.wait_for(all_final(store, [second]), 10)
            finally:
                shutdown.request("test over")
                await asyncio.wait_for(run, 30)
        rec = await store.get_call(second.id)
        assert rec is not None and rec.status is CallStatus.SUCCESS and rec.attempts == 1
        assert counted.running == 2
    finally:
        await queue.close()
        await store.close()

"""A call cancelled before it reached a container shows no run time and no attempt.

In-process worker and its upkeep (which stops calls with a cancel requested) on
the embedded SQLite queue and datastore, with the fake container driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import load_settings
from datastore.base import CallRecord, Datastore, open_datastore
from mq.base import open_queue
from worker.agent.agent import Agent
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver
from worker.cli.store import _duration
from worker.loop import Worker
from worker.metrics import Metrics
from worker.shutdown import Shutdown
from worker.upkeep import Upkeep

WAITS = Function(app="a", name="waits", image="img/waits", memory_mb=64)


async def until(store: Datastore, call_id: str, done: Callable[[CallRecord], bool]) -> CallRecord:
    while (rec := await store.get_call(call_id)) is None or not done(rec):
        await asyncio.sleep(0.02)
    return rec


async def test_a_call_cancelled_while_it_waits_for_a_container(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path))
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    call = Call(new_call_id(), WAITS.app, WAITS.name, b"x")
    gate = asyncio.Event()  # never set: its container never starts
    try:
        await store.create_fn(WAITS)
        await store.record_queued(call)
        await queue.push(call)
        async with Agent(settings, FakeDriver(FakeBehaviour(start_gate=gate))) as agent:
            worker = Worker(settings, queue, store, agent)
            upkeep = Upkeep(worker.worker_id, store, agent, Metrics(), worker.running.keys)
            shutdown = Shutdown(5.0)
            run = asyncio.create_task(worker.run(shutdown))
            side = asyncio.create_task(upkeep.run())
            try:
                async with asyncio.timeout(10):
                    while call.id not in worker.running:  # held, waiting for a container
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.2)  # well past the running mark's 50 ms
                    waiting = await store.get_call(call.id)
                    assert waiting is not None and waiting.status is CallStatus.QUEUED
                    asked = await store.request_cancel(call.id)  # `fnq calls cancel`
                    assert asked is not None and asked.status is CallStatus.CANCELLED
                    while call.id in worker.running:  # the upkeep stops it in the agent
                        await asyncio.sleep(0.02)
                    while (st := await queue.stats()).ready + st.reserved + st.delayed:
                        await asyncio.sleep(0.02)  # acked, not run
                    rec = await until(store, call.id, lambda r: r.status.is_final)
            finally:
                side.cancel()
                shutdown.request("test over")
                await asyncio.wait_for(run, 10)
        assert rec.status is CallStatus.CANCELLED
        assert (rec.started_at, rec.attempts, _duration(rec)) == (None, 0, "")
        assert rec.completed_at is not None
    finally:
        await queue.close()
        await store.close()

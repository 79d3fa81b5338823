"""The worker's upkeep: the queue depth it exports as ``fnq_queue_messages``."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from prometheus_client import generate_latest

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import load_settings
from datastore.base import open_datastore
from mq.base import open_queue
from worker.agent.agent import Agent
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver
from worker.metrics import Metrics
from worker.upkeep import Upkeep


async def test_the_queue_depth_is_exported_by_state(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path))
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    metrics = Metrics()
    try:
        await queue.push(Call(new_call_id(), "a", "f", b"x"))
        await queue.push(Call(new_call_id(), "a", "f", b"y"))
        await queue.push(Call(new_call_id(), "a", "f", b"z"), delay_s=60)
        async with Agent(settings, FakeDriver(FakeBehaviour())) as agent:
            upkeep = Upkeep("w-1", store, agent, metrics, lambda: (), queues=[queue])
            side = asyncio.create_task(upkeep.run())
            try:
                async with asyncio.timeout(10):
                    while 'fnq_queue_messages{state="ready"} 2.0' not in (
                        text := generate_latest(metrics.registry).decode()
                    ):
                        await asyncio.sleep(0.02)  # the first beat comes at once
            finally:
                side.cancel()
        for line in (
            'fnq_queue_messages{state="delayed"} 1.0',
            'fnq_queue_messages{state="reserved"} 0.0',
            'fnq_queue_messages{state="dead"} 0.0',
        ):
            assert line in text, (line, text)
    finally:
        await queue.close()
        await store.close()


async def test_without_queues_no_depth_is_exported(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path))
    store = await open_datastore(settings)
    metrics = Metrics()
    try:
        async with Agent(settings, FakeDriver(FakeBehaviour())) as agent:
            upkeep = Upkeep("w-1", store, agent, metrics, lambda: ())
            side = asyncio.create_task(upkeep.run())
            try:
                async with asyncio.timeout(10):
                    while not await store.list_workers(timedelta(seconds=60)):
                        await asyncio.sleep(0.02)  # the first beat is done
            finally:
                side.cancel()
        assert "fnq_queue_messages{" not in generate_latest(metrics.registry).decode()
    finally:
        await store.close()


async def test_containers_of_a_changed_or_deleted_function_leave_without_a_call(
    tmp_path: Path,
) -> None:
    """Another worker (or none) takes the calls after the change: this one's containers
    of the old definition, and then of the deleted function, leave all the same."""
    settings = load_settings(data_dir=str(tmp_path), cpu_split="off")
    store = await open_datastore(settings)
    driver = FakeDriver(FakeBehaviour())
    try:
        fn = await store.create_fn(Function(app="a", name="f", image="img", memory_mb=64))
        other = await store.create_fn(Function(app="a", name="g", image="img", memory_mb=64))
        async with Agent(settings, driver) as agent:
            for f in (fn, other):
                assert (await agent.submit(Call(new_call_id(), "a", f.name), f)).status is (
                    CallStatus.SUCCESS
                )
            await store.update_fn("a", "f", memory_mb=96)
            upkeep = Upkeep("w-1", store, agent, Metrics(), lambda: ())
            side = asyncio.create_task(upkeep.run())
            try:
                await driver.wait_until(lambda: driver.removes == 1)  # the first beat
                assert [c.spec.fn for c in driver.live] == ["g"]
                await store.delete_fn("a", "g")
                await driver.wait_until(lambda: driver.removes == 2, timeout_s=12)
            finally:
                side.cancel()
    finally:
        await store.close()

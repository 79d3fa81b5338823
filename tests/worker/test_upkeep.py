"""The worker's upkeep: the queue depth it exports as ``fnq_queue_messages``."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from prometheus_client import generate_latest

from config.domain import Call, new_call_id
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

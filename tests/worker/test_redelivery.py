"""A call delivered again to the worker that is running it (its reservation lapsed
while the queue could not be reached) runs once: the new delivery is put off, and
settled by the call's final record when it comes back.

In-process worker on the embedded SQLite queue and datastore, with the fake
container driver.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import load_settings
from datastore.base import open_datastore
from mq.base import Message, MessageQueue, open_queue
from mq.errors import QueueUnavailable
from worker import calls as worker_calls
from worker.agent.agent import Agent
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver, gated
from worker.loop import Worker
from worker.shutdown import Shutdown

FN = Function(app="a", name="f", image="img/f", memory_mb=64)


class CannotExtend:
    """The real queue, except that reservations cannot be extended (the queue is
    out of reach for the heartbeat); counts the releases of each call."""

    def __init__(self, inner: MessageQueue) -> None:
        self.inner = inner
        self.released: dict[str, int] = {}

    async def extend(self, msg: Message) -> None:
        raise QueueUnavailable("connection refused")

    async def release(self, msg: Message, delay_s: float = 0.0) -> None:
        self.released[msg.call.id] = self.released.get(msg.call.id, 0) + 1
        await self.inner.release(msg, delay_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_call_delivered_again_while_it_runs_here_runs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_calls, "RETRY_LATER_S", 0.05)
    settings = load_settings(data_dir=str(tmp_path), mq_reservation_msecs=1000)
    store = await open_datastore(settings)
    await store.create_fn(FN)
    queue = CannotExtend(open_queue(settings.mq_url, settings))
    call = Call(new_call_id(), FN.app, FN.name, b"x")
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate)))
    try:
        await queue.push(call)
        async with Agent(settings, driver) as agent:
            shutdown = Shutdown(5.0)
            worker = Worker(settings, [queue], store, agent)  # type: ignore[list-item]
            run = asyncio.create_task(worker.run(shutdown))
            try:
                with caplog.at_level(logging.WARNING, logger="fnq.worker"):
                    async with asyncio.timeout(20):
                        while not queue.released.get(call.id):  # the reservation lapses
                            await asyncio.sleep(0.02)
                        held = await store.get_call(call.id)
                        assert held is not None and held.status is CallStatus.RUNNING
                        gate.set()  # now the call in its container ends
                        while True:
                            stats = await queue.stats()
                            record = await store.get_call(call.id)
                            if (
                                record is not None
                                and record.status.is_final
                                and not (stats.ready + stats.reserved + stats.delayed)
                            ):
                                break
                            await asyncio.sleep(0.02)
            finally:
                shutdown.request("test over")
                await asyncio.wait_for(run, 10)
        assert driver.dispatches == 1  # it ran once
        assert (record.status, record.attempts) == (CallStatus.SUCCESS, 1)
        assert f"call {call.id}: delivered again while it runs here" in caplog.text
        assert (await queue.stats()).dead == 0
    finally:
        await queue.close()
        await store.close()

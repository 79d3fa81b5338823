"""A reserve that fails of a fault of the backend's own (not an outage it reports)
pauses that intake as an outage does: the worker goes on, and what the failed
reserve took comes back when its reservation lapses.

An in-process worker over the fake driver, the embedded SQLite queue and the
SQLite datastore (temporary files).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, CallStatus, Function, frozen_map, new_call_id
from config.settings import load_settings
from datastore.base import open_datastore
from mq.base import Message, MessageQueue, open_queue
from worker.agent.agent import Agent
from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.drivers.fake import FakeBehaviour, FakeContainer, FakeDriver
from worker.loop import Worker
from worker.shutdown import Shutdown

FN = Function(app="a", name="f", image="img/f", memory_mb=64)


class BuggyQueue:
    """The real queue, whose first ``bugs`` reserves take their messages, then raise."""

    def __init__(self, inner: MessageQueue, bugs: int) -> None:
        self.inner = inner
        self.bugs = bugs
        self.taken_by_bugs: list[str] = []

    async def reserve_many(self, max_count: int, timeout_s: float, **kw: Any) -> list[Message]:
        msgs: list[Message] = await self.inner.reserve_many(max_count, timeout_s, **kw)
        if msgs and self.bugs > 0:
            self.bugs -= 1
            self.taken_by_bugs += [m.call.id for m in msgs]
            raise RuntimeError("a message this backend cannot handle")
        return msgs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def _answer(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
    return DispatchResult(200, frozen_map(), f"out:{request.call_id}".encode(), False)


async def test_a_failing_reserve_pauses_the_intake_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(
        data_dir=str(tmp_path), async_chew_poll_msecs=50, mq_reservation_msecs=1000
    )
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    buggy = BuggyQueue(queue, bugs=2)
    calls = [Call(new_call_id(), FN.app, FN.name, b"x") for _ in range(6)]
    try:
        await store.create_fn(FN)
        for call in calls:
            await store.record_queued(call)
        await queue.push_many(calls)
        async with Agent(settings, FakeDriver(FakeBehaviour(handler=_answer))) as agent:
            shutdown = Shutdown(1.0)
            worker = Worker(settings, [buggy], store, agent, worker_id="w1")  # type: ignore[list-item]
            run = asyncio.create_task(worker.run(shutdown))
            try:
                async with asyncio.timeout(20):
                    while True:
                        records = await store.get_calls([c.id for c in calls])
                        if len(records) == len(calls) and all(
                            r.status.is_final for r in records.values()
                        ):
                            break
                        assert not run.done(), "the worker stopped"
                        await asyncio.sleep(0.05)
            finally:
                shutdown.request("test")
                async with asyncio.timeout(10):
                    await run  # raises what the worker raised
        assert buggy.bugs == 0 and buggy.taken_by_bugs  # the faults happened
        for call in calls:
            rec = records[call.id]
            assert rec.status is CallStatus.SUCCESS, (call.id, rec.status, rec.error)
            assert rec.response_body == f"out:{call.id}".encode()
        stats = await queue.stats()
        assert (stats.ready, stats.reserved, stats.delayed) == (0, 0, 0)
        faults = [r for r in caplog.records if "reserving failed" in r.getMessage()]
        assert len(faults) == 2 and all(r.levelno == logging.ERROR and r.exc_info for r in faults)
    finally:
        await queue.close()
        await store.close()

"""A call whose message the queue buries on its own does not stay `running` or
`queued` for ever: the worker whose reserve buried it ends its record as an error
with the queue's reason.

In-process worker with the fake container driver, on the embedded datastore and
the SQLite or Redis queue.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from pathlib import Path

import pytest

from config.domain import Call, CallStatus, FailureKind, Function, new_call_id, utcnow
from config.settings import Settings, load_settings
from datastore.base import CallRecord, Datastore, open_datastore
from datastore.clock import StoreClock
from datastore.errors import StoreUnavailable
from mq.base import Buried, MessageQueue, open_queue
from worker.agent.agent import Agent
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver
from worker.calls import CallHandler
from worker.logs import CallIdFilter, current_call
from worker.loop import Worker
from worker.metrics import Metrics
from worker.shutdown import Shutdown

pytestmark = pytest.mark.integration

FN = Function(app="a", name="f", image="img/f", memory_mb=64)


def queue_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'mq.db'}"
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=t{secrets.token_hex(4)}"


async def run_until_final(
    settings: Settings, queue: MessageQueue, store: Datastore, call_id: str
) -> tuple[CallRecord, FakeDriver]:
    """Run a worker until the call's record is final; its record and the driver."""
    driver = FakeDriver(FakeBehaviour())
    async with Agent(settings, driver) as agent:
        shutdown = Shutdown(5.0)
        run = asyncio.create_task(Worker(settings, [queue], store, agent).run(shutdown))
        try:
            async with asyncio.timeout(20):
                while (record := await store.get_call(call_id)) is None or not record.is_final:
                    await asyncio.sleep(0.05)
        finally:
            shutdown.request("test over")
            await asyncio.wait_for(run, 10)
    return record, driver


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_call_buried_after_its_workers_died_ends_as_an_error(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(
        data_dir=str(tmp_path),
        mq_url=queue_url(backend, tmp_path, request),
        mq_reservation_msecs=1000,
        mq_max_deliveries=1,
    )
    store = await open_datastore(settings)
    await store.create_fn(FN)
    gone, queue = open_queue(settings.mq_url, settings), open_queue(settings.mq_url, settings)
    call = Call(new_call_id(), FN.app, FN.name, b"x")
    try:
        await queue.push(call)
        taken = await gone.reserve(1.0)  # a worker takes it, marks it, and dies
        assert taken is not None and taken.call.id == call.id
        await store.record_running(call, 1, "gone-worker")
        with caplog.at_level(logging.INFO, logger="fnq.worker"):
            record, driver = await run_until_final(settings, queue, store, call.id)
        assert (record.status, record.failure) == (CallStatus.ERROR, FailureKind.TERMINAL)
        assert record.error == "delivered 1 time(s); the reservation lapsed each time"
        assert driver.dispatches == 0
        assert f"call {call.id}: the queue buried its message" in caplog.text
        assert [d.id for d in await queue.dead_list()] == [call.id]
    finally:
        await gone.close()
        await queue.close()
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_queued_call_malformed_for_its_worker_ends_as_an_error(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = queue_url(backend, tmp_path, request)
    lenient = load_settings(data_dir=str(tmp_path), mq_url=url, max_request_size=1000)
    strict = load_settings(data_dir=str(tmp_path), mq_url=url, max_request_size=10)
    store = await open_datastore(strict)
    await store.create_fn(FN)
    producer, queue = open_queue(lenient.mq_url, lenient), open_queue(strict.mq_url, strict)
    call = Call(new_call_id(), FN.app, FN.name, b"x" * 100)
    try:
        await store.record_queued(call)  # as `fnq call` does, before the push
        await producer.push(call)
        record, driver = await run_until_final(strict, queue, store, call.id)
        assert record.status is CallStatus.ERROR
        assert record.error is not None and record.error.startswith("malformed message")
        assert driver.dispatches == 0
    finally:
        await producer.close()
        await queue.close()
        await store.close()


class StoreDown:
    clock = StoreClock()

    async def end_buried(self, call_id: str, reason: str, died_at: object) -> bool:
        raise StoreUnavailable("connection refused")


async def test_burials_the_datastore_cannot_take_are_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = CallHandler(
        load_settings(), StoreDown(), None,  # type: ignore[arg-type]
        metrics=Metrics(), worker_id="w", rng=random.Random(),
    )  # fmt: skip
    buried = [Buried(new_call_id(), "delivered 2 times", utcnow()) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="fnq.worker"):
        await handler.record_buried(buried)  # not raised: best effort
    [warning] = [r.getMessage() for r in caplog.records]
    assert "could not record 3 call(s) buried by the queue" in warning
    assert "connection refused" in warning


class BuriesThenWaits:
    """The real queue, except that its reserve buries ``call_id`` and then waits for
    new messages until the worker stops it."""

    def __init__(self, inner: MessageQueue, call_id: str) -> None:
        self.inner = inner
        self.call_id = call_id
        self.pending: list[Buried] = []
        self.reserving = asyncio.Event()

    async def reserve_many(self, *args: object, **kw: object) -> list[object]:
        if not self.reserving.is_set():
            self.pending.append(Buried(self.call_id, "delivered 1 times", utcnow()))
        self.reserving.set()
        await asyncio.Event().wait()  # cancelled by the stop
        return []

    def take_buried(self) -> list[Buried]:
        taken, self.pending = self.pending, []
        return taken

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_a_burial_of_a_reserve_cut_short_by_the_stop_is_recorded(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path))
    store = await open_datastore(settings)
    await store.create_fn(FN)
    call = Call(new_call_id(), FN.app, FN.name, b"x")
    await store.record_running(call, 1, "gone-worker")
    queue = BuriesThenWaits(open_queue(settings.mq_url, settings), call.id)
    try:
        async with Agent(settings, FakeDriver(FakeBehaviour())) as agent:
            shutdown = Shutdown(5.0)
            worker = Worker(settings, [queue], store, agent)  # type: ignore[list-item]
            run = asyncio.create_task(worker.run(shutdown))
            await asyncio.wait_for(queue.reserving.wait(), 10)
            shutdown.request("test over")
            await asyncio.wait_for(run, 10)
        record = await store.get_call(call.id)
        assert record is not None
        assert (record.status, record.error) == (CallStatus.ERROR, "delivered 1 times")
    finally:
        await queue.inner.close()
        await store.close()


class StoreUp:
    clock = StoreClock()

    async def end_buried(self, call_id: str, reason: str, died_at: object) -> bool:
        return True


async def test_the_line_of_a_buried_call_names_the_call(caplog: pytest.LogCaptureFixture) -> None:
    handler = CallHandler(
        load_settings(), StoreUp(), None,  # type: ignore[arg-type]
        metrics=Metrics(), worker_id="w", rng=random.Random(),
    )  # fmt: skip
    buried = [Buried(new_call_id(), "delivered 2 times", utcnow()) for _ in range(2)]
    caplog.handler.addFilter(CallIdFilter())
    with caplog.at_level(logging.INFO, logger="fnq.worker"):
        await handler.record_buried(buried)
    assert {getattr(r, "call_id", None) for r in caplog.records} == {b.call_id for b in buried}
    assert current_call.get() is None  # the caller's context is left alone

"""A call delivered to this worker while its record says another worker runs it
(that worker's reservation lapsed, say while the queue was out of its reach).

While that worker is alive (a fresh heartbeat) and its attempt may still be under
way, this worker neither runs the call nor touches its record: the new delivery
is put off, and once the call has ended its final record settles it. A worker
that is gone, or an attempt that must have ended, lets the call run again here.

In-process worker B on a real Redis queue, with the fake container driver, on
each datastore; worker A is only its record, its heartbeat and its reservation.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, CallStatus, Function, Outcome, Response, new_call_id, utcnow
from config.settings import Settings, load_settings
from datastore.base import CallRecord, Datastore, open_datastore
from mq.base import Message, MessageQueue, open_queue
from tests.datastore.conftest import fresh_pg_database
from worker import calls as worker_calls
from worker.agent.agent import Agent
from worker.agent.cpu import NeverSaturated
from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.drivers.fake import FakeBehaviour, FakeContainer, FakeDriver, gated, reply
from worker.agent.resources import ResourceTracker
from worker.agent.totals import MIB, ResourceTotals
from worker.loop import Worker
from worker.shutdown import Shutdown

pytestmark = pytest.mark.integration

A, B = "worker-a", "worker-b"
# The call: worker B waits at most its timeout for a container before handing it back.
FN = Function(app="a", name="f", image="img/f", memory_mb=64, timeout_s=2)
# What keeps B's only room busy when B is to have none.
OTHER = Function(app="a", name="other", image="img/other", memory_mb=64, timeout_s=60)


class Watched:
    """The real queue; counts the releases and acks of each call."""

    def __init__(self, inner: MessageQueue) -> None:
        self.inner = inner
        self.released: dict[str, int] = {}
        self.acked: dict[str, int] = {}

    async def release(self, msg: Message, delay_s: float = 0.0) -> None:
        self.released[msg.call.id] = self.released.get(msg.call.id, 0) + 1
        await self.inner.release(msg, delay_s)

    async def reserve_many(self, *args: Any, ack: Any = (), **kw: Any) -> list[Message]:
        for msg in ack:
            self.acked[msg.call.id] = self.acked.get(msg.call.id, 0) + 1
        return await self.inner.reserve_many(*args, ack=ack, **kw)

    async def ack_many(self, msgs: list[Message]) -> None:
        for msg in msgs:
            self.acked[msg.call.id] = self.acked.get(msg.call.id, 0) + 1
        await self.inner.ack_many(msgs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Rig:
    settings: Settings
    store: Datastore
    queue: MessageQueue  # worker A's


@pytest.fixture(params=["sqlite", "postgres"])
async def rig(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    monkeypatch.setattr(worker_calls, "RETRY_LATER_S", 0.2)  # B looks again soon
    redis = request.getfixturevalue("redis_server")
    db_url = f"sqlite:///{tmp_path / 'fnq.db'}"
    if request.param == "postgres":
        db_url = await fresh_pg_database(request.getfixturevalue("postgres_server"))
    settings = load_settings(
        data_dir=str(tmp_path),
        mq_url=f"{redis.url}?prefix=t{secrets.token_hex(4)}",
        db_url=db_url,
        mq_reservation_msecs=1000,
    )
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    for fn in (FN, OTHER):
        await store.create_fn(fn)
    try:
        yield Rig(settings, store, queue)
    finally:
        await queue.close()
        await store.close()


async def taken_by_a(rig: Rig, *, alive: bool) -> tuple[Call, Message, CallRecord]:
    """Worker A takes the call, marks it `running` and (``alive``) beats; it never
    extends the reservation, which lapses a second later."""
    call = Call(new_call_id(), FN.app, FN.name, b"x")
    await rig.store.record_queued(call)  # as `fnq call` does
    await rig.queue.push(call)
    msg = await rig.queue.reserve(1.0)
    assert msg is not None and msg.call.id == call.id
    marked = await rig.store.record_running(call, 0, A)
    if alive:
        await rig.store.worker_heartbeat(A, {})
    return call, msg, marked


class DriverOfB:
    """B's fake containers: the call's answer at once; OTHER's when ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.ran: list[str] = []
        self.driver = FakeDriver(
            FakeBehaviour(handler=self._count(reply())),
            per_image={OTHER.image: FakeBehaviour(handler=self._count(gated(self.gate)))},
        )

    def _count(self, then: Any) -> Any:
        async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
            self.ran.append(request.call_id)
            result: DispatchResult = await then(container, request)
            return result

        return handle


def state(record: CallRecord) -> tuple[Any, ...]:
    """What a worker writes to a call's record (not run, not moved back, not ended)."""
    return (record.status, record.worker_id, record.attempts, record.error, record.started_at,
            record.updated_at, record.next_try_at)  # fmt: skip


async def settled(queue: MessageQueue) -> bool:
    stats = await queue.stats()
    return not (stats.ready + stats.reserved + stats.delayed)


@pytest.mark.parametrize("room", ["free", "busy"])
async def test_a_call_running_on_a_live_worker_is_put_off_and_its_record_left_alone(
    rig: Rig, room: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``room``: B has a container free for the call, or its only room is busy (so
    that B, were it to take the call, would wait for a container and hand it back)."""
    call, a_msg, marked = await taken_by_a(rig, alive=True)
    b = DriverOfB()
    room_mb = 200 if room == "free" else 100
    tracker = ResourceTracker(ResourceTotals(memory_bytes=room_mb * MIB, cpu_mcpus=4000))
    watched = Watched(open_queue(rig.settings.mq_url, rig.settings))
    other = Call(new_call_id(), OTHER.app, OTHER.name, b"y")
    try:
        async with Agent(rig.settings, b.driver, tracker, NeverSaturated()) as agent:
            shutdown = Shutdown(5.0)
            worker = Worker(rig.settings, [watched], rig.store, agent, worker_id=B)  # type: ignore[list-item]
            run = asyncio.create_task(worker.run(shutdown))
            try:
                if room == "busy":
                    await rig.queue.push(other)
                    await b.driver.wait_until(lambda: b.ran == [other.id], timeout_s=10)
                async with asyncio.timeout(15):  # A's reservation lapses, and B gets the call
                    while not watched.released.get(call.id) and not watched.acked.get(call.id):
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.5)  # B gets it again meanwhile, and puts it off again
                held = await rig.store.get_call(call.id)
                assert held is not None and state(held) == state(marked)  # as A left it
                assert call.id not in b.ran
                assert watched.released[call.id] >= 2
                warned = [r for r in caplog.records if r.levelno == logging.WARNING
                          and "the new delivery goes back" in r.getMessage()]  # fmt: skip
                assert len(warned) == 1  # the first put-off only
                # A ends the call: its outcome, then its ack (its reservation lapsed, but an
                # ack still removes the message).
                done = Outcome(
                    status=CallStatus.SUCCESS,
                    response=Response(status=200, body=b"from A"),
                    started_at=marked.started_at,
                    completed_at=utcnow(),
                )
                assert await rig.store.record_outcome(call, done, 1, A)
                await rig.queue.ack(a_msg)
                b.gate.set()  # and B's other call ends
                async with asyncio.timeout(10):
                    while not await settled(watched):
                        await asyncio.sleep(0.05)
            finally:
                b.gate.set()
                shutdown.request("test over")
                await asyncio.wait_for(run, 10)
        assert call.id not in b.ran  # it ran once, on A
        record = await rig.store.get_call(call.id)
        assert record is not None
        assert (record.status, record.worker_id, record.attempts, record.response_body) == (
            CallStatus.SUCCESS, A, 1, b"from A"
        )  # fmt: skip
        assert (await watched.stats()).dead == 0
    finally:
        await watched.close()


async def run_on_b(rig: Rig, call: Call) -> tuple[CallRecord, list[str]]:
    """Run worker B until ``call`` is final and its message settled."""
    b = DriverOfB()
    watched = Watched(open_queue(rig.settings.mq_url, rig.settings))
    try:
        async with Agent(rig.settings, b.driver) as agent:
            shutdown = Shutdown(5.0)
            worker = Worker(rig.settings, [watched], rig.store, agent, worker_id=B)  # type: ignore[list-item]
            run = asyncio.create_task(worker.run(shutdown))
            try:
                async with asyncio.timeout(20):
                    while not (
                        (record := await rig.store.get_call(call.id)) is not None
                        and record.is_final
                        and await settled(watched)
                    ):
                        await asyncio.sleep(0.05)
            finally:
                shutdown.request("test over")
                await asyncio.wait_for(run, 10)
    finally:
        await watched.close()
    return record, b.ran


async def test_a_call_running_on_a_worker_that_is_gone_runs_again(rig: Rig) -> None:
    call, _, _ = await taken_by_a(rig, alive=False)  # A died: no heartbeat
    record, ran = await run_on_b(rig, call)
    assert ran == [call.id]
    assert (record.status, record.worker_id, record.attempts) == (CallStatus.SUCCESS, B, 2)


async def test_a_call_running_on_a_live_worker_past_its_timeout_runs_again(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A is alive, but its attempt must have ended by now (the function's timeout):
    a record left `running` then (A handed the call back and could not put its record
    back, say) is not A's to end any more."""
    monkeypatch.setattr("worker.elsewhere.RUNNING_SLACK_S", 0.0)
    call, _, marked = await taken_by_a(rig, alive=True)
    record, ran = await run_on_b(rig, call)
    assert ran == [call.id]
    assert (record.status, record.worker_id, record.attempts) == (CallStatus.SUCCESS, B, 2)
    assert record.started_at is not None and marked.started_at is not None
    assert record.started_at - marked.started_at >= timedelta(seconds=FN.timeout_s)

"""When the datastore fails a call's handling, the call is not lost and the worker
goes on; calls of any valid id keep their logs in a file log store; a queue that
is down holds back its own intake only.

In-process worker on the embedded SQLite queue and datastore, with the fake
container driver (what is under test is what the worker does with the call).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, CallStatus, Function, Outcome, new_call_id
from config.settings import Settings, load_settings
from datastore.base import CallRecord, Datastore, open_datastore
from datastore.errors import StoreError, StoreUnavailable
from mq.base import Message, MessageQueue, open_queue
from mq.errors import QueueUnavailable
from worker import calls as worker_calls
from worker.agent.agent import Agent
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver, reply
from worker.loop import Worker
from worker.metrics import Metrics
from worker.shutdown import Shutdown

FN = Function(app="a", name="f", image="img/f", memory_mb=64)


class FaultyOutcomes:
    """The real datastore, except that recording the outcome of some calls fails:
    ``refuse`` ids always, ``flaky`` ids the first time only."""

    def __init__(self, inner: Datastore, refuse: set[str], flaky: set[str]) -> None:
        self.inner = inner
        self.refuse = refuse
        self.flaky = set(flaky)

    async def record_outcome(self, call: Call, outcome: Outcome, *args: Any, **kw: Any) -> bool:
        if call.id in self.refuse:
            raise StoreError(f"no room for {call.id}")
        if call.id in self.flaky:
            self.flaky.discard(call.id)
            raise StoreUnavailable("the disk is full")
        return await self.inner.record_outcome(call, outcome, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def _run_until(worker: Worker, done: Any) -> None:
    shutdown = Shutdown(5.0)
    run = asyncio.create_task(worker.run(shutdown))
    try:
        async with asyncio.timeout(30):
            while not await done():
                await asyncio.sleep(0.02)
    finally:
        shutdown.request("test over")
        await asyncio.wait_for(run, 30)


async def _worker_run(
    settings: Settings, store: Any, queue: MessageQueue, done: Any, metrics: Metrics | None = None
) -> None:
    driver = FakeDriver(FakeBehaviour(handler=reply(output=(b"hi\n",))))
    async with Agent(settings, driver) as agent:
        await _run_until(Worker(settings, queue, store, agent, metrics=metrics), done)


async def test_a_refused_record_dead_letters_the_call_and_the_worker_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_calls, "RETRY_LATER_S", 0.05)
    settings = load_settings(data_dir=str(tmp_path))
    inner = await open_datastore(settings)
    await inner.create_fn(FN)
    calls = [Call(new_call_id(), FN.app, FN.name, b"x") for _ in range(6)]
    refused, flaky, flaky2 = calls[1].id, calls[3].id, calls[4].id
    store = FaultyOutcomes(inner, refuse={refused}, flaky={flaky, flaky2})
    queue = open_queue(settings.mq_url, settings)
    try:
        await queue.push_many(calls)

        async def done() -> bool:
            stats = await queue.stats()
            return stats.dead == 1 and stats.ready + stats.reserved + stats.delayed == 0

        with caplog.at_level(logging.WARNING, logger="fnq.worker"):
            await _worker_run(settings, store, queue, done)
        [dead] = await queue.dead_list()
        assert dead.id == refused
        assert dead.reason == f"the datastore refused the call: no room for {refused}"
        assert f"call {refused}: the datastore refused it" in caplog.text
        handed_back = [r.getMessage() for r in caplog.records if "goes back" in r.getMessage()]
        assert len(handed_back) == 1, handed_back  # one warning for the two, not one each
        assert handed_back[0].endswith("the disk is full; it goes back to the queue for 0.05 s "
                                       "(1 call(s) so far)")  # fmt: skip
        records = {c.id: await inner.get_call(c.id) for c in calls}
        ran = {i: r.status for i, r in records.items() if i != refused and r is not None}
        assert ran == {c.id: CallStatus.SUCCESS for c in calls if c.id != refused}
        assert all(records[i].attempts == 1 for i in (flaky, flaky2))  # type: ignore[union-attr]
    finally:
        await queue.close()
        await inner.close()


class RefusesAnswers:
    """The real datastore, except that it refuses any outcome carrying a response."""

    def __init__(self, inner: Datastore) -> None:
        self.inner = inner

    async def record_outcome(self, call: Call, outcome: Outcome, *args: Any, **kw: Any) -> bool:
        if outcome.response is not None:
            raise StoreError(f"cannot store the answer of {call.id}")
        return await self.inner.record_outcome(call, outcome, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_call_whose_record_is_refused_ends_as_an_error_not_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(data_dir=str(tmp_path), running_mark_msecs=0)
    inner = await open_datastore(settings)
    await inner.create_fn(FN)
    call = Call(new_call_id(), FN.app, FN.name, b"x")
    queue = open_queue(settings.mq_url, settings)
    try:
        await queue.push(call)

        async def done() -> bool:
            stats = await queue.stats()
            return stats.dead == 1 and stats.ready + stats.reserved + stats.delayed == 0

        with caplog.at_level(logging.WARNING, logger="fnq.worker"):
            await _worker_run(settings, RefusesAnswers(inner), queue, done)
        reason = f"the datastore refused the call's record: cannot store the answer of {call.id}"
        record = await inner.get_call(call.id)
        assert record is not None
        assert (record.status, record.error, record.attempts) == (CallStatus.ERROR, reason, 1)
        assert record.started_at is not None and record.response_status is None
        assert await inner.get_log(call.id) in (None, b"")
        [dead] = await queue.dead_list()
        assert (dead.id, dead.reason) == (call.id, reason)
        assert f"call {call.id}: the datastore refused its record" in caplog.text
    finally:
        await queue.close()
        await inner.close()


async def test_file_logs_take_every_valid_call_id(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path), log_url=f"file://{tmp_path / 'logs'}")
    store = await open_datastore(settings)
    await store.create_fn(FN)
    ids = ["order-1234", "a.b:c_d", "5f0e9a1c-3b1d-4c55-9f0a-2a6f4b8c9d10", new_call_id()]
    calls = [Call(i, FN.app, FN.name, b"x") for i in ids]
    ghost = Call("ghost-1", FN.app, "nobody", b"x")  # ends early, with a log of nothing
    queue = open_queue(settings.mq_url, settings)
    try:
        await queue.push_many([*calls, ghost])

        async def done() -> bool:
            records = [await store.get_call(c.id) for c in [*calls, ghost]]
            return all(r is not None and r.status.is_final for r in records)

        await _worker_run(settings, store, queue, done)
        for c in calls:
            record = await store.get_call(c.id)
            assert record is not None and record.status is CallStatus.SUCCESS, c.id
            assert await store.get_log(c.id) == b"hi\n", c.id
        record = await store.get_call(ghost.id)
        assert record is not None and record.status is CallStatus.ERROR
        assert record.error == "function a/nobody is not registered"
    finally:
        await queue.close()
        await store.close()


class DownAtFirst:
    """A real queue whose first ``fails`` reserves fail as an outage would."""

    queue_names = ("jobs",)  # named in the log as the RQ bridge is

    def __init__(self, inner: MessageQueue, fails: int) -> None:
        self.inner = inner
        self.fails = fails

    async def reserve_many(self, *args: Any, **kw: Any) -> Any:
        if self.fails > 0:
            self.fails -= 1
            raise QueueUnavailable("connection refused")
        return await self.inner.reserve_many(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_one_queue_down_leaves_the_other_s_intake_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(data_dir=str(tmp_path))
    store = await open_datastore(settings)
    await store.create_fn(FN)
    main = open_queue(settings.mq_url, settings)
    other = open_queue(f"sqlite:///{tmp_path / 'other.db'}", settings)
    flaky = DownAtFirst(other, fails=3)
    calls = [Call(new_call_id(), FN.app, FN.name, b"x") for _ in range(8)]
    try:
        await main.push_many(calls[:4])
        await other.push_many(calls[4:])

        async def done() -> bool:
            records = [await store.get_call(c.id) for c in calls]
            return all(r is not None and r.status is CallStatus.SUCCESS for r in records)

        driver = FakeDriver(FakeBehaviour(handler=reply()))
        with caplog.at_level(logging.INFO, logger="fnq.worker"):
            async with Agent(settings, driver) as agent:
                await _run_until(Worker(settings, [main, flaky], store, agent), done)  # type: ignore[list-item]
        lines = [r.getMessage() for r in caplog.records]
        down = [m for m in lines if "unavailable, pausing its intake" in m]
        assert down == ["RQ queues jobs unavailable, pausing its intake: connection refused"]
        assert "RQ queues jobs is back, resuming its intake" in lines
        assert not any(m.startswith("queue ") for m in lines)  # the main queue never was down
    finally:
        await main.close()
        await other.close()
        await store.close()


async def test_a_queue_back_from_an_outage_is_logged_without_waiting_for_a_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing queued, the reserve after an outage waits for messages up to
    FN_ASYNC_CHEW_POLL_MSECS (60 s): the queue is back all the same, and says so."""
    settings = load_settings(data_dir=str(tmp_path))
    assert settings.async_chew_poll_msecs == 60_000
    store = await open_datastore(settings)
    queue = DownAtFirst(open_queue(settings.mq_url, settings), fails=2)
    shutdown = Shutdown(5.0)
    try:
        driver = FakeDriver(FakeBehaviour(handler=reply()))
        with caplog.at_level(logging.INFO, logger="fnq.worker"):
            async with Agent(settings, driver) as agent:
                worker = Worker(settings, queue, store, agent)
                run = asyncio.create_task(worker.run(shutdown))
                try:
                    async with asyncio.timeout(5):
                        while "RQ queues jobs is back, resuming its intake" not in caplog.text:
                            await asyncio.sleep(0.02)
                finally:
                    shutdown.request("test over")
                    await asyncio.wait_for(run, 30)
        assert "RQ queues jobs unavailable, pausing its intake" in caplog.text
    finally:
        await queue.close()
        await store.close()


class GoesDown:
    """A real queue that fails as in an outage once ``down`` is set."""

    def __init__(self, inner: MessageQueue) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in {"reserve_many", "ack", "ack_many", "release", "extend"}:
            return attr

        async def call(*args: Any, **kw: Any) -> Any:
            if self.down:
                raise QueueUnavailable("connection refused")
            result = await attr(*args, **kw)
            if self.down:  # went down while it waited: the answer is lost
                raise QueueUnavailable("connection lost")
            return result

        return call


async def test_a_queue_outage_under_running_calls_is_not_logged_call_by_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reservations that could not be extended are one warning per outage (the
    rounds after the first log at debug level), and the calls that ended meanwhile
    and could not be settled nor handed back are under the hand-back warning, which
    comes at most every HANDED_BACK_LOG_S."""
    settings = load_settings(data_dir=str(tmp_path), mq_reservation_msecs=1000)
    store = await open_datastore(settings)
    await store.create_fn(FN)
    queue = GoesDown(open_queue(settings.mq_url, settings))
    calls = [Call(new_call_id(), FN.app, FN.name, b"x") for _ in range(6)]
    go = asyncio.Event()

    async def handler(container: Any, request: Any) -> Any:
        await go.wait()
        return await reply()(container, request)

    shutdown = Shutdown(5.0)
    try:
        await queue.push_many(calls)
        driver = FakeDriver(FakeBehaviour(handler=handler))
        with caplog.at_level(logging.INFO, logger="fnq.worker"):
            async with Agent(settings, driver) as agent:
                worker = Worker(settings, queue, store, agent, prefetch=6)  # type: ignore[arg-type]
                run = asyncio.create_task(worker.run(shutdown))
                try:
                    async with asyncio.timeout(10):
                        while len(worker.calls.held) < len(calls) or driver.dispatches < 6:
                            await asyncio.sleep(0.02)
                    queue.down = True
                    await asyncio.sleep(1.2)  # three rounds of extends, at least
                    go.set()
                    async with asyncio.timeout(10):
                        while worker.calls.held:
                            await asyncio.sleep(0.02)
                finally:
                    shutdown.request("test over")
                    await asyncio.wait_for(run, 30)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        extends = [m for m in warnings if m.startswith("could not extend")]
        assert len(extends) == 1, extends
        assert extends[0].startswith("could not extend the reservations of 6 call(s) (")
        assert sum("could not be handed back either" in m for m in warnings) <= 1, warnings
        assert sum("it goes back to the queue" in m for m in warnings) <= 1, warnings
        for c in calls:
            record = await store.get_call(c.id)
            assert record is not None and record.status is CallStatus.SUCCESS
        assert worker.completed == len(calls)  # they ended here, acked or not
    finally:
        await queue.inner.close()
        await store.close()


class FullDiskOnce:
    """The real datastore, except that the first outcome fails to be recorded as on a
    full disk, and that putting a `running` record back (``record_retry(...,
    running_on=...)``) works, fails, or never ends, as ``put_back`` says."""

    def __init__(self, inner: Datastore, put_back: str) -> None:
        self.inner = inner
        self.put_back = put_back
        self.full = True
        self.put_backs = 0

    async def record_outcome(self, *args: Any, **kw: Any) -> bool:
        if self.full:
            self.full = False
            raise StoreUnavailable("the disk is full")
        return await self.inner.record_outcome(*args, **kw)

    async def record_retry(self, *args: Any, **kw: Any) -> bool:
        if kw.get("running_on") is not None:
            self.put_backs += 1
            if self.put_back == "fails":
                raise StoreUnavailable("the database is down")
            if self.put_back == "hangs":
                await asyncio.Event().wait()  # until the worker gives up on it
        return await self.inner.record_retry(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Releases:
    """The real queue; what the record said, and the delay, when each message was
    released."""

    def __init__(self, inner: MessageQueue, store: Datastore) -> None:
        self.inner = inner
        self.store = store
        self.seen: list[tuple[CallRecord | None, float]] = []

    async def release(self, msg: Message, delay_s: float) -> None:
        self.seen.append((await self.store.get_call(msg.call.id), delay_s))
        await self.inner.release(msg, delay_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("put_back", ["works", "fails", "hangs"])
async def test_a_call_handed_back_for_a_passing_fault_is_recorded_queued_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, put_back: str
) -> None:
    monkeypatch.setattr(worker_calls, "RETRY_LATER_S", 0.05)
    monkeypatch.setattr(worker_calls, "HAND_BACK_RECORD_S", 0.2)
    settings = load_settings(data_dir=str(tmp_path), running_mark_msecs=0)  # marked at once
    inner = await open_datastore(settings)
    await inner.create_fn(FN)
    call = Call(new_call_id(), FN.app, FN.name, b"x")
    await inner.record_queued(call)
    store = FullDiskOnce(inner, put_back)
    queue = open_queue(settings.mq_url, settings)
    releases = Releases(queue, inner)
    try:
        await queue.push_many([call])

        async def done() -> bool:
            record = await inner.get_call(call.id)
            return record is not None and record.status is CallStatus.SUCCESS

        metrics = Metrics()
        await _worker_run(settings, store, releases, done, metrics)  # type: ignore[arg-type]
        assert store.put_backs == 1  # tried once, before the message went back
        assert metrics.calls.handed_back == {"stop": 0, "fault": 1}
        [(before, delay_s)] = releases.seen
        assert delay_s == 0.05
        assert before is not None
        record = await inner.get_call(call.id)
        assert record is not None and record.status is CallStatus.SUCCESS
        # The function ran before the fault kept its outcome from the record: that
        # attempt counts, and the run that followed is the second.
        if put_back == "works":
            assert (before.status, before.attempts, before.started_at) == (
                CallStatus.QUEUED, 1, None
            )  # fmt: skip
            assert before.error == "the disk is full; the call went back to the queue"
            assert before.next_try_at is not None
        else:  # the datastore is what failed: the message went back all the same
            assert (before.status, before.attempts) == (CallStatus.RUNNING, 1)
        assert record.attempts == 2
    finally:
        await queue.close()
        await inner.close()

"""A worker whose call logs find no room (FN_LOG_URL=file:// on a full file system):
each call runs once, its outcome kept until its log can be written, then recorded
and acked; a call stopped meanwhile is not lost.

In-process worker on the embedded SQLite queue and datastore, the log directory a
real small tmpfs, the fake container driver counting the runs of each call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import Settings, load_settings
from datastore import logroom
from datastore.base import Datastore, open_datastore
from mq.base import MessageQueue, open_queue
from tests.rig import fill_space, small_tmpfs
from worker import calls as worker_calls
from worker.agent.agent import Agent
from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.drivers.fake import FakeBehaviour, FakeContainer, FakeDriver, reply
from worker.loop import Worker
from worker.metrics import Metrics
from worker.shutdown import Shutdown

FN = Function(app="a", name="f", image="img/f", memory_mb=64)
CALLS = 4


@dataclass
class Rig:
    settings: Settings
    store: Datastore
    queue: MessageQueue
    calls: list[Call]
    filler: Path
    runs: Counter[str]

    def driver(self) -> FakeDriver:
        """A driver whose function writes a line to its log and counts its runs."""
        answer = reply(output=(b"ran\n",))

        async def counted(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
            self.runs[request.call_id] += 1
            return await answer(container, request)

        return FakeDriver(FakeBehaviour(handler=counted))

    async def retried(self, times: int) -> None:
        """Until every call has run and the logs that wait for room have been tried
        ``times`` times again."""
        room = self.store._log_room  # type: ignore[attr-defined]
        async with asyncio.timeout(30):
            while set(self.runs) != set(self.ids) or room.retries < times:
                await asyncio.sleep(0.01)

    async def all_final(self) -> None:
        async with asyncio.timeout(30):
            while not all(r.is_final for r in (await self.store.get_calls(self.ids)).values()):
                await asyncio.sleep(0.02)

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.calls]


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    # A call handed back for a fault would come again within 0.05 s: a second run
    # would show at once.
    monkeypatch.setattr(worker_calls, "RETRY_LATER_S", 0.05)
    monkeypatch.setattr(logroom, "BACKOFF_MAX_S", 0.05)


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "logs", "size=256k") as directory:
        yield directory


@pytest.fixture
async def rig(tmp_path: Path, log_dir: Path) -> AsyncIterator[Rig]:
    # Messages left to lapse come back within 2 s.
    settings = load_settings(data_dir=str(tmp_path / "data"), log_url=f"file://{log_dir}",
                             mq_reservation_msecs=2000)  # fmt: skip
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    rig = Rig(settings, store, queue, [], log_dir, Counter())
    try:
        await store.create_fn(FN)
        rig.calls = [Call(new_call_id(), FN.app, FN.name, b"x") for _ in range(CALLS)]
        for call in rig.calls:
            await store.record_queued(call)
        await queue.push_many(rig.calls)
        rig.filler = fill_space(log_dir)
        yield rig
    finally:
        await queue.close()
        await rig.store.close()


async def test_each_call_runs_once_and_ends_with_its_log_once_there_is_room(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    metrics = Metrics()
    shutdown = Shutdown(5.0)
    async with Agent(rig.settings, rig.driver()) as agent:
        run = asyncio.create_task(Worker(rig.settings, rig.queue, rig.store, agent,
                                         metrics=metrics).run(shutdown))  # fmt: skip
        try:
            await rig.retried(10 * CALLS)  # a second or so: a hand-back would show by then
            assert rig.runs == dict.fromkeys(rig.ids, 1)
            stats = await rig.queue.stats()
            assert (stats.ready, stats.delayed, stats.reserved) == (0, 0, CALLS)
            records = await rig.store.get_calls(rig.ids)
            assert not any(r.is_final for r in records.values())
            rig.filler.unlink()
            await rig.all_final()
        finally:
            shutdown.request("test over")
            await asyncio.wait_for(run, 30)
    assert rig.runs == dict.fromkeys(rig.ids, 1)
    for record in (await rig.store.get_calls(rig.ids)).values():
        assert (record.status, record.attempts) == (CallStatus.SUCCESS, 1)
        assert await rig.store.get_log(record.id) == b"ran\n"
    stats = await rig.queue.stats()
    assert stats.ready + stats.delayed + stats.reserved == 0
    assert metrics.calls.handed_back == {"stop": 0, "fault": 0}
    said = [r.getMessage() for r in caplog.records if r.name == "fnq.datastore.logs"]
    assert len(said) == 2, said
    assert said[0].startswith("no room for call logs (writing the log of call ")
    assert said[1].startswith("call logs are written again after ")
    assert said[1].endswith(f" s ({CALLS} log(s) waited)")


async def test_a_call_stopped_while_its_log_waits_ends_if_room_comes_before_it_goes_back(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grace period is over: the call's handling is stopped, but not the writes of
    its log and record, which land while the hand-back waits for them. The message is
    then acked: the call does not run again."""
    monkeypatch.setattr(worker_calls, "HAND_BACK_RECORD_S", 10.0)
    caplog.set_level(logging.INFO)
    shutdown = Shutdown(0.1)
    async with Agent(rig.settings, rig.driver()) as agent:
        worker = Worker(rig.settings, rig.queue, rig.store, agent)
        run = asyncio.create_task(worker.run(shutdown))
        try:
            await rig.retried(CALLS)
            shutdown.request("test")
            async with asyncio.timeout(10):
                while "grace period over" not in caplog.text:
                    await asyncio.sleep(0.01)
            rig.filler.unlink()
        finally:
            await asyncio.wait_for(run, 30)
    assert worker.calls.left_to_lapse == 0
    assert rig.runs == dict.fromkeys(rig.ids, 1)
    for record in (await rig.store.get_calls(rig.ids)).values():
        assert (record.status, record.attempts) == (CallStatus.SUCCESS, 1)
        assert await rig.store.get_log(record.id) == b"ran\n"
    stats = await rig.queue.stats()
    assert stats.ready + stats.delayed + stats.reserved == 0


async def test_a_worker_stopped_while_logs_wait_leaves_the_calls_to_come_back(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room before the worker stops: it stops all the same, the calls' messages left
    to come back when their reservations lapse (none lost), their records not final.
    With room, the next worker runs them again and records them."""
    monkeypatch.setattr(worker_calls, "HAND_BACK_RECORD_S", 0.2)
    caplog.set_level(logging.INFO)
    async with Agent(rig.settings, rig.driver()) as agent:
        worker = Worker(rig.settings, rig.queue, rig.store, agent)
        shutdown = Shutdown(0.1)
        run = asyncio.create_task(worker.run(shutdown))
        await rig.retried(CALLS)
        shutdown.request("test")
        await asyncio.wait_for(run, 10)
    assert worker.calls.left_to_lapse == CALLS
    assert rig.runs == dict.fromkeys(rig.ids, 1)
    await rig.store.close()  # gives up the logs that wait, and their records
    closes = f"the datastore closes with {CALLS} call log(s) still waiting to be written"
    assert closes in caplog.text
    stats = await rig.queue.stats()
    assert (stats.ready, stats.delayed, stats.reserved) == (0, 0, CALLS)
    rig.filler.unlink()
    rig.store = await open_datastore(rig.settings)
    records = await rig.store.get_calls(rig.ids)
    assert {r.status for r in records.values()} == {CallStatus.QUEUED}
    async with Agent(rig.settings, rig.driver()) as agent:
        shutdown = Shutdown(5.0)
        run = asyncio.create_task(Worker(rig.settings, rig.queue, rig.store, agent).run(shutdown))
        try:
            await rig.all_final()
        finally:
            shutdown.request("test over")
            await asyncio.wait_for(run, 30)
    assert rig.runs == dict.fromkeys(rig.ids, 2)
    for record in (await rig.store.get_calls(rig.ids)).values():
        assert record.status is CallStatus.SUCCESS
        assert await rig.store.get_log(record.id) == b"ran\n"

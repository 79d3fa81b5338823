"""A worker whose call logs cannot be written for another reason than room
(FN_LOG_URL=file://): a read-only file system, a directory made immutable, no
permission, an I/O error, a log disk unmounted from above the directory. Each
call runs once, its outcome kept until its log can be written, then recorded and
acked; the worker says so once as it begins, naming the directory and the
error, and once as it ends.

In-process worker on the embedded SQLite queue and datastore, the log directory
on a real small tmpfs (bind-mounted, so that it can be unmounted and mounted
again), the fake container driver counting the runs of each call. The read-only
file system, the immutable directory and the unmounted one are real; no
permission and the I/O error are injected under the file log store.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import Settings, load_settings
from datastore import logroom
from datastore.base import Datastore, open_datastore
from datastore.filelogs import FileLogStore
from mq.base import MessageQueue, open_queue
from tests.rig import long_directory, remount, small_tmpfs
from worker import calls as worker_calls
from worker.agent.agent import Agent
from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.drivers.fake import FakeBehaviour, FakeContainer, FakeDriver, reply
from worker.loop import Worker
from worker.metrics import Metrics
from worker.shutdown import Shutdown

pytestmark = pytest.mark.integration

FN = Function(app="a", name="f", image="img/f", memory_mb=64)
CALLS = 4


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


@dataclass
class LogDisk:
    """The log directory ``directory`` on the tmpfs ``disk``, bind-mounted at ``mount``."""

    disk: Path
    mount: Path
    directory: Path
    lift: list[Callable[[], None]] = field(default_factory=list)

    def break_it(self, fault: str) -> str:
        """Make the log directory fail with ``fault``; the error text it gives."""
        if fault == "read-only":
            remount(self.disk, "ro")
            self.lift.append(lambda: remount(self.disk, "rw"))
            return os.strerror(errno.EROFS)
        if fault == "immutable":  # even root may not add to it
            dirs = [self.directory, *(p for p in self.directory.iterdir() if p.is_dir())]
            run("chattr", "+i", *map(str, dirs))
            self.lift.append(lambda: run("chattr", "-i", *map(str, dirs)))
            return os.strerror(errno.EPERM)
        if fault == "unmounted":
            run("umount", str(self.mount))
            self.lift.append(lambda: run("mount", "--bind", str(self.disk), str(self.mount)))
            return os.strerror(errno.ENOENT)
        code = {"no permission": errno.EACCES, "I/O error": errno.EIO}[fault]
        patch = pytest.MonkeyPatch()
        patch.setattr(FileLogStore, "_write", _failing(code))
        self.lift.append(patch.undo)
        return os.strerror(code)

    def repair(self) -> None:
        while self.lift:
            self.lift.pop()()


def _failing(code: int) -> Callable[[FileLogStore, Path, bytes], None]:
    def write(store: FileLogStore, path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code), str(path.parent))

    return write


@pytest.fixture
def log_disk(tmp_path: Path) -> Iterator[LogDisk]:
    with small_tmpfs(tmp_path / "disk", "size=1m") as disk:
        mount = tmp_path / "mnt"
        mount.mkdir()
        run("mount", "--bind", str(disk), str(mount))
        found = LogDisk(disk, mount, mount / "logs")
        try:
            yield found
        finally:
            try:
                found.repair()
            finally:
                subprocess.run(["umount", "--lazy", str(mount)], check=False, timeout=30)


@dataclass
class Rig:
    settings: Settings
    store: Datastore
    queue: MessageQueue
    runs: Counter[str] = field(default_factory=Counter)

    def driver(self) -> FakeDriver:
        """A driver whose function writes a line to its log and counts its runs."""
        answer = reply(output=(b"ran\n",))

        async def counted(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
            self.runs[request.call_id] += 1
            return await answer(container, request)

        return FakeDriver(FakeBehaviour(handler=counted))

    async def push(self, n: int, call_ids: list[str] | None = None) -> list[str]:
        ids = call_ids or [new_call_id() for _ in range(n)]
        calls = [Call(call_id, FN.app, FN.name, b"x") for call_id in ids]
        for call in calls:
            await self.store.record_queued(call)
        await self.queue.push_many(calls)
        return [c.id for c in calls]

    async def ran_and_retried(self, ids: list[str], times: int) -> None:
        """Until the calls ``ids`` have run and the logs that wait have been tried
        ``times`` times again, or a call has run twice."""
        room = self.store._log_room  # type: ignore[attr-defined]
        async with asyncio.timeout(30):
            while not set(ids) <= set(self.runs) or room.retries < times:
                if max(self.runs.values()) > 1:
                    return
                await asyncio.sleep(0.01)

    async def all_final(self, ids: list[str]) -> None:
        async with asyncio.timeout(30):
            while not all(r.is_final for r in (await self.store.get_calls(ids)).values()):
                await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    # A call handed back for a fault would come again within 0.05 s: a second run
    # would show at once.
    monkeypatch.setattr(worker_calls, "RETRY_LATER_S", 0.05)
    monkeypatch.setattr(logroom, "BACKOFF_MAX_S", 0.05)


@contextlib.asynccontextmanager
async def opened(data_dir: Path, log_dir: Path) -> AsyncIterator[Rig]:
    settings = load_settings(data_dir=str(data_dir), log_url=f"file://{log_dir}")
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    try:
        await store.create_fn(FN)
        yield Rig(settings, store, queue)
    finally:
        await queue.close()
        await store.close()


@pytest.fixture
async def rig(tmp_path: Path, log_disk: LogDisk) -> AsyncIterator[Rig]:
    async with opened(tmp_path / "data", log_disk.directory) as found:
        yield found


@pytest.mark.parametrize(
    "fault", ["read-only", "immutable", "unmounted", "no permission", "I/O error"]
)
async def test_each_call_runs_once_and_ends_with_its_log_once_it_can_be_written(
    rig: Rig, log_disk: LogDisk, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    metrics = Metrics()
    shutdown = Shutdown(5.0)
    async with Agent(rig.settings, rig.driver()) as agent:
        worker = Worker(rig.settings, rig.queue, rig.store, agent, metrics=metrics)
        running = asyncio.create_task(worker.run(shutdown))
        try:
            first = await rig.push(1)  # its log makes the directory
            await rig.all_final(first)
            why = log_disk.break_it(fault)
            ids = await rig.push(CALLS)
            await rig.ran_and_retried(ids, 10 * CALLS)  # a hand-back would show by then
            assert rig.runs == dict.fromkeys(first + ids, 1)
            stats = await rig.queue.stats()
            assert (stats.ready, stats.delayed, stats.reserved) == (0, 0, CALLS)
            records = await rig.store.get_calls(ids)
            assert not any(r.is_final for r in records.values())
            log_disk.repair()
            await rig.all_final(ids)
        finally:
            shutdown.request("test over")
            await asyncio.wait_for(running, 30)
    assert rig.runs == dict.fromkeys(first + ids, 1)
    for record in (await rig.store.get_calls(ids)).values():
        assert (record.status, record.attempts) == (CallStatus.SUCCESS, 1)
        assert await rig.store.get_log(record.id) == b"ran\n"
    stats = await rig.queue.stats()
    assert stats.ready + stats.delayed + stats.reserved == 0
    assert metrics.calls.handed_back == {"stop": 0, "fault": 0}
    said = [r.getMessage() for r in caplog.records if r.name == "fnq.datastore.logs"]
    assert len(said) == 2, said
    assert said[0].startswith("call logs cannot be written (writing the log of call "), said[0]
    assert f" in {log_disk.directory} failed: " in said[0] and why in said[0], said[0]
    assert said[1].startswith("call logs are written again after "), said[1]
    assert said[1].endswith(f" ({CALLS} log(s) waited)"), said[1]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_call_whose_log_can_never_be_stored_runs_once_and_ends_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A log directory whose path is so long (4,000 characters) that the log file of a
    call with a 128-character id would pass the system's limit on paths. That call
    ends as its function answered, its record marked as missing its log, the reason
    logged once as an error; its message is acked. A short id keeps its log."""
    directory = long_directory(tmp_path / "logs", 4000)
    longest, short = "o" * 128, new_call_id()
    async with opened(tmp_path / "data", directory) as rig:
        shutdown = Shutdown(5.0)
        async with Agent(rig.settings, rig.driver()) as agent:
            running = asyncio.create_task(Worker(rig.settings, rig.queue, rig.store,
                                                 agent).run(shutdown))  # fmt: skip
            try:
                await rig.push(2, [longest, short])
                await rig.all_final([longest, short])
            finally:
                shutdown.request("test over")
                await asyncio.wait_for(running, 30)
        assert rig.runs == {longest: 1, short: 1}
        records = await rig.store.get_calls([longest, short])
        assert {(r.status, r.attempts) for r in records.values()} == {(CallStatus.SUCCESS, 1)}
        assert records[longest].log_truncated and not records[short].log_truncated
        assert await rig.store.get_log(longest) is None
        assert await rig.store.get_log(short) == b"ran\n"
        stats = await rig.queue.stats()
        assert stats.ready + stats.delayed + stats.reserved + stats.dead == 0
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith(f"the log of call {longest} cannot be stored in {directory}: ")
    assert "File name too long" in error

"""Call logs that find no room wait for some (datastore.logroom): tried again with
backoff until they land, given up only by a patience or by close, the spell logged
once as it begins and once as it ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from datastore import logroom
from datastore.errors import LogStoreFull, StoreUnavailable
from datastore.filelogs import FileLogStore
from datastore.logroom import PatientLogs
from tests.rig import fill_inodes, fill_space, small_tmpfs

NO_ROOM = "no room for call logs"
AGAIN = "call logs are written again"


class RoomyStore:
    """A log store in memory with room while ``room`` is set; ``broken``: every write
    fails, for another reason than room."""

    def __init__(self, *, room: bool = False, broken: bool = False) -> None:
        self.room = asyncio.Event()
        if room:
            self.room.set()
        self.broken = broken
        self.tries = 0
        self.logs: dict[str, bytes] = {}

    async def put_log(self, call_id: str, data: bytes) -> None:
        self.tries += 1
        if self.broken:
            raise StoreUnavailable(f"writing the log of call {call_id} failed: EIO")
        if not self.room.is_set():
            raise LogStoreFull(f"writing the log of call {call_id} failed: ENOSPC")
        self.logs[call_id] = data

    async def get_log(self, call_id: str) -> bytes | None:
        return self.logs.get(call_id)

    async def delete_logs(self, call_ids: Sequence[str]) -> None:
        for call_id in call_ids:
            self.logs.pop(call_id, None)

    async def close(self) -> None:
        return None


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logroom, "BACKOFF_INITIAL_S", 0.001)
    monkeypatch.setattr(logroom, "BACKOFF_MAX_S", 0.01)


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def said(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(words in r.getMessage() for r in caplog.records if r.name == "fnq.datastore.logs")


async def test_logs_without_room_wait_and_land_once_there_is_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RoomyStore()
    logs = PatientLogs(store)
    writes = [asyncio.create_task(logs.put_log(f"call-{i}", b"out %d" % i)) for i in range(3)]
    await until(lambda: logs.retries >= 30)  # each tried again, ten times over
    assert not any(w.done() for w in writes)
    assert (said(caplog, NO_ROOM), said(caplog, AGAIN)) == (1, 0)
    store.room.set()
    await asyncio.wait_for(asyncio.gather(*writes), 5)
    assert store.logs == {f"call-{i}": b"out %d" % i for i in range(3)}
    assert (said(caplog, NO_ROOM), said(caplog, AGAIN)) == (1, 1)
    [back] = [r.getMessage() for r in caplog.records if AGAIN in r.getMessage()]
    assert back.endswith("without room (3 log(s) waited)"), back


async def test_the_retries_back_off_up_to_their_bound() -> None:
    """Doubling from the first pause to the last: a few tries a second at most,
    however long the disk stays full."""
    store = RoomyStore()
    logs = PatientLogs(store)
    write = asyncio.create_task(logs.put_log("call-1", b"x"))
    started = time.monotonic()
    await until(lambda: logs.retries >= 12)
    # 1, 2, 4, 8 ms, then 10 ms each: at least 0.095 s for 12 retries
    assert time.monotonic() - started >= 0.095
    store.room.set()
    await asyncio.wait_for(write, 5)


async def test_each_spell_without_room_is_logged_once_as_it_begins_and_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RoomyStore()
    logs = PatientLogs(store)
    for spell in (1, 2):
        store.room.clear()
        write = asyncio.create_task(logs.put_log(f"call-{spell}", b"x"))
        await until(lambda: said(caplog, NO_ROOM) == spell)  # noqa: B023 - awaited here
        store.room.set()
        await asyncio.wait_for(write, 5)
        await logs.put_log(f"quick-{spell}", b"x")  # lands at once: nothing more to say
        assert (said(caplog, NO_ROOM), said(caplog, AGAIN)) == (spell, spell)


async def test_the_spell_ends_only_when_no_log_waits(caplog: pytest.LogCaptureFixture) -> None:
    """A small log that lands while a larger one still waits does not end the spell."""

    class SmallRoom(RoomyStore):
        async def put_log(self, call_id: str, data: bytes) -> None:
            if len(data) <= 1:  # room for a byte
                self.logs[call_id] = data
                return
            await super().put_log(call_id, data)

    store = SmallRoom()
    logs = PatientLogs(store)
    large = asyncio.create_task(logs.put_log("large", b"x" * 100))
    await until(lambda: logs.retries >= 3)
    await logs.put_log("small", b"x")
    assert said(caplog, AGAIN) == 0
    store.room.set()
    await asyncio.wait_for(large, 5)
    assert said(caplog, AGAIN) == 1


async def test_other_failures_go_up_at_once(caplog: pytest.LogCaptureFixture) -> None:
    store = RoomyStore(broken=True)
    with pytest.raises(StoreUnavailable, match="EIO") as raised:
        await PatientLogs(store).put_log("call-1", b"x")
    assert not isinstance(raised.value, LogStoreFull)
    assert store.tries == 1
    assert said(caplog, NO_ROOM) == 0


async def test_a_patience_gives_the_log_up() -> None:
    logs = PatientLogs(RoomyStore())
    logs.give_up_after_s = 0.1
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"ENOSPC; no room for 0\.1 s, the write was given"):
        await logs.put_log("call-1", b"x")
    assert 0.1 <= time.monotonic() - started < 2


async def test_close_ends_every_wait(caplog: pytest.LogCaptureFixture) -> None:
    store = RoomyStore()
    logs = PatientLogs(store)
    writes = [asyncio.create_task(logs.put_log(f"call-{i}", b"x")) for i in range(2)]
    await until(lambda: logs.retries >= 4)
    logs.close()
    done = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 1)
    assert all(isinstance(e, StoreUnavailable) for e in done), done
    assert "the datastore closed while it waited for room" in str(done[0])
    assert said(caplog, "closes with 2 call log(s) still waiting for room") == 1
    assert store.logs == {}


async def test_a_kept_write_goes_on_when_its_caller_is_cancelled() -> None:
    """The log and the record after it (here: a list) are not withdrawn by a caller
    that stops waiting for them."""
    store = RoomyStore()
    logs = PatientLogs(store)
    recorded: list[str] = []

    async def log_then_record() -> bool:
        await logs.put_log("call-1", b"x")
        recorded.append("call-1")
        return True

    caller = asyncio.create_task(logs.keep(log_then_record()))
    await until(lambda: logs.retries >= 2)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    store.room.set()
    await until(lambda: recorded == ["call-1"])
    assert store.logs == {"call-1": b"x"}


async def test_a_full_file_system_is_waited_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a real small tmpfs, out of space and then out of inodes: each log waits and
    lands once there is room, with no temporary file left behind."""
    caplog.set_level(logging.WARNING, "fnq.datastore.logs")
    with small_tmpfs(tmp_path / "logs", "size=256k,nr_inodes=64") as directory:
        logs = PatientLogs(FileLogStore(directory))
        filler = fill_space(directory)
        write = asyncio.create_task(logs.put_log("call-00", b"x" * 8192))
        await until(lambda: logs.retries >= 3)
        filler.unlink()
        await asyncio.wait_for(write, 5)
        inodes = fill_inodes(directory)
        write = asyncio.create_task(logs.put_log("call-01", b"y"))  # a shard of its own
        await until(lambda: logs.retries >= 6)
        assert not write.done()
        for path in inodes:
            path.unlink()
        await asyncio.wait_for(write, 5)
        files = sorted(p.name for p in directory.rglob("*") if p.is_file())
        assert files == ["call-00.log", "call-01.log"]
    assert (said(caplog, NO_ROOM), said(caplog, AGAIN)) == (2, 2)

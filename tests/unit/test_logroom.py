"""Call logs the store cannot take for now (no room, a read-only file system, no
permission...) wait until it can (datastore.logroom): tried again with backoff
until they land, given up only by a patience or by close, the spell logged once
as it begins (and once for each other reason met meanwhile) and once as it ends.
A log the store will never take goes up at once."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from datastore import logroom
from datastore.errors import LogRefused, LogStoreDown, LogStoreFull, StoreError, StoreUnavailable
from datastore.filelogs import FileLogStore
from datastore.logroom import PatientLogs
from tests.rig import fill_inodes, fill_space, missing, remount, small_tmpfs

NO_ROOM = "no room for call logs"
AGAIN = "call logs are written again"


class RoomyStore:
    """A log store in memory with room while ``room`` is set; ``broken``: every write
    fails with that error instead (an errno, for the spell's words)."""

    def __init__(self, *, room: bool = False, broken: StoreError | None = None) -> None:
        self.room = asyncio.Event()
        if room:
            self.room.set()
        self.broken = broken
        self.tries = 0
        self.logs: dict[str, bytes] = {}

    async def put_log(self, call_id: str, data: bytes) -> None:
        self.tries += 1
        if self.broken is not None:
            raise self.broken
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
    assert back.endswith(" s (3 log(s) waited)"), back


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


def down(code: int) -> LogStoreDown:
    """The store's error for a write that failed with the system's ``code``."""
    cause = OSError(code, os.strerror(code), "/logs/1")
    error = LogStoreDown(f"writing the log of call call-1 in /logs failed: {cause}")
    error.__cause__ = cause
    return error


async def test_a_log_the_store_cannot_take_for_any_reason_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not only no room: a read-only file system, no permission, an I/O error. The
    spell says its reason as it begins, and once each other reason met meanwhile."""
    store = RoomyStore(broken=down(errno.EROFS))
    logs = PatientLogs(store)
    write = asyncio.create_task(logs.put_log("call-1", b"x"))
    await until(lambda: logs.retries >= 5)
    for code in (errno.EACCES, errno.EIO, errno.EACCES):  # the second EACCES: said already
        store.broken = down(code)
        tries = store.tries
        await until(lambda: store.tries >= tries + 3)  # noqa: B023 - awaited here
    store.broken = None
    store.room.set()
    await asyncio.wait_for(write, 5)
    assert store.logs == {"call-1": b"x"}
    lines = [r.getMessage() for r in caplog.records if r.name == "fnq.datastore.logs"]
    assert lines[0] == (
        "call logs cannot be written (writing the log of call call-1 in /logs failed: "
        "[Errno 30] Read-only file system: '/logs/1'); they wait and retry, and the "
        "records of their calls after them"
    )
    assert lines[1:3] == [
        "call logs still wait, now for another reason (writing the log of call call-1 in "
        f"/logs failed: [Errno {code}] {os.strerror(code)}: '/logs/1')"
        for code in (errno.EACCES, errno.EIO)
    ]
    assert lines[3].startswith("call logs are written again after "), lines
    assert lines[3].endswith(" s (1 log(s) waited)"), lines
    assert len(lines) == 4, lines


async def test_a_log_the_store_will_never_take_goes_up_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RoomyStore(broken=LogRefused("the log of call call-1 cannot be stored in /logs"))
    with pytest.raises(LogRefused):
        await PatientLogs(store).put_log("call-1", b"x")
    assert store.tries == 1
    assert caplog.records == []


async def test_a_patience_gives_the_log_up() -> None:
    logs = PatientLogs(RoomyStore())
    logs.give_up_after_s = 0.1
    started = time.monotonic()
    with pytest.raises(
        StoreUnavailable, match=r"ENOSPC; still failing after 0\.1 s, the write was given up"
    ):
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
    assert "the datastore closed while the log waited" in str(done[0])
    assert said(caplog, "closes with 2 call log(s) still waiting to be written") == 1
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


async def test_a_read_only_file_system_is_waited_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real tmpfs remounted read-only (as the kernel does to a disk after errors),
    then read-write again: the log waits, then lands, no temporary file left."""
    caplog.set_level(logging.WARNING, "fnq.datastore.logs")
    with small_tmpfs(tmp_path / "logs", "size=256k") as directory:
        logs = PatientLogs(FileLogStore(directory))
        remount(directory, "ro")
        try:
            write = asyncio.create_task(logs.put_log("call-00", b"x"))
            await until(lambda: logs.retries >= 3)
            assert not write.done()
        finally:
            remount(directory, "rw")
        await asyncio.wait_for(write, 5)
        files = sorted(p.name for p in directory.rglob("*") if p.is_file())
        assert files == ["call-00.log"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(
        f"call logs cannot be written (writing the log of call call-00 in {directory} "
        "failed: [Errno 30] Read-only file system: "
    ), lines
    assert len(lines) == 2 and lines[1].startswith("call logs are written again after "), lines


# A writer of call logs in a process of its own: it says "waiting" once its log has
# been tried again three times, then "written" once it lands.
WRITER = """
import asyncio, logging, sys
from datastore import logroom
from datastore.filelogs import FileLogStore

async def main() -> None:
    logroom.BACKOFF_INITIAL_S, logroom.BACKOFF_MAX_S = 0.001, 0.01
    logs = logroom.PatientLogs(FileLogStore(sys.argv[1]))
    write = asyncio.create_task(logs.put_log("call-00", b"x"))
    async with asyncio.timeout(10):
        while logs.retries < 3:
            await asyncio.sleep(0.005)
    print("waiting", flush=True)
    await asyncio.wait_for(write, 10)
    print("written", flush=True)

logging.basicConfig(format="%(name)s: %(message)s")
asyncio.run(main())
"""
NO_OVERRIDE = "-dac_override,-dac_read_search"  # root without them: as any other user


async def test_a_directory_the_worker_may_not_write_to_is_waited_out(tmp_path: Path) -> None:
    """A real EACCES: a writer running as root but without the capabilities that let
    root pass permission bits, on a directory made read-only for its owner (an operator's
    chmod). The log waits; once the directory is writable again, it lands."""
    if os.geteuid() != 0:
        missing("dropping root's capabilities needs root")
    directory = tmp_path / "logs"
    directory.mkdir(mode=0o500)
    command = ["setpriv", f"--inh-caps={NO_OVERRIDE}", f"--bounding-set={NO_OVERRIDE}",
               "--", sys.executable, "-c", WRITER, str(directory)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    writer = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert writer.stdout is not None and writer.stderr is not None
        assert await asyncio.wait_for(writer.stdout.readline(), 10) == b"waiting\n"
        directory.chmod(0o700)
        assert await asyncio.wait_for(writer.stdout.readline(), 10) == b"written\n"
        said = (await asyncio.wait_for(writer.stderr.read(), 10)).decode()
        assert await asyncio.wait_for(writer.wait(), 10) == 0
    finally:
        if writer.returncode is None:
            writer.kill()
            await writer.wait()
    lines = said.splitlines()
    assert lines[0] == (
        f"fnq.datastore.logs: call logs cannot be written (writing the log of call call-00 "
        f"in {directory} failed: [Errno 13] Permission denied: '{directory}/00'); they wait "
        "and retry, and the records of their calls after them"
    ), said
    assert len(lines) == 2 and " call logs are written again after " in lines[1], said
    assert FileLogStore(directory).path_of("call-00").read_bytes() == b"x"

"""FN_LOG_URL=file:// on a full file system: a call's outcome waits for its log to
find room, then both are stored, the log first (datastore.logroom). A caller that
stops waiting does not withdraw them; close and a command's patience give them up.
A log the file system will never take leaves the record without it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.domain import Call, CallStatus, Outcome, Response, new_call_id
from config.settings import Settings, load_settings
from datastore import logroom
from datastore.base import Datastore, open_datastore
from datastore.errors import StoreUnavailable
from tests.rig import fill_space, long_directory, small_tmpfs

pytestmark = pytest.mark.integration

OUTCOME = Outcome(CallStatus.SUCCESS, response=Response(200, body=b"ok"), log=b"the log\n" * 512)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logroom, "BACKOFF_MAX_S", 0.05)


@pytest.fixture
def full_logs(tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    """Settings whose log directory is a small tmpfs, and its filler (full until removed)."""
    with small_tmpfs(tmp_path / "logs", "size=256k") as directory:
        settings = load_settings(data_dir=str(tmp_path / "data"), log_url=f"file://{directory}")
        yield settings, fill_space(directory)


async def queued_call(store: Datastore, call_id: str | None = None) -> Call:
    call = Call(call_id or new_call_id(), "app", "fn", b"body")
    await store.record_queued(call)
    return call


async def retried(store: Datastore, times: int) -> None:
    """Until the store has tried the logs that wait for room ``times`` times again."""
    room = store._log_room  # type: ignore[attr-defined]
    async with asyncio.timeout(20):
        while room.retries < times:
            await asyncio.sleep(0.01)


async def test_the_outcome_waits_for_its_log_then_both_are_stored(
    full_logs: tuple[Settings, Path],
) -> None:
    settings, filler = full_logs
    store = await open_datastore(settings)
    try:
        call = await queued_call(store)
        write = asyncio.create_task(store.record_outcome(call, OUTCOME, 1, "w1"))
        await retried(store, 5)
        assert not write.done()
        record = await store.get_call(call.id)
        assert record is not None and record.status is CallStatus.QUEUED  # not before its log
        assert await store.get_log(call.id) is None
        filler.unlink()
        assert await asyncio.wait_for(write, 10) is True
        record = await store.get_call(call.id)
        assert record is not None and (record.status, record.attempts) == (CallStatus.SUCCESS, 1)
        assert await store.get_log(call.id) == OUTCOME.log
    finally:
        await store.close()


async def test_a_caller_that_stops_waiting_does_not_withdraw_the_log_and_record(
    full_logs: tuple[Settings, Path],
) -> None:
    settings, filler = full_logs
    store = await open_datastore(settings)
    try:
        call = await queued_call(store)
        write = asyncio.create_task(store.record_outcome(call, OUTCOME, 1, "w1"))
        await retried(store, 3)
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        filler.unlink()
        async with asyncio.timeout(10):
            while (record := await store.get_call(call.id)) is None or not record.is_final:
                await asyncio.sleep(0.02)
        assert record.status is CallStatus.SUCCESS
        assert await store.get_log(call.id) == OUTCOME.log
    finally:
        await store.close()


async def test_close_gives_up_the_logs_that_wait_and_their_records(
    full_logs: tuple[Settings, Path],
) -> None:
    settings, _ = full_logs
    store = await open_datastore(settings)
    call = await queued_call(store)
    write = asyncio.create_task(store.record_outcome(call, OUTCOME, 1, "w1"))
    await retried(store, 3)
    started = time.monotonic()
    await store.close()
    assert time.monotonic() - started < 2
    with pytest.raises(StoreUnavailable, match="the datastore closed while the log waited"):
        await asyncio.wait_for(write, 2)
    store = await open_datastore(settings)
    try:
        record = await store.get_call(call.id)
        assert record is not None and record.status is CallStatus.QUEUED
    finally:
        await store.close()


async def test_a_command_s_patience_gives_the_log_up(full_logs: tuple[Settings, Path]) -> None:
    settings, _ = full_logs
    store = await open_datastore(settings, write_patience_s=0.3)
    try:
        call = await queued_call(store)
        started = time.monotonic()
        with pytest.raises(
            StoreUnavailable,
            match=r"No space left on device; still failing after 0\.3 s, the write was given up",
        ):
            await store.record_outcome(call, OUTCOME, 1, "cli")
        assert 0.3 <= time.monotonic() - started < 3
    finally:
        await store.close()


async def test_a_log_whose_name_is_refused_leaves_the_record_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The log directory's path is so long (4,000 characters) that the file of the
    longest call ids would pass the system's limit: no wait would store such a log.
    The call's outcome is stored at once all the same, its log marked cut, and the
    reason logged as an error; a call with a shorter id keeps its log."""
    directory = long_directory(tmp_path, 4000)
    settings = load_settings(data_dir=str(tmp_path / "data"), log_url=f"file://{directory}")
    store = await open_datastore(settings)
    try:
        longest = await queued_call(store, "o" * 128)
        short = await queued_call(store)
        assert await asyncio.wait_for(store.record_outcome(longest, OUTCOME, 1, "w1"), 5)
        assert await asyncio.wait_for(store.record_outcome(short, OUTCOME, 1, "w1"), 5)
        record = await store.get_call(longest.id)
        assert record is not None and (record.status, record.attempts) == (CallStatus.SUCCESS, 1)
        assert record.response_body == b"ok" and record.log_truncated
        assert await store.get_log(longest.id) is None
        record = await store.get_call(short.id)
        assert record is not None and not record.log_truncated
        assert await store.get_log(short.id) == OUTCOME.log
    finally:
        await store.close()
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.name == "fnq.datastore.logs"
    assert error.getMessage().startswith(
        f"the log of call {longest.id} cannot be stored in {directory}: "
        "[Errno 36] File name too long: "
    )
    assert error.getMessage().endswith("; the call's record is stored without it")

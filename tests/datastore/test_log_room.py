"""FN_LOG_URL=file:// on a full file system: a call's outcome waits for its log to
find room, then both are stored, the log first (datastore.logroom). A caller that
stops waiting does not withdraw them; close and a command's patience give them up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.domain import Call, CallStatus, Outcome, Response, new_call_id
from config.settings import Settings, load_settings
from datastore import logroom
from datastore.base import Datastore, open_datastore
from datastore.errors import StoreUnavailable
from tests.rig import fill_space, small_tmpfs

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


async def queued_call(store: Datastore) -> Call:
    call = Call(new_call_id(), "app", "fn", b"body")
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
    with pytest.raises(StoreUnavailable, match="the datastore closed while it waited for room"):
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
        with pytest.raises(StoreUnavailable, match=r"no room for 0\.3 s, the write was given up"):
            await store.record_outcome(call, OUTCOME, 1, "cli")
        assert 0.3 <= time.monotonic() - started < 3
    finally:
        await store.close()

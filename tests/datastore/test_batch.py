"""Group commit logic against a fake backend (no database)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from datastore.batch import Failed, GroupCommit
from datastore.errors import StoreClosed, StoreUnavailable


class FakeBackend:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.outages_left = 0
        self.gate: asyncio.Event | None = None

    async def run_batch(self, ops: list[int]) -> list[object]:
        if self.gate is not None:
            await self.gate.wait()
        if self.outages_left:
            self.outages_left -= 1
            raise ConnectionRefusedError("database down")
        if -1 in ops:
            raise ValueError("a bug in a write")
        self.batches.append(list(ops))
        return [Failed(KeyError(op)) if op == 13 else op * 2 for op in ops]


def outage(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError)


@pytest.fixture
async def writer() -> GroupCommit[int]:
    backend = FakeBackend()
    gc: GroupCommit[int] = GroupCommit(
        "fake", backend.run_batch, outage, max_batch=50, backoff_initial_s=0.001
    )
    gc.backend = backend  # type: ignore[attr-defined]
    gc.start()
    yield gc  # type: ignore[misc]
    await gc.close(1.0)


async def test_concurrent_submits_share_batches(writer: GroupCommit[int]) -> None:
    results = await asyncio.gather(*(writer.submit(i) for i in range(100, 300)))
    assert results == [i * 2 for i in range(100, 300)]
    sizes = [len(b) for b in writer.backend.batches]  # type: ignore[attr-defined]
    assert sum(sizes) == 200 and max(sizes) <= 50 and len(sizes) < 200
    assert (writer.batches, writer.ops) == (len(sizes), 200)


async def test_one_failed_write_fails_only_its_caller(writer: GroupCommit[int]) -> None:
    results = await asyncio.gather(
        *(writer.submit(i) for i in (12, 13, 14)), return_exceptions=True
    )
    assert results[0] == 24 and results[2] == 28
    assert isinstance(results[1], KeyError)


async def test_a_batch_that_raises_fails_its_callers_but_not_the_writer(
    writer: GroupCommit[int],
) -> None:
    with pytest.raises(ValueError, match="a bug"):
        await writer.submit(-1)
    assert await writer.submit(5) == 10


async def test_outage_retries_with_backoff_and_logs_once(
    writer: GroupCommit[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fnq.datastore.batch")
    writer.backend.outages_left = 6  # type: ignore[attr-defined]
    results = await asyncio.gather(*(writer.submit(i) for i in range(10)))
    assert results == [i * 2 for i in range(10)]
    assert writer.backend.outages_left == 0  # type: ignore[attr-defined]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "unavailable" in messages[0] and "back after" in messages[1]
    assert "(ConnectionRefusedError: database down)" in messages[0]
    assert not writer.in_outage


async def test_an_outage_error_without_text_is_named_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A timeout's own text is empty: the log names it, with no dangling colon."""
    caplog.set_level(logging.WARNING, logger="fnq.datastore.batch")
    tries = [TimeoutError()]

    async def run_batch(ops: list[int]) -> list[object]:
        if tries:
            raise tries.pop()
        return list(ops)

    gc: GroupCommit[int] = GroupCommit(
        "fake", run_batch, lambda exc: isinstance(exc, TimeoutError), backoff_initial_s=0.001
    )
    gc.start()
    try:
        assert await gc.submit(7) == 7
    finally:
        await gc.close(1.0)
    first = caplog.records[0].getMessage()
    assert "(TimeoutError); writes wait and retry" in first, first


async def test_close_flushes_then_refuses(writer: GroupCommit[int]) -> None:
    pending = [asyncio.ensure_future(writer.submit(i)) for i in range(20, 50)]
    await asyncio.sleep(0)
    await writer.close(1.0)
    assert [p.result() for p in pending] == [i * 2 for i in range(20, 50)]
    with pytest.raises(StoreClosed):
        await writer.submit(1)


async def test_close_gives_up_after_its_timeout(writer: GroupCommit[int]) -> None:
    writer.backend.gate = asyncio.Event()  # type: ignore[attr-defined]  # the database hangs
    pending = [asyncio.ensure_future(writer.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    await writer.close(0.05)
    for p in pending:
        with pytest.raises(StoreUnavailable):
            await p


async def test_cancelled_caller_does_not_break_the_batch(writer: GroupCommit[int]) -> None:
    writer.backend.gate = asyncio.Event()  # type: ignore[attr-defined]
    first = asyncio.ensure_future(writer.submit(1))
    second = asyncio.ensure_future(writer.submit(2))
    await asyncio.sleep(0)
    first.cancel()
    writer.backend.gate.set()  # type: ignore[attr-defined]
    assert await second == 4
    assert first.cancelled()


class RoomForFour(FakeBackend):
    """A disk with room for batches of four writes at most, until ``room`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.room = asyncio.Event()
        self.tries: list[int] = []

    async def run_batch(self, ops: list[int]) -> list[object]:
        self.tries.append(len(ops))
        if len(ops) > 4 and not self.room.is_set():
            raise OSError(28, "disk full")
        return await super().run_batch(ops)


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == 28


async def test_a_batch_the_disk_has_no_room_for_goes_in_parts_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = RoomForFour()
    gc: GroupCommit[int] = GroupCommit("fake", backend.run_batch, lambda e: isinstance(e, OSError),
                                       splits_on=disk_full, backoff_initial_s=0.001)  # fmt: skip
    caplog.set_level(logging.WARNING, logger="fnq.datastore.batch")
    gc.start()
    try:
        results = await asyncio.gather(*(gc.submit(i) for i in range(100, 120)))
    finally:
        await gc.close(1.0)
    assert results == [i * 2 for i in range(100, 120)]
    assert [op for batch in backend.batches for op in batch] == list(range(100, 120))
    assert max(len(batch) for batch in backend.batches) <= 4
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "back" in messages[1], messages  # once each, not per part


async def test_a_part_given_up_gives_up_the_rest_of_its_batch() -> None:
    backend = RoomForFour()
    backend.outages_left = 10**6  # nothing fits once split: the database is down too
    gc: GroupCommit[int] = GroupCommit("fake", backend.run_batch, lambda e: isinstance(e, OSError),
                                       splits_on=disk_full, backoff_initial_s=0.001)  # fmt: skip
    gc.give_up_after_s = 0.05
    gc.start()
    try:
        results = await asyncio.gather(*(gc.submit(i) for i in range(8)), return_exceptions=True)
    finally:
        await gc.close(1.0)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert backend.tries[:2] == [8, 4]  # halved once, then the first half given up

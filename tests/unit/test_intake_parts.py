"""The worker's prefetch places and batched acks (on the real SQLite queue)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from config.domain import Call, new_call_id
from config.settings import load_settings
from mq.base import Message, MessageQueue, open_queue
from worker.acks import AckBatcher
from worker.places import Places


async def test_places_take_what_is_free_up_to_the_ask() -> None:
    places = Places(4)
    assert await places.take(3) == 3
    assert await places.take(3) == 1
    waiter = asyncio.create_task(places.take(3))
    await asyncio.sleep(0)
    assert not waiter.done()
    places.give(2)
    assert await asyncio.wait_for(waiter, 1) == 2
    places.give(10)  # never more than the total
    assert places.free == 4


async def test_a_cancelled_take_takes_nothing() -> None:
    places = Places(1)
    await places.take(1)
    waiter = asyncio.create_task(places.take(1))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    places.give()
    assert places.free == 1


class CountingQueue:
    """The real queue, with its ack_many round trips counted (and slowed a little)."""

    def __init__(self, inner: MessageQueue) -> None:
        self.inner = inner
        self.batches: list[int] = []

    async def ack_many(self, msgs: Sequence[Message]) -> None:
        self.batches.append(len(msgs))
        await asyncio.sleep(0.01)
        await self.inner.ack_many(msgs)


class FailingAcks(CountingQueue):
    async def ack_many(self, msgs: Sequence[Message]) -> None:
        self.batches.append(len(msgs))
        raise RuntimeError("queue down")


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[MessageQueue]:
    settings = load_settings(data_dir=str(tmp_path))
    q = open_queue(f"sqlite:///{tmp_path / 'mq.db'}", settings)
    try:
        yield q
    finally:
        await q.close()


async def test_acks_that_arrive_together_share_round_trips(queue: MessageQueue) -> None:
    await queue.push_many([Call(new_call_id(), "a", "f", b"") for _ in range(20)])
    msgs = await queue.reserve_many(20, 1.0)
    assert len(msgs) == 20
    counting = CountingQueue(queue)
    acks = AckBatcher(counting, linger_s=0)  # type: ignore[arg-type]
    first = asyncio.create_task(acks.ack(msgs[0]))
    await asyncio.sleep(0.002)
    assert counting.batches == [1]  # the first went at once (no linger)
    await asyncio.gather(first, *(acks.ack(m) for m in msgs[1:]))
    assert counting.batches == [1, 19]  # the others waited for it and went together
    assert acks.round_trips == 2
    stats = await queue.stats()
    assert (stats.ready, stats.reserved) == (0, 0)


async def test_an_ack_failure_reaches_every_waiting_caller(queue: MessageQueue) -> None:
    await queue.push_many([Call(new_call_id(), "a", "f", b"") for _ in range(3)])
    msgs = await queue.reserve_many(3, 1.0)
    acks = AckBatcher(FailingAcks(queue))  # type: ignore[arg-type]
    results = await asyncio.gather(*(acks.ack(m) for m in msgs), return_exceptions=True)
    assert [str(r) for r in results] == ["queue down"] * 3
    assert (await queue.stats()).reserved == 3  # nothing was acked


async def _two_acks_first_cancelled(
    queue: MessageQueue, through: CountingQueue
) -> list[asyncio.Task[None]]:
    """Two reserved messages acked through ``through``; the first caller is cancelled."""
    await queue.push_many([Call(new_call_id(), "a", "f", b"") for _ in range(2)])
    held = await queue.reserve_many(2, 1.0)
    acks = AckBatcher(through, linger_s=0.05)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(acks.ack(m)) for m in held]
    await asyncio.sleep(0)
    waiting[0].cancel()
    await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 2.0)
    assert waiting[0].cancelled()
    return waiting


async def test_an_ack_goes_out_when_its_caller_is_cancelled(queue: MessageQueue) -> None:
    counting = CountingQueue(queue)
    waiting = await _two_acks_first_cancelled(queue, counting)
    assert waiting[1].result() is None
    assert counting.batches == [2]  # the cancelled caller's ack went with the other
    assert (await queue.stats()).reserved == 0


async def test_a_failed_ack_nobody_waits_for_is_logged(
    queue: MessageQueue, caplog: pytest.LogCaptureFixture
) -> None:
    waiting = await _two_acks_first_cancelled(queue, FailingAcks(queue))
    assert str(waiting[1].exception()) == "queue down"  # the caller still waiting has it
    assert "1 ack(s) failed" in caplog.text and "queue down" in caplog.text
    assert (await queue.stats()).reserved == 2


async def test_a_reserve_carries_the_acks_waiting_for_it(queue: MessageQueue) -> None:
    await queue.push_many([Call(new_call_id(), "a", "f", b"") for _ in range(4)])
    held = await queue.reserve_many(3, 1.0)
    counting = CountingQueue(queue)
    acks = AckBatcher(counting, linger_s=10.0)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(acks.ack(m)) for m in held]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in waiting)  # lingering for a reserve
    batch = acks.take()
    assert [m.call.id for m, _ in batch] == [m.call.id for m in held]
    more = await queue.reserve_many(
        3, 1.0, ack=[m for m, _ in batch], on_acked=lambda: acks.carried_by_reserve(batch)
    )
    await asyncio.wait_for(asyncio.gather(*waiting), 1.0)
    assert (counting.batches, acks.carried) == ([], 3)  # no round trip of their own
    assert len(more) == 1 and (await queue.stats()).reserved == 1
    # A reserve that goes on waiting for messages lets its acks' callers go first.
    last = asyncio.create_task(acks.ack(more[0]))
    await asyncio.sleep(0.01)
    batch = acks.take()
    reserve = asyncio.create_task(
        queue.reserve_many(3, 10.0, ack=[more[0]], on_acked=lambda: acks.carried_by_reserve(batch))
    )
    await asyncio.wait_for(last, 2.0)
    assert not reserve.done()
    reserve.cancel()
    await asyncio.gather(reserve, return_exceptions=True)


async def test_acks_no_reserve_takes_go_alone_after_the_linger(queue: MessageQueue) -> None:
    await queue.push_many([Call(new_call_id(), "a", "f", b"") for _ in range(2)])
    held = await queue.reserve_many(2, 1.0)
    counting = CountingQueue(queue)
    acks = AckBatcher(counting, linger_s=0.05)  # type: ignore[arg-type]
    t0 = asyncio.get_running_loop().time()
    await asyncio.wait_for(asyncio.gather(*(acks.ack(m) for m in held)), 2.0)
    assert asyncio.get_running_loop().time() - t0 >= 0.05
    assert counting.batches == [2]
    assert (await queue.stats()).reserved == 0


async def test_acks_of_a_failed_reserve_are_sent_alone(queue: MessageQueue) -> None:
    await queue.push_many([Call(new_call_id(), "a", "f", b"")])
    held = await queue.reserve_many(1, 1.0)
    counting = CountingQueue(queue)
    acks = AckBatcher(counting, linger_s=0.05)  # type: ignore[arg-type]
    waiting = asyncio.create_task(acks.ack(held[0]))
    await asyncio.sleep(0)
    batch = acks.take()  # a reserve takes it, then fails:
    acks.give_back(batch)
    await asyncio.wait_for(waiting, 2.0)
    assert (counting.batches, acks.carried) == ([1], 0)
    assert (await queue.stats()).reserved == 0


async def test_take_can_wait_a_moment_for_more_places() -> None:
    places = Places(2)
    assert await places.take(2) == 2
    places.give()
    waiter = asyncio.create_task(places.take(2, gather_s=1.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # one is free, it waits for the second
    places.give()
    assert await asyncio.wait_for(waiter, 1) == 2
    places.give()
    t0 = asyncio.get_running_loop().time()
    assert await places.take(2, gather_s=0.02) == 1  # the second never came
    assert asyncio.get_running_loop().time() - t0 >= 0.02

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
    acks = AckBatcher(counting)  # type: ignore[arg-type]
    first = asyncio.create_task(acks.ack(msgs[0]))
    await asyncio.sleep(0.002)
    assert counting.batches == [1]  # the first went at once, with no added delay
    await asyncio.gather(first, *(acks.ack(m) for m in msgs[1:]))
    assert counting.batches == [1, 19]  # the others waited for it and went together
    assert acks.round_trips == 2
    stats = await queue.stats()
    assert (stats.ready, stats.reserved) == (0, 0)


async def test_an_ack_failure_reaches_every_waiting_caller(queue: MessageQueue) -> None:
    class Failing(CountingQueue):
        async def ack_many(self, msgs: Sequence[Message]) -> None:
            raise RuntimeError("queue down")

    await queue.push_many([Call(new_call_id(), "a", "f", b"") for _ in range(3)])
    msgs = await queue.reserve_many(3, 1.0)
    acks = AckBatcher(Failing(queue))  # type: ignore[arg-type]
    results = await asyncio.gather(*(acks.ack(m) for m in msgs), return_exceptions=True)
    assert [str(r) for r in results] == ["queue down"] * 3
    assert (await queue.stats()).reserved == 3  # nothing was acked

"""The reservation heartbeat and a reservation the queue says is gone.

A reservation that lapsed and was given to another consumer, or that a Redis
server restarted without its data no longer has, never comes back: the
heartbeat stops extending it, with one warning, while it goes on extending the
others. Real SQLite queue.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from config.domain import Call, new_call_id
from config.settings import load_settings
from mq.base import Message, MessageQueue, open_queue
from worker.delivery import Delivery
from worker.reservations import heartbeat


class Counted:
    """The real queue; counts the extends of each call."""

    def __init__(self, inner: MessageQueue) -> None:
        self.inner = inner
        self.extends: dict[str, int] = {}

    async def extend(self, msg: Message) -> None:
        self.extends[msg.call.id] = self.extends.get(msg.call.id, 0) + 1
        await self.inner.extend(msg)


async def test_a_reservation_that_is_gone_is_not_extended_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(data_dir=tmp_path, mq_reservation_msecs=1000)
    queue = open_queue(f"sqlite:///{tmp_path / 'mq.db'}", settings)
    try:
        await queue.push_many([Call(new_call_id(), "a", "f"), Call(new_call_id(), "a", "f")])
        kept, lost = await queue.reserve_many(2, 5.0)
        await queue.ack(lost)  # as if another consumer had ended it: its reservation is gone
        counted = Counted(queue)
        held = {m.call.id: Delivery(counted, m) for m in (kept, lost)}  # type: ignore[arg-type]
        caplog.set_level(logging.DEBUG, logger="fnq.worker")
        beat = asyncio.create_task(heartbeat(settings, held))
        try:
            async with asyncio.timeout(10):
                while counted.extends.get(kept.call.id, 0) < 4:
                    await asyncio.sleep(0.05)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
        assert counted.extends[lost.call.id] == 1
        warned = [r for r in caplog.records if lost.call.id in r.getMessage()]
        assert len(warned) == 1 and "is gone" in warned[0].getMessage(), warned
        assert not [r for r in caplog.records if kept.call.id in r.getMessage()]
    finally:
        await queue.close()

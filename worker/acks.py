"""Acks of many calls in few queue round trips.

A call's ack is sent at once when no other ack is on its way; acks that
arrive meanwhile wait for that round trip to end and then go together in one
``ack_many``. An idle worker therefore acks with no added delay, and a busy
one sends one request per batch instead of one per call.
"""

from __future__ import annotations

import asyncio
import logging

from mq.base import Message, MessageQueue

log = logging.getLogger("fnq.worker")

ACK_TIMEOUT_S = 30.0
MAX_BATCH = 256


class AckBatcher:
    def __init__(self, queue: MessageQueue) -> None:
        self.queue = queue
        self._pending: list[tuple[Message, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0

    async def ack(self, msg: Message) -> None:
        """Ack ``msg``; returns once the queue has it (or raises what the queue raised)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((msg, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="fnq-acks")
        # The ack goes out even if this caller is cancelled: the record is final.
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(_consume)
            raise

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            error: BaseException | None = None
            try:
                async with asyncio.timeout(ACK_TIMEOUT_S):
                    await self.queue.ack_many([msg for msg, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                error = exc
            self.round_trips += 1
            for _, done in batch:
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)


def _consume(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.warning("an ack failed (the message returns when its reservation lapses, "
                    "and its final record settles it): %s", done.exception())  # fmt: skip

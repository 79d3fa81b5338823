"""Acks of many calls in few queue round trips.

A finished call's ack waits a moment (``linger_s``) for the intake's next
reserve, which carries it to the queue in the same round trip
(``reserve_many(ack=...)``, taken with :meth:`AckBatcher.take`). When no
reserve comes by then, the batcher sends what is waiting in one ``ack_many``;
acks that arrive while that is on its way go together in the next one. A
busy worker therefore spends no round trip of its own on acks, and an idle
one acks ``linger_s`` after the call's final record is stored.
"""

from __future__ import annotations

import asyncio
import logging

from mq.base import Message, MessageQueue
from mq.errors import QueueUnavailable

log = logging.getLogger("fnq.worker")

ACK_TIMEOUT_S = 30.0
ACK_LINGER_S = 0.005
MAX_BATCH = 256

Pending = tuple[Message, asyncio.Future[None]]


class AckBatcher:
    def __init__(self, queue: MessageQueue, linger_s: float = ACK_LINGER_S) -> None:
        self.queue = queue
        self.linger_s = linger_s
        self._pending: list[Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0  # ack_many requests of its own
        self.carried = 0  # acks that went with a reserve

    async def ack(self, msg: Message) -> None:
        """Ack ``msg``; returns once the queue has it (or raises what the queue raised)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((msg, done))
        self._start_flusher()
        # A cancelled caller cancels only its wait, not the ack (the record is final):
        # the message stays in the batch, and _settle reports a failure nobody awaits.
        await done

    def take(self) -> list[Pending]:
        """Waiting acks for a reserve to carry; hand them to :meth:`carried_by_reserve` or
        :meth:`give_back` once it is over."""
        batch = self._pending[:MAX_BATCH]
        del self._pending[:MAX_BATCH]
        return batch

    def carried_by_reserve(self, batch: list[Pending]) -> None:
        """The reserve that carried ``batch`` succeeded: those messages are acked."""
        self.carried += len(batch)
        _settle(batch, None)

    def give_back(self, batch: list[Pending]) -> None:
        """The reserve failed or was cancelled: send them on their own (acking twice
        is harmless)."""
        if batch:
            self._pending[:0] = batch
            self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="fnq-acks")

    async def _flush(self) -> None:
        if self.linger_s > 0:
            await asyncio.sleep(self.linger_s)  # the intake's next reserve may take them
        while self._pending:
            batch = self.take()
            error: BaseException | None = None
            try:
                async with asyncio.timeout(ACK_TIMEOUT_S):
                    await self.queue.ack_many([msg for msg, _ in batch])
            except TimeoutError:
                error = QueueUnavailable(f"acking took longer than {ACK_TIMEOUT_S:g} s")
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                error = exc
            self.round_trips += 1
            _settle(batch, error)


def _settle(batch: list[Pending], error: BaseException | None) -> None:
    unawaited = 0
    for _, done in batch:
        if done.done():  # its caller was cancelled
            unawaited += 1
        elif error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
    if error is not None and unawaited:
        log.warning("%d ack(s) failed (each message returns when its reservation lapses, "
                    "and its final record settles it): %s", unawaited, error)  # fmt: skip

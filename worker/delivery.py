"""One message and the queue it came from: how the worker ends each delivery.

Native queues end a delivery with ``ack`` or ``dead_letter``. A queue that
reports results back to its producer (the RQ bridge, ``mq.rq``) has
``complete(msg, outcome)`` instead, which both settles the message and hands
the outcome to the producer's own API; that difference lives here only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, cast

from config.domain import Outcome
from config.errors import FnqError, reason_of
from mq.base import Message, MessageQueue
from worker.acks import AckBatcher

HAND_BACK_TIMEOUT_S = 5.0


class CompletingQueue(Protocol):
    async def complete(self, msg: Message, outcome: Outcome) -> None: ...


def completer(queue: MessageQueue) -> CompletingQueue | None:
    """``queue`` if it settles deliveries with ``complete`` (an attribute lookup: a
    runtime-checked Protocol would inspect the whole class on every call)."""
    return cast(CompletingQueue, queue) if callable(getattr(queue, "complete", None)) else None


@dataclass(frozen=True, slots=True)
class Delivery:
    queue: MessageQueue
    msg: Message
    acks: AckBatcher | None = None  # plain acks go through it, batched with others

    @property
    def call_id(self) -> str:
        return self.msg.call.id

    async def settle(self, outcome: Outcome, *, dead_letter: bool) -> None:
        """The call has its final record: take the message off the queue for good."""
        completing = completer(self.queue)
        if completing is not None:
            await completing.complete(self.msg, outcome)
        elif dead_letter:
            await self.queue.dead_letter(self.msg, outcome.error or outcome.status.value)
        elif self.acks is not None:
            await self.acks.ack(self.msg)
        else:
            await self.queue.ack(self.msg)

    async def release(self, delay_s: float) -> None:
        await self.queue.release(self.msg, delay_s)

    async def extend(self) -> None:
        await self.queue.extend(self.msg)

    async def hand_back(self) -> str | None:
        """Release the message at once, best effort: None if it went back, else why not
        (then it returns when its reservation lapses)."""
        try:
            await asyncio.wait_for(self.queue.release(self.msg, 0.0), HAND_BACK_TIMEOUT_S)
        except (FnqError, TimeoutError) as exc:
            return reason_of(exc, HAND_BACK_TIMEOUT_S)
        return None

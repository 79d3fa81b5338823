"""The queue seam: messages, the MessageQueue protocol, and ``open_queue``.

Delivery is at least once. A consumer ``reserve``s messages; each stays
invisible to other consumers until it is acked, released, dead-lettered, or
its reservation lapses (``settings.mq_reservation_msecs`` without an
``extend``). A lapsed message is delivered again with ``deliveries + 1``; once
it has been delivered ``settings.mq_max_deliveries`` times and lapses again it
moves to the dead letters. ``release`` hands a message back without charging
a delivery. Malformed messages never reach the caller of ``reserve``: they go
to the dead letters with the reason. The calls a consumer's own reserves
bury so are reported to it once, by ``take_buried``.

Ordering: priority 2 before 1 before 0, first in first out within a priority.

Backends are picked by URL scheme and imported only when used:
``sqlite:///PATH`` (mq.sqlite) and ``redis://`` / ``rediss://`` / ``unix://``
(mq.redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from config.domain import CALL_ID_RE, Call, utcnow
from config.errors import ConfigError, QueueError
from config.settings import Settings, mask_url

__all__ = ["Buried", "DeadLetter", "Message", "MessageQueue", "QueueStats", "open_queue"]

MAX_BURIED = 1000  # burials a queue object keeps for ``take_buried``; the oldest go first


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery of a call to one consumer."""

    call: Call  # call.id is the message id; call.priority is the queue it came from
    deliveries: int  # 1 on first delivery, +1 each time a reservation lapsed
    receipt: str  # this reservation; ack/release/extend/dead_letter use it
    priority: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that will not be delivered again unless requeued."""

    id: str  # the call id, or "inbox-<entry>" when the message had none
    reason: str
    deliveries: int
    died_at: datetime
    raw: bytes  # the message as stored (JSON), for inspection
    call: Call | None  # None when the message is malformed


# The reason of a message buried for too many deliveries, the only spelling of it: a
# format that SQLite's printf() (mq.sqlite_db), Lua's string.format (reserve.lua, which
# is passed it) and lapsed_reason fill alike.
LAPSED_REASON = "delivered %d time(s); the reservation lapsed each time"


def lapsed_reason(deliveries: int) -> str:
    return LAPSED_REASON % deliveries


@dataclass(frozen=True, slots=True)
class Buried:
    """A call whose message the queue itself buried, so that its record can end too."""

    call_id: str
    reason: str
    died_at: datetime  # this host's wall clock
    # this process's time.monotonic() then: the worker reads the burial's time from
    # the datastore's clock with it (datastore.clock), as the records' times are
    at_s: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int  # visible now (or waiting to be routed)
    delayed: int  # waiting for their time (delays and delayed releases)
    reserved: int  # held by consumers
    dead: int


@runtime_checkable
class MessageQueue(Protocol):
    """What producers and workers use. Every method may raise QueueError."""

    async def push(
        self, call: Call, *, delay_s: float | None = None, priority: int | None = None
    ) -> str:
        """Queue a call; ``delay_s``/``priority`` default to ``call.delay_s``/``call.priority``.

        Returns ``call.id``. Pushing an id that is still queued, delayed or reserved
        does nothing (one message per id).
        """
        ...

    async def push_new(
        self, call: Call, *, delay_s: float | None = None, priority: int | None = None
    ) -> bool:
        """``push``, reporting whether it queued a message.

        True: this call is now the queue's message for ``call.id``. False: a message
        with that id was already queued, delayed or reserved, and this push changed
        nothing (that message, with its own body, is the one that runs). See
        docs/queue.md for what a backend can see at push time.
        """
        ...

    async def push_many(self, calls: Sequence[Call]) -> list[str]:
        """Queue several calls (each with its own delay and priority) in one round trip."""
        ...

    async def reserve(self, timeout_s: float) -> Message | None:
        """The next message, waiting up to ``timeout_s``; None when none came."""
        ...

    async def reserve_many(
        self,
        max_count: int,
        timeout_s: float,
        *,
        ack: Sequence[Message] = (),
        on_acked: Callable[[], None] | None = None,
    ) -> list[Message]:
        """Up to ``max_count`` messages; waits only while there are none, and not
        once it has buried a call (it returns none then: see ``take_buried``).

        ``ack``: messages to ack first, in the same round trip where the backend
        can (a busy worker's acks ride on its next reserve). ``on_acked`` is
        called once they are, before any wait for new messages. If it was not
        called when this returns or raises, whether they were acked is unknown
        (acking again is harmless).
        """
        ...

    async def ack(self, msg: Message) -> None:
        """Done with it: remove the message (idempotent)."""
        ...

    async def ack_many(self, msgs: Sequence[Message]) -> None:
        """``ack`` for several messages in one round trip."""
        ...

    async def release(self, msg: Message, delay_s: float = 0.0) -> None:
        """Hand it back (after ``delay_s``) without counting a delivery.

        A no-op when the reservation was already lost.
        """
        ...

    async def extend(self, msg: Message) -> None:
        """Restart the reservation clock; ReservationLost if another consumer has it."""
        ...

    async def dead_letter(self, msg: Message, reason: str) -> None:
        """Move the message to the dead letters with ``reason``."""
        ...

    def take_buried(self) -> list[Buried]:
        """The calls this object's reserves buried since the last take (too many
        deliveries, or malformed for this consumer), oldest first; each is reported
        once, to the consumer that buried it. Messages without a valid call id are
        not reported."""
        ...

    async def dead_list(self, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        ...

    async def dead_among(self, ids: Sequence[str]) -> list[str]:
        """The ids of ``ids`` that name a dead letter, in their order."""
        ...

    async def dead_requeue(self, ids: Sequence[str] | None = None) -> int:
        """Queue dead letters again (all when ``ids`` is None) with fresh delivery counts."""
        ...

    async def dead_purge(self, ids: Sequence[str] | None = None) -> int:
        """Delete dead letters (all when ``ids`` is None)."""
        ...

    async def stats(self) -> QueueStats: ...

    async def close(self) -> None: ...


# URL schemes of a Redis server: TCP, TLS, and a unix socket on this host.
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})


def open_queue(url: str, settings: Settings, *, create: bool = True) -> MessageQueue:
    """The queue named by ``url``; nothing is connected until first use.

    A SQLite file that does not exist is created at first use, unless ``create``
    is false (commands that only read): then that use raises QueueError.
    """
    scheme = url.partition("://")[0].lower()
    if scheme == "sqlite":
        from mq.sqlite import SqliteQueue  # noqa: PLC0415 - backends load lazily

        return SqliteQueue.from_url(url, settings, create=create)
    if scheme in REDIS_SCHEMES:
        from mq.redis import RedisQueue  # noqa: PLC0415 - backends load lazily

        return RedisQueue.from_url(url, settings)
    raise ConfigError(
        f"unsupported queue URL {mask_url(url)!r}: use sqlite:///PATH, redis://HOST:PORT/DB"
        " or unix:///SOCKET?db=DB"
    )


# ----------------------------------------------------------- shared helpers


class Burials:
    """The ``take_buried`` list of one queue object, bounded: a queue nobody takes
    from must not grow without end."""

    def __init__(self, limit: int = MAX_BURIED) -> None:
        self._items: deque[Buried] = deque(maxlen=limit)
        self.made = 0  # burials noted so far: a reserve that made one does not wait

    def add(self, call_id: str, reason: str) -> None:
        """Note a burial; ignored unless ``call_id`` is a valid call id."""
        if CALL_ID_RE.fullmatch(call_id):
            self._items.append(Buried(call_id, reason, utcnow()))
            self.made += 1

    def take(self) -> list[Buried]:
        items = list(self._items)
        self._items.clear()
        return items


async def claim_shielded(
    claim: Coroutine[Any, Any, list[Message]],
    hand_back: Callable[[list[Message]], Awaitable[None]],
    timeout_s: float,
) -> list[Message]:
    """Run a claiming step that must not be torn in half by cancellation.

    If the caller is cancelled while the backend is handing out messages, the
    step still finishes and its messages go straight back (no delivery charged)
    instead of waiting for their reservation to lapse.
    """
    task = asyncio.ensure_future(claim)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            # On failure the messages simply lapse and come back later.
            with contextlib.suppress(QueueError, TimeoutError):
                async with asyncio.timeout(timeout_s):
                    msgs = await task
                    if msgs:
                        await hand_back(msgs)
        finally:
            if not task.done():
                task.cancel()
        raise

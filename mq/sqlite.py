"""The embedded queue: one SQLite file (``sqlite:///PATH``), safe for several processes.

sqlite3 blocks, so every queue object owns one thread that holds its
connection; coroutines hand it work and await the result. WAL lets readers
run beside the single writer; writers wait up to ``busy_timeout_ms`` for each
other, and every write is one short ``BEGIN IMMEDIATE`` transaction.

When the queue is empty, ``reserve`` waits by polling ``PRAGMA data_version``
(which changes when another connection commits, and costs no lock) at an
interval that grows from 5 ms to 100 ms, and wakes at once for pushes made
through the same queue object or when a delayed message or a reservation
falls due. Durability: WAL with ``synchronous=NORMAL`` survives process
crashes; a power cut may lose the last transactions.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from config.domain import Call
from config.errors import ConfigError
from config.settings import Settings, sqlite_path
from config.sqlite import full_disk_note
from mq import wire
from mq.base import Burials, Buried, DeadLetter, Message, QueueStats, claim_shielded
from mq.errors import InvalidCall, QueueError, QueueUnavailable, ReservationLost
from mq.sqlite_db import SqliteDb, now_ms

T = TypeVar("T")

POLL_MIN_S = 0.005
POLL_MAX_S = 0.1


class SqliteQueue:
    """MessageQueue on a SQLite file."""

    def __init__(
        self,
        path: Path,
        settings: Settings,
        *,
        busy_timeout_ms: int = 10_000,
        create: bool = True,
    ) -> None:
        self._db = SqliteDb(
            path,
            create=create,
            reservation_ms=settings.mq_reservation_msecs,
            max_deliveries=settings.mq_max_deliveries,
            max_body_bytes=settings.max_request_size,
            busy_timeout_ms=busy_timeout_ms,
        )
        # A blocked writer gives up after busy_timeout; allow that plus slack.
        self._op_timeout_s = busy_timeout_ms / 1000 + 5.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fnq-mq-sqlite")
        self._pushed = asyncio.Event()
        self._closed = False
        self._buried = Burials()

    @classmethod
    def from_url(cls, url: str, settings: Settings, *, create: bool = True) -> SqliteQueue:
        try:
            path = sqlite_path(url, "queue URL")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(path, settings, create=create)

    @property
    def path(self) -> Path:
        return self._db.path

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise QueueError("the queue is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._op_timeout_s):
                return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except TimeoutError:
            msg = f"{self._db.path}: no answer in {self._op_timeout_s:.0f}s"
            raise QueueUnavailable(msg) from None
        except sqlite3.OperationalError as exc:
            note = full_disk_note(self._db.path, exc)
            raise QueueUnavailable(f"{self._db.path}: {exc}{note}") from exc
        except sqlite3.Error as exc:
            raise QueueError(f"{self._db.path}: {exc}") from exc

    # ------------------------------------------------------------- produce
    async def push(
        self, call: Call, *, delay_s: float | None = None, priority: int | None = None
    ) -> str:
        await self.push_new(call, delay_s=delay_s, priority=priority)
        return call.id

    async def push_new(
        self, call: Call, *, delay_s: float | None = None, priority: int | None = None
    ) -> bool:
        prio = call.priority if priority is None else priority
        delay = call.delay_s if delay_s is None else delay_s
        return await self._push([(call, prio, delay)]) == 1

    async def push_many(self, calls: Sequence[Call]) -> list[str]:
        await self._push([(c, c.priority, c.delay_s) for c in calls])
        return [c.id for c in calls]

    async def _push(self, items: list[tuple[Call, int, float]]) -> int:
        """Queue ``items``; returns how many were new (the others' ids were queued)."""
        for call, prio, delay in items:
            try:
                wire.check_call(call, prio, delay, self._db.max_body_bytes)
            except wire.WireError as exc:
                raise InvalidCall(f"call {call.id}: {exc}") from None
        if not items:
            return 0
        queued = await self._run(self._db.push, items)
        self._pushed.set()
        return queued

    # ------------------------------------------------------------- consume
    async def reserve(self, timeout_s: float) -> Message | None:
        msgs = await self.reserve_many(1, timeout_s)
        return msgs[0] if msgs else None

    async def reserve_many(
        self,
        max_count: int,
        timeout_s: float,
        *,
        ack: Sequence[Message] = (),
        on_acked: Callable[[], None] | None = None,
    ) -> list[Message]:
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        if ack:
            await self.ack_many(ack)
            if on_acked is not None:
                on_acked()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        made = self._buried.made
        while True:
            self._pushed.clear()
            msgs, next_due_ms, version = await self._claim(max_count)
            if msgs or self._buried.made != made:  # burials are told without waiting
                return msgs
            if not await self._wait_for_change(version, next_due_ms, deadline):
                return []

    async def _claim(self, count: int) -> tuple[list[Message], int | None, int]:
        box: list[tuple[int | None, int]] = []

        async def claim() -> list[Message]:
            msgs, next_due, version, buried = await self._run(self._db.reserve, count)
            for call_id, reason in buried:
                self._buried.add(call_id, reason)
            box.append((next_due, version))
            return msgs

        msgs = await claim_shielded(claim(), self._hand_back, self._op_timeout_s)
        next_due, version = box[0]
        return msgs, next_due, version

    def take_buried(self) -> list[Buried]:
        return self._buried.take()

    async def _hand_back(self, msgs: list[Message]) -> None:
        await self._run(self._db.release, msgs, 0.0)

    async def _wait_for_change(
        self, version: int, next_due_ms: int | None, deadline: float
    ) -> bool:
        """Sleep until something may be reservable; False when the deadline passed first."""
        loop = asyncio.get_running_loop()
        interval = POLL_MIN_S
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            nap = min(interval, remaining)
            if next_due_ms is not None:
                nap = min(nap, max((next_due_ms - now_ms()) / 1000, 0.0))
            if nap > 0 and await _wait_event(self._pushed, nap):
                return True
            if next_due_ms is not None and now_ms() >= next_due_ms:
                return True
            if await self._run(self._db.data_version) != version:
                return True
            interval = min(interval * 2, POLL_MAX_S)

    async def ack(self, msg: Message) -> None:
        await self._run(self._db.ack, [msg])

    async def ack_many(self, msgs: Sequence[Message]) -> None:
        if msgs:
            await self._run(self._db.ack, list(msgs))

    async def release(self, msg: Message, delay_s: float = 0.0) -> None:
        await self._run(self._db.release, [msg], wire.check_delay(delay_s))
        # Also for a delay: a reserve waiting in this process must learn when the
        # message comes due (its own writes do not change the data version it polls).
        self._pushed.set()

    async def extend(self, msg: Message) -> None:
        if not await self._run(self._db.extend, msg):
            raise ReservationLost(f"message {msg.call.id}: reservation {msg.receipt} is gone")

    async def dead_letter(self, msg: Message, reason: str) -> None:
        await self._run(self._db.dead_letter, msg, reason)

    # --------------------------------------------------------- dead letters
    async def dead_list(self, limit: int = 100) -> list[DeadLetter]:
        return await self._run(self._db.dead_list, limit)

    async def dead_among(self, ids: Sequence[str]) -> list[str]:
        return await self._run(self._db.dead_among, list(ids)) if ids else []

    async def dead_requeue(self, ids: Sequence[str] | None = None) -> int:
        if ids is not None and not ids:
            return 0
        count = await self._run(self._db.dead_requeue, None if ids is None else list(ids))
        self._pushed.set()
        return count

    async def dead_purge(self, ids: Sequence[str] | None = None) -> int:
        if ids is not None and not ids:
            return 0
        return await self._run(self._db.dead_purge, None if ids is None else list(ids))

    async def stats(self) -> QueueStats:
        return await self._run(self._db.stats)

    async def close(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._op_timeout_s):
                await loop.run_in_executor(self._pool, self._db.close)
        finally:
            self._closed = True
            self._pool.shutdown(wait=False)


async def _wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True

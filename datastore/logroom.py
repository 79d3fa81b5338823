"""Call logs that wait for room in their log store (``FN_LOG_URL=file:///DIR``).

A call's log is written before its record, and the record waits for it
(datastore.common). A log that finds no room (LogStoreFull: no space or inode
left, a disk quota) is tried again with exponential backoff, as the batches
retry (datastore.batch: 50 ms doubling to 5 s), until it lands: as during a
datastore outage, a worker keeps the outcome of a call it ran, and does not
run the call again. The spell is logged once when a log first finds no room,
and once when logs are written again (a log lands and none waits any more).

With ``give_up_after_s`` set (a command of the CLI, which has a user waiting),
a log that has waited that long fails with StoreUnavailable instead. ``close``
ends every wait at once with StoreUnavailable. Any other failure of the log
store goes up at once.

A log and the record after it run as one task (``keep``): a caller cancelled
while they wait (a worker that stops a call whose outcome waits for room)
does not withdraw them, as it does not withdraw a write the batches have
taken; they go on until the datastore closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from datastore.base import LogStore
from datastore.batch import BACKOFF_INITIAL_S, BACKOFF_MAX_S
from datastore.errors import LogStoreFull, StoreUnavailable

log = logging.getLogger("fnq.datastore.logs")

T = TypeVar("T")


class PatientLogs:
    """Writes the logs of ``store``, each waiting for room as long as it takes."""

    def __init__(self, store: LogStore) -> None:
        self.store = store
        self.give_up_after_s: float | None = None  # None: a log waits as long as it takes
        self.retries = 0  # writes tried again, for tests
        self._backoff_initial_s = BACKOFF_INITIAL_S
        self._backoff_max_s = BACKOFF_MAX_S
        self._closed = asyncio.Event()
        self._waiting = 0  # logs waiting for room now
        self._full_since: float | None = None  # the spell without room, logged as begun
        self._waited = 0  # logs that have waited in that spell
        self._kept: set[asyncio.Future[Any]] = set()  # see keep

    async def put_log(self, call_id: str, data: bytes) -> None:
        """Write the log; if it finds no room, wait for some (see the module)."""
        try:
            await self.store.put_log(call_id, data)
        except LogStoreFull as exc:
            await self._wait_for_room(call_id, data, exc)
        if self._full_since is not None and not self._waiting:
            log.warning("call logs are written again after %.1f s without room (%d log(s) "
                        "waited)", time.monotonic() - self._full_since, self._waited)  # fmt: skip
            self._full_since = None

    async def _wait_for_room(self, call_id: str, data: bytes, exc: LogStoreFull) -> None:
        started = time.monotonic()
        if self._full_since is None:
            self._full_since, self._waited = started, 0
            log.warning("no room for call logs (%s); they wait and retry, and the records "
                        "of their calls after them", exc)  # fmt: skip
        self._waiting += 1
        self._waited += 1
        delay_s = self._backoff_initial_s
        try:
            while True:
                pause_s = delay_s
                if self.give_up_after_s is not None:
                    waited_s = time.monotonic() - started
                    if waited_s >= self.give_up_after_s:
                        raise StoreUnavailable(
                            f"{exc}; no room for {waited_s:.1f} s, the write was given up"
                        )
                    pause_s = min(pause_s, self.give_up_after_s - waited_s)
                if await self._closing(pause_s):
                    raise StoreUnavailable(f"{exc}; the datastore closed while it waited for room")
                self.retries += 1
                try:
                    await self.store.put_log(call_id, data)
                except LogStoreFull as again:
                    exc = again
                else:
                    return
                delay_s = min(delay_s * 2, self._backoff_max_s)
        finally:
            self._waiting -= 1

    async def _closing(self, pause_s: float) -> bool:
        """Wait ``pause_s``; whether ``close`` was called (the wait ends then)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause_s):
                await self._closed.wait()
        return self._closed.is_set()

    async def keep(self, write: Coroutine[Any, Any, T]) -> T:
        """What ``write`` (a log, then its record) returns; a caller cancelled meanwhile
        does not cancel it: it runs on until it is done, or given up at ``close``."""
        task = asyncio.ensure_future(write)
        self._kept.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._kept.discard(task)
        if not task.cancelled() and task.exception() is not None:  # seen by its caller, if any
            log.debug("a call's log and record were not written: %s", task.exception())

    def close(self) -> None:
        """End every wait for room, each with StoreUnavailable."""
        if self._waiting:
            log.warning("the datastore closes with %d call log(s) still waiting for room: "
                        "they are given up, and their calls' records with them",
                        self._waiting)  # fmt: skip
        self._closed.set()

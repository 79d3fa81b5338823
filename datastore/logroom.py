"""Call logs that wait until their log store can take them (``FN_LOG_URL=file:///DIR``).

A call's log is written before its record, and the record waits for it
(datastore.recording). A log the store cannot take for now (LogStoreDown: no
room, a read-only file system, no permission, an I/O error, its directory
missing) is tried again with exponential backoff, as the batches retry
(datastore.batch: 50 ms doubling to 5 s), until it lands: as during a
datastore outage, a worker keeps the outcome of a call it ran, and does not
run the call again. Such a spell is logged once as a log first fails, with the
reason; once more for each other reason that turns up while it lasts (a disk
that fills up, then goes read-only); and once when logs are written again (a
log lands and none waits any more).

With ``give_up_after_s`` set (a command of the CLI, which has a user waiting),
a log that has waited that long fails with StoreUnavailable instead. ``close``
ends every wait at once with StoreUnavailable. Any other failure of the log
store (LogRefused: a log it will never take) goes up at once.

A log and the record after it run as one task (``keep``): a caller cancelled
while they wait (a worker that stops a call whose outcome waits for its log)
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
from datastore.errors import LogStoreDown, LogStoreFull, StoreUnavailable

log = logging.getLogger("fnq.datastore.logs")

T = TypeVar("T")


class PatientLogs:
    """Writes the logs of ``store``, each waiting as long as it takes for the store
    to take it."""

    def __init__(self, store: LogStore) -> None:
        self.store = store
        self.give_up_after_s: float | None = None  # None: a log waits as long as it takes
        self.retries = 0  # writes tried again, for tests
        self._backoff_initial_s = BACKOFF_INITIAL_S
        self._backoff_max_s = BACKOFF_MAX_S
        self._closed = asyncio.Event()
        self._waiting = 0  # logs waiting now
        self._down_since: float | None = None  # the spell of failures, logged as begun
        self._waited = 0  # logs that have waited in that spell
        self._reasons: set[tuple[type[LogStoreDown], int | None]] = set()  # said in it
        self._kept: set[asyncio.Future[Any]] = set()  # see keep

    async def put_log(self, call_id: str, data: bytes) -> None:
        """Write the log; if the store cannot take it, wait until it can (see the module)."""
        try:
            await self.store.put_log(call_id, data)
        except LogStoreDown as exc:
            await self._wait(call_id, data, exc)
        if self._down_since is not None and not self._waiting:
            log.warning("call logs are written again after %.1f s (%d log(s) waited)",
                        time.monotonic() - self._down_since, self._waited)  # fmt: skip
            self._down_since = None

    async def _wait(self, call_id: str, data: bytes, exc: LogStoreDown) -> None:
        started = time.monotonic()
        if self._down_since is None:
            self._down_since, self._waited = started, 0
            self._reasons.clear()
        self._say(exc)
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
                            f"{exc}; still failing after {waited_s:.1f} s, the write was given up"
                        )
                    pause_s = min(pause_s, self.give_up_after_s - waited_s)
                if await self._closing(pause_s):
                    raise StoreUnavailable(f"{exc}; the datastore closed while the log waited")
                self.retries += 1
                try:
                    await self.store.put_log(call_id, data)
                except LogStoreDown as again:
                    exc = again
                    self._say(exc)
                else:
                    return
                delay_s = min(delay_s * 2, self._backoff_max_s)
        finally:
            self._waiting -= 1

    def _say(self, exc: LogStoreDown) -> None:
        """Log why ``exc`` failed, unless the spell has said so already (the same kind
        of failure, with the same error of the system)."""
        cause = exc.__cause__
        reason = (type(exc), cause.errno if isinstance(cause, OSError) else None)
        if reason in self._reasons:
            return
        self._reasons.add(reason)
        if len(self._reasons) > 1:
            log.warning("call logs still wait, now for another reason (%s)", exc)
        elif isinstance(exc, LogStoreFull):
            log.warning("no room for call logs (%s); they wait and retry, and the records "
                        "of their calls after them", exc)  # fmt: skip
        else:
            log.warning("call logs cannot be written (%s); they wait and retry, and the "
                        "records of their calls after them", exc)  # fmt: skip

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
        """End every wait, each with StoreUnavailable."""
        if self._waiting:
            log.warning("the datastore closes with %d call log(s) still waiting to be "
                        "written: they are given up, and their calls' records with them",
                        self._waiting)  # fmt: skip
        self._closed.set()

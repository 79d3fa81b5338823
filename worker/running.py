"""The `running` mark of a call, written only if the call lasts.

A call that ends within FN_RUNNING_MARK_MSECS goes from `queued` to its final
state in one write: the `running` record of a call that short would be
overwritten a moment later, and writing it costs a commit per call. A call
that lasts longer is recorded `running` (attempt n, this worker, its start)
at that point, while it runs. Either way the outcome write comes after, and
when a mark was written the outcome waits for it.

What this leaves out, for calls shorter than the delay only: a crash of the
worker during the call leaves the record `queued` without counting that
attempt (the queue still counts the delivery, and bounds them).
"""

from __future__ import annotations

import asyncio
import logging

from config.domain import Call
from datastore.base import CallRecord, Datastore

log = logging.getLogger("fnq.worker")


class RunningMark:
    """Writes ``call``'s `running` record after ``delay_s`` (at once when 0)."""

    def __init__(self, store: Datastore, call: Call, worker_id: str, delay_s: float) -> None:
        self._store = store
        self._call = call
        self._worker_id = worker_id
        self._write: asyncio.Future[CallRecord] | None = None
        self._timer: asyncio.TimerHandle | None = None
        if delay_s <= 0:
            self._start()
        else:
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._start)

    def _start(self) -> None:
        self._timer = None
        self._write = asyncio.ensure_future(
            self._store.record_running(self._call, 0, self._worker_id)
        )
        self._write.add_done_callback(_quiet)  # seen even when nobody waits for it any more

    async def written(self) -> CallRecord | None:
        """The `running` record once it is stored; None if it was never due (and now never
        will be). Raises what the write raised."""
        self.cancel()
        if self._write is None:
            return None
        return await asyncio.shield(self._write)

    def cancel(self) -> None:
        """Forget a mark that is not due yet (a write under way goes on)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _quiet(done: asyncio.Future[CallRecord]) -> None:
    """Retrieve the result of a write nobody waits for any more (it is logged if it failed)."""
    if not done.cancelled() and done.exception() is not None:
        log.warning("recording a call as running failed: %s", done.exception())

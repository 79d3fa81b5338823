"""A call whose record says that another worker runs it.

A message can be delivered to this worker while another one still runs its call:
that worker's reservation lapsed (the queue was out of its reach for longer than
FN_MQ_RESERVATION_MSECS, say) and the queue gave the message to the next
reserve. Running the call here too would run it twice, and handing it back
unrun (no container free in time) would move the other worker's `running`
record back to `queued` while it runs. So the call is left to that worker
(worker.calls puts the new delivery off, its record untouched) while:

- the record is `running` on another worker,
- that worker is alive: its heartbeat (worker.upkeep) is at most
  ``ALIVE_WITHIN`` (worker.liveness) old, as ``fnq status`` counts live workers, and, when it
  ran on this host in this pid namespace (its heartbeat says which), its
  process still runs (a worker killed with SIGKILL leaves a fresh heartbeat
  behind), and
- its attempt may still be under way: the function's timeout, plus
  ``RUNNING_SLACK_S``, has not passed since the record was marked. A record
  still `running` after that is not being ended by that worker (it handed the
  call back and could not put the record back, say).

Otherwise (a worker that died, or stopped) the call runs here, as any call
delivered again does. Every time compared here (a heartbeat's, a record's
mark, now) is the datastore's (datastore.clock): the workers' own clocks may
be minutes apart.

Only a record `running` on another worker costs a read of the live workers,
shared by the calls that need it at once and kept for ``LIVE_TTL_S``.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from config.domain import CallStatus, Function, process_gone
from datastore.base import CallRecord, Datastore
from datastore.errors import StoreUnavailable
from worker.liveness import ALIVE_WITHIN

RUNNING_SLACK_S = 5.0  # past the function's timeout: the outcome's write
LIVE_TTL_S = 2.0  # the live workers are read again after this long
LIVE_READ_TIMEOUT_S = 5.0


class Elsewhere:
    """Tells whether another live worker may be running a call (see the module)."""

    def __init__(self, store: Datastore, worker_id: str) -> None:
        self._store = store
        self._worker_id = worker_id
        self._live: asyncio.Future[dict[str, str]] | None = None
        self._live_at = 0.0

    async def runs(self, record: CallRecord, fn: Function) -> str | None:
        """The id of the live worker that may still be running ``record``'s attempt,
        else None. Raises StoreUnavailable if the live workers cannot be read."""
        other = record.worker_id
        if record.status is not CallStatus.RUNNING or other is None or other == self._worker_id:
            return None
        marked = record.started_at or record.updated_at
        if self._store.clock.now() - marked > timedelta(seconds=fn.timeout_s + RUNNING_SLACK_S):
            return None
        live = await self._live_workers()
        if other not in live or process_gone(other, live[other]):
            return None  # (killed on this host: its heartbeat is not yet stale)
        return other

    async def _live_workers(self) -> dict[str, str]:
        """The live workers' ids, each with its pid namespace ("" if not told)."""
        now = asyncio.get_running_loop().time()
        live = self._live
        if live is None or (live.done() and now - self._live_at >= LIVE_TTL_S):
            live = self._live = asyncio.ensure_future(self._read())
            self._live_at = now
            live.add_done_callback(self._forget_failed)
        # shield: a call cancelled while it waits must not cancel the others' read
        return await asyncio.shield(live)

    async def _read(self) -> dict[str, str]:
        try:
            async with asyncio.timeout(LIVE_READ_TIMEOUT_S):
                workers = await self._store.list_workers(ALIVE_WITHIN)
        except TimeoutError:
            raise StoreUnavailable(
                f"the live workers could not be read within {LIVE_READ_TIMEOUT_S:g} s"
            ) from None
        return {w.id: str(w.info.get("pidns") or "") for w in workers}

    def _forget_failed(self, live: asyncio.Future[dict[str, str]]) -> None:
        """A failed read is not kept: the next call that asks reads again."""
        if (live.cancelled() or live.exception() is not None) and self._live is live:
            self._live = None

"""One datastore read for the records of the calls of one reserve.

Before a call runs, its record is read (is it final already: a duplicate
delivery, a call cancelled while queued?). The intake starts a
:class:`RecordRead` for all the calls a reserve brought, right before their
tasks: one ``get_calls`` instead of one read per call. With SQLite the read
is done before the call tasks first run (a read on the event loop itself), so
it puts no extra turn of the loop on their way to a container. A failed read
fails each call's lookup with the same error, which the call handles as its
own read failing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from datastore.base import CallRecord, Datastore


class RecordRead:
    def __init__(self, store: Datastore, call_ids: Sequence[str]) -> None:
        self._task = asyncio.create_task(_read(store, call_ids), name="fnq-record-read")
        self._task.add_done_callback(_retrieved)

    async def get(self, call_id: str) -> CallRecord | None:
        """The record of ``call_id`` (None if it has none); raises what the read raised."""
        task = self._task
        # shield: a call cancelled while it waits must not cancel the others' read
        found = task.result() if task.done() else await asyncio.shield(task)
        return found.get(call_id)


async def _read(store: Datastore, call_ids: Sequence[str]) -> dict[str, CallRecord]:
    if len(call_ids) == 1:  # a point read is the cheaper query
        record = await store.get_call(call_ids[0])
        return {} if record is None else {record.id: record}
    return await store.get_calls(call_ids)


def _retrieved(task: asyncio.Task[dict[str, CallRecord]]) -> None:
    """Mark a failure as seen: each call that asks gets it (and logs what it does)."""
    if not task.cancelled():
        task.exception()

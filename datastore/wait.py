"""Waiting for calls to end (``fnq calls wait``, ``fnq call --wait``, or Python)::

    store = await open_datastore(load_settings())
    waited = await wait_for_calls(store, [call_id], timeout_s=60)
    record = waited.records.get(call_id)  # None: no record yet

The datastore is read again and again, more and more slowly (from
``FIRST_POLL_S`` up to ``MAX_POLL_S``), and only for the calls not yet ended.
A call queued some other way than with ``fnq call`` (redis-cli, Python, RQ)
has no record until a worker takes it: its id is waited for like any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from config.domain import CallStatus
from datastore.base import CallRecord, Datastore
from datastore.errors import StoreUnavailable

FIRST_POLL_S = 0.05
MAX_POLL_S = 1.0
POLL_GROWTH = 1.5
READ_TIMEOUT_S = 30.0  # one read of the records, at most
MIN_READ_S = 1.0  # a read at the deadline may take this long


@dataclass
class Waited:
    """Where each call stands when the wait is over, in the order the ids were given."""

    ids: Sequence[str]
    records: dict[str, CallRecord] = field(default_factory=dict)  # the last read of each

    @property
    def pending(self) -> list[str]:
        """The ids that have not ended (no record yet, or `queued` / `running`)."""
        return [i for i in self.ids if i not in self.records or not self.records[i].is_final]

    @property
    def all_succeeded(self) -> bool:
        return not self.pending and all(
            self.records[i].status is CallStatus.SUCCESS for i in self.ids
        )


async def wait_for_calls(
    store: Datastore,
    call_ids: Sequence[str],
    timeout_s: float | None,
    on_end: Callable[[CallRecord], None] | None = None,
) -> Waited:
    """Read the calls' records until each has ended or ``timeout_s`` has passed
    (None: no limit); ``on_end`` is called once per call, as it is seen to end."""
    ids = list(dict.fromkeys(call_ids))  # each once, in the order given
    waited = Waited(ids)
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    pause = FIRST_POLL_S
    while True:
        pending = waited.pending
        read_s = READ_TIMEOUT_S
        if deadline is not None:  # the last read too gets a moment
            read_s = min(READ_TIMEOUT_S, max(MIN_READ_S, deadline - loop.time()))
        try:
            async with asyncio.timeout(read_s):
                found = await store.get_calls(pending)
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                return waited  # the wait ran out during the read
            raise StoreUnavailable(
                f"reading the call records took longer than {READ_TIMEOUT_S:g} s"
            ) from None
        for call_id, record in found.items():
            waited.records[call_id] = record
            if record.is_final and on_end is not None:
                on_end(record)
        if not waited.pending:
            return waited
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                return waited
            pause = min(pause, left)
        await asyncio.sleep(pause)
        pause = min(MAX_POLL_S, pause * POLL_GROWTH)

"""worker.reads: the records of a reserve's calls are read once for all of them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from config.domain import CallStatus, new_call_id, utcnow
from config.errors import StoreError
from datastore.base import CallRecord
from worker.reads import RecordRead


class CountingStore:
    """Only what RecordRead uses (``get_call``, ``get_calls``), counted, from a dict."""

    def __init__(self, records: dict[str, CallRecord]) -> None:
        self.records = records
        self.reads: list[list[str]] = []
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def get_call(self, call_id: str) -> CallRecord | None:
        return (await self.get_calls([call_id])).get(call_id)

    async def get_calls(self, call_ids: Sequence[str]) -> dict[str, CallRecord]:
        self.reads.append(list(call_ids))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return {i: self.records[i] for i in call_ids if i in self.records}


def _record(call_id: str) -> CallRecord:
    now = utcnow()
    return CallRecord(call_id, "app", "fn", CallStatus.SUCCESS, now, now, attempts=1)


def _read(store: CountingStore, ids: list[str]) -> RecordRead:
    return RecordRead(store, ids)  # type: ignore[arg-type]  # a duck of the Datastore


async def test_the_calls_of_a_reserve_are_read_at_once() -> None:
    known = new_call_id()
    store = CountingStore({known: _record(known)})
    ids = [new_call_id(), known, new_call_id()]
    read = _read(store, ids)
    found = await asyncio.gather(*(read.get(i) for i in ids))
    assert store.reads == [ids]
    assert [r is not None and r.id for r in found] == [False, known, False]
    assert await read.get(known) is found[1]  # asked again: no second read
    assert len(store.reads) == 1


async def test_a_failed_read_fails_each_lookup() -> None:
    store = CountingStore({})
    store.error = StoreError("the datastore is down")
    ids = [new_call_id() for _ in range(3)]
    read = _read(store, ids)
    results = await asyncio.gather(*(read.get(i) for i in ids), return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results) and len(store.reads) == 1


async def test_a_cancelled_lookup_leaves_the_others_their_answer() -> None:
    known, other = new_call_id(), new_call_id()
    store = CountingStore({known: _record(known)})
    store.gate = asyncio.Event()
    read = _read(store, [other, known])
    gone = asyncio.create_task(read.get(other))
    kept = asyncio.create_task(read.get(known))
    await asyncio.sleep(0.01)  # both wait; the read waits for the gate
    gone.cancel()
    store.gate.set()
    record = await asyncio.wait_for(kept, 5)
    assert record is not None and record.id == known
    with pytest.raises(asyncio.CancelledError):
        await gone

"""The records of calls the queue buried on its own.

A call whose message the queue buried (too many lapsed reservations, or
malformed for this worker) will not be delivered again: the intake
(worker.loop) hands the calls each reserve buried to ``record_buried``, in
the background, which ends a `queued` or `running` record as an error with
the queue's reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from config.domain import CallStatus
from config.errors import StoreError
from datastore.base import Datastore
from mq.base import Buried
from worker.logs import current_call
from worker.metrics import Metrics

log = logging.getLogger("fnq.worker")

BURIED_RECORD_S = 30.0  # ending the records of calls the queue buried takes at most


async def record_buried(store: Datastore, metrics: Metrics, buried: Sequence[Buried]) -> None:
    """End the records of calls the queue buried on its own (nothing runs them
    again). Best effort, within ``BURIED_RECORD_S``: failures are logged, once."""
    try:
        async with asyncio.timeout(BURIED_RECORD_S):
            results = await asyncio.gather(*(_end_buried(store, metrics, b) for b in buried))
        errors: list[StoreError] = [e for e in results if e is not None]
    except TimeoutError:  # some may have been recorded
        errors = [StoreError(f"no answer within {BURIED_RECORD_S:g} s")] * len(buried)
    if errors:
        log.warning("could not record %d call(s) buried by the queue as errors: %s",
                    len(errors), errors[0])  # fmt: skip


async def _end_buried(store: Datastore, metrics: Metrics, b: Buried) -> StoreError | None:
    current_call.set(b.call_id)  # its own task (gather): the line names the call
    try:
        if await store.end_buried(b.call_id, b.reason, store.clock.at(b.at_s)):
            log.info("call %s: the queue buried its message (%s); recorded as error",
                     b.call_id, b.reason)  # fmt: skip
            metrics.calls.ended(CallStatus.ERROR.value)
    except StoreError as exc:
        return exc
    return None

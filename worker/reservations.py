"""The reservation heartbeat: the reservations of the calls a worker holds, extended.

A call is held (``CallHandler.held``, worker.calls) while its task handles
it: from its delivery until its message is settled or handed back. One task
extends the reservations of all of them, so that the queue does not give a
call to another worker while it runs here or waits to be recorded. Calls the
queue could not be reached for are one warning per outage: the first round that
reaches none of them warns, the rounds after it log at debug level until one
reaches the queue again.

A reservation the queue says is gone (it lapsed while the queue was out of
reach, or a Redis server came back without its data) never comes back: the
call is handled on as before, but its delivery is not extended again, and the
warning comes once for it, not at every round while it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from config.errors import FnqError, reason_of
from config.settings import Settings
from mq.errors import QueueUnavailable, ReservationLost
from worker.delivery import Delivery

log = logging.getLogger("fnq.worker")

MAX_IDS_SHOWN = 5  # a log line about many calls names this many


async def heartbeat(settings: Settings, calls: Mapping[str, Delivery]) -> None:
    """Extend the reservation of every held call, three times per reservation period.

    ``calls``: the held calls by id (``CallHandler.held``). One task for all calls
    (cancelled when the worker stops); a call held at a tick is extended then,
    so its reservation never lapses while it runs.
    """
    every_s = settings.mq_reservation_msecs / 3000.0
    down = False  # the last round found the queue out of reach
    gone: dict[int, Delivery] = {}  # held deliveries whose reservation is lost, by id()
    while True:
        await asyncio.sleep(every_s)
        gone = {key: d for key, d in gone.items() if calls.get(d.call_id) is d}
        held = [d for d in calls.values() if id(d) not in gone]
        if not held:
            down = False
            continue
        results = await asyncio.gather(
            *(asyncio.wait_for(d.extend(), timeout=every_s) for d in held),
            return_exceptions=True,
        )
        unreached: list[str] = []  # the queue is down: one line for them all
        first: BaseException = TimeoutError()  # the first failure, for the line
        extended = False  # the queue answered for one of them, at least
        for d, result in zip(held, results, strict=True):
            extended = extended or result is None
            if result is None or calls.get(d.call_id) is not d:
                continue  # extended, or settled meanwhile (then losing it is expected)
            if isinstance(result, QueueUnavailable | TimeoutError):
                if not unreached:
                    first = result
                unreached.append(d.call_id)
            elif isinstance(result, FnqError):
                if isinstance(result, ReservationLost):
                    gone[id(d)] = d
                log.warning("could not extend the reservation of %s: %s", d.call_id, result)
            elif isinstance(result, BaseException):
                log.error("extending the reservation of %s failed: %r", d.call_id, result)
        if unreached:
            shown = ", ".join(unreached[:MAX_IDS_SHOWN])
            more = (
                f" and {len(unreached) - MAX_IDS_SHOWN} more"
                if len(unreached) > MAX_IDS_SHOWN
                else ""
            )
            log.log(logging.DEBUG if down else logging.WARNING,
                    "could not extend the reservations of %d call(s) (%s%s): %s",
                    len(unreached), shown, more, reason_of(first, every_s))  # fmt: skip
        down = bool(unreached) and not extended

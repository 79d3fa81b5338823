"""The `running` mark of a call, written only if the call lasts.

The mark is armed when the call reaches its function (a container's socket
takes its connection: ``reached``); a call that waits for a container stays
`queued`. A call that ends within FN_RUNNING_MARK_MSECS of that goes from
`queued` to its final state in one write: the `running` record of a call
that short would be overwritten a moment later, and writing it costs a
commit per call. A call that lasts longer is recorded `running` (attempt n,
this worker, its start) at that point, while it runs. Either way the outcome
write comes after, and when a mark was written the outcome waits for it.
(When the datastore could not be read, the mark is written at once, before
the call goes to the agent.)

What this leaves out, for calls shorter than the delay only: a crash of the
worker during the call leaves the record `queued` without counting that
attempt (the queue still counts the delivery, and bounds them).

A call that goes back to the queue unfinished has its record put back to
`queued` by ``withdraw`` first, only while it is still this worker's
(``record_retry(..., running_on=...)``): a call the worker stops while it
runs (a second stop request, or the grace period over), one that never
reached its function (the first stop request), and one whose handling
failed for a passing reason (worker.calls). Its ``attempts`` counts the
times the function ran: a call that reached its function keeps the attempt
the mark counted (a call stopped before its mark was due is marked then, so
that its run counts too); a call that never reached it (marked only if the
datastore could not be read at intake) has that attempt taken back.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from config.domain import Call, CallStatus, FailureKind, Outcome
from config.errors import FnqError
from datastore.base import CallRecord, Datastore

log = logging.getLogger("fnq.worker")

HANDED_BACK = Outcome(
    status=CallStatus.ERROR,
    error="the worker stopped before the call finished; it went back to the queue",
    failure=FailureKind.BUSY,
)
HANDED_BACK_UNSTARTED = Outcome(
    status=CallStatus.ERROR,
    error="the worker stopped before the call reached a container; it went back to the queue",
    failure=FailureKind.BUSY,
)


class RunningMark:
    """Writes ``call``'s `running` record ``delay_s`` after :meth:`arm` (at once when 0)."""

    def __init__(self, store: Datastore, call: Call, worker_id: str) -> None:
        self._store = store
        self._call = call
        self._worker_id = worker_id
        self._write: asyncio.Future[CallRecord] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed = False
        self._reached = False  # the call reached its function (see reached)
        self._over = False  # the agent has answered for the call (see finished)

    def arm(self, delay_s: float) -> None:
        """Start the count (once; later calls do nothing)."""
        if self._armed:
            return
        self._armed = True
        if delay_s <= 0:
            self._start()
        else:
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._start)

    def reached(self, delay_s: float) -> None:
        """The call has reached its function (it runs, and its run counts): arm the mark."""
        self._reached = True
        self.arm(delay_s)

    def finished(self, reached: bool) -> None:
        """The agent has answered for the call: its outcome carries the count from now on,
        so a hand-back makes no mark (one under way goes on). ``reached``: the outcome's
        word on whether the call reached its function; a connection the function's
        socket took but the function never accepted did not (its mark was armed)."""
        self._over = True
        self._reached = reached
        self.cancel()

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
        self._armed = True  # and never arm it after this
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def withdraw(
        self, timeout_s: float, why: Outcome = HANDED_BACK, retry_in_s: float = 0.0
    ) -> bool:
        """The call goes back to the queue unfinished: put its record back to `queued`
        if the mark made it `running`, with the attempt the mark counted if the call
        reached its function, without it if not; ``why`` gives the record its error,
        ``retry_in_s`` when it is tried again. A call stopped while it runs, its mark
        not due yet, is marked first: its run counts as any other.

        Best effort, within ``timeout_s``. The write is conditional (only while the
        call is still `running` here), so it may land late. False when the mark's own
        write had not finished by then: it may still land, so the message should not
        be handed back before its reservation lapses.
        """
        self.cancel()
        if self._reached and not self._over and self._write is None:
            self._start()
        write = self._write
        if write is None:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                record = await asyncio.shield(write)
                if record.status is CallStatus.RUNNING and record.worker_id == self._worker_id:
                    # The attempt the mark counted stays only if the call ran.
                    attempts = record.attempts if self._reached else record.attempts - 1
                    await self._store.record_retry(
                        self._call, why, attempts,
                        self._store.clock.now() + timedelta(seconds=retry_in_s),
                        running_on=self._worker_id,
                    )  # fmt: skip
        except TimeoutError:
            if not write.done():
                return False
            log.warning("the record of %s could not be put back to queued within %g s",
                        self._call.id, timeout_s)  # fmt: skip
        except FnqError as exc:  # the mark was never written, or putting it back failed
            log.warning("the record of %s could not be put back to queued: %s",
                        self._call.id, exc)  # fmt: skip
        return True


def _quiet(done: asyncio.Future[CallRecord]) -> None:
    """Retrieve the result of a write nobody waits for any more (it is logged if it failed)."""
    if not done.cancelled() and done.exception() is not None:
        log.warning("recording a call as running failed: %s", done.exception())
